"""The training program: bad configs fail early, 1 vs 4 devices agree, resume is bitwise,
every mode runs and writes what it says."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffenc_jax import checks, data, methods, runs, train
from tests.conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


@pytest.mark.parametrize("override,message", [
    ({"data.name": "imagenet"}, "unknown name 'imagenet'"),
    ({"model.latent_dim": 0}, "latent_dim must be > 0"),
    ({"train.batch_size": 6}, "not divisible by the 4 devices"),
    ({"data.name": "idx", "data.data_dir": "/nonexistent/mnist"}, "/nonexistent/mnist"),
    ({"em.langevin.step_rule": "hmc"}, "unknown em.langevin.step_rule"),
    ({"model.decoder": "flow"}, "unknown decoder"),
    ({"em.langevin.mc_samples": 3}, "(even with antithetic)"),
    ({"data.augment_shift": -1}, "augment_shift must be >= 0"),
    ({"data.name": "toy2d", "data.augment_shift": 1}, "augment_shift needs image data"),
    ({"em.encoder_shift": -1}, "em.encoder_shift must be >= 0"),
    ({"data.name": "toy2d", "data.augment_shift": 0, "em.encoder_shift": 1},
     "em.encoder_shift needs image data"),
    ({"method": "vae", "em.encoder_shift": 1}, "needs method='diffenc'"),
    ({"em.em_shift": -1}, "em.em_shift must be >= 0"),
    ({"em.em_shift": 1, "em.em_shift_fraction": 0.0}, "em_shift_fraction must be in"),
    ({"train.weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"train.lr_schedule": "step"}, "unknown train.lr_schedule 'step'"),
    ({"train.final_lr": 2.0}, "final_lr must be in [0, 1]"),
    # each of these was accepted, or crashed after compiling or after writing config.json
    ({"train.num_steps": 0}, "train.num_steps must be >= 1"),
    ({"train.num_steps": -3}, "train.num_steps must be >= 1"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints must be >= 1"),
    ({"train.enc_lr": -1e-3}, "train.enc_lr must be > 0"),
    ({"train.dec_lr": 0.0}, "train.dec_lr must be > 0"),
    ({"train.ema_decay": 2.0}, "train.ema_decay must be in [0, 1]"),
    ({"em.langevin.step_size": -0.5}, "em.langevin.step_size must be > 0"),
    ({"train.eval_every": 0}, "train.eval_every must be >= 1"),
    ({"train.log_every": 0}, "train.log_every must be >= 1"),
    ({"train.checkpoint_every": 0}, "train.checkpoint_every must be >= 1"),
    ({"encoder_sampler.num_steps": 0}, "encoder_sampler.num_steps must be >= 1"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"em.gaussian_warmup_rounds": 5}, "needs model.decoder='diffusion'"),
    ({"model.decoder": "diffusion", "em.gaussian_warmup_rounds": 5,
      "em.joint_warmup_rounds": 5}, "two warm-ups: set one"),
    ({"em.warm_langevin.step_rule": "hmc"}, "unknown em.warm_langevin.step_rule"),
    # the warm-up's chain is checked as the E-step's is (`chain.validate`)
    ({"em.warm_langevin.step_size": 0.0}, "em.warm_langevin.step_size must be > 0"),
    ({"em.em_enc_lr_scale": 0.0}, "em.em_enc_lr_scale must be > 0"),
    ({"model.decoder": "diffusion", "model.denoiser": "dit", "model.dit_dtype": "float16"},
     "model.dit_dtype='float16' is not one of"),
    ({"eval.rate_estimator": "elbo"}, "unknown eval.rate_estimator 'elbo'"),
    ({"eval.rate_spacing": "cosine"}, "unknown eval.rate_spacing 'cosine'"),
    ({"eval.rate_steps": 0}, "eval.rate_steps must be >= 1"),
    ({"train.batches_per_round": 0}, "train.batches_per_round must be >= 1"),
    ({"bottleneck.beta": 0.0}, "bottleneck.beta must be > 0"),
    ({"model.enc_noise_draws": 0}, "model.enc_noise_draws must be >= 1"),
])
def test_bad_config_fails_with_one_line(override, message):
  with pytest.raises(train.UsageError) as err:
    checks.validate_config(tiny_config(**override), num_devices=4)
  assert message in str(err.value)
  assert "\n" not in str(err.value)


def test_bad_config_touches_nothing(tmp_path):
  """Validation runs before the workdir or any checkpoint is created."""
  workdir = tmp_path / "run"
  with pytest.raises(train.UsageError):
    train.train_and_evaluate(tiny_config(**{"model.latent_dim": -1}), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("override,message", [
    ({"train.batch_size": 100_000}, "train.batch_size=100000 exceeds the 4500 training examples"),
    ({"data.augment_shift": 100}, "data.augment_shift=100 must be below half the image size"),
    ({"em.encoder_shift": 14}, "em.encoder_shift=14 must be below half the image size"),
    ({"em.em_shift": 14}, "em.em_shift=14 must be below half the image size"),
    ({"train.mode": "eval"}, "no trained run in"),  # eval of a workdir that does not exist
    ({"model.decoder": "diffusion", "model.denoiser": "dit", "model.dit_patch_size": 5,
      "em.langevin.step_rule": "snr", "em.langevin.mala": False},
     "a multiple of model.dit_patch_size=5"),
])
def test_config_that_does_not_fit_the_data_or_run_touches_nothing(tmp_path, override, message):
  """Checks that need the dataset (or the workdir) also come before anything is written."""
  workdir = tmp_path / "run"
  with pytest.raises(train.UsageError) as err:
    train.train_and_evaluate(tiny_config(**override), str(workdir))
  assert message in str(err.value) and "\n" not in str(err.value)
  assert not workdir.exists()


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=cwd,
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_main_unknown_field_and_missing_config_file_are_one_line(tmp_path):
  """A typo in an override gets ml_collections' own suggestion, on one line; a missing config
  file is one line too (both were 40-60-line tracebacks); nothing is created."""
  workdir = str(tmp_path / "run")
  typo = _main("--config", "configs/tiny.py", "--workdir", workdir, "--config.train.nmu_steps=5")
  assert typo.returncode == 1
  assert typo.stderr.strip().splitlines() == [
      "error: no such config field: 'nmu_steps' Did you mean \"num_steps\" instead of "
      "\"nmu_steps\"?"]
  missing = _main("--config", "configs/nope.py", "--workdir", workdir)
  assert missing.returncode == 1
  lines = missing.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: cannot load the config file "
                                                 "'configs/nope.py': No such file")
  assert not os.path.exists(workdir)


def final_state(config, workdir):
  metrics = train.train_and_evaluate(config, workdir)
  trainer = train.Trainer(config, workdir)
  return jax.device_get(trainer.restore_or_init(require=True)), metrics


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """One uninterrupted 4-round run, shared by the tests below."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  state, metrics = final_state(tiny_config(), workdir)
  return workdir, state, metrics


def test_resume_is_bitwise(tmp_path, straight_run):
  _, straight, _ = straight_run
  # the same run, stopped after 2 rounds and resumed from its checkpoint
  final_state(tiny_config(**{"train.num_steps": 2}), str(tmp_path))
  resumed, _ = final_state(tiny_config(), str(tmp_path))
  assert int(resumed.step) == int(straight.step) == 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # the run's clock (train/elapsed_s) carries on from where the first process stopped
  lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  clock = [(l["step"], l["train/elapsed_s"]) for l in lines if "train/elapsed_s" in l]
  assert [s for s, _ in clock] == [2, 4]
  assert 0 < clock[0][1] < clock[1][1]
  assert runs.previous_elapsed(os.path.join(tmp_path, "metrics.jsonl"), 2) == clock[0][1]
  assert runs.previous_elapsed(os.path.join(tmp_path, "metrics.jsonl"), 0) == 0.0
  # and training moved every network away from its initialisation
  init = jax.device_get(train.Trainer(tiny_config(), str(tmp_path / "x")).fresh_state())
  for net in ("encoder", "decoder"):
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(init.params[net]), jax.tree.leaves(straight.params[net])))


def _tree(path) -> dict:
  """{relative path: bytes} of every file under path."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def test_rejected_resume_changes_nothing(tmp_path, straight_run):
  """Resuming (or evaluating) a run with a changed model is refused in one line naming the field,
  before anything is written: config.json still describes the checkpoints, which still load.
  (It used to overwrite config.json first, so that the run could no longer be loaded.)"""
  from diffenc_jax import api
  workdir = str(tmp_path / "run")
  shutil.copytree(straight_run[0], workdir)
  before = _tree(workdir)
  for mode in ("train", "eval"):
    with pytest.raises(train.UsageError) as err:
      train.train_and_evaluate(tiny_config(**{"model.latent_dim": 8, "train.mode": mode}), workdir)
    assert "model.latent_dim=4, not 8" in str(err.value) and "\n" not in str(err.value)
  assert _tree(workdir) == before
  assert api.Autoencoder.load(workdir).latent_dim == 4
  # what may change on resume passes; a training field that may not is named
  checks.check_resume(tiny_config(**{"train.num_steps": 9, "train.log_every": 3,
                                    "eval.batch_size": 16, "train.mode": "eval"}), workdir)
  with pytest.raises(train.UsageError, match="train.enc_lr=0.001, not 0.002"):
    checks.check_resume(tiny_config(**{"train.enc_lr": 2e-3}), workdir)
  # and a config whose shapes differ from the checkpoint's never restores partially
  with pytest.raises(train.UsageError, match="cannot restore checkpoint 4 .* does not match"):
    train.Trainer(tiny_config(**{"model.latent_dim": 5}), workdir).restore_or_init()
  assert _tree(workdir) == before


_DEVICE_SCRIPT = """
import sys, json, jax, numpy as np
sys.path.insert(0, {root!r})
from configs import tiny
from diffenc_jax import train
config = tiny.get_config()
config.train.num_steps = 1
# the regularisers too: shifts, dropout and decay must not depend on the device layout
config.data.augment_shift = 1
config.model.dec_dropout = 0.1
config.train.weight_decay = 0.1
trainer = train.Trainer(config, {workdir!r})
state = trainer.fresh_state()
from diffenc_jax import data
batches = data.TrainBatches(config.data, batch_size=config.train.batch_size, seed=config.seed)
xs, index = trainer.global_batch(batches, 0)
state, metrics = trainer.round(state, xs, jax.random.key(0), index)
np.savez({out!r}, *[np.asarray(x) for x in jax.tree.leaves(state.params)])
print(jax.device_count())
"""


def test_one_and_four_devices_agree(tmp_path):
  results = []
  for n in (1, 4):
    out = str(tmp_path / f"params{n}.npz")
    env = {**os.environ, "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count={n}",
           "JAX_PLATFORMS": "cpu"}
    script = _DEVICE_SCRIPT.format(root=ROOT, workdir=str(tmp_path / f"w{n}"), out=out)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == str(n)
    loaded = np.load(out)
    results.append([loaded[k] for k in sorted(loaded.files, key=lambda s: int(s[4:]))])
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_modes_write_their_outputs(straight_run):
  workdir, _, metrics = straight_run
  for key in ("psnr_z0", "psnr_zK", "rate_nats", "gap"):
    assert np.isfinite(metrics[key])
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("eval/psnr_z0" in l for l in lines) and any("train/gap" in l for l in lines)
  assert os.path.exists(os.path.join(workdir, "recon_000004.png"))
  assert os.listdir(os.path.join(workdir, "tb"))
  for mode, name in (("eval", "eval.json"), ("reconstruct", "reconstructions.png"),
                     ("sample", "samples.png"), ("encode", "latents.npz")):
    train.train_and_evaluate(tiny_config(**{"train.mode": mode}), workdir)
    assert os.path.exists(os.path.join(workdir, name)), mode
  evaluated = json.load(open(os.path.join(workdir, "eval.json")))
  assert evaluated["step"] == 4
  # eval mode on the final checkpoint reproduces the metrics the run reported at its end
  np.testing.assert_allclose(evaluated["psnr_z0"], metrics["psnr_z0"], rtol=1e-5)
  latents = np.load(os.path.join(workdir, "latents.npz"))
  assert latents["train_z0"].shape == (4500, 4) and latents["test_zK"].shape == (64, 4)


def test_diffusion_decoder_round(tmp_path):
  """One EM round with the z-conditioned U-Net decoder: finite metrics, both nets updated."""
  config = tiny_config(**{"model.decoder": "diffusion", "em.langevin.step_rule": "fixed",
                          "em.langevin.step_size": 0.01, "em.langevin.max_move": 1.0,
                          "em.langevin.mala": False})
  trainer = train.Trainer(config, str(tmp_path))
  state = trainer.fresh_state()
  init = jax.device_get(state.params)
  batches = data.TrainBatches(config.data, batch_size=config.train.batch_size, seed=0)
  xs, index = trainer.global_batch(batches, 0)
  state, metrics = trainer.round(state, xs, jax.random.key(0), index)
  for k, v in metrics.items():
    assert np.isfinite(float(v)), k
  assert float(metrics["move"]) > 0
  for net in ("encoder", "decoder"):
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(init[net]), jax.tree.leaves(state.params[net])))


def test_weight_decay_shrinks_kernels_only():
  """AdamW with zero gradients: kernels scale by exactly 1 − lr·wd, biases stay."""
  import jax.numpy as jnp
  from diffenc_jax import train_state
  lr, wd = 1e-2, 0.5
  opt = train_state.make_optimizer(lr, warmup_steps=1, grad_clip=1.0, weight_decay=wd)
  params = {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)}
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -lr * wd * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["bias"], 0.0)


def test_cosine_schedule_counts_every_update_of_every_round():
  """With a constant gradient Adam's bias-corrected step is exactly the learning rate, so the
  per-update moves trace the schedule: linear warm-up from lr/warmup_steps, then lr·(f + (1 − f)(1 + cos πu)/2)
  with u the fraction of the decay, ending at f·lr after num_steps rounds × updates per round
  (the diffenc decoder is updated m_updates = 2 times per round)."""
  import jax.numpy as jnp
  from diffenc_jax import train_state
  rounds, per_round, warm, lr, f = 6, 2, 3, 1e-2, 0.1
  config = tiny_config(**{"train.lr_schedule": "cosine", "train.final_lr": f,
                          "train.num_steps": rounds, "train.warmup_steps": warm,
                          "train.grad_clip": 1e9})
  opt = train_state.optimizer_for(config, lr, per_round)
  params = jnp.zeros(())
  state = opt.init(params)
  moves = []
  for _ in range(rounds * per_round + 2):
    updates, state = opt.update(jnp.ones(()), state, params)
    moves.append(-float(updates))
  total = rounds * per_round
  expected = [lr / warm + (lr - lr / warm) * n / warm if n < warm else
              lr * (f + (1 - f) * 0.5 * (1 + np.cos(np.pi * min(n - warm, total - warm)
                                                     / (total - warm))))
              for n in range(total + 2)]
  np.testing.assert_allclose(moves, expected, rtol=1e-4)
  assert moves[-1] == pytest.approx(f * lr, rel=1e-4)


def test_decoder_dropout_only_in_the_training_loss():
  """dec_dropout changes the M-step loss (key-dependent, inverted-dropout scaled) but not the
  deterministic mean that the E-step and evaluation use."""
  from diffenc_jax import methods
  x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1), minval=-1, maxval=1)
  z = jax.random.normal(jax.random.key(2), (8, 4))
  plain = methods.get_method(tiny_config(), (28, 28, 1))
  dropped = methods.get_method(tiny_config(**{"model.dec_dropout": 0.5}), (28, 28, 1))
  params = plain.init_state(jax.random.key(0)).params["decoder"]
  nll = plain.nll(params, x, z, None)
  np.testing.assert_array_equal(plain.decoder.loss(params, x, z, jax.random.key(3)), nll)
  np.testing.assert_array_equal(dropped.decoder.mean(params, z), plain.decoder.mean(params, z))
  a, b = (dropped.decoder.loss(params, x, z, jax.random.key(k)) for k in (3, 4))
  assert not np.allclose(a, nll) and not np.allclose(a, b)


def latent_prior_runs(config_with_prior, xs):
  """Two jitted rounds on xs (E, B, ...) of the method of config_with_prior(False) and of
  config_with_prior(True), from one seed; asserts that the encoder and decoder end bitwise
  alike and that only the second has a prior, whose loss is finite. Returns the second run's
  (method, initial state, state, last metrics)."""
  from diffenc_jax import methods
  runs = {}
  for flag in (False, True):
    method = methods.get_method(config_with_prior(flag), xs.shape[2:])
    state = init = method.init_state(jax.random.key(0))
    train_round = jax.jit(method.train_round)
    for i in range(2):
      state, metrics = train_round(state, xs, jax.random.key(10 + i))
    runs[flag] = (method, init, state, metrics)
  for net in ("encoder", "decoder"):
    for a, b in zip(jax.tree.leaves(runs[False][2].params[net]),
                    jax.tree.leaves(runs[True][2].params[net])):
      np.testing.assert_array_equal(a, b)
  assert "prior" not in runs[False][2].params and np.isfinite(runs[True][3]["prior_loss"])
  return runs[True]


def test_latent_prior_leaves_em_untouched_and_is_sampled():
  """em.latent_prior adds a prior fitted to detached z⁰ with its own key: the encoder and
  decoder of two rounds are bitwise those of a run without it; samples come from the prior."""
  xs = jax.random.uniform(jax.random.key(1), (1, 8, 28, 28, 1), minval=-1, maxval=1)
  method, init, state, metrics = latent_prior_runs(
      lambda flag: tiny_config(**{"em.latent_prior": flag}), xs)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(init.params["prior"]), jax.tree.leaves(state.params["prior"])))
  key = jax.random.key(3)
  np.testing.assert_array_equal(method.sample_latents(state.params, key, 4),
                                method.prior.sample(state.params["prior"], key, 4))
  assert not np.allclose(method.sample_latents(state.params, key, 4),
                         jax.random.normal(key, (4, method.latent_dim)))


def test_latent_ddpm_prior_fits_a_gaussian():
  """The latent DDPM prior trained on draws of N(μ, diag s²) samples that law's moments (with
  the default clipped ancestral sampler; unclipped deterministic DDIM gave means ~(69, −24))."""
  import jax.numpy as jnp
  import optax
  from diffenc_jax import latent_prior, schedules
  config = tiny_config(**{"model.latent_dim": 2, "latent_prior.hidden": 64,
                          "latent_prior.blocks": 2, "latent_prior.steps": 50})
  prior = latent_prior.LatentDDPMPrior(config, schedules.get_schedule(**config.schedule))
  mu, s = jnp.array([2.0, -1.0]), jnp.array([0.5, 1.5])
  opt = optax.adam(3e-3)
  params = prior.init(jax.random.key(0))

  def step(carry, key):
    params, opt_state = carry
    k_z, k_loss = jax.random.split(key)
    z = mu + s * jax.random.normal(k_z, (256, 2))
    grads = jax.grad(lambda p: prior.loss(p, z, k_loss).mean())(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.jit(lambda c, k: jax.lax.scan(step, c, k))(
      (params, opt.init(params)), jax.random.split(jax.random.key(1), 3000))
  z = prior.sample(params, jax.random.key(2), 4000)
  np.testing.assert_allclose(z.mean(0), mu, atol=0.1)
  np.testing.assert_allclose(z.std(0), s, rtol=0.1)


def _interrupted_run(workdir, monkeypatch, failing_round, error):
  """A Trainer whose round `failing_round` (0-based) raises `error` (or returns NaN metrics for
  error=None); returns (the exception train() raised, calls of wait_until_finished after it)."""
  import orbax.checkpoint as ocp
  trainer = train.Trainer(tiny_config(), workdir)
  real_round, calls, waits = trainer.round, [0], []
  failed = []

  def round_fn(state, xs, key, index, phase=None):
    calls[0] += 1
    if calls[0] - 1 == failing_round:
      failed.append(True)
      if error is not None:
        raise error
      state, metrics = real_round(state, xs, key, index, phase)
      return state, {**metrics, "gap": metrics["gap"] * np.nan}
    return real_round(state, xs, key, index, phase)

  real_wait = ocp.CheckpointManager.wait_until_finished
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished",
                      lambda self: (waits.append(bool(failed)), real_wait(self))[1])
  trainer.round = round_fn
  with pytest.raises(BaseException) as err:
    trainer.train()
  return err.value, sum(waits)


@pytest.mark.parametrize("error", [None, KeyboardInterrupt()], ids=["diverged", "interrupted"])
def test_stopped_run_waits_for_its_checkpoint_and_names_it(tmp_path, monkeypatch, error):
  """Divergence or Ctrl-C after the asynchronous save of round 2 began: the save is finished
  (it used to be abandoned as 2.orbax-checkpoint-tmp) and the error names what is on disk; a
  run stopped before any save says that none is (it used to say '(None) is kept')."""
  workdir = str(tmp_path / "run")
  stopped, waits = _interrupted_run(workdir, monkeypatch, 3, error)
  assert isinstance(stopped, FloatingPointError if error is None else KeyboardInterrupt)
  assert waits >= 1  # pending saves were awaited after the failure
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  assert f"the newest checkpoint on disk is 2 ({workdir}/checkpoints/2)" in str(stopped)
  assert "\n" not in str(stopped)
  stopped, _ = _interrupted_run(str(tmp_path / "early"), monkeypatch, 1, error)
  assert "no checkpoint is on disk" in str(stopped)


def _damage(step_dir, how):
  """Truncates, or flips one byte in the middle of, the largest data file of a checkpoint."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    raw = bytearray(f.read())
    if how == "truncate":
      f.truncate(len(raw) // 2)
    else:
      raw[len(raw) // 2] ^= 0xFF
      f.seek(0)
      f.write(raw)


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path, straight_run, capsys):
  """A flipped byte inside checkpoint 4 (orbax restores it without complaint: one Adam moment
  differed) fails its sha256; evaluation and `Autoencoder.load` use checkpoint 2 with one
  warning naming 4, and leave 4 where it is. A truncated checkpoint 4 (orbax errors) is moved
  aside by training, which resumes from 2 and ends bitwise equal to the uninterrupted run."""
  from diffenc_jax import api, checkpointing
  source, straight, _ = straight_run
  flipped, truncated = str(tmp_path / "flipped"), str(tmp_path / "truncated")
  for workdir, how in ((flipped, "flip"), (truncated, "truncate")):
    shutil.copytree(source, workdir)
    _damage(os.path.join(workdir, "checkpoints", "4"), how)
  capsys.readouterr()
  restored = train.Trainer(tiny_config(), flipped).restore_or_init(require=True)
  assert int(restored.step) == 2
  assert api.Autoencoder.load(flipped).step == 2
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 2 and all(
      "checkpoint 4 is unreadable (its data does not match the checksum saved with it)" in w
      and "using checkpoint 2" in w for w in warnings)
  assert os.path.isdir(os.path.join(flipped, "checkpoints", "4"))
  # the checksum is the one of the state that was saved
  intact = train.Trainer(tiny_config(), source)
  meta = intact.checkpoints.metadata(4).custom_metadata
  assert meta[checkpointing.DIGEST_KEY] == checkpointing.state_digest(straight)

  resumed, _ = final_state(tiny_config(), truncated)
  err = capsys.readouterr().err
  assert f"moved {truncated}/checkpoints/4 to {truncated}/damaged_checkpoints/4" in err
  assert os.listdir(os.path.join(truncated, "damaged_checkpoints", "4"))
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_second_run_in_a_workdir_is_refused(tmp_path, straight_run):
  """A lock file with the owner's pid and host: a live owner (here a sleeping process) or one
  on another host refuses a second run in one line, before anything is written; a dead owner
  on this host (a killed run) is a stale lock and is taken over; a finished run leaves none."""
  from diffenc_jax import checkpointing
  assert not os.path.exists(os.path.join(straight_run[0], checkpointing.LOCK_NAME))
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir / checkpointing.LOCK_NAME
  host = socket.gethostname()
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    for pid, owner_host in ((sleeper.pid, host), (1, "another-host")):
      lock.write_text(json.dumps({"pid": pid, "host": owner_host}))
      with pytest.raises(train.UsageError) as err:
        train.train_and_evaluate(tiny_config(), str(workdir))
      assert f"in use by process {pid} on host {owner_host}" in str(err.value)
      assert "\n" not in str(err.value)
      assert sorted(os.listdir(workdir)) == [checkpointing.LOCK_NAME]
  finally:
    sleeper.kill()
    sleeper.wait()
  lock.write_text(json.dumps({"pid": sleeper.pid, "host": host}))  # now dead: stale
  with checkpointing.WorkdirLock(str(workdir)) as taken:
    assert json.loads(lock.read_text()) == taken.owner == {"pid": os.getpid(), "host": host}
    with pytest.raises(checkpointing.WorkdirInUse):  # held, even against this very process
      checkpointing.WorkdirLock(str(workdir)).acquire()
  assert not lock.exists()


_PROCESS_SCRIPT = """
import sys, jax, numpy as np
sys.path.insert(0, {root!r})
from configs import tiny
from diffenc_jax import train
config = tiny.get_config()
config.train.num_steps = 2
train.train_and_evaluate(config, {workdir!r})
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 2, 1)
state = train.Trainer(config, {workdir!r}).restore_or_init(require=True)
local = [np.asarray(a.addressable_data(0)) for a in jax.tree.leaves(state.params)]
np.savez({out!r} + str(jax.process_index()), *local)
"""


def test_two_processes_match_one(tmp_path):
  """Two processes on localhost (jax.distributed over JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID; CPU collectives: gloo, jax's default), one CPU device each, each reading its
  half of every batch: 2 rounds, a checkpoint and an evaluation. The checkpointed params equal a
  1-process run's; only process 0 writes config.json and metrics.jsonl."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir, out = str(tmp_path / "run"), str(tmp_path / "params")
  script = _PROCESS_SCRIPT.format(root=ROOT, workdir=workdir, out=out)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE,
         "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
  procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "JAX_PROCESS_ID": str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  one, _ = final_state(tiny_config(**{"train.num_steps": 2}), str(tmp_path / "one"))
  for i in range(2):
    loaded = np.load(f"{out}{i}.npz")
    two = [loaded[k] for k in sorted(loaded.files, key=lambda s: int(s[4:]))]
    for a, b in zip(jax.tree.leaves(one.params), two, strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [l["step"] for l in lines] == [2, 2]  # one train/ and one eval/ line, written once
  assert sum("train/gap" in l for l in lines) == sum("eval/psnr_z0" in l for l in lines) == 1
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 2


def _rounds(config, num_rounds):
  """The state after num_rounds training rounds, run directly (no checkpoints, no evaluation)."""
  trainer = train.Trainer(config, "/nonexistent/unused")
  state = trainer.fresh_state()
  batches = data.TrainBatches(config.data, batch_size=config.train.batch_size, seed=config.seed)
  for step in range(num_rounds):
    xs, index = trainer.global_batch(batches, step)
    state, _ = trainer.round(state, xs, jax.random.fold_in(jax.random.key(config.seed), step),
                             index, trainer.phase_of(step))
  return jax.device_get(state)


@pytest.mark.parametrize("signum", [15, 2], ids=["SIGTERM", "SIGINT"])
def test_signal_during_a_save_keeps_the_round_and_resumes_bitwise(tmp_path, signum):
  """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) sent while a checkpoint is being
  written (its `N.orbax-checkpoint-tmp` on disk): the run finishes and checkpoints its current
  round, releases the lock, prints one line naming the checkpoint and exits 128 + signal. (It
  used to exit 143 silently, leaving the tmp folder and the lock; Ctrl-C lost that checkpoint.)
  Resumed, it ends bitwise where an uninterrupted run does."""
  import signal
  import time
  from diffenc_jax import checkpointing
  workdir, rounds = tmp_path / "run", 8
  ckpts = workdir / "checkpoints"
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config", "configs/tiny.py",
       f"--config.train.num_steps={rounds}", f"--config.train.eval_every={rounds}",
       "--workdir", str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  seen = None
  while seen is None and proc.poll() is None:
    names = os.listdir(ckpts) if ckpts.is_dir() else []
    seen = next((n for n in names if "orbax-checkpoint-tmp" in n), None)
    time.sleep(0.001)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  assert seen is not None, "the run ended before a save was seen"
  assert proc.returncode == 128 + signum, err[-2000:]
  errors = [l for l in err.splitlines() if "error" in l.lower() or "Traceback" in l]
  assert len(errors) == 1, err[-3000:]
  name = signal.Signals(signum).name
  done = int(errors[0].split(" after ")[1].split()[0])
  assert errors[0] == (f"error: stopped by {name} after {done} rounds; the newest checkpoint on "
                       f"disk is {done} ({workdir}/checkpoints/{done})")
  assert int(seen.split(".")[0]) <= done < rounds
  assert str(done) in os.listdir(ckpts)
  assert not [n for n in os.listdir(ckpts) if "tmp" in n]
  assert not (workdir / checkpointing.LOCK_NAME).exists()
  if signum != signal.SIGTERM:  # the same path: the checkpoint restores, resumed once below
    config = tiny_config(**{"train.num_steps": rounds})
    assert int(train.Trainer(config, str(workdir)).restore_or_init(require=True).step) == done
    return
  resumed, _ = final_state(tiny_config(**{"train.num_steps": rounds}), str(workdir))
  straight = _rounds(tiny_config(**{"train.num_steps": rounds}), rounds)
  assert int(resumed.step) == rounds
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_this_version_without_its_checksum_is_damaged(tmp_path, straight_run,
                                                                      capsys):
  """A flipped byte in checkpoint 4's _CHECKPOINT_METADATA (orbax then reads no custom metadata,
  or a renamed key hides the checksum) and one in its largest data file used to restore 'with no
  checksum (saved by an older version?)' onto a damaged leaf. Whether a checkpoint must carry a
  checksum is recorded in config.json, not in the checkpoint: it is passed over, 2 restored.
  Only a run whose config.json has no record (an older version's) restores one unverified."""
  from diffenc_jax import runs
  source, straight, _ = straight_run
  meta_name = "_CHECKPOINT_METADATA"
  for how in ("flip", "rename"):
    workdir = tmp_path / how
    shutil.copytree(source, workdir)
    _damage(os.path.join(workdir, "checkpoints", "4"), "flip")
    meta = workdir / "checkpoints" / "4" / meta_name
    raw = bytearray(meta.read_bytes())
    if how == "flip":
      raw[len(raw) // 2] ^= 0xFF
    else:
      raw = raw.replace(b'"state_sha256"', b'"state_sha257"')
    meta.write_bytes(bytes(raw))
    capsys.readouterr()
    assert int(train.Trainer(tiny_config(), str(workdir)).restore_or_init().step) == 2
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint 4 is unreadable (its checksum is missing or " \
        "unreadable" in warnings[0] and "using checkpoint 2" in warnings[0], warnings
  # a run of an older version: no record in config.json, no checksum in its checkpoints
  legacy = tmp_path / "legacy"
  shutil.copytree(source, legacy)
  config = json.loads((legacy / "config.json").read_text())
  assert config.pop(runs.RECORD_KEY)["checksummed_from"] == 0
  (legacy / "config.json").write_text(json.dumps(config))
  meta = legacy / "checkpoints" / "4" / meta_name
  saved = json.loads(meta.read_text())
  saved["custom_metadata"] = {}
  meta.write_text(json.dumps(saved))
  assert checks.checksummed_from(str(legacy)) is None
  restored = train.Trainer(tiny_config(), str(legacy)).restore_or_init()
  assert int(restored.step) == 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  assert "checkpoint 4 in" in capsys.readouterr().err


@contextlib.contextmanager
def _read_only(path):
  """path read-only: by chmod for a user, by a read-only bind mount for root (whom chmod does
  not stop); the test is skipped where neither can be done."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    try:
      yield
    finally:
      os.chmod(path, 0o755)
    return
  mount = lambda *args: subprocess.run(["mount", *args], capture_output=True).returncode == 0
  if not (mount("--bind", str(path), str(path)) and
          mount("-o", "remount,bind,ro", str(path), str(path))):
    subprocess.run(["umount", str(path)], capture_output=True)
    pytest.skip("cannot make a directory read-only here")
  try:
    yield
  finally:
    subprocess.run(["umount", str(path)], check=True)


def test_unusable_workdirs_are_one_line(tmp_path, straight_run):
  """A workdir that is a file, a config.json that is valid JSON but not an object, a read-only
  workdir: each one line, before anything is computed or written (they were tracebacks; a
  read-only run evaluated first and then failed writing eval.json)."""
  from diffenc_jax import api
  def refused(workdir, message, modes=("train", "eval")):
    for mode in modes:
      with pytest.raises(train.UsageError) as err:
        train.train_and_evaluate(tiny_config(**{"train.mode": mode}), str(workdir))
      assert message in str(err.value) and "\n" not in str(err.value), mode

  a_file = tmp_path / "a_file"
  a_file.write_text("not a run")
  refused(a_file, f"the workdir {a_file} is a file, not a directory")
  not_an_object = tmp_path / "list"
  shutil.copytree(straight_run[0], not_an_object)
  (not_an_object / "config.json").write_text("[1, 2]")
  refused(not_an_object, "config.json: not a config (a JSON object of config fields), but list")
  with pytest.raises(train.UsageError, match="not a config"):
    api.Autoencoder.load(str(not_an_object))
  read_only = tmp_path / "read_only"
  shutil.copytree(straight_run[0], read_only)
  before = _tree(read_only)
  with _read_only(read_only):
    refused(read_only, f"cannot write to {read_only}: Read-only file system"
            if os.geteuid() == 0 else f"cannot write to {read_only}: Permission denied")
    assert api.Autoencoder.load(str(read_only)).step == 4  # loading writes nothing
  assert _tree(read_only) == before


@pytest.mark.parametrize("damage", ["array_metadatas", "truncated"])
def test_damaged_checkpoint_under_eval_is_one_warning(tmp_path, straight_run, capfd, damage):
  """A damaged array_metadatas/process_0 or a truncated data file of checkpoint 4, evaluated:
  one warning line and the fallback to checkpoint 2 on the terminal (these printed hundreds of
  lines of orbax warnings and 'Exception ignored' tracebacks); the details go to the workdir's
  log file."""
  from diffenc_jax import runs
  workdir = tmp_path / "run"
  shutil.copytree(straight_run[0], workdir)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  if damage == "truncated":
    _damage(step_dir, "truncate")
  else:
    path = os.path.join(step_dir, "default", "array_metadatas", "process_0")
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
  capfd.readouterr()
  train.train_and_evaluate(tiny_config(**{"train.mode": "eval"}), str(workdir))
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: checkpoint 4 is unreadable (") \
      and err[0].endswith(f"{workdir}/checkpoints/4 left as it is, using checkpoint 2"), err
  assert json.load(open(workdir / "eval.json"))["step"] == 2
  log = (workdir / runs.LOG_NAME).read_text()
  assert f"checkpoint 4 in {workdir} is unreadable" in log and "Traceback" in log


def test_what_a_resume_may_change(tmp_path, straight_run):
  """Raising train.num_steps of a cosine-schedule run is refused in one line (the schedule is a
  function of it: the learning rate would rise again past the old end), while a constant one
  may train longer; a run whose data was replaced is refused by the fingerprint in config.json;
  a config.json of an older version (no record) still resumes and loads. A run killed after it
  logged rounds past its newest checkpoint logs each round once when resumed (they were
  repeated)."""
  from diffenc_jax import api, runs
  source = straight_run[0]
  cosine = tmp_path / "cosine"
  shutil.copytree(source, cosine)
  saved = json.loads((cosine / "config.json").read_text())
  saved["train"]["lr_schedule"] = "cosine"
  (cosine / "config.json").write_text(json.dumps(saved))
  longer = tiny_config(**{"train.lr_schedule": "cosine", "train.num_steps": 8})
  with pytest.raises(train.UsageError) as err:
    checks.check_resume(longer, str(cosine))
  assert "follows a cosine learning-rate schedule over train.num_steps=4 rounds: resumed " \
      "with 8" in str(err.value) and "\n" not in str(err.value)
  longer.train.mode = "eval"
  checks.check_resume(longer, str(cosine))  # evaluation does not follow the schedule
  checks.check_resume(tiny_config(**{"train.num_steps": 8}), source)

  replaced = tmp_path / "replaced"
  shutil.copytree(source, replaced)
  saved = json.loads((replaced / "config.json").read_text())
  recorded = saved[runs.RECORD_KEY]["data"]
  now = runs.data_fingerprint(tiny_config(), data.get_info(tiny_config().data))
  assert recorded == now
  assert recorded["shape"] == [28, 28, 1] and recorded["num_train"] == 4500
  recorded["first_batch_sha256"] = "0" * 64
  (replaced / "config.json").write_text(json.dumps(saved))
  before = _tree(replaced)
  for mode in ("train", "eval"):
    with pytest.raises(train.UsageError) as err:
      train.train_and_evaluate(tiny_config(**{"train.mode": mode}), str(replaced))
    assert f"the data is not what the run in {replaced} was trained on: first_batch_sha256 " \
        f"000000000000… then, {now['first_batch_sha256'][:12]}… now" in str(err.value)
  assert _tree(replaced) == before

  older = tmp_path / "older"  # killed after logging round 4, before checkpoint 4 was saved
  shutil.copytree(source, older)
  shutil.rmtree(older / "checkpoints" / "4")
  saved = json.loads((older / "config.json").read_text())
  del saved[runs.RECORD_KEY]
  (older / "config.json").write_text(json.dumps(saved))
  assert api.Autoencoder.load(str(older)).step == 2
  resumed, _ = final_state(tiny_config(), str(older))
  for a, b in zip(jax.tree.leaves(straight_run[1]), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  lines = [json.loads(l) for l in open(older / "metrics.jsonl")]
  for kind in ("train/gap", "eval/psnr_z0"):
    steps = [l["step"] for l in lines if kind in l]
    assert steps == sorted(set(steps)) and steps[-1] == 4, (kind, steps)
  record = json.loads((older / "config.json").read_text())[runs.RECORD_KEY]
  assert record["checksummed_from"] == 3 and record["data"] == now



def test_persistent_chains_continue_where_they_stopped_and_resume_bitwise(tmp_path):
  """em.chain_slots: an example's chain starts at z⁰ on its first visit and at its last z^K on
  later ones (a planted far-away state is where the chain continues); the chains are part of
  the checkpoint, so a stopped and resumed run ends bitwise equal to a straight one."""
  config = tiny_config(**{"em.chain_slots": 40500, "em.langevin.step_rule": "fixed",
                          "em.langevin.step_size": 1e-9, "em.langevin.mala": False,
                          "em.langevin.num_steps": 1})
  method = methods.get_method(config, (28, 28, 1))
  state = jax.jit(method.init_state)(jax.random.key(0))
  index = jnp.arange(8) * 3
  planted = jnp.full((4, config.model.latent_dim), 5.0)
  chains = state.opt_state["chains"]
  chains = {**chains, "z": chains["z"].at[index[:4]].set(planted),
            "visits": chains["visits"].at[index[:4]].set(1)}
  state = state.replace(opt_state={**state.opt_state, "chains": chains})
  x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1), minval=-1.0)
  e_step = jax.jit(method.e_step, static_argnums=3)
  state, _, lat = e_step(state, x, jax.random.key(2), "em", index)
  np.testing.assert_allclose(lat["zK"][:4], planted, atol=0.01)  # continued from the plant
  np.testing.assert_allclose(lat["zK"][4:], lat["z0"][4:], atol=0.01)  # first visits: from z⁰
  chains = state.opt_state["chains"]
  np.testing.assert_array_equal(chains["z"][index], lat["zK"])
  np.testing.assert_array_equal(chains["visits"][index], [2] * 4 + [1] * 4)
  assert int(chains["visits"].sum()) == 12
  with pytest.raises(ValueError, match="needs the examples' index"):
    method.train_round(state, x[None], jax.random.key(3))

  config = tiny_config(**{"em.chain_slots": 40500})
  straight, _ = final_state(config, str(tmp_path / "straight"))
  final_state(tiny_config(**{"em.chain_slots": 40500, "train.num_steps": 2}),
              str(tmp_path / "resumed"))
  resumed, _ = final_state(config, str(tmp_path / "resumed"))
  assert int(straight.opt_state["chains"]["visits"].sum()) == 4 * config.train.batch_size
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_encoder_shift_moves_the_encoders_image_not_the_chains():
  """em.encoder_shift: the chain runs on the unmoved images (its z^K is the one without the
  shift), and the encoder's update is one optimiser step of its loss on the moved images
  (data.random_shift from the E-step's key) with that z^K as target."""
  import optax
  plain = methods.get_method(tiny_config(), (28, 28, 1))
  moved = methods.get_method(tiny_config(**{"em.encoder_shift": 2}), (28, 28, 1))
  state = jax.jit(plain.init_state)(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1), minval=-1.0)
  key = jax.random.key(2)
  s_plain, _, lat_plain = jax.jit(plain.e_step)(state, x, key)
  s_moved, _, lat_moved = jax.jit(moved.e_step)(state, x, key)
  np.testing.assert_array_equal(lat_moved["zK"], lat_plain["zK"])
  _, k_enc = jax.random.split(key)
  x_moved = data.random_shift(jax.random.fold_in(k_enc, 2), x, 2)
  assert float(jnp.abs(x_moved - x).max()) > 0.5
  (k_loss,) = jax.random.split(k_enc, 1)
  enc = state.params["encoder"]
  grads = jax.grad(moved.encoder_loss)(enc, x_moved, lat_moved["zK"], k_loss)
  updates, _ = moved.enc_opt.update(grads, state.opt_state["encoder"], enc)
  expected = optax.apply_updates(enc, updates)
  for a, b, c in zip(jax.tree.leaves(s_moved.params["encoder"]), jax.tree.leaves(expected),
                     jax.tree.leaves(s_plain.params["encoder"])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  differs = [float(jnp.abs(a - c).max()) for a, c in zip(
      jax.tree.leaves(s_moved.params["encoder"]), jax.tree.leaves(s_plain.params["encoder"]))]
  assert max(differs) > 1e-5
