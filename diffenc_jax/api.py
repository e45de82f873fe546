"""A trained model as an object: encode, decode, reconstruct, interpolate, sample.

    model = Autoencoder.load("runs/mnist")                 # newest checkpoint of a workdir
    z = model.encode(x)                                    # (B, d): the encoder's own z⁰
    z = model.encode(x, refine_steps=10)                   # (B, d): z^K, E-step Langevin from z⁰
    x_hat = model.decode(z)                                # (B, H, W, C) in [-1, 1]
    x_T = model.encode_stochastic(x)                       # diffusion decoder: DDIM inversion
    x_hat = model.decode(z, x_T=x_T)                       # … decoded from it: ≈ x
    x_edit = model.manipulate(x, direction, scale=2.0)     # z moved along a direction
    path = model.interpolate(x[0], x[1], num=8)            # (8, H, W, C), slerp in latent space
    xs = model.sample(16)                                  # (16, H, W, C) through the prior
    model.save_grid(xs, "samples.png", rows=4)

Images are NHWC float32 in [-1, 1], like `diffenc_jax.data` (uint8 p ↦ p / 127.5 − 1); numpy
or jax arrays. Every random function takes a `key` that defaults to `jax.random.key(0)`, so
repeated calls (and notebooks) give the same output. The functions are jitted once per input
shape (and per `refine_steps`, `num`, `n`). `lerp` and `slerp` are pure and jittable.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from diffenc_jax import (checkpointing, checks, data, evaluate, latent_prior, methods, runs,
                         visualize)

Array = jax.Array
MODES = ("slerp", "lerp")
# how far outside [-1, 1] an input image may reach before it is taken for a wrong range
_RANGE_TOLERANCE = 1e-3


def lerp(z_a: Array, z_b: Array, ts: Array) -> Array:
  """(1 − t) z_a + t z_b for each t: z_a, z_b (..., d), ts (T,) → (T, ..., d)."""
  z_a, z_b = jnp.asarray(z_a), jnp.asarray(z_b)
  t = jnp.asarray(ts, z_a.dtype).reshape((-1,) + (1,) * z_a.ndim)
  return z_a + t * (z_b - z_a)


def slerp(z_a: Array, z_b: Array, ts: Array) -> Array:
  """Spherical interpolation: the angle from z_a to z_b and the norm both move linearly in t.

  z(t) = ((1 − t)‖z_a‖ + t‖z_b‖) (cos(tω) u + sin(tω) v), with u = z_a/‖z_a‖, ω the angle
  between z_a and z_b, and v the unit vector orthogonal to u in the plane of z_a and z_b. For
  endpoints of equal norm this is Shoemake's slerp and keeps the norm. (Anti)parallel endpoints
  span no plane: v is then the coordinate axis least aligned with u, orthogonalised, so
  parallel ones give a straight line and antiparallel ones a half great circle (not a path
  through 0). z_a, z_b (..., d), ts (T,) → (T, ..., d).
  """
  z_a, z_b = jnp.asarray(z_a), jnp.asarray(z_b)
  tiny = jnp.finfo(z_a.dtype).tiny
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), tiny)
  r_a = jnp.linalg.norm(z_a, axis=-1, keepdims=True)
  r_b = jnp.linalg.norm(z_b, axis=-1, keepdims=True)
  u, b = unit(z_a), unit(z_b)
  cos = jnp.sum(u * b, -1, keepdims=True)
  perp = b - cos * u
  sin = jnp.linalg.norm(perp, axis=-1, keepdims=True)
  # no plane: any direction orthogonal to u; the least aligned axis is the best conditioned
  axis = jax.nn.one_hot(jnp.argmin(jnp.abs(u), -1), u.shape[-1], dtype=u.dtype)
  fallback = unit(axis - jnp.sum(axis * u, -1, keepdims=True) * u)
  v = jnp.where(sin > 1e-6, perp / jnp.maximum(sin, tiny), fallback)
  omega = jnp.arctan2(sin, cos)
  t = jnp.asarray(ts, z_a.dtype).reshape((-1,) + (1,) * z_a.ndim)
  return ((1 - t) * r_a + t * r_b) * (jnp.cos(t * omega) * u + jnp.sin(t * omega) * v)


class Autoencoder:
  """A trained method with its parameters; build it with `Autoencoder.load(workdir)`.

  Attributes: `config` (the run's ConfigDict), `method` (`diffenc_jax.methods` interface),
  `params` (the restored raw or EMA parameters), `step` (training rounds of the checkpoint),
  `use_ema`, `data_shape` (per example, e.g. (28, 28, 1)) and `latent_dim` (d).
  """

  def __init__(self, config, method, params, step: int, use_ema: bool):
    self.config, self.method, self.params = config, method, params
    self.step, self.use_ema = int(step), bool(use_ema)
    self.data_shape, self.latent_dim = tuple(method.data_shape), int(method.latent_dim)
    self._encode = jax.jit(self._encode_fn, static_argnums=3)
    self._decode = jax.jit(self._decode_fn)
    self._interpolate = jax.jit(self._interpolate_fn, static_argnums=4)
    self._invert = jax.jit(self._invert_fn)
    self._decode_from = jax.jit(self._decode_from_fn)
    self._manipulate = jax.jit(self._manipulate_fn)
    self._sample_latents = jax.jit(method.sample_latents, static_argnums=2)

  @classmethod
  def load(cls, workdir: str, use_ema: bool | None = None,
           step: int | None = None) -> "Autoencoder":
    """The model trained in `workdir` (by `train.train_and_evaluate` or main.py) from its
    config.json and its newest checkpoint, or checkpoint `step`: neither the dataset nor a
    training setup is needed (the example shape is recorded in config.json; a run of an older
    version without that record reads it from its dataset). `use_ema=None` takes the run's
    `config.eval.use_ema`. Raises checks.UsageError (one line) when the workdir, its config or
    the checkpoint is missing or does not match."""
    workdir = os.path.abspath(os.fspath(workdir))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(workdir):
      raise checks.UsageError(f"no trained model in {workdir}: no such directory")
    if not os.path.isfile(os.path.join(workdir, runs.CONFIG_NAME)):
      raise checks.UsageError(f"no trained model in {workdir}: no config.json (train mode "
                             f"writes it there)")
    if not os.path.isdir(ckpt_dir):
      raise checks.UsageError(f"no trained model in {workdir}: no checkpoints/ folder")
    try:
      fields, record = runs.read_config(workdir)
    except ValueError as e:
      raise checks.UsageError(str(e)) from None
    config = ml_collections.ConfigDict(fields)
    try:
      if record and "data" in record:
        shape = tuple(record["data"]["shape"])
      else:
        shape = data.get_info(config.data).shape
      method = methods.get_method(config, shape)
      abstract = jax.eval_shape(method.init_state, jax.random.key(0))
    except (ValueError, KeyError, AttributeError) as e:  # a data config this machine lacks,
      first = str(e).splitlines()[0] if str(e) else repr(e)  # or a config field it lacks
      field = first.strip("\"' ")
      if isinstance(e, AttributeError) and field.isidentifier():  # ml_collections' message
        raise checks.UsageError(f"cannot rebuild the model of {workdir}: its config.json has no "
                               f"field '{field}' (written by another version of diffenc_jax?)"
                               ) from e
      raise checks.UsageError(f"cannot rebuild the model of {workdir}: {first}") from e
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract)
    checkpoints = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
      steps = sorted(checkpoints.all_steps(), reverse=True)
      if not steps:
        raise checks.UsageError(f"no trained model in {workdir}: checkpoints/ is empty")
      if step is not None and step not in steps:
        raise checks.UsageError(f"no checkpoint {step} in {ckpt_dir}; it holds steps "
                                f"{sorted(steps)}")
      state = checkpointing.restore_newest(checkpoints, workdir, abstract,
                                           checks.checksummed_from(workdir),
                                           steps=[step] if step is not None else steps)
    finally:
      checkpoints.close()
    use_ema = config.eval.use_ema if use_ema is None else use_ema
    return cls(config, method, state.eval_params(use_ema), int(state.step), use_ema)

  def __repr__(self):
    return (f"Autoencoder(method={self.config.method!r}, data_shape={self.data_shape}, "
            f"latent_dim={self.latent_dim}, step={self.step}, use_ema={self.use_ema})")

  # --- pure functions of the parameters (jitted in __init__) ----------------------------
  def _encode_fn(self, params, x, key, refine_steps):
    # z⁰ is the chain's start, so encode(x, k) is the z⁰ that encode(x, k, K) refines; with
    # refine_steps=0 the one traced Langevin step is dead code, removed by XLA
    lat = self.method.latents(params, x, key, max(refine_steps, 1))
    return lat["zK"] if refine_steps else lat["z0"]

  def _decode_fn(self, params, z, key):
    return evaluate.decode_images(self.method, params["decoder"], z, key)

  def _invert_fn(self, params, x, z):
    return self.method.decoder.encode_stochastic(params["decoder"], x, z)

  def _decode_from_fn(self, params, z, x_T, key):
    return jnp.clip(self.method.decoder.decode(params["decoder"], z, key, x_T=x_T), -1.0, 1.0)

  def _manipulate_fn(self, params, x, direction, scale, key, mean, std):
    z = self.method.latents(params, x, key, 0)["z0"]
    unit = direction / jnp.maximum(jnp.linalg.norm(direction), 1e-12)
    z_new = mean + std * ((z - mean) / std + scale * unit)
    if self.method.decoder.kind == "diffusion":  # keep what x_T carries: decode from x's own
      return self._decode_from_fn(params, z_new, self._invert_fn(params, x, z), key)
    return self._decode_fn(params, z_new, key)

  def _interpolate_fn(self, params, z_a, z_b, key, num, use_slerp):
    # both paths are cheap: a traced choice compiles the decoder once for both modes
    ts = jnp.linspace(0.0, 1.0, num)
    path = jnp.where(use_slerp, slerp(z_a, z_b, ts), lerp(z_a, z_b, ts))
    # every point decoded as decode(z[None], key): one shared decoder noise along the path
    return jax.vmap(lambda z: self._decode_fn(params, z[None], key)[0])(path)

  # --- checks at the public boundary ------------------------------------------------------
  @staticmethod
  def _nonempty_finite(x: Array, name: str) -> None:
    if not x.shape[0]:
      raise ValueError(f"{name} is an empty batch, shape {x.shape}: B must be >= 1")
    bad = int(jnp.sum(~jnp.isfinite(x)))
    if bad:
      raise ValueError(f"{name} holds {bad} NaN or infinite values")

  def _images(self, x, name: str = "x") -> Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 1 or x.shape[1:] != self.data_shape:
      raise ValueError(f"{name} must have shape (B, {', '.join(map(str, self.data_shape))}), "
                       f"got {x.shape}")
    self._nonempty_finite(x, name)
    if len(self.data_shape) == 3:
      lo, hi = float(jnp.min(x)), float(jnp.max(x))
      if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"{name} must be images in [-1, 1] like the training data (uint8 p ↦ "
                         f"p / 127.5 − 1), got values in [{lo:.3g}, {hi:.3g}]")
    return x

  def _one(self, x, name: str) -> Array:
    """One example, (...) or (1, ...), as a batch (1, ...)."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape == self.data_shape:
      x = x[None]
    if x.shape != (1,) + self.data_shape:
      raise ValueError(f"{name} must be one example, {self.data_shape} or "
                       f"{(1,) + self.data_shape}, got {x.shape}")
    return x

  def _latents(self, z, name: str = "z") -> Array:
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != self.latent_dim:
      raise ValueError(f"{name} must have shape (B, {self.latent_dim}), got {z.shape}")
    self._nonempty_finite(z, name)
    return z

  @staticmethod
  def _key(key) -> Array:
    return jax.random.key(0) if key is None else key

  # --- the API ----------------------------------------------------------------------------
  def encode(self, x, key: Array | None = None, refine_steps: int = 0) -> Array:
    """Latents (B, d) of images x (B, H, W, C): the encoder's own sample z⁰ ~ q(z|x), or with
    refine_steps = K > 0 the E-step's z^K after K Langevin steps from that z⁰ on the
    decoder's posterior (`method.latents`)."""
    if not isinstance(refine_steps, (int, np.integer)) or refine_steps < 0:
      raise ValueError(f"refine_steps must be an int >= 0, got {refine_steps!r}")
    return self._encode(self.params, self._images(x), self._key(key), int(refine_steps))

  def decode(self, z, key: Array | None = None, x_T=None) -> Array:
    """Images (B, H, W, C) in [-1, 1] decoded from latents z (B, d): the gaussian decoder's
    mean, or a DDIM sample of the diffusion decoder (config.eval.decoder_steps steps) from a
    random x_T drawn with key, or from the given x_T (B, H, W, C) (e.g. `encode_stochastic`'s);
    clipped to [-1, 1] (2-D points are returned as decoded)."""
    z = self._latents(z)
    if x_T is None:
      return self._decode(self.params, z, self._key(key))
    self._need_diffusion("decode from x_T")
    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.shape != (z.shape[0],) + self.data_shape:
      raise ValueError(f"x_T must have shape {(z.shape[0],) + self.data_shape}, got {x_T.shape}")
    self._nonempty_finite(x_T, "x_T")
    return self._decode_from(self.params, z, x_T, self._key(key))

  def encode_stochastic(self, x, z=None, key: Array | None = None) -> Array:
    """x_T (B, H, W, C): the diffusion decoder's deterministic DDIM inversion of images x given
    their latents z (default: encode(x, key)), with config.eval.decoder_steps steps, so that
    decode(z, x_T=x_T) gives x back (DiffAE's stochastic encoding: x_T holds what z does not)."""
    self._need_diffusion("encode_stochastic")
    x = self._images(x)
    z = self.encode(x, key) if z is None else self._latents(z)
    if z.shape[0] != x.shape[0]:
      raise ValueError(f"z has {z.shape[0]} rows for {x.shape[0]} images")
    return self._invert(self.params, x, z)

  def manipulate(self, x, direction, scale: float = 1.0, key: Array | None = None) -> Array:
    """Images x (B, H, W, C) edited by moving their code along `direction` (d,) in
    standardised z: z' = μ + s ⊙ ((z⁰ − μ)/s + scale · direction/‖direction‖), μ and s the
    run's running code statistics (latent_prior.normalize; else 0 and 1), e.g. a linear
    probe's class weight (fitted on standardised codes). A diffusion decoder decodes z' from
    x's own x_T (`encode_stochastic`), so what z does not carry is kept."""
    x = self._images(x)
    direction = jnp.asarray(direction, jnp.float32)
    if direction.shape != (self.latent_dim,):
      raise ValueError(f"direction must have shape ({self.latent_dim},), got {direction.shape}")
    self._nonempty_finite(direction, "direction")
    if not bool(jnp.any(direction)):
      raise ValueError("direction is the zero vector: it points nowhere")
    if not isinstance(scale, (int, float, np.integer, np.floating)) or not np.isfinite(scale):
      raise ValueError(f"scale must be a finite number, got {scale!r}")
    return self._manipulate(self.params, x, direction, jnp.float32(scale), self._key(key),
                            *self.code_statistics())

  def code_statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), std (d,)) with which `manipulate` standardises codes: the run's running
    statistics of z⁰ (latent_prior.normalize), else zeros and ones."""
    if "zstats" in self.params:
      stats = latent_prior.LatentDDPMPrior.mean_std(self.params["zstats"])
      return tuple(np.asarray(a) for a in stats)
    return np.zeros(self.latent_dim, np.float32), np.ones(self.latent_dim, np.float32)

  def _need_diffusion(self, what: str) -> None:
    if self.method.decoder.kind != "diffusion":
      raise ValueError(f"{what} needs a diffusion decoder; this model's is "
                       f"{self.method.decoder.kind!r}")

  def reconstruct(self, x, key: Array | None = None, refine_steps: int = 0) -> Array:
    """decode(encode(x, key, refine_steps), key): images (B, H, W, C) → (B, H, W, C)."""
    return self.decode(self.encode(x, key, refine_steps), key)

  def interpolate(self, x_a, x_b, num: int = 8, mode: str = "slerp",
                  key: Array | None = None) -> Array:
    """Images (num, H, W, C) decoded along the latent path from encode(x_a) to encode(x_b).

    x_a, x_b: one image each, (H, W, C) or (1, H, W, C), encoded with the same key. The path
    is `slerp` or `lerp` at num evenly spaced t ∈ [0, 1]; each point z is decoded as
    decode(z[None], key), so the first and last images are decode(encode(x_a, key), key) and
    decode(encode(x_b, key), key)."""
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if not isinstance(num, (int, np.integer)) or num < 2:
      raise ValueError(f"num must be an int >= 2, got {num!r}")
    key = self._key(key)
    z_a, z_b = (self._encode(self.params, self._images(self._one(x, name), name), key, 0)
                for x, name in ((x_a, "x_a"), (x_b, "x_b")))
    return self._interpolate(self.params, z_a[0], z_b[0], key, int(num), mode == "slerp")

  def sample(self, n: int, key: Array | None = None) -> Array:
    """n images (n, H, W, C) decoded from latents of the method's prior (`sample_latents`)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"n must be an int >= 1, got {n!r}")
    k_z, k_dec = jax.random.split(self._key(key))
    return self.decode(self._sample_latents(self.params, k_z, int(n)), k_dec)

  @staticmethod
  def save_grid(images, path: str, rows: int | None = None) -> str:
    """Writes images (N, H, W, C) in [-1, 1] as one PNG grid of `rows` rows (default ≈ √N)
    and returns path."""
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"images must have shape (N, H, W, C), got {images.shape}")
    rows = rows or max(1, int(np.sqrt(len(images))))
    visualize.save_png(visualize.image_grid(images, rows=rows), os.fspath(path))
    return os.fspath(path)
