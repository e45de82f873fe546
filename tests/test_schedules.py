"""Schedules: VP identity, endpoints, and dλ/dt against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffenc_jax import schedules


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_vp_identity_endpoints_and_derivative(name):
  sched = schedules.get_schedule(name)
  t = jnp.linspace(0.0, 1.0, 101)
  alpha, sigma = sched.alpha_sigma(t)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  lam = sched.log_snr(t)
  np.testing.assert_allclose(lam[0], sched.logsnr_max, rtol=1e-4)
  np.testing.assert_allclose(lam[-1], sched.logsnr_min, rtol=1e-4)
  assert bool(jnp.all(jnp.diff(lam) < 0)), "log-SNR must decrease in t"
  np.testing.assert_allclose(sched.t_of_log_snr(lam), t, atol=1e-4)
  autodiff = jax.vmap(jax.grad(sched.log_snr))(t)
  np.testing.assert_allclose(sched.dlog_snr_dt(t), autodiff, rtol=1e-3)
  # β(t) = −d log α²/dt (away from t = 0, where log α² ≈ −3e-7 defeats float32 autodiff)
  t_in = t[1:]
  beta_ad = jax.vmap(jax.grad(lambda s: -jnp.log(sched.alpha(s) ** 2)))(t_in)
  np.testing.assert_allclose(sched.beta(t_in), beta_ad, rtol=1e-3, atol=1e-6)


def test_unknown_schedule():
  with pytest.raises(ValueError, match="unknown schedule"):
    schedules.get_schedule("sqrt")
