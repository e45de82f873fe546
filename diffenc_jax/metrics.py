"""Held-out metrics for comparing autoencoders: a linear probe on latents and Fréchet distances.

  linear_probe_accuracy   test accuracy of a logistic regression on standardised latents.
  frechet_distance        ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^{1/2}) between Gaussian fits.
  FeatureClassifier       a small CNN trained here on the *train split only*; the Fréchet
                          distance in its 128 penultimate features ("classifier FD") compares
                          real and generated / reconstructed images. It is NOT Inception FID:
                          its numbers are comparable only with each other, for the same dataset,
                          image size, seed and training steps (the cache key).

Images are NHWC float32 in [-1, 1], as `data.load_eval_split` returns them. PSNR lives in
`evaluate` (`psnr_from_mse`, `unit_mse`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import time
import warnings
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.linalg
from flax import traverse_util
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from diffenc_jax import data

# `train_classifier`'s default; its time and held-out accuracy: docs/benchmarks.md, "The feature
# classifier" (`python -m diffenc_jax.metrics` prints both)
DEFAULT_CLASSIFIER_STEPS = 400
FEATURE_DIM = 128


# --- linear probe ----------------------------------------------------------------------------


def linear_probe_accuracy(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray,
                          test_y: np.ndarray, max_iter: int = 1000) -> float:
  """Test accuracy in [0, 1] of a logistic regression fitted on (train_z (N, d), train_y (N,)).

  Features are standardised with the train split's mean and std (constant columns are left
  centred, unscaled); L2-regularised (C = 1) multinomial logistic regression, lbfgs. A
  ConvergenceWarning after `max_iter` iterations is silenced: the probe is what it is.
  """
  train_z, test_z = np.asarray(train_z, np.float64), np.asarray(test_z, np.float64)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  if train_z.ndim != 2 or test_z.ndim != 2 or train_z.shape[1] != test_z.shape[1]:
    raise ValueError(f"latents must be (N, d) with the same d, got {train_z.shape} and "
                     f"{test_z.shape}")
  if train_y.shape != train_z.shape[:1] or test_y.shape != test_z.shape[:1]:
    raise ValueError(f"labels {train_y.shape}, {test_y.shape} do not match latents "
                     f"{train_z.shape}, {test_z.shape}")
  probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    probe.fit(train_z, train_y)
  return float(np.mean(probe.predict(test_z) == test_y))


# --- Fréchet distance ------------------------------------------------------------------------


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean (F,), unbiased covariance (F, F)) of features (N, F), N ≥ 2, in float64."""
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or len(feats) < 2:
    raise ValueError(f"features must be (N, F) with N >= 2, got {feats.shape}")
  return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], -1)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
  """Fréchet (2-Wasserstein²) distance ≥ 0 between Gaussian fits of features (Na, F), (Nb, F).

  d² = ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^{1/2}), float64, the square root by
  `scipy.linalg.sqrtm` (its real part). If Σa Σb is singular (sqrtm warns) or the root is not
  finite, both covariances get eps·I added, consistently in every term, i.e. the distance
  between the two slightly widened Gaussians. Round-off negatives are clamped to 0.
  """
  mu_a, cov_a = gaussian_stats(feats_a)
  mu_b, cov_b = gaussian_stats(feats_b)
  if mu_a.shape != mu_b.shape:
    raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
  root = _real_sqrtm(cov_a @ cov_b, singular="raise")
  if root is None:
    offset = eps * np.eye(len(mu_a))
    cov_a, cov_b = cov_a + offset, cov_b + offset
    root = _real_sqrtm(cov_a @ cov_b, singular="ignore")
    if root is None:
      raise ValueError(f"sqrtm(Σa Σb) is not finite even with eps={eps} added")
  distance = (np.sum(np.square(mu_a - mu_b)) + np.trace(cov_a) + np.trace(cov_b)
              - 2 * np.trace(root))
  return max(float(distance), 0.0)


def _real_sqrtm(matrix: np.ndarray, singular: str) -> np.ndarray | None:
  """Real part of the principal square root of `matrix` (F, F); None if it is not finite, or
  if sqrtm finds `matrix` singular and singular='raise' (with 'ignore' its result is kept)."""
  with warnings.catch_warnings():
    warnings.simplefilter("error" if singular == "raise" else "ignore",
                          scipy.linalg.LinAlgWarning)
    try:
      root = scipy.linalg.sqrtm(matrix)
    except scipy.linalg.LinAlgWarning:
      return None
  return root.real if np.all(np.isfinite(root)) else None


# --- the feature classifier ------------------------------------------------------------------


class FeatureClassifier(nn.Module):
  """Small CNN: images (B, H, W, C) in [-1, 1], H, W ≥ 8 → logits (B, num_classes).

  conv3×3 c1 → conv3×3 c2 stride 2 → conv3×3 c3 stride 2 (ReLU after each, SAME padding)
  → flatten → dense 128 + ReLU (`features`, (B, 128)) → dense num_classes. The flatten makes
  the parameters specific to one image size. The default channels (16, 32, 64) are the
  narrower of the two widths in docs/benchmarks.md, "The feature classifier".
  """

  num_classes: int = 10
  channels: tuple[int, int, int] = (16, 32, 64)

  def setup(self):
    self.convs = [nn.Conv(c, (3, 3), strides=s) for c, s in zip(self.channels, (1, 2, 2))]
    self.feature_layer = nn.Dense(FEATURE_DIM)
    self.head = nn.Dense(self.num_classes)

  def features(self, x):
    """Penultimate activations (B, 128) of images x (B, H, W, C)."""
    if x.ndim != 4:
      raise ValueError(f"FeatureClassifier expects images (B, H, W, C), got {x.shape}")
    for conv in self.convs:
      x = nn.relu(conv(x))
    return nn.relu(self.feature_layer(x.reshape(x.shape[0], -1)))

  def __call__(self, x):
    return self.head(self.features(x))


def _model(params) -> FeatureClassifier:
  """The FeatureClassifier whose variables `params` are (its widths read off the kernels)."""
  layers = params["params"]
  channels = tuple(layers[f"convs_{i}"]["kernel"].shape[-1] for i in range(3))
  return FeatureClassifier(layers["head"]["kernel"].shape[-1], channels)


@functools.partial(jax.jit, static_argnames=("num", "steps", "batch_size"))
def _batch_indices(key, *, num, steps, batch_size):
  """Example indices (steps, batch_size): epoch e visits range(num) in the order of
  permutation(fold_in(key, e)), dropping its last num mod batch_size examples."""
  per_epoch = num // batch_size
  orders = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e), num))(
      jnp.arange(-(-steps // per_epoch)))
  return orders[:, :per_epoch * batch_size].reshape(-1, batch_size)[:steps]


def _random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Each image (B, H, W, C) translated by its own uniform integer (dy, dx) ∈ [−s, s]², the
  uncovered border filled with −1 (black)."""
  height, width, channels = images.shape[1:]
  s = max_shift
  padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * s + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets)


@functools.partial(jax.jit, static_argnames=("model", "max_shift"))
def _train_step(model, params, adam_state, images, labels, idx, lr, key, max_shift):
  """One Adam step of learning rate lr on the mean softmax cross-entropy of examples idx (B,),
  randomly shifted by up to max_shift pixels."""

  def loss_fn(p):
    logits = model.apply(p, _random_shift(images[idx], key, max_shift))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

  grads = jax.grad(loss_fn)(params)
  directions, adam_state = optax.scale_by_adam().update(grads, adam_state, params)
  return jax.tree.map(lambda p, d: p - lr * d, params, directions), adam_state


def train_classifier(images: np.ndarray, labels: np.ndarray, key: jax.Array,
                     num_classes: int = 10, steps: int = DEFAULT_CLASSIFIER_STEPS,
                     batch_size: int = 128, lr: float = 1e-3,
                     max_shift: int | None = None) -> dict:
  """Trains a FeatureClassifier on (images (N, H, W, C) in [-1, 1], labels (N,) int) → variables.

  `steps` Adam steps on batches of `batch_size` examples (epoch-wise permutations, see
  `_batch_indices`), the learning rate decayed from lr to 0 on a half cosine; each image is
  shifted by up to `max_shift` pixels (None: round(H / 14), i.e. 2 for 28×28, 1 for 8×8).
  Pure in `key`. `python -m diffenc_jax.metrics` times the default on mnist5k and prints its
  held-out accuracy (docs/benchmarks.md, "The feature classifier").
  """
  images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
  if images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(f"expected images (N, H, W, C) and labels (N,), got {images.shape} and "
                     f"{labels.shape}")
  if not 0 < batch_size <= len(images) or steps <= 0:
    raise ValueError(f"need 0 < batch_size={batch_size} <= N={len(images)} and steps={steps} > 0")
  model = FeatureClassifier(num_classes)
  init_key, order_key, shift_key = jax.random.split(key, 3)
  params = jax.jit(model.init)(init_key, images[:1])
  adam_state = optax.scale_by_adam().init(params)
  lrs = np.float32(lr) * optax.cosine_decay_schedule(1.0, steps)(np.arange(steps))
  batches = _batch_indices(order_key, num=len(images), steps=steps, batch_size=batch_size)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  # A Python loop over jitted steps, not lax.scan: XLA:CPU runs this step's convolutions far
  # slower inside a while loop (docs/benchmarks.md, "The feature classifier")
  max_shift = round(images.shape[1] / 14) if max_shift is None else max_shift
  for step, (idx, lr_t) in enumerate(zip(batches, lrs)):
    params, adam_state = _train_step(model, params, adam_state, images, labels, idx, lr_t,
                                     jax.random.fold_in(shift_key, step), max_shift)
  return params


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _apply(model, params, x, method):
  return model.apply(params, x, method=method)


def _batched(params, images: np.ndarray, method: str, batch_size: int) -> np.ndarray:
  """`method` of the classifier over images (N, H, W, C) in batches, the last one zero-padded
  so that one shape is compiled."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or not len(images):
    raise ValueError(f"expected images (N, H, W, C) with N >= 1, got {images.shape}")
  model, batch_size = _model(params), min(batch_size, len(images))
  outputs = []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    padded = np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])
    outputs.append(np.asarray(_apply(model, params, padded, method))[:len(x)])
  return np.concatenate(outputs)


def classifier_features(params, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Penultimate features (N, 128) float32 of images (N, H, W, C) in [-1, 1]."""
  return _batched(params, images, "features", batch_size)


def classifier_logits(params, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Logits (N, num_classes) float32 of images (N, H, W, C) in [-1, 1]."""
  return _batched(params, images, "__call__", batch_size)


def classifier_accuracy(params, images: np.ndarray, labels: np.ndarray,
                        batch_size: int = 500) -> float:
  """Fraction in [0, 1] of images (N, H, W, C) whose arg-max logit is their label (N,)."""
  predictions = classifier_logits(params, images, batch_size).argmax(-1)
  return float(np.mean(predictions == np.asarray(labels)))


def sample_frechet_distance(params, real_images: np.ndarray, fake_images: np.ndarray,
                            batch_size: int = 500) -> float:
  """Fréchet distance in the classifier's 128 features between two image sets (N, H, W, C).

  Not Inception FID: see the module docstring. With a few hundred images per set the
  distance has a positive small-sample bias; compare only sets of equal sizes.
  """
  return frechet_distance(classifier_features(params, real_images, batch_size),
                          classifier_features(params, fake_images, batch_size))


# --- cached classifier -----------------------------------------------------------------------


def classifier_cache_path(data_config, cache_dir: str, seed: int = 0,
                          steps: int = DEFAULT_CLASSIFIER_STEPS) -> str:
  """cache_dir/classifier_{dataset}_{image_size}px_seed{seed}_steps{steps}.npz.

  dataset is `name`, `tfds-{tfds_name}`, or `idx-{hash of data_dir}` (two IDX folders, e.g.
  MNIST and Fashion-MNIST, must not share a classifier); image_size 0 means native.
  """
  dataset = data_config.name
  if dataset == "tfds":
    dataset = f"tfds-{data_config.tfds_name}"
  elif dataset == "idx":
    digest = hashlib.sha1(os.path.abspath(data_config.data_dir).encode()).hexdigest()[:10]
    dataset = f"idx-{digest}"
  name = f"classifier_{dataset}_{data_config.image_size}px_seed{seed}_steps{steps}.npz"
  return os.path.join(cache_dir, name)


def load_or_train_classifier(data_config, cache_dir: str, seed: int = 0,
                             steps: int = DEFAULT_CLASSIFIER_STEPS) -> dict:
  """The FeatureClassifier of `data_config`'s train split, cached in `cache_dir` as an .npz.

  The cache (see `classifier_cache_path`) holds the flattened variables ('params/head/kernel',
  …); reloading returns bitwise the trained arrays. A cache file that cannot be read or does
  not match the model's parameter shapes is retrained and overwritten. Files are written to a
  temporary name and `os.replace`d, so an interrupted write leaves no partial cache.
  """
  info = data.get_info(data_config)
  if not info.is_image:
    raise ValueError(f"the feature classifier needs images; {info.name} examples are "
                     f"{info.shape}")
  model = FeatureClassifier(info.num_classes)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *info.shape)))
  path = classifier_cache_path(data_config, cache_dir, seed, steps)
  params = _load_params(path, template)
  if params is None:
    images, labels = data.load_eval_split(data_config, "train")
    params = train_classifier(images, labels, jax.random.key(seed), info.num_classes, steps)
    _save_params(path, params)
  return params


def _load_params(path: str, template) -> dict | None:
  """Variables from the .npz at `path`, or None if it is missing, unreadable or its arrays'
  names, shapes or dtypes differ from `template`'s."""
  expected = traverse_util.flatten_dict(template, sep="/")
  try:
    with np.load(path, allow_pickle=False) as npz:
      flat = {name: npz[name] for name in npz.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
    return None
  if flat.keys() != expected.keys() or any(
      flat[k].shape != v.shape or flat[k].dtype != v.dtype for k, v in expected.items()):
    return None
  return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="/"))


def _save_params(path: str, params) -> None:
  """Writes the flattened variables to `path` atomically (temporary file, then os.replace)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


def _main() -> None:
  """Trains the default classifier on mnist5k's train split; prints its time and accuracy."""
  data_config = ml_collections.ConfigDict(
      dict(name="mnist5k", tfds_name="", data_dir="", image_size=0, num_test=0))
  train_x, train_y = data.load_eval_split(data_config, "train")
  test_x, test_y = data.load_eval_split(data_config, "test")
  wall, cpu = time.perf_counter(), time.process_time()
  params = jax.block_until_ready(train_classifier(train_x, train_y, jax.random.key(0)))
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  print(f"mnist5k: {DEFAULT_CLASSIFIER_STEPS} steps in {wall:.1f} s wall, {cpu:.1f} s CPU "
        f"(compilation included); held-out accuracy "
        f"{classifier_accuracy(params, test_x, test_y):.3f} on {len(test_x)} test images")


if __name__ == "__main__":
  _main()
