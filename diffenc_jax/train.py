"""The training program: `train_and_evaluate(config, workdir)`, data parallel over a mesh.

Modes (config.train.mode):
  train        train from scratch, or resume from the newest checkpoint in workdir;
  eval         held-out metrics of the newest checkpoint (JSON to stdout and workdir);
  reconstruct  PNG of held-out images beside their reconstructions from z⁰ and z^K;
  sample       PNG of samples through the prior z ~ N(0, I);
  encode       latents z⁰ (and z^K) of both splits to workdir/latents.npz.

Parallelism: one `jax.jit` over a 1-D `jax.make_mesh` mesh with axis 'data': the batch is
sharded on 'data', the training state replicated, its buffers donated. Several hosts: run the
same command on every host; `jax.distributed.initialize()` is called when JAX_COORDINATOR_ADDRESS
(or a cluster environment JAX detects, e.g. TPU pods or SLURM) is set, and each process reads
its own slice of every global batch. RNG: the key of round s is fold_in(key(seed), s).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from diffenc_jax import (baselines, data, em, evaluate, losses, methods, models, samplers,
                         schedules, visualize)

MODES = ("train", "eval", "reconstruct", "sample", "encode")
LR_SCHEDULES = ("constant", "cosine")


class UsageError(ValueError):
  """A bad config, missing data or an unusable checkpoint: reported as one line by main.py."""


def validate_config(config, num_devices: int | None = None) -> None:
  """Raises UsageError with one line on a bad config, before anything is loaded or compiled."""
  num_devices = num_devices or jax.device_count()

  def check(ok, message):
    if not ok:
      raise UsageError(f"bad config: {message}")

  check(config.method in methods.METHODS,
        f"unknown method {config.method!r}; choose one of {methods.METHODS}")
  check(config.train.mode in MODES, f"unknown mode {config.train.mode!r}; choose one of {MODES}")
  try:
    data.validate_data_config(config.data)
  except ValueError as e:
    raise UsageError(str(e)) from None
  m = config.model
  check(m.latent_dim > 0, f"model.latent_dim must be > 0, got {m.latent_dim}")
  check(m.decoder in em.DECODERS, f"unknown decoder {m.decoder!r}; choose one of {em.DECODERS}")
  check(m.enc_parameterization in em.PARAMETERIZATIONS,
        f"unknown model.enc_parameterization {m.enc_parameterization!r}; "
        f"choose one of {em.PARAMETERIZATIONS}")
  check(m.enc_weighting in losses.WEIGHTINGS,
        f"unknown model.enc_weighting {m.enc_weighting!r}; choose one of {losses.WEIGHTINGS}")
  check(m.sigma_x > 0, f"model.sigma_x must be > 0, got {m.sigma_x}")
  for name in ("schedule", "image_schedule"):
    check(config[name].name in schedules.SCHEDULES,
          f"unknown {name}.name {config[name].name!r}; choose one of {sorted(schedules.SCHEDULES)}")
  lv, langevin = config.em.langevin, config.method == "diffenc"  # only diffenc runs Langevin
  check(lv.step_rule in samplers.STEP_RULES,
        f"unknown em.langevin.step_rule {lv.step_rule!r}; choose one of {samplers.STEP_RULES}")
  check(not (langevin and lv.step_rule == "gauss_newton" and m.decoder != "gaussian"),
        "em.langevin.step_rule='gauss_newton' needs model.decoder='gaussian'")
  check(not (langevin and lv.mala and (lv.step_rule == "snr" or lv.max_move > 0)),
        "em.langevin.mala needs step_rule 'fixed' without max_move, or 'gauss_newton'")
  # baselines (diffenc_jax/baselines.py): each method's own section only
  check(m.unet_conditioning in models.CONDITIONINGS,
        f"unknown model.unet_conditioning {m.unet_conditioning!r}; "
        f"choose one of {models.CONDITIONINGS}")
  check(config.method not in ("diffae", "dmz") or m.decoder == "diffusion",
        f"method {config.method!r} needs model.decoder='diffusion'")
  if config.method == "diffae":
    dae = config.diffae
    check(dae.encoder in baselines.DIFFAE_ENCODERS,
          f"unknown diffae.encoder {dae.encoder!r}; choose one of {baselines.DIFFAE_ENCODERS}")
    check(dae.encoder != "resnet" or config.data.name != "toy2d",
          "diffae.encoder='resnet' needs image data")
    check(dae.prior_steps >= 1, f"diffae.prior_steps must be >= 1, got {dae.prior_steps}")
  if config.method == "dmz":
    check(m.unet_conditioning == "xattn", "method 'dmz' feeds z as one cross-attention token: "
          "needs model.unet_conditioning='xattn'")
    check(config.dmz.temperature > 0, f"dmz.temperature must be > 0, got {config.dmz.temperature}")
    check(config.dmz.input_perturbation >= 0,
          f"dmz.input_perturbation must be >= 0, got {config.dmz.input_perturbation}")
    check(config.dmz.sample_steps >= 1,
          f"dmz.sample_steps must be >= 1, got {config.dmz.sample_steps}")
  check(config.em.beta > 0, f"em.beta must be > 0, got {config.em.beta}")
  check(config.em.beta_schedule in schedules.BETA_SCHEDULES, f"unknown em.beta_schedule "
        f"{config.em.beta_schedule!r}; choose one of {schedules.BETA_SCHEDULES}")
  check(config.em.beta_schedule != "anneal" or (config.em.beta_start > 0 and
                                                config.em.beta_anneal_steps >= 1),
        "em.beta_schedule='anneal' needs em.beta_start > 0 and em.beta_anneal_steps >= 1")
  for name in ("e_updates", "m_updates", "encoder_inner_steps", "encoder_noise_draws"):
    check(config.em[name] >= 1, f"em.{name} must be >= 1, got {config.em[name]}")
  check(config.data.augment_shift >= 0,
        f"data.augment_shift must be >= 0, got {config.data.augment_shift}")
  check(config.data.augment_shift == 0 or config.data.name != "toy2d",
        "data.augment_shift needs image data")
  check(config.train.lr_schedule in LR_SCHEDULES,
        f"unknown train.lr_schedule {config.train.lr_schedule!r}; choose one of {LR_SCHEDULES}")
  check(0 <= config.train.final_lr <= 1,
        f"train.final_lr must be in [0, 1], got {config.train.final_lr}")
  check(config.train.weight_decay >= 0,
        f"train.weight_decay must be >= 0, got {config.train.weight_decay}")
  b = config.train.batch_size
  check(b > 0 and b % num_devices == 0,
        f"train.batch_size={b} is not divisible by the {num_devices} devices")
  check(config.eval.batch_size % num_devices == 0,
        f"eval.batch_size={config.eval.batch_size} is not divisible by the {num_devices} devices")


def maybe_initialize_distributed() -> None:
  """Starts multi-process JAX when launched as one of several processes."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


class Trainer:
  """Holds the mesh, the jitted round and evaluation functions, and the checkpoint manager."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.info = data.get_info(config.data)
    self.method = methods.get_method(config, self.info.shape)
    # Auto axes: XLA propagates the batch sharding through the step (no sharding-in-types)
    self.mesh = jax.make_mesh((jax.device_count(),), ("data",),
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    # E batches of B examples: (E, B, ...) sharded on B
    self.round_sharding = NamedSharding(self.mesh, P(None, "data"))
    self.round = jax.jit(self.augmented_round,
                         in_shardings=(self.replicated, self.round_sharding, self.replicated),
                         out_shardings=(self.replicated, self.replicated), donate_argnums=0)
    self.checkpoints = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                             create=True))

  def augmented_round(self, state, xs, key):
    """The method's training round on xs after `data.random_shift` (when data.augment_shift)."""
    shift = self.config.data.augment_shift
    if shift:
      k_aug, key = jax.random.split(key)
      xs = data.random_shift(k_aug, xs, shift)
    return self.method.train_round(state, xs, key)

  # --- state and checkpoints ------------------------------------------------------------
  def fresh_state(self) -> em.TrainState:
    init = jax.jit(self.method.init_state, out_shardings=self.replicated)
    return init(jax.random.key(self.config.seed))

  def restore_or_init(self, require: bool = False, step: int | None = None) -> em.TrainState:
    """The newest checkpoint (or checkpoint `step`) restored against the abstract state (shapes,
    dtypes and tree structure must match exactly: never a silent partial restore), else a
    fresh state."""
    if step is None:
      step = self.checkpoints.latest_step()
    elif step not in self.checkpoints.all_steps():
      raise UsageError(f"no checkpoint {step} in {self.workdir}/checkpoints; it holds steps "
                       f"{sorted(self.checkpoints.all_steps())}")
    if step is None:
      if require:
        raise UsageError(f"no checkpoint in {self.workdir}/checkpoints to {self.config.train.mode}")
      return self.fresh_state()
    abstract = jax.eval_shape(self.method.init_state, jax.random.key(0))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated), abstract)
    try:
      return self.checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises several types; say which checkpoint and why
      raise UsageError(f"cannot restore checkpoint {step} in {self.workdir}: "
                       f"{str(e).splitlines()[0]}") from e

  def save(self, state: em.TrainState) -> None:
    self.checkpoints.save(int(state.step), args=ocp.args.StandardSave(state))

  # --- data -----------------------------------------------------------------------------
  def global_batch(self, batches: data.TrainBatches, round_index: int) -> jax.Array:
    """The (E, B, ...) images of one round as a global array sharded on the batch axis."""
    e = self.config.em.e_updates
    local = np.stack([batches.get(round_index * e + i)["image"] for i in range(e)])
    return jax.make_array_from_process_local_data(self.round_sharding, local)

  # --- training -------------------------------------------------------------------------
  def train(self) -> dict:
    from tqdm import tqdm
    from tensorboardX import SummaryWriter

    cfg = self.config
    state = self.restore_or_init()
    start = int(state.step)
    batches = data.TrainBatches(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    test = evaluate.HeldOut.load(cfg, self.method)
    base_key = jax.random.key(cfg.seed)
    is_main = jax.process_index() == 0
    writer = SummaryWriter(os.path.join(self.workdir, "tb")) if is_main else None
    metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    bar = tqdm(range(start, cfg.train.num_steps), initial=start, total=cfg.train.num_steps,
               disable=not is_main, dynamic_ncols=True)
    t_last, s_last, eval_metrics = time.time(), start, {}
    for step in bar:
      state, metrics = self.round(state, self.global_batch(batches, step),
                                  jax.random.fold_in(base_key, step))
      done = step + 1
      if done % cfg.train.log_every == 0 or done == cfg.train.num_steps:
        metrics = self._finite(metrics, done)
        now = time.time()
        metrics["steps_per_s"] = (done - s_last) / (now - t_last)
        t_last, s_last = now, done
        bar.set_postfix({**{k: f"{metrics[k]:.3g}" for k in self.method.progress_keys},
                         "sps": f"{metrics['steps_per_s']:.2f}"})
        self._log(writer, metrics_path, done, {"train/" + k: v for k, v in metrics.items()})
      if done % cfg.train.eval_every == 0 or done == cfg.train.num_steps:
        eval_metrics = test.evaluate(state)
        self._log(writer, metrics_path, done, {"eval/" + k: v for k, v in eval_metrics.items()})
        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_metrics.items()))
        if is_main:
          visualize.save_reconstructions(test, state, os.path.join(self.workdir,
                                                                   f"recon_{done:06d}.png"))
      if done % cfg.train.checkpoint_every == 0 or done == cfg.train.num_steps:
        self._finite(metrics, done)
        self.save(state)
    self.checkpoints.wait_until_finished()
    if writer:
      writer.close()
    return eval_metrics

  def _finite(self, metrics, done: int) -> dict[str, float]:
    """The metrics as floats; raises before a diverged state can overwrite a checkpoint."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if bad:
      raise FloatingPointError(
          f"training diverged by round {done}: {', '.join(bad)} not finite; the newest "
          f"checkpoint ({self.checkpoints.latest_step()}) is kept")
    return metrics

  def _log(self, writer, path, step, metrics):
    if jax.process_index() != 0:
      return
    with open(path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    for k, v in metrics.items():
      writer.add_scalar(k, v, step)
    writer.flush()


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs config.train.mode in workdir; returns the held-out metrics where the mode has them."""
  validate_config(config)
  maybe_initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, workdir)
  mode = config.train.mode
  if mode == "train":
    if jax.process_index() == 0:  # what `diffenc_jax.api` rebuilds the model from
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=1))
    return trainer.train()
  state = trainer.restore_or_init(require=True)
  test = evaluate.HeldOut.load(config, trainer.method)
  if mode == "eval":
    metrics = test.evaluate(state)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"step": int(state.step), **metrics}, f, indent=1)
    print(json.dumps(metrics, indent=1))
    return metrics
  if mode == "reconstruct":
    path = os.path.join(workdir, "reconstructions.png")
    visualize.save_reconstructions(test, state, path)
    print(path)
  elif mode == "sample":
    path = os.path.join(workdir, "samples.png")
    visualize.save_samples(trainer.method, state, config, path)
    print(path)
  elif mode == "encode":
    path = os.path.join(workdir, "latents.npz")
    evaluate.encode_splits(config, trainer.method, state, path)
    print(path)
  return {}
