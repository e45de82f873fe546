"""Held-out metrics with known answers: PSNR, the linear probe, Fréchet distances, and the
cached feature classifier (trained briefly on the 8×8 digits, never downloaded)."""

import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from diffenc_jax import data, evaluate, metrics

CLASSIFIER_STEPS = 150  # digits (1,500 train images, 8×8): ~96% held-out, seconds on a CPU


def _digits_config():
  config = tiny.get_config().data
  config.name, config.num_test = "digits", 0
  return config


# --- PSNR (evaluate.psnr_from_mse / unit_mse) -------------------------------------------------


def _psnr(x, x_hat):
  return evaluate.psnr_from_mse(float(jnp.mean(evaluate.unit_mse(x, x_hat))))


def test_psnr_of_identical_images_is_the_100_db_cap():
  x = np.random.RandomState(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  assert _psnr(x, x) == 100.0


@pytest.mark.parametrize("offset", [0.25, -0.1, 0.5])
def test_psnr_of_a_constant_offset_is_analytic(offset):
  # Within [-0.5, 0.5] so that x + offset is not clipped; in [0, 1] the error is offset / 2.
  x = np.random.RandomState(1).uniform(-0.5, 0.5, (3, 8, 8, 2)).astype(np.float64)
  expected = -10 * math.log10((offset / 2) ** 2)
  assert _psnr(jnp.asarray(x, jnp.float32), jnp.asarray(x + offset, jnp.float32)) == (
      pytest.approx(expected, abs=1e-4))


# --- linear probe ----------------------------------------------------------------------------


def test_probe_on_separable_clusters_is_perfect_despite_a_constant_column():
  rng = np.random.RandomState(0)

  def clusters(n):
    y = rng.randint(2, size=n)
    z = rng.normal(size=(n, 5)) + 10.0 * (2 * y[:, None] - 1)
    return np.concatenate([z, np.full((n, 1), 3.0)], axis=1), y  # constant column

  (train_z, train_y), (test_z, test_y) = clusters(200), clusters(200)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert metrics.linear_probe_accuracy(train_z, train_y, test_z, test_y) == 1.0


def test_probe_on_the_sign_of_one_coordinate_is_perfect():
  rng = np.random.RandomState(1)
  z = rng.normal(size=(600, 4))
  z[:, 2] += 2.0 * np.sign(z[:, 2])  # a margin of 4 around the threshold
  y = (z[:, 2] > 0).astype(int)
  assert metrics.linear_probe_accuracy(z[:300], y[:300], z[300:], y[300:]) == 1.0


def test_probe_on_three_separated_clusters_is_perfect():
  rng = np.random.RandomState(3)
  y = rng.randint(3, size=600)
  angles = 2 * np.pi * y / 3
  z = 8.0 * np.stack([np.cos(angles), np.sin(angles)], -1) + rng.normal(size=(600, 2))
  assert metrics.linear_probe_accuracy(z[:300], y[:300], z[300:], y[300:]) == 1.0


def test_probe_on_random_labels_is_near_chance():
  rng = np.random.RandomState(2)
  z, y = rng.normal(size=(800, 16)), rng.randint(2, size=800)
  accuracy = metrics.linear_probe_accuracy(z[:400], y[:400], z[400:], y[400:])
  assert 0.3 < accuracy < 0.7


def test_probe_rejects_mismatched_shapes():
  z, y = np.zeros((10, 3)), np.zeros(10, int)
  with pytest.raises(ValueError, match="same d"):
    metrics.linear_probe_accuracy(z, y, np.zeros((10, 4)), y)
  with pytest.raises(ValueError, match="labels"):
    metrics.linear_probe_accuracy(z, y[:9], z, y)


# --- Fréchet distance ------------------------------------------------------------------------


def _correlated(rng, n, f):
  return rng.normal(size=(n, f)) @ rng.normal(size=(f, f)) + rng.normal(size=f)


def _symmetric_sqrt(cov):
  eigvals, eigvecs = np.linalg.eigh(cov)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def test_gaussian_stats_are_the_sample_mean_and_unbiased_covariance():
  feats = _correlated(np.random.RandomState(0), 50, 3)
  mu, cov = metrics.gaussian_stats(feats)
  centred = feats - feats.mean(0)
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, centred.T @ centred / 49, rtol=1e-10)
  assert metrics.gaussian_stats(feats[:, :1])[1].shape == (1, 1)
  with pytest.raises(ValueError, match="N >= 2"):
    metrics.gaussian_stats(feats[:1])


def test_frechet_distance_of_a_set_with_itself_is_zero():
  feats = 10.0 * _correlated(np.random.RandomState(0), 500, 16)
  scale = np.trace(np.cov(feats, rowvar=False))
  assert metrics.frechet_distance(feats, feats) <= 1e-6 * scale


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
  rng = np.random.RandomState(1)
  feats, shift = _correlated(rng, 400, 8), rng.normal(size=8)
  assert metrics.frechet_distance(feats, feats + shift) == pytest.approx(
      np.sum(shift ** 2), rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
  # Whitened samples have sample covariance exactly I, so scaling the columns by sqrt(var)
  # gives sample statistics exactly (mu, diag(var)): d² = ‖Δμ‖² + Σ (√va − √vb)².
  rng = np.random.RandomState(2)

  def with_stats(mu, var, n):
    x = rng.normal(size=(n, len(mu)))
    x -= x.mean(0)
    x = np.linalg.solve(np.linalg.cholesky(np.cov(x, rowvar=False)), x.T).T
    return x * np.sqrt(var) + mu

  mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
  var_a, var_b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
  distance = metrics.frechet_distance(with_stats(mu_a, var_a, 300), with_stats(mu_b, var_b, 200))
  assert distance == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_matches_the_symmetric_form_for_full_covariances():
  # Tr (Σa Σb)^{1/2} = Tr (Σa^{1/2} Σb Σa^{1/2})^{1/2}, the latter by eigendecompositions.
  rng = np.random.RandomState(3)
  a, b = _correlated(rng, 300, 10), 0.5 * _correlated(rng, 250, 10)
  (mu_a, cov_a), (mu_b, cov_b) = metrics.gaussian_stats(a), metrics.gaussian_stats(b)
  root_a = _symmetric_sqrt(cov_a)
  expected = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
              - 2 * np.trace(_symmetric_sqrt(root_a @ cov_b @ root_a)))
  assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_with_singular_covariances_is_finite_and_close():
  # A shared constant column makes Σa Σb singular; the distance is that of the other columns
  # up to the eps·I regularisation.
  rng = np.random.RandomState(4)
  a, b = _correlated(rng, 200, 5), _correlated(rng, 200, 5) + 1.0
  expected = metrics.frechet_distance(a, b)
  pad = lambda x: np.concatenate([x, np.full((len(x), 3), 7.0)], axis=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    distance = metrics.frechet_distance(pad(a), pad(b))
    assert metrics.frechet_distance(pad(a), pad(a)) <= 1e-6
  assert distance == pytest.approx(expected, rel=1e-4)


# --- feature classifier ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 28, 32])
def test_feature_classifier_shapes(size):
  model = metrics.FeatureClassifier(num_classes=7)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 7)
  features = jax.eval_shape(lambda v: model.apply(v, x, method="features"), variables)
  assert features.shape == (2, metrics.FEATURE_DIM)


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
  """(cache_dir, params) of the classifier trained on the digits train split, cached."""
  cache_dir = str(tmp_path_factory.mktemp("classifier_cache"))
  params = metrics.load_or_train_classifier(_digits_config(), cache_dir, seed=0,
                                            steps=CLASSIFIER_STEPS)
  return cache_dir, params


def test_classifier_learns_digits_and_has_128_features(digits_classifier):
  _, params = digits_classifier
  images, labels = data.load_eval_split(_digits_config(), "test")
  assert metrics.classifier_accuracy(params, images, labels, batch_size=128) > 0.85
  # Batching (a zero-padded last batch) does not change the outputs.
  features = metrics.classifier_features(params, images, batch_size=100)
  assert features.shape == (len(images), metrics.FEATURE_DIM) and features.dtype == np.float32
  np.testing.assert_allclose(features, metrics.classifier_features(params, images), rtol=1e-5,
                             atol=1e-5)
  assert metrics.classifier_logits(params, images).shape == (len(images), 10)


def test_sample_frechet_distance_is_zero_for_the_same_images_and_grows_with_noise(
    digits_classifier):
  _, params = digits_classifier
  images, _ = data.load_eval_split(_digits_config(), "test")
  noisy = np.clip(images + np.random.RandomState(0).normal(0, 0.5, images.shape), -1, 1)
  assert metrics.sample_frechet_distance(params, images, images) < 1e-6
  train_images, _ = data.load_eval_split(_digits_config(), "train")
  real = metrics.sample_frechet_distance(params, images, train_images[:len(images)])
  assert metrics.sample_frechet_distance(params, images, noisy) > 2 * real


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def _no_training(*args, **kwargs):
  raise AssertionError("the cached classifier was retrained")


def test_classifier_cache_round_trip_is_bitwise(digits_classifier, monkeypatch):
  cache_dir, params = digits_classifier
  path = metrics.classifier_cache_path(_digits_config(), cache_dir, 0, CLASSIFIER_STEPS)
  assert os.listdir(cache_dir) == [os.path.basename(path)]  # no temporary file left
  monkeypatch.setattr(metrics, "train_classifier", _no_training)
  reloaded = metrics.load_or_train_classifier(_digits_config(), cache_dir, seed=0,
                                              steps=CLASSIFIER_STEPS)
  _assert_bitwise_equal(reloaded, params)
  # Another seed, image size or dataset is another file.
  other = _digits_config()
  other.image_size = 32
  assert len({path, metrics.classifier_cache_path(_digits_config(), cache_dir, 1),
              metrics.classifier_cache_path(other, cache_dir, 0, CLASSIFIER_STEPS)}) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shapes"])
def test_an_unusable_cache_file_is_retrained(digits_classifier, tmp_path, monkeypatch, damage):
  cache_dir, params = digits_classifier
  path = metrics.classifier_cache_path(_digits_config(), str(tmp_path), 0, CLASSIFIER_STEPS)
  if damage == "wrong_shapes":  # a valid .npz, but of a 3-class classifier
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep="/")
    flat["params/head/kernel"] = flat["params/head/kernel"][:, :3]
    flat["params/head/bias"] = flat["params/head/bias"][:3]
    np.savez(path, **flat)
  else:
    with open(metrics.classifier_cache_path(_digits_config(), cache_dir, 0, CLASSIFIER_STEPS),
              "rb") as f:
      good = f.read()
    with open(path, "wb") as f:
      f.write(b"not an npz file" if damage == "garbage" else good[:len(good) // 2])
  calls = []

  def fake_training(images, labels, key, num_classes, steps):
    calls.append((images.shape, num_classes, steps))
    return params

  monkeypatch.setattr(metrics, "train_classifier", fake_training)
  retrained = metrics.load_or_train_classifier(_digits_config(), str(tmp_path), seed=0,
                                               steps=CLASSIFIER_STEPS)
  assert calls == [((1500, 8, 8, 1), 10, CLASSIFIER_STEPS)]
  _assert_bitwise_equal(retrained, params)
  monkeypatch.setattr(metrics, "train_classifier", _no_training)  # the file is good again
  _assert_bitwise_equal(
      metrics.load_or_train_classifier(_digits_config(), str(tmp_path), seed=0,
                                       steps=CLASSIFIER_STEPS), params)


def test_load_or_train_classifier_rejects_points():
  config = _digits_config()
  config.name = "toy2d"
  with pytest.raises(ValueError, match="needs images"):
    metrics.load_or_train_classifier(config, "/nonexistent")


def test_an_interrupted_cache_write_leaves_no_file(digits_classifier, tmp_path, monkeypatch):
  _, params = digits_classifier

  def interrupted_savez(file, **arrays):
    file.write(b"PK\x03\x04 half a zip")
    raise KeyboardInterrupt

  monkeypatch.setattr(metrics, "train_classifier", lambda *args: params)
  monkeypatch.setattr(np, "savez", interrupted_savez)
  with pytest.raises(KeyboardInterrupt):
    metrics.load_or_train_classifier(_digits_config(), str(tmp_path), steps=CLASSIFIER_STEPS)
  assert not os.listdir(tmp_path)
