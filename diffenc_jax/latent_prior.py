"""A latent DDPM prior p(z), fitted to an encoder's detached codes, for sampling them.

    prior = LatentDDPMPrior(config, schedule)
    params = prior.init(key)
    loss = prior.loss(params, z, key, stats)         # (B,) ε-MSE on stop_gradient(z)
    state, loss = prior.step(state, z, key, decay)   # one update of state.params['prior']
    z = prior.sample(params, key, n, stats)          # (n, d) by latent DDIM

DiffAE's prior, and the diffusion encoder's with em.latent_prior.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffenc_jax import losses, models, samplers, schedules, train_state

Array = jax.Array


def validate(section) -> None:
  """Raises ValueError with one line on a bad config.latent_prior."""
  for name in ("hidden", "blocks", "steps"):
    if not section[name] >= 1:
      raise ValueError(f"latent_prior.{name} must be >= 1, got {section[name]}")
  if not section.lr > 0:
    raise ValueError(f"latent_prior.lr must be > 0, got {section.lr}")
  if not 0 <= section.eta <= 1:
    raise ValueError(f"latent_prior.eta must be in [0, 1], got {section.eta}")
  if not section.clip >= 0:
    raise ValueError(f"latent_prior.clip must be >= 0 (0: no clip), got {section.clip}")


class LatentDDPMPrior:
  """A latent DDPM p(z) fitted to stop_gradient(z) of an encoder's codes, for sampling them:
  `models.LatentPrior` (config.latent_prior.hidden, blocks) trained by the unit-weighted
  ε-MSE on the latent schedule, sampled by latent DDIM (latent_prior.steps, latent_prior.eta)
  with the predicted z_0 clipped to ±latent_prior.clip. DiffAE's prior, and diffenc's when
  em.latent_prior is set.

  With latent_prior.normalize the DDPM is fitted to z standardised per dimension by running
  dataset statistics (`init_stats` / `update_stats`: an exponential moving average, decay
  STATS_DECAY, of the batches' means and second moments) and its samples are
  de-standardised: DiffAE's z-normalisation, which makes the prior's task independent of the
  codes' scale (its authors call it crucial for sampling and manipulation).

  The clip matters: at the latent schedule's log-SNR of −15 the first DDIM steps multiply the
  ε-network's error by up to σ/α ≈ 1,800 (docs/benchmarks.md has what that did unclipped); so
  does the ancestral sampler (latent_prior.eta = 1; tests/test_train.py)."""

  STATS_DECAY = 0.99

  def __init__(self, config, schedule: schedules.Schedule):
    d = config.latent_prior
    self.config = config
    self.schedule = schedule
    self.latent_dim = config.model.latent_dim
    self.normalize = d.normalize
    self.module = models.LatentPrior(self.latent_dim, hidden=d.hidden,
                                     num_blocks=d.blocks)
    # Adam at latent_prior.lr, one update per batch of a round, no weight decay
    self.optimizer = train_state.optimizer_for(config, d.lr, config.train.batches_per_round,
                                               weight_decay=False)

  def init(self, key: Array):
    return self.module.init(key, jnp.zeros((1, self.latent_dim)), jnp.zeros((1,)))

  def init_stats(self) -> dict[str, Array]:
    """Running per-dimension mean and second moment of the codes, starting at N(0, I)'s."""
    return {"mean": jnp.zeros((self.latent_dim,)), "sq": jnp.ones((self.latent_dim,))}

  def update_stats(self, stats: dict[str, Array], z: Array) -> dict[str, Array]:
    """One moving-average step of `stats` towards the batch z (B, d) (no gradient)."""
    z = jax.lax.stop_gradient(z)
    new = {"mean": jnp.mean(z, 0), "sq": jnp.mean(jnp.square(z), 0)}
    return jax.tree.map(lambda s, b: self.STATS_DECAY * s + (1 - self.STATS_DECAY) * b,
                        stats, new)

  @staticmethod
  def mean_std(stats: dict[str, Array]) -> tuple[Array, Array]:
    """(mean (d,), std (d,)) of the running statistics (std floored at 1e-3)."""
    std = jnp.sqrt(jnp.maximum(stats["sq"] - jnp.square(stats["mean"]), 1e-6))
    return stats["mean"], std

  def eps_fn(self, params):
    return lambda z_t, t: self.module.apply(params, z_t, t)

  def loss(self, params, z: Array, key: Array, stats: dict | None = None) -> Array:
    """ε-MSE per example (B,) on stop_gradient(z) (B, d), standardised by `stats` if given."""
    z = jax.lax.stop_gradient(z)
    if stats is not None:
      mean, std = self.mean_std(stats)
      z = (z - mean) / std
    return losses.denoising_loss(self.eps_fn(params), z, key, self.schedule)

  def sample(self, params, key: Array, n: int, stats: dict | None = None) -> Array:
    """n latents (n, d) by latent DDIM, de-standardised by `stats` if given."""
    d = self.config.latent_prior
    z = samplers.latent_ddim(self.eps_fn(params), key, (n, self.latent_dim), self.schedule,
                             d.steps, eta=d.eta, clip=d.clip)
    if stats is not None:
      mean, std = self.mean_std(stats)
      z = mean + std * z
    return z

  def step(self, state: train_state.TrainState, z: Array, key: Array, ema_decay: float):
    """One update of the prior (state.params['prior'], its optimiser and EMA) on the detached
    codes z (B, d), then the running statistics (with latent_prior.normalize): (state, loss)."""
    stats = state.params.get("zstats")
    loss, grads = jax.value_and_grad(lambda p: self.loss(p, z, key, stats).mean())(
        state.params["prior"])
    state = train_state.apply_update(state, {"prior": self.optimizer}, {"prior": grads},
                                     ema_decay)
    if stats is not None:
      stats = self.update_stats(stats, z)
      state = state.replace(params={**state.params, "zstats": stats},
                            ema={**state.ema, "zstats": stats})
    return state, loss
