"""The user API: a model trained by `train_and_evaluate` loads from its workdir, and encode,
decode, reconstruct, interpolate and sample agree with one another; lerp/slerp geometry."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffenc_jax import api, data, train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Two training rounds of the tiny config."""
  workdir = str(tmp_path_factory.mktemp("api_run"))
  config = tiny.get_config()
  config.train.num_steps = 2
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def model(workdir):
  return api.Autoencoder.load(workdir)


@pytest.fixture(scope="module")
def images():
  x, _ = data.load_eval_split(tiny.get_config().data, "test", max_examples=4)
  return x


# --- lerp / slerp: pure geometry ---------------------------------------------------------------


def test_lerp_and_slerp_endpoints_and_shapes():
  keys = jax.random.split(jax.random.key(1), 2)
  a, b = (jax.random.normal(k, (3, 5)) for k in keys)  # a batch of 3 pairs, d = 5
  b = 2.5 * b  # unequal norms
  ts = jnp.linspace(0.0, 1.0, 7)
  for path_fn in (api.lerp, api.slerp):
    path = path_fn(a, b, ts)
    assert path.shape == (7, 3, 5)
    np.testing.assert_allclose(path[0], a, atol=1e-6)
    np.testing.assert_allclose(path[-1], b, atol=1e-5)
  np.testing.assert_allclose(api.lerp(a, b, jnp.array([0.25]))[0], 0.75 * a + 0.25 * b,
                             atol=1e-6)


def test_slerp_geometry():
  ts = jnp.linspace(0.0, 1.0, 9)
  # equal norms: the norm stays, and the angle moves linearly
  a, b = jax.random.normal(jax.random.key(2), (2, 16))
  a, b = 3.0 * a / jnp.linalg.norm(a), 3.0 * b / jnp.linalg.norm(b)
  path = api.slerp(a, b, ts)
  np.testing.assert_allclose(jnp.linalg.norm(path, axis=-1), 3.0, rtol=1e-5)
  omega = jnp.arccos(jnp.dot(a, b) / 9.0)
  np.testing.assert_allclose(jnp.arccos(jnp.clip(path @ a / 9.0, -1, 1)), ts * omega, atol=1e-3)
  # orthogonal unit vectors: the midpoint is (a + b)/√2
  e1, e2 = jnp.eye(4)[0], jnp.eye(4)[2]
  np.testing.assert_allclose(api.slerp(e1, e2, jnp.array([0.5]))[0], (e1 + e2) / np.sqrt(2),
                             atol=1e-6)
  # parallel: the straight line; antiparallel: a half circle of constant norm, not through 0
  np.testing.assert_allclose(api.slerp(a, 2 * a, ts), api.lerp(a, 2 * a, ts), rtol=1e-5,
                             atol=1e-5)
  anti = api.slerp(a, -a, ts)
  assert np.all(np.isfinite(anti))
  np.testing.assert_allclose(jnp.linalg.norm(anti, axis=-1), 3.0, rtol=1e-5)
  np.testing.assert_allclose(anti[-1], -a, atol=1e-5)
  np.testing.assert_allclose(jnp.dot(anti[4], a), 0.0, atol=1e-4)  # halfway: orthogonal to a


# --- a trained model ---------------------------------------------------------------------------


def test_decode_of_encode_is_reconstruct(model, images):
  key = jax.random.key(7)
  z = model.encode(images, key)
  assert z.shape == (4, model.latent_dim)
  np.testing.assert_array_equal(model.decode(z, key), model.reconstruct(images, key))
  # refinement starts from the same z⁰ and moves it; the default key is fixed
  zk = model.encode(images, key, refine_steps=2)
  assert zk.shape == z.shape and not np.allclose(zk, z)
  np.testing.assert_array_equal(model.decode(zk, key),
                                model.reconstruct(images, key, refine_steps=2))
  np.testing.assert_array_equal(model.encode(images), model.encode(images))
  x_hat = model.reconstruct(images)
  assert x_hat.shape == images.shape and float(jnp.abs(x_hat).max()) <= 1.0


def test_interpolate_ends_at_the_reconstructions(model, images):
  key = jax.random.key(3)
  x_a, x_b = images[0], images[1]
  path = model.interpolate(x_a, x_b, num=5, key=key)
  assert path.shape == (5,) + model.data_shape
  z_a, z_b = (model.encode(x[None], key) for x in (x_a, x_b))
  for end, z in ((path[0], z_a), (path[-1], z_b)):
    np.testing.assert_allclose(end, model.decode(z, key)[0], atol=1e-5)
  assert not np.allclose(path[0], path[-1])
  # the middle image is the decode of the path's midpoint, for either mode
  for mode, path_fn in (("slerp", api.slerp), ("lerp", api.lerp)):
    mid = path_fn(z_a[0], z_b[0], jnp.array([0.5]))
    np.testing.assert_allclose(model.interpolate(x_a, x_b, num=5, mode=mode, key=key)[2],
                               model.decode(mid, key)[0], atol=1e-5)
  with pytest.raises(ValueError, match="unknown mode"):
    model.interpolate(x_a, x_b, mode="cubic")


def test_sample_shapes_and_range(model):
  x = model.sample(6)
  assert x.shape == (6,) + model.data_shape
  assert np.all(np.isfinite(x)) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
  np.testing.assert_array_equal(x, model.sample(6))  # default key: reproducible
  assert not np.array_equal(x, model.sample(6, jax.random.key(5)))


def test_bad_inputs_are_clear_errors(model, images, tmp_path):
  with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
    model.encode((images + 1.0) * 127.5)  # uint8-range pixels
  with pytest.raises(ValueError, match="must have shape"):
    model.encode(images[:, :14])
  with pytest.raises(ValueError, match="must have shape"):
    model.decode(jnp.zeros((2, model.latent_dim + 1)))
  path = model.save_grid(images, str(tmp_path / "grid.png"), rows=2)
  assert os.path.getsize(path) > 0


def test_what_cannot_be_encoded_is_refused(model, images):
  """NaN pixels used to give NaN latents and NaN 'reconstructions' (documented as in [-1, 1]);
  an empty batch a ZeroDivisionError. Both are one-line ValueErrors now, for latents too."""
  bad = np.array(images)
  bad[1, 3, 4, 0] = np.nan
  bad[2, 0, 0, 0] = np.inf
  for call in (model.encode, model.reconstruct, lambda x: model.encode(x, refine_steps=2)):
    with pytest.raises(ValueError, match="x holds 2 NaN or infinite values"):
      call(bad)
    with pytest.raises(ValueError, match="x is an empty batch"):
      call(images[:0])
  with pytest.raises(ValueError, match="x_a holds 1 NaN"):
    model.interpolate(bad[1], images[0])
  z = np.array(model.encode(images))
  with pytest.raises(ValueError, match="z is an empty batch"):
    model.decode(z[:0])
  z[0, 0] = np.nan
  with pytest.raises(ValueError, match="z holds 1 NaN"):
    model.decode(z)


def test_load_without_a_model_is_one_clear_error(tmp_path, workdir):
  for bad in (tmp_path, tmp_path / "missing"):
    with pytest.raises(train.UsageError) as err:
      api.Autoencoder.load(str(bad))
    assert "no trained model" in str(err.value) and "\n" not in str(err.value)
  assert os.listdir(tmp_path) == []  # loading created nothing
  with pytest.raises(train.UsageError, match="no checkpoint 3 .* holds steps \\[2\\]"):
    api.Autoencoder.load(workdir, step=3)


def test_load_of_a_config_without_a_field_names_it(tmp_path, workdir):
  """A workdir whose config.json lacks a field this version reads (one written before the
  field existed) is one line naming the field; nothing in the workdir changes."""
  import json
  import shutil
  old = tmp_path / "old_run"
  shutil.copytree(workdir, old)
  config = json.loads((old / "config.json").read_text())
  del config["em"]["latent_prior"]
  (old / "config.json").write_text(json.dumps(config))
  before = sorted(str(p) for p in old.rglob("*"))
  with pytest.raises(train.UsageError) as err:
    api.Autoencoder.load(str(old))
  assert "has no field 'latent_prior'" in str(err.value) and "\n" not in str(err.value)
  assert sorted(str(p) for p in old.rglob("*")) == before


def _as_written_before_the_moves(fields: dict, nll_draws: int | None = None) -> dict:
  """config.json's fields as a version before runs.MOVED_FIELDS wrote them: the bottleneck's β
  fields, train.batches_per_round and model.enc_noise_draws in em, the latent prior's in diffae
  (as prior_*), no model.dec_nll_samples (the NLL took em.langevin.mc_samples draws, set to
  nll_draws where given)."""
  import copy
  old = copy.deepcopy(fields)
  for name, value in old.pop("bottleneck").items():
    old["em"][name] = value
  old["em"]["e_updates"] = old["train"].pop("batches_per_round")
  old["em"]["encoder_noise_draws"] = old["model"].pop("enc_noise_draws")
  for name, value in old.pop("latent_prior").items():
    old["diffae"][f"prior_{name}"] = value
  draws = old["model"].pop("dec_nll_samples")
  old["em"]["langevin"]["mc_samples"] = draws if nll_draws is None else nll_draws
  return old


def test_a_run_written_before_fields_moved_reads_at_their_new_place(tmp_path, workdir, model):
  """A config.json with em.beta*, em.e_updates and no model.dec_nll_samples (an older version's)
  reads as the current one: the moved values at their new place (a β of 4 as bottleneck.beta,
  the NLL's draws from em.langevin.mc_samples), the model loads with the same parameters, and
  a resume with the current config is accepted, or refused naming the new field where the
  run's value differs."""
  import json
  import shutil
  from diffenc_jax import checks, runs
  with open(os.path.join(workdir, "config.json")) as f:
    current = json.load(f)
  record = current.pop(runs.RECORD_KEY)
  assert runs.upgrade_fields(_as_written_before_the_moves(current)) == current
  old = tmp_path / "old_run"
  shutil.copytree(workdir, old)
  written = _as_written_before_the_moves(current, nll_draws=3)
  written["em"]["beta"] = 4.0
  (old / "config.json").write_text(json.dumps({**written, runs.RECORD_KEY: record}))
  fields, _ = runs.read_config(str(old))
  assert (fields["bottleneck"]["beta"], fields["train"]["batches_per_round"]) == (4.0, 1)
  assert fields["model"]["dec_nll_samples"] == 3 == fields["em"]["langevin"]["mc_samples"]
  assert "beta" not in fields["em"] and "e_updates" not in fields["em"]
  assert not any(name.startswith("prior_") for name in fields["diffae"])
  loaded = api.Autoencoder.load(str(old))
  assert loaded.config.bottleneck.beta == 4.0
  jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)
  config = tiny.get_config()
  config.train.num_steps = 2
  config.bottleneck.beta, config.em.langevin.mc_samples, config.model.dec_nll_samples = 4.0, 3, 3
  checks.check_resume(config, str(old))
  config.bottleneck.beta = 1.0
  with pytest.raises(checks.UsageError, match="bottleneck.beta=4.0, not 1.0"):
    checks.check_resume(config, str(old))


def test_use_ema_picks_the_ema_parameters(workdir, model):
  ema = api.Autoencoder.load(workdir, use_ema=True, step=2)
  assert model.step == ema.step == 2 and not model.use_ema and ema.use_ema
  state = train.Trainer(model.config, workdir).restore_or_init(require=True)
  for loaded, restored in ((model, state.params), (ema, state.ema)):
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(restored)):
      np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(model.params), jax.tree.leaves(ema.params)))


# --- a diffusion-decoder model: DiffAE's autoencoding and editing --------------------------------


@pytest.fixture(scope="module")
def diffae_model(tmp_path_factory):
  """Twenty rounds of a tiny DiffAE with the transformer denoiser (z-normalised prior)."""
  workdir = str(tmp_path_factory.mktemp("api_diffae"))
  config = tiny.get_config()
  config.method, config.model.decoder, config.model.denoiser = "diffae", "diffusion", "dit"
  config.model.dit_width, config.model.dit_depth = 32, 1
  config.latent_prior.normalize = True
  config.train.num_steps, config.train.eval_every, config.train.checkpoint_every = 20, 20, 20
  config.eval.decoder_steps = 10
  train.train_and_evaluate(config, workdir)
  return api.Autoencoder.load(workdir)


def test_decoding_from_the_inferred_x_T_beats_a_random_one(diffae_model, images):
  """encode_stochastic (DDIM inversion given z) then decode(z, x_T) gives x back far better than
  decoding z from a random x_T; the default z is encode(x)."""
  m, key = diffae_model, jax.random.key(4)
  z = m.encode(images, key)
  x_T = m.encode_stochastic(images, z)
  assert x_T.shape == images.shape
  np.testing.assert_array_equal(m.encode_stochastic(images, key=key), x_T)
  mse = lambda a: float(jnp.mean(jnp.square(a - images)))
  inferred, random = mse(m.decode(z, key, x_T=x_T)), mse(m.decode(z, key))
  assert inferred < 0.1 * random  # measured 0.042 vs 1.36 after 20 rounds


def test_manipulate_moves_z_in_standardised_units(diffae_model, images):
  m, key = diffae_model, jax.random.key(4)
  mean, std = m.code_statistics()
  assert mean.shape == std.shape == (m.latent_dim,) and np.all(std > 0)
  z = m.encode(images, key)
  x_T = m.encode_stochastic(images, z)
  direction = np.eye(m.latent_dim, dtype=np.float32)[0] * 3.0  # normalised inside
  # scale 0 is the reconstruction from x's own x_T; scale s moves z_0 by s std
  np.testing.assert_allclose(m.manipulate(images, direction, 0.0, key),
                             m.decode(z, key, x_T=x_T), atol=1e-5)
  moved = np.asarray(z).copy()
  moved[:, 0] += 2.0 * std[0]
  np.testing.assert_allclose(m.manipulate(images, direction, 2.0, key),
                             m.decode(moved, key, x_T=x_T), atol=1e-4)
  with pytest.raises(ValueError, match="direction must have shape"):
    m.manipulate(images, np.ones(m.latent_dim + 1), 1.0)


def test_x_T_needs_a_diffusion_decoder(model, images):
  with pytest.raises(ValueError, match="needs a diffusion decoder"):
    model.encode_stochastic(images)


def _write_idx(path, array: np.ndarray) -> None:
  """An IDX file of uint8 values: zero, zero, type 0x08, number of dims, sizes, data."""
  import struct
  with open(path, "wb") as f:
    f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
    f.write(struct.pack(f">{array.ndim}I", *array.shape))
    f.write(np.ascontiguousarray(array, np.uint8).tobytes())


def test_a_trained_model_loads_without_its_dataset(tmp_path):
  """A model is an artefact: trained on an IDX copy of the data that is then deleted, it loads
  from config.json and its checkpoint alone (it used to rebuild the trainer, which reads the
  dataset: 'data_dir ... is not a directory'), with the checkpoint's parameters, and encodes,
  decodes and samples."""
  import shutil
  idx = tmp_path / "idx"
  idx.mkdir()
  source = tiny.get_config().data
  for split, (images_name, labels_name) in (
      ("train", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
      ("test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
    x, y = data.load_eval_split(source, split)
    _write_idx(idx / images_name, np.round((x[..., 0] + 1.0) * 127.5))
    _write_idx(idx / labels_name, y)
  config = tiny.get_config()
  config.data.name, config.data.data_dir = "idx", str(idx)
  config.train.num_steps = 2
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  state = train.Trainer(config, workdir).restore_or_init(require=True)
  x, _ = data.load_eval_split(config.data, "test", max_examples=4)
  shutil.rmtree(idx)
  model = api.Autoencoder.load(workdir)
  assert model.step == 2 and model.data_shape == (28, 28, 1)
  for a, b in zip(jax.tree.leaves(model.params),
                  jax.tree.leaves(state.eval_params(config.eval.use_ema)), strict=True):
    np.testing.assert_array_equal(a, b)
  z = model.encode(x)
  assert z.shape == (4, 4) and np.all(np.isfinite(z))
  x_hat = model.decode(z)
  assert x_hat.shape == x.shape and np.all(np.isfinite(x_hat))
  samples = model.sample(3)
  assert samples.shape == (3, 28, 28, 1) and np.all(np.isfinite(samples))


def test_the_api_does_not_load_the_training_program():
  """`diffenc_jax.api` (what opens a trained model) imports neither the training program nor
  its logging: a model opens where only its files are."""
  import subprocess
  import sys
  code = ("import sys, diffenc_jax.api; "
          "print(sorted(m for m in ('diffenc_jax.train', 'tensorboardX') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_what_cannot_be_decoded_or_moved_along_is_refused(model, diffae_model, images):
  """NaN or infinite directions, scales and x_T used to give NaN images; each public input is
  checked as x and z are, in one line."""
  d = model.latent_dim
  for direction, message in ((np.full(d, np.nan), f"direction holds {d} NaN"),
                             (np.where(np.arange(d) == 0, np.inf, 1.0),
                              "direction holds 1 NaN or infinite"),
                             (np.zeros(d), "direction is the zero vector")):
    with pytest.raises(ValueError, match=message):
      model.manipulate(images, direction)
  for scale in (np.nan, np.inf, "2"):
    with pytest.raises(ValueError, match="scale must be a finite number"):
      model.manipulate(images, np.ones(d), scale)
  m, key = diffae_model, jax.random.key(4)
  z = m.encode(images, key)
  x_T = np.array(m.encode_stochastic(images, z))
  x_T[0, 0, 0, 0], x_T[3, 1, 1, 0] = np.nan, -np.inf
  with pytest.raises(ValueError, match="x_T holds 2 NaN or infinite values"):
    m.decode(z, key, x_T=x_T)
  assert np.all(np.isfinite(m.manipulate(images, np.ones(d), 2.0)))
