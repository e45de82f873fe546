"""The baselines (vae, diffae, dmz, diffenc_joint): each trains through `train_and_evaluate`
and evaluates with a finite PSNR, and each has the property that defines it: the VAE's rate is
its closed-form KL, DMZ's codes are soft in training and hard bits at eval, DiffAE's prior
learns from codes without touching the autoencoder, and the joint ablation's gradient reaches
the encoder through its DDIM chain where EM's decoder loss does not."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffenc_jax import checks, em, train

# every method on the digits (8×8), the fastest image data; one-level U-Nets, because the
# tests' time goes into compiling (the random initialisation of every kernel included)
METHOD_OVERRIDES = {
    "vae": {},
    "diffae": {"model.decoder": "diffusion", "model.unet_channel_mult": (1,)},
    "dmz": {"model.decoder": "diffusion", "model.unet_conditioning": "xattn",
            "model.unet_channel_mult": (1,), "dmz.sample_steps": 3},
    "diffenc_joint": {},
}


def baseline_config(method, **overrides):
  config = tiny.get_config()
  config.method = method
  config.data.name = "digits"
  config.train.num_steps = 2
  config.train.log_every = 1
  config.train.eval_every = 2
  for key, value in {**METHOD_OVERRIDES[method], **overrides}.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def trained(method, workdir):
  """Two rounds through train_and_evaluate: (method, initial state, final state, metrics)."""
  config = baseline_config(method)
  metrics = train.train_and_evaluate(config, str(workdir))
  trainer = train.Trainer(config, str(workdir))
  init = jax.device_get(trainer.fresh_state())
  state = jax.device_get(trainer.restore_or_init(require=True))
  assert int(state.step) == 2
  for key in ("psnr_z0", "psnr_zK"):
    assert np.isfinite(metrics[key]) and metrics[key] > 0, (key, metrics[key])
  if method == "vae":  # z^K: its mean refined by diffenc's E-step chain (baselines.VAE.latents)
    assert metrics["gap"] > 0.0
  else:
    assert metrics["gap"] == 0.0  # no posterior refinement: zK is z0
  assert set(state.params) == set(state.opt_state) == set(state.ema)
  for net in state.params:  # every network moved away from its initialisation
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(init.params[net]), jax.tree.leaves(state.params[net]))), net
  return trainer.method, init, state, metrics


def held_out(n=16):
  from diffenc_jax import data
  images, _ = data.load_eval_split(baseline_config("vae").data, "test")
  return jnp.asarray(images[:n])


def nonzero(tree):
  return any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(tree))


def test_vae_rate_is_the_closed_form_kl(tmp_path):
  method, _, state, metrics = trained("vae", tmp_path)
  x = held_out()

  @jax.jit  # one compiled program, not hundreds of eager ops
  def outputs(params, key):
    lat = method.latents(params, x, key)
    return (method.encoder.apply(params["encoder"], x),
            method.rate(params, x, lat["z0"], key, 2), lat["z0"])

  (mean, log_var), rate, z0 = outputs(state.params, jax.random.key(0))
  mean, log_var = np.asarray(mean, np.float64), np.asarray(log_var, np.float64)
  kl = 0.5 * np.sum(mean**2 + np.exp(log_var) - 1.0 - log_var, axis=-1)
  np.testing.assert_allclose(rate, kl, rtol=1e-5, atol=1e-6)
  assert kl.min() > 0
  np.testing.assert_allclose(z0, mean, rtol=1e-5, atol=1e-6)  # its code is the posterior mean
  assert np.isfinite(metrics["rate_nats"]) and metrics["rate_nats"] > 0


def test_dmz_bits_are_soft_in_training_and_hard_at_eval(tmp_path):
  method, _, state, metrics = trained("dmz", tmp_path)
  x, d = held_out(), method.latent_dim

  @jax.jit
  def outputs(params, key):
    k_lat, k_code, k_prior = jax.random.split(key, 3)
    z0 = method.latents(params, x, k_lat)["z0"]
    return (z0, method.rate(params, x, z0, k_lat, 2),
            method.q.train_code(params["encoder"], x, k_code),
            method.sample_latents(params, k_prior, 64))

  z0, rate, soft, samples = (np.asarray(a) for a in outputs(state.params, jax.random.key(0)))
  assert z0.shape == (16, d) and set(np.unique(z0)) <= {0.0, 1.0}
  np.testing.assert_allclose(rate, d * math.log(2), rtol=1e-6)
  np.testing.assert_allclose(metrics["rate_nats"], d * math.log(2), rtol=1e-6)
  assert soft.shape == (16, d)
  assert np.all((soft > 0) & (soft < 1))
  assert np.mean(np.minimum(soft, 1 - soft) > 1e-3) > 0.5  # mostly not saturated bits
  assert set(np.unique(samples)) == {0.0, 1.0}


def test_diffae_prior_learns_from_detached_codes(tmp_path):
  method, init, state, metrics = trained("diffae", tmp_path)
  assert metrics["rate_nats"] == math.inf
  assert any(not np.array_equal(a, b) for a, b in  # the prior trained alongside
             zip(jax.tree.leaves(init.params["prior"]), jax.tree.leaves(state.params["prior"])))
  x = held_out()

  @jax.jit
  def prior_step(state, key):
    def prior_loss(params):
      z = method.encode(params["encoder"], x)
      return method.prior.loss(params["prior"], z, key).mean()
    grads = jax.grad(prior_loss)(state.params)
    return grads, method.apply_gradients(state, grads), method.sample_latents(state.params, key, 5)

  # a step from fresh optimiser moments (Adam's momentum alone would still move a network)
  grads, stepped, z = prior_step(state.replace(opt_state=init.opt_state), jax.random.key(0))
  assert nonzero(grads["prior"])
  assert not nonzero(grads["encoder"]) and not nonzero(grads["decoder"])
  for net in ("encoder", "decoder"):
    for a, b in zip(jax.tree.leaves(state.params[net]), jax.tree.leaves(stepped.params[net])):
      np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(state.params["prior"]), jax.tree.leaves(stepped.params["prior"])))
  # (that the ε-MSE does reach the encoder through z is shown by `trained`: the U-Net's output
  # conv starts at zero, so the encoder can only have moved by the second update's gradient)
  assert z.shape == (5, method.latent_dim) and np.all(np.isfinite(z))


def test_joint_gradient_flows_through_the_ddim_chain(tmp_path):
  method, _, state, _ = trained("diffenc_joint", tmp_path)
  x, key = held_out(), jax.random.key(0)
  # EM for comparison, on the same parameters
  em_config = baseline_config("diffenc_joint", **{"em.langevin.step_rule": "fixed",
                                                  "em.langevin.step_size": 0.01})
  em_method = em.DiffusionEncoder(em_config, method.data_shape)

  @jax.jit
  def encoder_grads(params):
    def chain_loss(enc):  # NLL + β ½‖z⁰‖², without the encoder's own denoising loss
      return method.chain_energy({**params, "encoder": enc}, x, key)[0].mean()

    def m_step_loss(enc):  # the M-step's decoder loss on the E-step's latents
      lat = em_method.latents({**params, "encoder": enc}, x, key)
      return em_method.decoder.loss(params["decoder"], x, lat["zK"], key).mean()

    return jax.grad(chain_loss)(params["encoder"]), jax.grad(m_step_loss)(params["encoder"])

  joint, em_grads = encoder_grads(state.params)
  assert nonzero(joint)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(joint))
  assert not nonzero(em_grads)


@pytest.mark.parametrize("method,override,message", [
    ("dmz", {"model.unet_conditioning": "adagn"}, "needs model.unet_conditioning='xattn'"),
    ("dmz", {"model.decoder": "gaussian"}, "needs model.decoder='diffusion'"),
    ("dmz", {"dmz.temperature": 0.0}, "dmz.temperature must be > 0"),
    ("diffae", {"model.decoder": "gaussian"}, "needs model.decoder='diffusion'"),
    ("diffae", {"diffae.encoder": "vit"}, "unknown diffae.encoder"),
    ("diffae", {"latent_prior.steps": 0}, "latent_prior.steps must be >= 1"),
    ("diffae", {"latent_prior.eta": 2.0}, "latent_prior.eta must be in"),
    ("diffenc_joint", {"em.latent_prior": True, "latent_prior.clip": -1.0},
     "latent_prior.clip must be >= 0"),
])
def test_bad_baseline_config_fails_with_one_line(method, override, message):
  with pytest.raises(train.UsageError) as err:
    checks.validate_config(baseline_config(method, **override), num_devices=1)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_configs_validate():
  import importlib
  from diffenc_jax import methods
  for name in ("mnist_vae", "mnist_diffae", "mnist_dmz", "mnist_joint", "diffae64"):
    config = importlib.import_module(f"configs.{name}").get_config()
    checks.validate_config(config, num_devices=1)
    assert config.model.latent_dim == (512 if name == "diffae64" else 16)
    assert config.train.batch_size == 128
  # DiffAE's 64×64 architecture builds at 32×32 RGB (shapes only)
  method = methods.get_method(config, (32, 32, 3))
  state = jax.eval_shape(method.init_state, jax.random.key(0))
  # the running code statistics of DiffAE's z-normalisation ride along (no optimiser)
  assert set(state.params) == {"encoder", "decoder", "prior", "zstats"}
  assert state.params["zstats"]["mean"].shape == (512,)
  z = jax.eval_shape(method.encode, state.params["encoder"], jnp.zeros((2, 32, 32, 3)))
  assert z.shape == (2, 512)


def test_joint_trains_its_latent_prior_without_touching_the_autoencoder():
  """em.latent_prior on the joint ablation: a prior fitted to the detached z⁰ of each update,
  after it and with its own key: encoder and decoder end two rounds bitwise where they end
  without it, the prior (and its optimiser) moved, and samples come from it."""
  from tests.test_train import latent_prior_runs
  xs = jax.random.uniform(jax.random.key(1), (2, 8, 8, 8, 1), minval=-1, maxval=1)
  method, init, state, metrics = latent_prior_runs(lambda flag: baseline_config(
      "diffenc_joint", **{"em.latent_prior": flag, "train.batches_per_round": 2}), xs)
  assert set(state.params) - {"zstats"} == set(state.opt_state)
  for tree in (state.params, state.ema):  # the parameters and their EMA moved
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(init.params["prior"]), jax.tree.leaves(tree["prior"])))
  counts = [np.asarray(c) for p, c in jax.tree_util.tree_leaves_with_path(state.opt_state["prior"])
            if "count" in jax.tree_util.keystr(p)]
  assert counts and all(c == 4 for c in counts)  # one prior update per batch: 2 rounds × 2
  key = jax.random.key(3)
  np.testing.assert_array_equal(method.sample_latents(state.params, key, 4),
                                method.prior.sample(state.params["prior"], key, 4,
                                                    state.params.get("zstats")))
  assert not np.allclose(method.sample_latents(state.params, key, 4),
                         jax.random.normal(key, (4, method.latent_dim)))


@pytest.mark.parametrize("field", ["em.gaussian_warmup_rounds", "em.joint_warmup_rounds"])
def test_joint_refuses_the_warm_ups_of_em(field):
  """EM's warm-ups are phases of the EM rule: the one-loss ablation has none to run."""
  config = baseline_config("diffenc_joint", **{field: 2, "model.decoder": "diffusion"})
  with pytest.raises(train.UsageError) as err:
    checks.validate_config(config, num_devices=1)
  assert f"{field} " in str(err.value) and "method='diffenc'" in str(err.value)
  assert "\n" not in str(err.value)
