"""bottleneck.beta_schedule: the β that diffenc's E-step and the VAE's loss use at round s is
the closed form β_start (β / β_start)^min(s / beta_anneal_steps, 1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffenc_jax import baselines, checks, em, schedules


def annealed(config, start=2.0, beta=2000.0, steps=10):
  config.bottleneck.beta_schedule = "anneal"
  b = config.bottleneck
  b.beta_start, b.beta, b.beta_anneal_steps = start, beta, steps
  return config


def closed_form(s, start=2.0, beta=2000.0, steps=10):
  return start * (beta / start) ** min(s / steps, 1.0)


def test_beta_at_is_log_linear_then_constant():
  bottleneck = annealed(tiny.get_config()).bottleneck
  for s, expected in ((0, 2.0), (5, 2.0 * 1000**0.5), (7, 2.0 * 1000**0.7), (10, 2000.0),
                      (25, 2000.0)):
    np.testing.assert_allclose(float(schedules.beta_at(bottleneck, jnp.int32(s))), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(expected, closed_form(s), rtol=1e-12)
  constant = tiny.get_config().bottleneck
  constant.beta = 7.0
  assert schedules.beta_at(constant, jnp.int32(3)) == 7.0  # a Python float: program unchanged


def test_vae_update_weighs_the_kl_by_the_beta_of_its_round():
  config = annealed(tiny.get_config())
  config.method = "vae"
  method = baselines.VAE(config, (8, 8, 1))
  state = jax.jit(method.init_state)(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1.0)
  update, loss = jax.jit(method.update), jax.jit(method.loss)
  for s in (0, 4, 10, 30):
    _, metrics = update(state.replace(step=jnp.int32(s)), x, jax.random.key(2))
    # the same draws (key) at the closed-form β give the same loss = mean(nll + β kl) ...
    at_closed_form = loss(state.params, x, jax.random.key(2), closed_form(s))[0]
    np.testing.assert_allclose(float(metrics["loss"]), float(at_closed_form), rtol=1e-6)
    # ... which is far from the loss at the final β (a schedule ignored)
    if s < 10:
      assert abs(float(loss(state.params, x, jax.random.key(2))[0]) - float(at_closed_form)) > 1.0


def test_diffenc_e_step_samples_the_posterior_at_the_beta_of_its_round(monkeypatch):
  config = annealed(tiny.get_config())
  method = em.DiffusionEncoder(config, (8, 8, 1))
  state = jax.jit(method.init_state)(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1.0)
  seen = []
  original = method.posterior_sample

  def spy(params, x, z0, key, num_steps=None, beta=None, warm=False, *chain_state):
    jax.debug.callback(seen.append, beta)
    return original(params, x, z0, key, num_steps, beta, warm, *chain_state)

  monkeypatch.setattr(method, "posterior_sample", spy)
  e_step = jax.jit(method.e_step)
  for s in (0, 3, 12):
    jax.block_until_ready(e_step(state.replace(step=jnp.int32(s)), x, jax.random.key(2)))
  np.testing.assert_allclose([float(b) for b in seen], [closed_form(s) for s in (0, 3, 12)],
                             rtol=1e-5)


def test_validate_config_rejects_a_bad_beta_schedule():
  config = tiny.get_config()
  config.bottleneck.beta_schedule = "cosine"
  with pytest.raises(checks.UsageError, match="bottleneck.beta_schedule"):
    checks.validate_config(config)
  config = annealed(tiny.get_config(), steps=0)
  with pytest.raises(checks.UsageError, match="beta_anneal_steps >= 1"):
    checks.validate_config(config)
  checks.validate_config(annealed(tiny.get_config()))
  assert math.isclose(closed_form(10), 2000.0)
