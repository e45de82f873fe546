"""Side by side with the PyTorch original: one training step of DiffAE's autoencoder in the
reference implementation (github.com/phizaz/diffae, from the user's own checkout) and in ours,
alternately in one process (A B A B …, --steps timed steps of each after --warmup untimed ones,
median), with images/s of each and the ratio ours / reference.

    pip install -e '.[reference]'          # PyTorch, an optional extra
    git clone https://github.com/phizaz/diffae /path/to/diffae
    python benchmarks/vs_reference.py --reference /path/to/diffae [--configs diffae64,mnist]
        [--steps 7] [--warmup 2] [--threads N] [--set FIELD=VALUE]

Pairs (--configs):
  diffae64  the reference's `templates.ffhq64_autoenc()` (its 64×64 FFHQ autoencoder) against
            configs/diffae64.py, both at 32×32×3, batch 16. The reference network is built for
            the input's size (its config's img_size = 32), so that its attention sits at the
            16×16 maps as ours does.
  mnist     the reference's `templates.autoenc_base()` made MNIST-sized (32 channels, channel
            mult (1, 2) in the U-Net and the encoder, 1 res block in each, no attention,
            embedding 128, dropout 0, a 16-d code, 1 input and output channel) against
            configs/mnist_diffae.py with model.denoiser=unet, at 28×28×1, batch 128.

A reference step is what its Lightning training step does: t from its uniform T-sampler, its
`training_losses` (the unit ε-MSE on 1,000 discrete steps, the encoder fed x_0), backward,
gradient-norm clipping at its config's grad_clip, Adam at its lr, then an EMA of every
state-dict entry at its ema_decay. fp16 is off (float32 on the CPU, as ours). Ours is
`method.train_round` (jitted, state donated): the same update, plus the latent prior's update
and the running z statistics that our DiffAE trains in the same step (the reference fits its
latent DDPM in a separate stage), so ours does strictly more work per step. PyTorch runs with
--threads threads (default: the cores this process may use); XLA:CPU uses all of them.

Nothing of the reference is copied into this project: its code is imported from --reference at
run time, unmodified. Two of its modules cannot be imported in a current environment and are
not needed to build or train its network; where their import fails the loader puts a stand-in
into `sys.modules` (each is said on the output's first lines):
  experiment  its Lightning training module: imports pytorch_lightning 1.4 and
              `numpy.lib.function_base` (gone in NumPy 2). `templates.py` takes from it only the
              names it re-exports from `config.py` (`from config import *`), so the stand-in
              holds config.py's names.
  dataset     its data-set readers (lmdb, torchvision, pandas), star-imported by config.py and
              used only by its data-loading methods, which no step here calls: an empty module.
Without torch, or with a --reference that is not such a checkout, the script prints one line
saying so and exits with status 2.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import time
import types
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# files of a phizaz/diffae checkout that the loader needs
REFERENCE_FILES = ("templates.py", "config.py", os.path.join("model", "unet_autoenc.py"))
# pair → (ours: config module and overrides; shape, batch)
PAIRS = {
    "diffae64": ("diffae64", {}, (32, 32, 3), 16),
    "mnist": ("mnist_diffae", {"model.denoiser": "unet"}, (28, 28, 1), 128),
}


def fail(message: str):
  """Prints one line and exits with status 2 (a missing requirement, not a failed run)."""
  print(f"vs_reference: {message}", flush=True)
  sys.exit(2)


def check_requirements(path: str | None):
  """Exits (status 2, one line) unless `path` is a checkout of phizaz/diffae and torch imports."""
  if not path:
    fail("give --reference PATH, your checkout of https://github.com/phizaz/diffae")
  missing = [f for f in REFERENCE_FILES if not os.path.isfile(os.path.join(path, f))]
  if missing:
    fail(f"{path!r} is not a checkout of https://github.com/phizaz/diffae (no "
         f"{', '.join(missing)})")
  try:
    import torch  # noqa: F401
  except ImportError:
    fail("PyTorch is not installed; it is an optional extra: pip install -e '.[reference]' "
         "(a CPU build is enough)")


def import_reference(path: str) -> tuple[types.ModuleType, list[str]]:
  """The reference's `templates` module imported from checkout `path`, and a note for each
  stand-in module the loader had to use (see the module docstring)."""
  sys.path.insert(0, os.path.abspath(path))
  # its training loss enters torch.cuda.amp.autocast(fp16), deprecated and a no-op on the CPU
  warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast", category=FutureWarning)
  notes = []
  try:
    importlib.import_module("dataset")
  except ImportError as e:
    # stand-in at the import level only: config.py star-imports the data-set readers, which no
    # step here uses; the reference checkout itself is not modified
    sys.modules["dataset"] = types.ModuleType("dataset")
    notes.append(f"reference module 'dataset' (data-set readers) replaced by an empty stand-in "
                 f"({type(e).__name__}: {e})")
  config = importlib.import_module("config")
  try:
    importlib.import_module("experiment")
  except Exception as e:  # ImportError, or NumPy 2's missing numpy.lib.function_base
    # stand-in at the import level only: templates.py does `from experiment import *` for the
    # names experiment.py itself star-imports from config.py
    stand_in = types.ModuleType("experiment")
    stand_in.__dict__.update({k: v for k, v in vars(config).items() if not k.startswith("__")})
    sys.modules["experiment"] = stand_in
    notes.append(f"reference module 'experiment' (Lightning training loop) replaced by "
                 f"config.py's names ({type(e).__name__}: {e})")
  return importlib.import_module("templates"), notes


def reference_config(templates, pair: str, shape: tuple[int, int, int]):
  """The reference's TrainConfig for `pair`, its network built for images of `shape`."""
  if pair == "diffae64":
    conf = templates.ffhq64_autoenc()
  elif pair == "mnist":
    conf = templates.autoenc_base()
    conf.net_ch = 32
    conf.net_ch_mult = (1, 2)
    conf.net_enc_channel_mult = (1, 2)
    conf.net_num_res_blocks = 1
    conf.net_enc_num_res_blocks = 1
    conf.net_attn = ()
    conf.net_beatgans_embed_channels = 128
    conf.dropout = 0.0
    conf.style_ch = 16
    conf.net_beatgans_resnet_cond_channels = 16  # its ResBlocks' z input (else embed_channels)
  else:
    raise ValueError(f"unknown pair {pair!r}; choose from {tuple(PAIRS)}")
  conf.img_size = shape[0]
  conf.fp16 = False
  conf.make_model_conf()
  # its TrainConfig always builds 3-channel networks; the model config takes any
  conf.model_conf.in_channels = shape[2]
  conf.model_conf.out_channels = shape[2]
  return conf


class ReferenceStep:
  """One training step of the reference, as its Lightning module runs it (module docstring)."""

  def __init__(self, conf, shape: tuple[int, int, int], batch: int, seed: int = 0):
    import torch
    torch.manual_seed(seed)
    np.random.seed(seed)  # its T-sampler draws t with NumPy
    self.torch = torch
    self.conf = conf
    self.model = conf.model_conf.make_model()
    self.model.train()
    self.ema_model = copy.deepcopy(self.model)
    self.ema_model.requires_grad_(False)
    self.sampler = conf.make_diffusion_conf().make_sampler()
    self.t_sampler = conf.make_T_sampler()
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=conf.lr,
                                      weight_decay=conf.weight_decay)
    h, w, c = shape
    self.x = torch.rand(batch, c, h, w) * 2 - 1  # NCHW in [-1, 1]

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def __call__(self):
    torch = self.torch
    t, _ = self.t_sampler.sample(len(self.x), self.x.device)
    loss = self.sampler.training_losses(model=self.model, x_start=self.x, t=t)["loss"].mean()
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.conf.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.conf.grad_clip)
    self.optimizer.step()
    with torch.no_grad():  # EMA of every state-dict entry, after each step
      ema, new = self.ema_model.state_dict(), self.model.state_dict()
      for name, value in new.items():
        if value.is_floating_point():
          ema[name].mul_(self.conf.ema_decay).add_(value, alpha=1 - self.conf.ema_decay)
    return loss.detach().item()


class OurStep:
  """One jitted `train_round` of our config (its state donated and carried)."""

  def __init__(self, name: str, overrides: dict, shape: tuple[int, int, int], batch: int,
               seed: int = 0):
    import jax

    sys.path.insert(0, ROOT)  # configs/
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
    from breakdown import apply_overrides
    from diffenc_jax import methods

    config = importlib.import_module(f"configs.{name}").get_config()
    config.train.batch_size = batch
    apply_overrides(config, overrides)
    self.jax = jax
    self.method = methods.get_method(config, shape)
    self.xs = jax.random.uniform(jax.random.key(seed + 1),
                                 (config.train.batches_per_round, batch) + tuple(shape),
                                 minval=-1.0, maxval=1.0)
    self.state = jax.jit(self.method.init_state)(jax.random.key(seed))
    self.round = jax.jit(self.method.train_round, donate_argnums=0)
    self.calls = 0

  def num_params(self) -> tuple[int, int]:
    """(all trained parameters, of which the latent prior's)."""
    count = lambda tree: sum(int(np.prod(a.shape)) for a in self.jax.tree.leaves(tree))
    params = self.state.params
    return (sum(count(v) for k, v in params.items() if k != "zstats"),
            count(params.get("prior", {})))

  def __call__(self):
    self.state, metrics = self.round(self.state, self.xs, self.jax.random.key(1000 + self.calls))
    self.calls += 1
    self.jax.block_until_ready(metrics)
    return metrics


def alternate(ref, ours, steps: int, warmup: int) -> tuple[list[float], list[float], float]:
  """(reference seconds per step, ours, our first call's seconds): `warmup` untimed calls of
  each (ours compiles in its first), then `steps` timed pairs, reference first."""
  start = time.perf_counter()
  ours()
  first = time.perf_counter() - start
  for _ in range(warmup):
    ref()
    ours()
  ref_times, our_times = [], []
  for _ in range(steps):
    for fn, times in ((ref, ref_times), (ours, our_times)):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
  return ref_times, our_times, first


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reference", metavar="PATH",
                      help="your checkout of https://github.com/phizaz/diffae")
  parser.add_argument("--configs", default=",".join(PAIRS))
  parser.add_argument("--steps", type=int, default=7, help="timed steps of each")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="PyTorch's intra-op threads (default: the usable cores)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a field of our configs, e.g. latent_prior.blocks=1")
  args = parser.parse_args(argv)
  pairs = args.configs.split(",")
  unknown = [p for p in pairs if p not in PAIRS]
  if unknown:
    parser.error(f"unknown --configs {unknown}; choose from {tuple(PAIRS)}")
  check_requirements(args.reference)

  import jax
  import torch

  torch.set_num_threads(args.threads)
  templates, notes = import_reference(args.reference)
  for note in notes:
    print(f"note: {note}")
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__}, "
        f"{jax.devices()}; {len(os.sched_getaffinity(0))} usable cores")
  overrides = dict(item.split("=", 1) for item in args.set)
  rows = []
  for pair in pairs:
    name, our_overrides, shape, batch = PAIRS[pair]
    ref = ReferenceStep(reference_config(templates, pair, shape), shape, batch)
    ours = OurStep(name, {**our_overrides, **overrides}, shape, batch)
    ref_times, our_times, first = alternate(ref, ours, args.steps, args.warmup)
    ref_s, our_s = float(np.median(ref_times)), float(np.median(our_times))
    total, prior = ours.num_params()
    rows.append(dict(pair=pair, size=f"{'×'.join(map(str, shape))}, {batch}", batch=batch,
                     ref_params=ref.num_params(), params=total, prior=prior, ref_s=ref_s,
                     our_s=our_s, first=first))
    del ref, ours
  print()
  print("| pair | input, batch | implementation | params (M) | s/step | img/s | ours / ref |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['pair']} | {r['size']} | reference (PyTorch) | {r['ref_params'] / 1e6:.2f} | "
          f"{r['ref_s']:.3f} | {r['batch'] / r['ref_s']:.1f} | |")
    print(f"| {r['pair']} | {r['size']} | ours (JAX; latent prior {r['prior'] / 1e6:.2f} M of "
          f"it) | {r['params'] / 1e6:.2f} | {r['our_s']:.3f} | {r['batch'] / r['our_s']:.1f} | "
          f"{r['ref_s'] / r['our_s']:.2f}× |")
  print(f"\nmedian of {args.steps} alternating steps of each after {args.warmup} warm-up steps; "
        "our first call (compilation + one step): "
        + ", ".join(f"{r['pair']} {r['first']:.1f} s" for r in rows))


if __name__ == "__main__":
  main()
