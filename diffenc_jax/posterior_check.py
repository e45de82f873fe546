"""Held-out diagnostics of the E-step under a decoder: what z buys, and whether a chain follows
the posterior it targets (docs/method.md §4).

    info = z_information(decoder, dec_params, x, z, z_other, key, edges)   # per log-SNR bin
    ref = reference_chain(config, decoder, dec_params, x, z_init, key, h_at=z0)  # long chain
    figures = chain_check(config, method, params, images, key)             # one row of figures
    states = persistent_visits(config, method, params, images, key, [10, 40])  # frozen decoder

`z_information` splits the continuous-time ELBO of a diffusion decoder into bins of log-SNR λ:
in each bin, the nats per unit λ that the code z buys over another code z' (the code of another
example, or a prior draw), ½ E[‖ε − ε̂(x_λ, λ, z')‖² − ‖ε − ε̂(x_λ, λ, z)‖²], with its Monte-Carlo
standard error; its integral over λ is NLL(x|z') − NLL(x|z) on the ELBO. Beside it, per bin, the
signal and the noise of the E-step's gradient estimate: the norm of the bin's mean gradient
∫_bin E_ε ∇_z ½‖ε − ε̂‖² dλ and the standard deviation of a one-draw estimate of it. Their ratio
says where the E-step's signal lives and how many draws a bin needs.

`chain_check` scores codes on an estimate that no chain saw (the exact NLL for a gaussian decoder,
a many-draw ELBO for a diffusion decoder): the encoder's z⁰, the E-step's K-step chain from it, and
a long reference chain (`reference_chain`: Gauss-Newton-preconditioned Langevin with fresh draws
at every step), run from z⁰ and from a prior draw. Where the two reference chains agree they give
the posterior's typical NLL, and `coverage` is the share of the way from NLL(z⁰) to it that the
E-step's chain covers. `persistent_visits` runs the persistent chains of training on a frozen
decoder for a given number of visits, for `chain_check` to score: how far a chain gets in as
many visits as training gives it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffenc_jax import samplers, schedules

Array = jax.Array


def z_information(decoder, dec_params, x: Array, z: Array, z_other: Array, key: Array,
                  edges, draws_per_bin: int = 8) -> dict[str, Array]:
  """Per log-SNR bin, what the code z buys a diffusion decoder over z_other, and the E-step
  gradient's signal and noise there. x (B, ...), z and z_other (B, d); edges (n + 1,) increasing
  log-SNR bin edges within the decoder's schedule; `draws_per_bin` (λ, ε) draws per example and
  bin, λ stratified uniform in the bin, the same draws for z and z_other.

  Returns, each (n,) summed or averaged over the batch as said (`combine_bins` pools batches):
    gain_sum, gain_sq_sum: Σ over examples and draws of the per-draw gain per unit λ,
      ½(‖ε − ε̂(·, z_other)‖² − ‖ε − ε̂(·, z)‖²), and of its square;
    grad_mean_sq_sum: Σ over examples of ‖Δ · mean_m g_m‖², g_m = ∇_z ½‖ε_m − ε̂_m(z)‖², Δ the
      bin's width (the squared norm of the bin's gradient estimate from all its draws);
    grad_var_sum: Σ over examples of Δ² · the per-draw variance of g (unbiased, summed over d);
    count: examples × draws per bin.
  """
  edges = jnp.asarray(edges, x.dtype)
  n_bins, b = edges.shape[0] - 1, x.shape[0]
  sched = decoder.schedule

  def one_bin(args):
    lo, hi, k = args
    k_u, k_e = jax.random.split(k)
    u = (jax.random.uniform(k_u, (b, draws_per_bin)) + jnp.arange(draws_per_bin)) / draws_per_bin
    lam = lo + (hi - lo) * u  # (B, M)
    eps = jax.random.normal(k_e, (draws_per_bin,) + x.shape, x.dtype)  # (M, B, ...)

    def per_draw(lam_m, eps_m):
      alpha = jnp.sqrt(jax.nn.sigmoid(lam_m)).reshape((b,) + (1,) * (x.ndim - 1))
      sigma = jnp.sqrt(jax.nn.sigmoid(-lam_m)).reshape(alpha.shape)
      x_t, t = alpha * x + sigma * eps_m, sched.t_of_log_snr(lam_m)

      def half_sq(zz):
        res = eps_m - decoder.eps_fn(dec_params, zz)(x_t, t)
        return 0.5 * jnp.sum(jnp.square(res).reshape(b, -1), -1)

      loss_z, pull = jax.vjp(half_sq, z)
      return half_sq(z_other) - loss_z, pull(jnp.ones_like(loss_z))[0]

    gain, grad = jax.lax.map(lambda a: per_draw(*a), (lam.T, eps))  # (M, B), (M, B, d)
    width = hi - lo
    g_mean = jnp.mean(grad, 0)
    g_var = jnp.sum(jnp.square(grad - g_mean), (0, 2)) / max(draws_per_bin - 1, 1)
    return (jnp.sum(gain), jnp.sum(jnp.square(gain)),
            jnp.sum(jnp.square(width * g_mean)), jnp.sum(width**2 * g_var))

  keys = jax.random.split(key, n_bins)
  gain, gain_sq, g_mean_sq, g_var = jax.lax.map(one_bin, (edges[:-1], edges[1:], keys))
  return {"gain_sum": gain, "gain_sq_sum": gain_sq, "grad_mean_sq_sum": g_mean_sq,
          "grad_var_sum": g_var, "count": jnp.full((n_bins,), b * draws_per_bin, x.dtype)}


def combine_bins(parts: list[dict], edges, draws_per_bin: int) -> dict[str, np.ndarray]:
  """Pools `z_information` sums over batches into per-bin figures (each (n,)):
    gain_per_lambda, gain_se: the mean nats per unit λ that z buys, and its standard error;
    gain_nats: the bin's share of NLL(z_other) − NLL(z), gain_per_lambda × width;
    grad_signal: RMS over examples of the bin's gradient ∫_bin E ∇_z ½‖ε − ε̂‖² dλ (its
      estimate from draws_per_bin draws, debiased by the draws' variance);
    grad_noise_one_draw: RMS over examples of a one-draw estimate's noise of that integral;
    draws_needed: (noise / signal)², the draws at which the bin's gradient estimate has a
      signal-to-noise ratio of 1;
    grad_second_moment: signal² + noise², the mean square norm of a one-draw estimate of the
      bin's gradient (λ uniform in the bin): with `posterior.proposal_mass` q of a λ proposal,
      Σ_b grad_second_moment_b / q_b is the second moment of the E-step's one-draw estimate of
      the whole gradient, and q_b ∝ √grad_second_moment_b the best proposal constant on the
      bins."""
  tot = {k: np.sum([np.asarray(p[k], np.float64) for p in parts], 0) for k in parts[0]}
  edges = np.asarray(edges, np.float64)
  width = np.diff(edges)
  n = tot["count"]
  examples = n / draws_per_bin
  mean = tot["gain_sum"] / n
  var = np.maximum(tot["gain_sq_sum"] / n - mean**2, 0.0)
  noise_sq = tot["grad_var_sum"] / examples
  signal_sq = np.maximum(tot["grad_mean_sq_sum"] / examples - noise_sq / draws_per_bin, 0.0)
  return {"lambda_lo": edges[:-1], "lambda_hi": edges[1:], "gain_per_lambda": mean,
          "gain_se": np.sqrt(var / n), "gain_nats": mean * width,
          "grad_signal": np.sqrt(signal_sq), "grad_noise_one_draw": np.sqrt(noise_sq),
          "draws_needed": noise_sq / np.maximum(signal_sq, 1e-30),
          "grad_second_moment": signal_sq + noise_sq}


def reference_chain(config, decoder, dec_params, x: Array, z_init: Array, key: Array,
                    h_at: Array, *, num_steps: int = 200, draws: int = 8,
                    step_size: float = 0.05, beta: float | None = None) -> Array:
  """A long chain on π_β(z|x) ∝ N(z; 0, I) p_θ(x|z)^(1/β) from z_init (B, d): Langevin
  preconditioned by the decoder's Gauss-Newton precision H, computed once at h_at (B, d) (a
  constant preconditioner: the chain stays a valid sampler wherever it starts), with `draws`
  fresh (λ, ε) draws of the energy at every step (for a gaussian decoder the exact NLL).
  Returns z (B, d)."""
  beta = config.bottleneck.beta if beta is None else beta
  k_pre, k_chain = jax.random.split(key)
  h = jax.lax.stop_gradient(decoder.precision_fn(dec_params, x, k_pre, beta, 1.0,
                                                 estimator=config.em.langevin)(h_at))
  fresh = decoder.kind == "diffusion"

  def log_density(z, k=None):
    if fresh:
      nll = decoder.nll(dec_params, x, z, k, num_samples=draws)
    else:
      nll = decoder.nll(dec_params, x, z)
    return -nll / beta - 0.5 * jnp.sum(z**2, -1)

  z, _ = samplers.langevin_posterior(
      log_density, z_init, k_chain, num_steps=num_steps, step_size=step_size,
      step_rule="gauss_newton", precision_fn=lambda z: h, refresh_precision=False,
      mala=not fresh, fresh_draws=fresh)
  return z


def persistent_visits(config, method, params, images: np.ndarray, key: Array,
                      visits, batch_size: int | None = None) -> dict[int, np.ndarray]:
  """The E-step's persistent chains (em.chain_slots) on a frozen model: each image's chain
  starts at its z⁰ and is continued `max(visits)` times as training continues it at every visit
  (`method.latents` with resume, the `diagonal` curvature a running mean over visits,
  `chain.running_curvature`), but with the decoder held fixed. Returns {v: the chains' states
  (N, d) after v visits} for each v in visits, to score with `chain_check(z_chain=…)`: how many
  visits the chain needs to reach the posterior, apart from the decoder moving under it. The
  `diagonal` rule pools its curvature over a batch, so the states depend on batch_size
  (default eval.batch_size), as training's do on train.batch_size."""
  from diffenc_jax import chain
  from diffenc_jax.evaluate import in_batches
  visits = sorted({int(v) for v in visits})
  if not visits or visits[0] < 1:
    raise ValueError(f"visits must be >= 1, got {visits}")
  decay = config.em.curvature_decay

  @jax.jit
  def visit(x, z, curv, seen, k):
    lat = method.latents(params, x, k, resume=(z, seen, curv))
    return lat["zK"], chain.running_curvature(curv, lat["info"].grad_sq, decay)

  def batch(x, k):
    z = jnp.zeros((x.shape[0], method.latent_dim), x.dtype)
    curv, seen, out = jnp.zeros_like(z), jnp.zeros((x.shape[0],), bool), {}
    for v in range(1, visits[-1] + 1):
      z, curv = visit(x, z, curv, seen, jax.random.fold_in(k, v))
      seen = jnp.ones_like(seen)
      if v in visits:
        out[v] = z
    return out

  b = batch_size or config.eval.batch_size
  parts = in_batches(batch, images, b, key)
  return {v: np.concatenate([p[v] for p in parts]) for v in visits}


def chain_check(config, method, params, images: np.ndarray, key: Array, draws: int = 64,
                num_steps: int | None = None, batch_size: int | None = None,
                reference_steps: int = 0, reference_draws: int = 8,
                reference_step_size: float = 0.05,
                z_chain: np.ndarray | None = None,
                reference: tuple[float, float] | None = None) -> dict[str, float]:
  """Does the E-step's chain move the encoder's z⁰ towards the decoder's posterior?

  For each image: z⁰ from the encoder and z^K after the E-step's chain (em.langevin, its
  num_steps unless given, β = bottleneck.beta), then, under an estimate of the decoder's NLL
  that the chain did not see (exact for the gaussian decoder; for a diffusion decoder the ELBO
  bound with `draws` stratified draws, the same draws for every code):
    nll_z0, nll_zK   the mean NLL of z⁰ and of z^K (nats);
    nll_change       mean NLL(z^K) − NLL(z⁰): negative when the chain improves the code;
    share_better     the share of images whose z^K has the lower NLL;
    energy_change    the same for U(z) = NLL/β + ½‖z‖², the chain's target (prox term aside);
    gap              E‖z^K − z⁰‖² (the training metric);
    score_norm       E‖∇U(z⁰)‖, U under the same estimate;
    step_size        the chain's mean step.
  With reference_steps > 0, also `reference_chain`s of that length (reference_draws fresh draws
  per step, step reference_step_size) from z⁰ and from a prior draw, both preconditioned at z⁰:
    nll_ref, nll_ref_prior  their mean NLL (agreeing when the reference has mixed);
    coverage         (NLL(z^K) − NLL(z⁰)) / (NLL_ref − NLL(z⁰)), means over the images: the share
                     of the way to the posterior's typical NLL that the E-step's chain covers.
  reference (nll_ref, nll_ref_prior), optional: those figures from an earlier call on the same
  images, key and draws, to compute coverage against without running the reference chains again.
  z_chain (N, d), optional: the codes to score as z^K instead of running the E-step's chain
  from z⁰, e.g. a run's persistent chains for training images (`opt_state["chains"]`).
  Images go through in batches of `batch_size` (default: eval.batch_size, at most 4096 // draws).
  Methods without an E-step chain (em.DiffusionEncoder's `posterior_sample`) are refused."""
  from diffenc_jax.evaluate import in_batches
  if not hasattr(method, "posterior_sample"):
    raise ValueError(f"method {config.method!r} has no E-step chain to check")
  if draws < 1:
    raise ValueError(f"draws must be >= 1, got {draws}")
  if reference is not None and reference_steps:
    raise ValueError("give reference_steps or a precomputed reference, not both")
  beta = config.bottleneck.beta
  decoder = method.decoder

  def nll(dec_params, x, z):
    if decoder.kind == "diffusion":  # a fixed key: the same draws for every code and ∇U
      return decoder.nll(dec_params, x, z, jax.random.key(1), num_samples=draws)
    return decoder.nll(dec_params, x, z)

  @jax.jit
  def batch(params, x, key, z_given):
    lat = method.latents(params, x, key, 0 if z_given is not None else num_steps)
    k_ref, k_prior = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    z0, zk = lat["z0"], (lat["zK"] if z_given is None else z_given)
    # NLL(z⁰) and its gradient from one pass: ∇U = ∇NLL/β + z⁰
    n0, pullback = jax.vjp(lambda z: nll(params["decoder"], x, z), z0)
    grad = pullback(jnp.ones_like(n0))[0] / beta + z0
    nk = nll(params["decoder"], x, zk)
    step = (lat["info"].step_size if lat["info"] is not None and z_given is None
            else jnp.float32(0.0))
    out = {"nll_z0": n0, "nll_zK": nk, "nll_change": nk - n0,
           "share_better": (nk < n0).astype(jnp.float32),
           "energy_change": (nk - n0) / beta + 0.5 * jnp.sum(zk**2 - z0**2, -1),
           "gap": jnp.sum((zk - z0) ** 2, -1),
           "score_norm": jnp.sqrt(jnp.sum(grad**2, -1)),
           "step_size": jnp.broadcast_to(step, n0.shape)}
    if reference_steps:
      ref = lambda z_init, k: reference_chain(
          config, decoder, params["decoder"], x, z_init, k, z0, num_steps=reference_steps,
          draws=reference_draws, step_size=reference_step_size, beta=beta)
      out["nll_ref"] = nll(params["decoder"], x, ref(z0, k_ref))
      out["nll_ref_prior"] = nll(params["decoder"], x,
                                 ref(jax.random.normal(k_prior, z0.shape, z0.dtype), k_ref))
    return out

  b = batch_size or max(1, min(config.eval.batch_size, 4096 // draws))
  if z_chain is not None and len(z_chain) != len(images):
    raise ValueError(f"z_chain has {len(z_chain)} codes for {len(images)} images")
  out = in_batches(lambda i, k: batch(params, images[i], k,
                                      None if z_chain is None else z_chain[i]),
                   np.arange(len(images)), b, key)
  figures = {k: float(np.mean(np.concatenate([o[k] for o in out]))) for k in out[0]}
  if reference is not None:
    figures["nll_ref"], figures["nll_ref_prior"] = map(float, reference)
  if "nll_ref" in figures:
    target = figures["nll_ref"] - figures["nll_z0"]
    figures["coverage"] = figures["nll_change"] / target if target else float("nan")
  return figures


def proposal_second_moments(second_moment, mass) -> dict[str, float]:
  """Σ_b second_moment_b / q_b (`combine_bins`' grad_second_moment) for the proposal masses
  `mass` (n,), for λ uniform over the bins, and for the best q constant on the bins,
  q_b ∝ √second_moment_b, whose value is (Σ_b √second_moment_b)²."""
  m2 = np.asarray(second_moment, np.float64)
  width = np.full_like(m2, 1.0 / len(m2))
  with np.errstate(divide="ignore"):
    value = lambda q: float(np.sum(np.where(m2 > 0, m2 / np.asarray(q, np.float64), 0.0)))
  return {"proposal": value(mass), "uniform": value(width),
          "best": float(np.sum(np.sqrt(m2)) ** 2)}


def default_edges(schedule: schedules.Schedule, num_bins: int = 10) -> np.ndarray:
  """num_bins equal-width log-SNR bins over the schedule's range [λ_min, λ_max]."""
  lo, hi = float(schedule.log_snr(1.0)), float(schedule.log_snr(0.0))
  return np.linspace(lo, hi, num_bins + 1)
