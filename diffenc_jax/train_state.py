"""The training state, the optimisers, EMA and the parameter update, shared by every method.

    state = train_state.init(params, optimizers)               # step 0, EMA = params
    state = train_state.apply_update(state, optimizers, grads, ema_decay)

`params`, `opt_state` and `ema` are dicts of parameter groups ('encoder', 'decoder', and a
method's others: 'prior', 'warm_decoder'); each group has its own optimiser (own clipping and
Adam moments) and its own EMA. Groups without an optimiser (running statistics) are carried
as they are, and `opt_state` may hold state of a rule that is not an optimiser's (the E-step's
persistent chains).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training. `params`, `opt_state` and `ema` are dicts with
  the keys 'encoder' and 'decoder' (and a method's other groups); `step` counts training rounds.
  With persistent E-step chains (em.chain_slots) `opt_state["chains"]` is the E-step's own
  state: {"z": (S, d) each training example's last z^K, "visits": (S,) how often its chain ran,
  "curvature": (S, d) a running mean of its chain's (∇log π)², the `diagonal` step rule's
  preconditioner}."""

  step: Array
  params: Any
  opt_state: Any
  ema: Any

  def eval_params(self, use_ema: bool):
    """The parameters to evaluate with: the EMA ones or the raw ones."""
    return self.ema if use_ema else self.params


def init(params: dict, optimizers: dict[str, optax.GradientTransformation],
         opt_state: dict | None = None) -> TrainState:
  """The state at round 0: each group of `optimizers` with its optimiser's initial state (plus
  `opt_state`'s entries), the EMA a copy of params."""
  opt_state = {**{name: opt.init(params[name]) for name, opt in optimizers.items()},
               **(opt_state or {})}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    ema=jax.tree.map(jnp.copy, params))


def ema_update(ema, params, decay: float):
  """decay · ema + (1 − decay) · params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def apply_update(state: TrainState, optimizers: dict[str, optax.GradientTransformation],
                 grads: dict, ema_decay: float) -> TrainState:
  """One step of each named group's optimiser on its gradient grads[name], then that group's
  EMA; the other groups are left as they are."""
  params, opt_state, ema = dict(state.params), dict(state.opt_state), dict(state.ema)
  for name, opt in optimizers.items():
    updates, opt_state[name] = opt.update(grads[name], state.opt_state[name], state.params[name])
    params[name] = optax.apply_updates(state.params[name], updates)
    ema[name] = ema_update(state.ema[name], params[name], ema_decay)
  return state.replace(params=params, opt_state=opt_state, ema=ema)


def mean_metrics(metrics: list[dict]) -> dict:
  """The per-key mean of a list of metric dicts (a round's updates, averaged)."""
  return jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *metrics)


def make_optimizer(lr: float, warmup_steps: int, grad_clip: float,
                   weight_decay: float = 0.0, decay_steps: int = 0,
                   final_lr: float = 0.0,
                   scale_after: tuple[int, float] | None = None) -> optax.GradientTransformation:
  """Adam (AdamW when weight_decay > 0: decoupled decay of the weight matrices and kernels,
  not of biases or norm scales) with linear warm-up (from lr/warmup_steps, so the first update
  moves) and global-norm clipping. decay_steps > 0: after the warm-up the rate follows a
  cosine from lr down to `final_lr` · lr at update `decay_steps` (warm-up included), and stays
  there; else it stays at lr. scale_after = (n, s): from update n on, the rate is s times that."""
  warmup_steps = max(warmup_steps, 1)
  if decay_steps > warmup_steps:
    schedule = optax.warmup_cosine_decay_schedule(lr / warmup_steps, lr, warmup_steps,
                                                  decay_steps, end_value=final_lr * lr)
  else:
    schedule = optax.linear_schedule(lr / warmup_steps, lr, warmup_steps)
  if scale_after is not None and scale_after[1] != 1.0:
    base, (boundary, scale) = schedule, scale_after
    schedule = lambda count: base(count) * jnp.where(count < boundary, 1.0, scale)
  if weight_decay:
    kernels = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adam = optax.adamw(schedule, weight_decay=weight_decay, mask=kernels)
  else:
    adam = optax.adam(schedule)
  return optax.chain(optax.clip_by_global_norm(grad_clip), adam)


def optimizer_for(config, lr: float, updates_per_round: int,
                  weight_decay: bool = True,
                  scale_after: tuple[int, float] | None = None) -> optax.GradientTransformation:
  """`make_optimizer` from config.train for a network updated `updates_per_round` times per
  training round: train.lr_schedule 'cosine' decays it over all train.num_steps rounds;
  scale_after = (rounds, s) multiplies the rate by s from that round on."""
  t = config.train
  decay = t.num_steps * updates_per_round if t.lr_schedule == "cosine" else 0
  if scale_after is not None:
    scale_after = (scale_after[0] * updates_per_round, scale_after[1])
  return make_optimizer(lr, t.warmup_steps, t.grad_clip, t.weight_decay if weight_decay else 0.0,
                        decay_steps=decay, final_lr=t.final_lr, scale_after=scale_after)


def encoder_decoder_optimizers(config) -> dict[str, optax.GradientTransformation]:
  """The encoder's and decoder's optimisers of a method updated once per batch of a round (the
  one-loss rule): a cosine rate decays over train.batches_per_round × train.num_steps updates."""
  e = config.train.batches_per_round
  return {"encoder": optimizer_for(config, config.train.enc_lr, e),
          "decoder": optimizer_for(config, config.train.dec_lr, e)}
