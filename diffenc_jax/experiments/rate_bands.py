r"""Where a trained diffusion encoder's rate comes from, band by band in log-SNR.

    python -m diffenc_jax.experiments.rate_bands --workdir runs/mnist [--bands=8,6,4,2,0,-4,-15]

prints for the held-out split:
- the code: E‖z⁰‖², and the KL to N(0, I) of a Gaussian fitted to the aggregate of z⁰ (mean and
  full covariance), a lower bound on the aggregate's KL and so on the rate (a code equal to the
  prior has E‖z⁰‖² ≈ d and that KL ≈ 0); the same for the path rate's code z_q;
- per band [λ_hi, λ_lo] of log-SNR, the nats each estimate puts there:
  forward z⁰   the forward-noised estimate's integrand ½ E‖σ_λ z_λ − ε̂(z_λ, x)‖² integrated over
               the band, z_λ noised from the encoder's z⁰ (the diffusion_kl rate is the sum);
  forward z^K  the same from the E-step's z^K, the encoder's training targets;
  ε-MSE z⁰/z^K ½ ∫ E‖ε − ε̂‖² dλ over the band: the encoder's denoising error, on its own
               samples and on its training targets (for codes ~ N(0, I) and the prior's exact
               predictor it is ½ d ∫ α_λ² dλ);
  path         the path-KL rate's steps in the band (eval.rate_steps, eval.rate_spacing);
- the totals: the diffusion_kl and path_kl rates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained diffenc run.")
_BANDS = flags.DEFINE_list("bands", ["8", "7", "6", "4", "2", "0", "-4", "-15"],
                           "Band edges in log-SNR, decreasing, within the latent schedule.")
_DRAWS = flags.DEFINE_integer("draws", 16, "λ draws per band and example.")
_ZK = flags.DEFINE_bool("zk", True, "Also from the E-step's z^K (its chain: costly with a "
                        "diffusion decoder); without it the z^K columns repeat z⁰'s.")


def aggregate_kl(z: np.ndarray) -> float:
  """KL(N(m, C) ‖ N(0, I)) of the Gaussian fitted to the rows of z (N, d)."""
  m, c = z.mean(0), np.cov(z, rowvar=False)
  return float(0.5 * (np.trace(c) + m @ m - len(m) - np.linalg.slogdet(c)[1]))


def band_terms(method, params, x, key, edges, draws: int, with_zk: bool = True):
  """(forward from z⁰, forward from z^K, ε-MSE from z⁰, ε-MSE from z^K), each (bands, B)."""
  schedule = method.schedule
  k_lat, k_band = jax.random.split(key)
  lat = method.latents(params, x, k_lat, None if with_zk else 0)
  enc = params["encoder"]
  eps_fn = method.encoder_eps_fn(enc, method.encoder.apply(enc, x, method="features"))

  def one_band(k, hi, lo):
    ku, ke = jax.random.split(k)
    u = (jnp.arange(draws) + jax.random.uniform(ku, (draws,))) / draws  # stratified in λ
    lam = hi + (lo - hi) * u

    def at(lam_i, k_i, z0):
      t = jnp.full((x.shape[0],), schedule.t_of_log_snr(lam_i))
      alpha, sigma = schedule.alpha_sigma(t[0])
      eps = jax.random.normal(k_i, z0.shape)
      z_t = alpha * z0 + sigma * eps
      e_hat = eps_fn(z_t, t)
      return (jnp.sum(jnp.square(sigma * z_t - e_hat), -1),
              jnp.sum(jnp.square(eps - e_hat), -1))

    keys = jax.random.split(ke, draws)
    out = [jax.lax.map(lambda a, z=z: at(*a, z), (lam, keys)) for z in (lat["z0"], lat["zK"])]
    width = 0.5 * (hi - lo)
    return [width * jnp.mean(v, 0) for pair in out for v in pair]

  terms = [one_band(jax.random.fold_in(k_band, i), hi, lo)
           for i, (hi, lo) in enumerate(zip(edges[:-1], edges[1:]))]
  fwd0, mse0, fwdk, msek = (jnp.stack([t[j] for t in terms]) for j in range(4))
  return lat["z0"], fwd0, fwdk, mse0, msek


def main(argv):
  del argv
  from diffenc_jax import api, data, evaluate, path_rate
  model = api.Autoencoder.load(_WORKDIR.value)
  config, method, params = model.config, model.method, model.params
  images, labels = data.load_eval_split(config.data, "test")
  edges = [float(e) for e in _BANDS.value]
  key = jax.random.key(config.seed + 11)

  @jax.jit
  def batch(x, k):
    z0, fwd0, fwdk, mse0, msek = band_terms(method, params, x, k, edges, _DRAWS.value,
                                                    _ZK.value)
    enc = params["encoder"]
    eps_fn = method.encoder_eps_fn(enc, method.encoder.apply(enc, x, method="features"))
    path = path_rate.encoder_path(method, eps_fn, x, jax.random.fold_in(k, 1))
    lam = method.schedule.log_snr(path_rate.ancestral_times(
        method.schedule, path["per_step"].shape[0], config.eval.get("rate_spacing", "logsnr")))
    mid = 0.5 * (lam[:-1] + lam[1:])
    path_bands = jnp.stack([jnp.sum(jnp.where(((mid <= hi) & (mid > lo))[:, None],
                                              path["per_step"], 0.0), 0)
                            for hi, lo in zip(edges[:-1], edges[1:])])
    return (z0, path["code"], fwd0, fwdk, mse0, msek, path_bands, path["terminal"],
            path["rate"])

  outs = evaluate.in_batches(batch, images, config.eval.batch_size, key)
  cat = [np.concatenate([o[i] for o in outs], axis=-1 if i > 1 else 0) for i in range(9)]
  z0, code, fwd0, fwdk, mse0, msek, path_bands, terminal, rate = cat
  d = z0.shape[1]
  print(f"{_WORKDIR.value}: {config.method}, β = {config.bottleneck.beta:g}, step {model.step}, "
        f"{len(images)} held-out digits, d = {d}")
  print(f"E‖z⁰‖² = {np.mean(np.sum(z0**2, -1)):.2f} (N(0, I): {d}); aggregate of z⁰ against "
        f"N(0, I), Gaussian fit: {aggregate_kl(z0):.2f} nats")
  print(f"the path rate's code z_q (its sampler's last noisy state): E‖z_q‖² = "
        f"{np.mean(np.sum(code**2, -1)):.2f}, aggregate (Gaussian fit) {aggregate_kl(code):.2f} "
        f"nats")
  print("\n| band λ | forward z⁰ | forward z^K | ε-MSE z⁰ | ε-MSE z^K | path KL |")
  print("|---|---|---|---|---|---|")
  for i, (hi, lo) in enumerate(zip(edges[:-1], edges[1:])):
    print(f"| {hi:g} → {lo:g} | {fwd0[i].mean():.2f} | {fwdk[i].mean():.2f} | "
          f"{mse0[i].mean():.2f} | {msek[i].mean():.2f} | {path_bands[i].mean():.2f} |")
  print(f"| total | {fwd0.sum(0).mean():.2f} | {fwdk.sum(0).mean():.2f} | "
        f"{mse0.sum(0).mean():.2f} | {msek.sum(0).mean():.2f} | "
        f"{path_bands.sum(0).mean():.2f} |")
  print(f"\npath-KL rate {rate.mean():.2f} nats = path {rate.mean() - terminal.mean():.2f} + "
        f"terminal {terminal.mean():.2f}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
