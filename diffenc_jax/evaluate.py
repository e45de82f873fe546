"""Held-out evaluation: reconstruction PSNR from z⁰, from E-step-refined z^K and from the
variable whose rate is reported (z_q), rate, gap, and what shows a failure that PSNR can hide:
how many reconstructions a classifier recognises, how many distinct codes the split gets, and a
linear probe of the codes; the rate as a function of its log-SNR floor.

PSNR is computed with pixels in [0, 1] (the model's [-1, 1] output is clipped and mapped by
x ↦ (x + 1)/2) as 10 log10(1 / MSE), the MSE averaged over every pixel of the held-out split
(one number for the split, not a mean of per-image PSNRs, which would read higher). A diffusion
decoder decodes from a random x_T (config.eval.decoder_steps of DDIM).

Rate and distortion of the same variable (docs/method.md §1.8, docs/rate.md): `rate_nats` is the KL
to the prior of `method.rate_latent` — for diffenc the code blurred at the latent schedule's
λ_max, z_q = α_0 z⁰ + σ_0 ε; for the VAE a sample of q(z|x) — and `mse_zq`/`psnr_zq` are the
distortion of decoding that same z_q.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffenc_jax import data


def psnr_from_mse(mse: float) -> float:
  """10 log10(1 / mse) for pixels in [0, 1]; capped at 100 dB for a perfect match."""
  return 100.0 if mse <= 1e-10 else -10.0 * math.log10(mse)


def unit_mse(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Per-example MSE (B,) with both in [-1, 1] mapped to [0, 1]; x_hat clipped first."""
  diff = (jnp.clip(x_hat, -1.0, 1.0) - x) / 2.0
  return jnp.mean(jnp.square(diff).reshape(x.shape[0], -1), axis=-1)


@dataclasses.dataclass
class HeldOut:
  """The held-out split and a jitted function of the metrics of one of its batches."""

  config: object
  method: object
  images: np.ndarray
  labels: np.ndarray
  classifier: dict | None = None  # FeatureClassifier variables: adds recon_acc

  @classmethod
  def load(cls, config, method, classifier: dict | None = None) -> "HeldOut":
    """The held-out split of config.data; with image data and config.eval.classifier_steps > 0
    the cached feature classifier (trained on the train split the first time, in
    config.eval.classifier_dir) unless one is given."""
    images, labels = data.load_eval_split(config.data, "test")
    if classifier is None and config.eval.classifier_steps > 0 and images.ndim == 4:
      from diffenc_jax import metrics  # sklearn and scipy: loaded only when used
      classifier = metrics.load_or_train_classifier(
          config.data, classifier_dir(config), seed=0, steps=config.eval.classifier_steps)
    return cls(config, method, images, labels, classifier)

  def __post_init__(self):
    self._batch_metrics = jax.jit(self._metrics)
    self.reconstruct = jax.jit(self._reconstruct)

  def _reconstruct(self, params, x, key):
    """(z⁰, z^K, decode(z⁰), decode(z^K), Langevin info) for a batch x."""
    m = self.method
    k_lat, k_dec = jax.random.split(key)
    lat = m.latents(params, x, k_lat, self.config.em.eval_refine_steps)
    z0, zk = lat["z0"], lat["zK"]
    return (z0, zk, m.decode(params["decoder"], z0, k_dec), m.decode(params["decoder"], zk, k_dec),
            lat["info"])

  def _metrics(self, params, x, key):
    m = self.method
    k_rec = jax.random.split(key)[0]
    z0, zk, x0, xk, info = self._reconstruct(params, x, k_rec)
    k_q, k_dec = jax.random.split(jax.random.fold_in(key, 2))
    # rate and rate_latent under one key: the rate is that of the decoded z_q
    rate, zq = m.rate_and_latent(params, x, z0, k_q, self.config.eval.rate_samples)
    # a deterministic code's z_q is z⁰ itself (the same traced array): no second decode
    xq = x0 if zq is z0 else m.decode(params["decoder"], zq, k_dec)
    out = {
        "mse_z0": unit_mse(x, x0),
        "mse_zK": unit_mse(x, xk),
        "mse_zq": unit_mse(x, xq),
        "rate_nats": rate,
        "gap": jnp.sum(jnp.square(zk - z0), -1),
    }
    if info is not None:  # methods with a posterior refinement of z⁰
      out["move"] = jnp.full((x.shape[0],), info.move_norm)
      out["accept"] = jnp.full((x.shape[0],), info.accept_rate)
    decoder = self.method.decoder
    if decoder.kind == "diffusion":  # autoencoding through z⁰ and x's own DDIM-inverted x_T
      dec_params = params["decoder"]
      x_T = decoder.encode_stochastic(dec_params, x, z0)
      out["mse_xT"] = unit_mse(x, decoder.decode(dec_params, z0, k_rec, x_T=x_T))
    return out, z0, jnp.clip(x0, -1.0, 1.0)

  def evaluate(self, state, key=None) -> dict[str, float]:
    """Metrics over the whole held-out split (EMA params if config.eval.use_ema):

    psnr_z0, psnr_zK  reconstruction PSNR from the encoder's z⁰ / the refined z^K (a diffusion
                      decoder decodes from a random x_T);
    psnr_xT           (diffusion decoder) PSNR decoding z⁰ from x's own x_T, the decoder's
                      DDIM inversion of x given z⁰ (DiffAE's autoencoding);
    rate_nats/bits    the method's rate estimate; gap E‖z^K − z⁰‖²;
    distinct_codes    how many different z⁰ the split's images get (rows equal after rounding
                      to DISTINCT_DECIMALS decimals; a collapsed encoder gets few);
    recon_acc         (with a classifier) the share of reconstructions from z⁰ that the
                      feature classifier assigns to the image's own label (a decoder that
                      ignores z draws other digits: ~0.1);
    probe_acc         (config.eval.probe) `probe_accuracy` of z⁰.
    """
    params = state.eval_params(self.config.eval.use_ema)
    key = jax.random.key(self.config.seed + 1) if key is None else key
    b = self.config.eval.batch_size
    sums, n, codes, recons = {}, 0, [], []
    for i in range(0, len(self.images), b):
      x = self.images[i:i + b]
      out, z0, x0 = jax.device_get(self._batch_metrics(params, x, jax.random.fold_in(key, i)))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(np.sum(v))
      codes.append(z0)
      recons.append(x0)
      n += len(x)
    mean = {k: v / n for k, v in sums.items()}
    result = {"psnr_z0": psnr_from_mse(mean["mse_z0"]), "psnr_zK": psnr_from_mse(mean["mse_zK"]),
              "psnr_zq": psnr_from_mse(mean["mse_zq"]),
              **({"psnr_xT": psnr_from_mse(mean["mse_xT"])} if "mse_xT" in mean else {}),
              "rate_nats": mean["rate_nats"], "rate_bits": mean["rate_nats"] / math.log(2),
              **mean, "distinct_codes": distinct_codes(np.concatenate(codes))}
    if self.classifier is not None:
      from diffenc_jax import metrics
      result["recon_acc"] = metrics.classifier_accuracy(self.classifier, np.concatenate(recons),
                                                        self.labels)
    if self.config.eval.probe:
      result["probe_acc"] = probe_accuracy(self.config, self.method, params,
                                           np.concatenate(codes), self.labels,
                                           jax.random.fold_in(key, len(self.images)))
    return result


DISTINCT_DECIMALS = 3


def distinct_codes(z: np.ndarray, decimals: int = DISTINCT_DECIMALS) -> int:
  """The number of different rows of z (N, d) after rounding to `decimals` decimals: N for an
  injective code, 1 for a collapsed one (binary codes count exactly)."""
  return int(len(np.unique(np.round(np.asarray(z, np.float64), decimals), axis=0)))


def classifier_dir(config) -> str:
  """Where the feature classifier is cached: config.eval.classifier_dir, else
  ~/.cache/diffenc_jax."""
  return config.eval.classifier_dir or os.path.join(os.path.expanduser("~"), ".cache",
                                                    "diffenc_jax")


def probe_accuracy(config, method, params, test_z: np.ndarray, test_y: np.ndarray,
                   key: jax.Array) -> float:
  """Held-out accuracy of a logistic regression fitted on z⁰ of the train split
  (`metrics.linear_probe_accuracy`), given the held-out split's z⁰ and labels."""
  from diffenc_jax import metrics
  train_x, train_y = data.load_eval_split(config.data, "train")
  train_z, _ = split_latents(config, method, params, train_x, key, refine=False)
  return metrics.linear_probe_accuracy(train_z, train_y, test_z, test_y)


def in_batches(fn: Callable, inputs: np.ndarray, batch_size: int, key: jax.Array) -> list:
  """[device_get(fn(inputs[i:i + batch_size], fold_in(key, i))) for each batch start i]: the
  held-out loops' one pattern, each batch's key a pure function of its position."""
  return [jax.device_get(fn(inputs[i:i + batch_size], jax.random.fold_in(key, i)))
          for i in range(0, len(inputs), batch_size)]


def rate_curve(config, method, params, images: np.ndarray, floors, key: jax.Array
               ) -> dict[str, np.ndarray]:
  """The diffusion-KL rate as a function of the log-SNR floor it integrates from.

  For each floor λ_f in `floors` (each ≤ the latent schedule's λ_max: the encoder's score is
  trained only on [λ_min, λ_max]), the held-out mean over `images` of `method.rate(…,
  log_snr_max=λ_f)`, the KL to N(0, I) of the code blurred at λ_f, α_f z⁰ + σ_f ε; beside it
  the KL a deterministic code at the same z⁰ would have there, ½ Σ (α_f² z⁰² + σ_f² − 1 −
  log σ_f²), which grows by d/2 per unit of λ_f. Every floor sees the same z⁰ and noise draws.
  Returns {"floor", "rate_nats", "point_mass_nats"}, arrays of len(floors).
  """
  if method.rate_kind != "diffusion KL":
    raise ValueError(f"the rate of a {method.rate_kind!r} method has no log-SNR floor")
  lam_max = float(method.schedule.log_snr(0.0))
  floors = [float(f) for f in floors]
  if max(floors) > lam_max + 1e-4:
    raise ValueError(f"floors must be <= the latent schedule's logsnr_max = {lam_max:g}, "
                     f"got {max(floors):g}")

  @jax.jit
  def batch(params, x, key, floor):
    k_lat, k_rate = jax.random.split(key)
    z0 = method.latents(params, x, k_lat, 0)["z0"]
    rate = method.rate(params, x, z0, k_rate, config.eval.rate_samples, floor)
    var = jax.nn.sigmoid(-floor)
    point = 0.5 * jnp.sum((1.0 - var) * jnp.square(z0) + var - 1.0 - jnp.log(var), -1)
    return jnp.sum(rate), jnp.sum(point)

  n = len(images)
  rates, points = [], []
  for floor in floors:
    sums = in_batches(lambda x, k, f=jnp.float32(floor): batch(params, x, k, f), images,
                      config.eval.batch_size, key)
    rates.append(sum(float(s[0]) for s in sums) / n)
    points.append(sum(float(s[1]) for s in sums) / n)
  return {"floor": np.array(floors), "rate_nats": np.array(rates),
          "point_mass_nats": np.array(points)}


def decode_images(method, dec_params, z: jax.Array, key: jax.Array) -> jax.Array:
  """method.decode clipped to [-1, 1], the data's range, for image data (a gaussian decoder's
  mean is unbounded); other data (2-D points) as decoded."""
  x = method.decode(dec_params, z, key)
  return jnp.clip(x, -1.0, 1.0) if len(method.data_shape) == 3 else x


def split_latents(config, method, params, images: np.ndarray, key: jax.Array,
                  refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(z⁰, z^K) of images (N, ...) in batches of eval.batch_size; z^K = z⁰ without refine (or
  for methods with no posterior refinement)."""

  @jax.jit
  def encode(x, key):
    lat = method.latents(params, x, key, config.em.eval_refine_steps if refine else 0)
    return lat["z0"], lat["zK"]

  out = in_batches(encode, images, config.eval.batch_size, key)
  return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def encode_splits(config, method, state, path: str, refine: bool = True) -> None:
  """Writes z⁰ (and, with refine, E-step-refined z^K) of both splits with labels to .npz."""
  params = state.eval_params(config.eval.use_ema)
  out = {}
  for split in ("train", "test"):
    images, labels = data.load_eval_split(config.data, split)
    z0, zk = split_latents(config, method, params, images, jax.random.key(config.seed + 2),
                           refine)
    out[f"{split}_z0"] = z0
    if refine:
      out[f"{split}_zK"] = zk
    out[f"{split}_labels"] = labels
  np.savez(path, **out)


def generate(method, params, n: int, key: jax.Array, batch_size: int) -> np.ndarray:
  """n images decoded from latents drawn from the method's prior, in batches (`decode_images`)."""

  @jax.jit
  def sample(key):
    k_z, k_dec = jax.random.split(key)
    return decode_images(method, params["decoder"],
                         method.sample_latents(params, k_z, batch_size), k_dec)

  out = [jax.device_get(sample(jax.random.fold_in(key, i))) for i in range(0, n, batch_size)]
  return np.concatenate(out)[:n]


def decode_all(config, method, params, z: np.ndarray, key: jax.Array) -> np.ndarray:
  """Decodes latents (N, d) in batches of eval.batch_size (`decode_images`)."""
  decode = jax.jit(lambda z, key: decode_images(method, params["decoder"], z, key))
  return np.concatenate(in_batches(decode, z, config.eval.batch_size, key))


def comparison_metrics(config, method, state, classifier_params=None) -> dict[str, float]:
  """The held-out suite that the method comparison reports (`HeldOut.evaluate` with the
  classifier's recon_acc and the probe_acc, plus):

  recon_fd      classifier Fréchet distance, held-out images vs their reconstructions;
  sample_fd     classifier Fréchet distance, held-out images vs as many prior samples.
  The classifier (`metrics.load_or_train_classifier`) is trained on the train split only;
  without one (classifier_params=None) recon_acc, recon_fd and sample_fd are left out (none is
  loaded or trained, whatever config.eval.classifier_steps says).
  """
  from diffenc_jax import metrics  # sklearn and scipy: loaded only for the comparison

  params = state.eval_params(config.eval.use_ema)
  test_x, test_y = data.load_eval_split(config.data, "test")
  # the given classifier, or none (not HeldOut.load's, which trains one on classifier_steps)
  out = HeldOut(config, method, test_x, test_y, classifier_params).evaluate(state)
  key = jax.random.key(config.seed + 5)
  test_z, _ = split_latents(config, method, params, test_x, jax.random.fold_in(key, 1),
                            refine=False)
  if "probe_acc" not in out:
    out["probe_acc"] = probe_accuracy(config, method, params, test_z, test_y, key)
  if classifier_params is None:
    return out
  recon = decode_all(config, method, params, test_z, jax.random.fold_in(key, 2))
  out["recon_fd"] = metrics.sample_frechet_distance(classifier_params, test_x, recon)
  samples = generate(method, params, len(test_x), jax.random.fold_in(key, 3),
                     config.eval.batch_size)
  out["sample_fd"] = metrics.sample_frechet_distance(classifier_params, test_x, samples)
  return out
