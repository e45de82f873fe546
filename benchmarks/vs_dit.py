"""Side by side with the PyTorch original: the transformer denoiser (models/dit.py's DiTDenoiser
at configs/mnist_diffae.py's sizes) against the same network built from the reference DiT
(github.com/facebookresearch/DiT `models.py`, from the user's own checkout), one training step
and one forward pass, with ms per step, images/s and the ratio reference / ours.

    pip install -e '.[reference]'          # PyTorch and timm, optional extras
    git clone https://github.com/facebookresearch/DiT /path/to/DiT
    python benchmarks/vs_dit.py --reference /path/to/DiT [--cases train128,train32,forward500]
        [--impls ours,eager,compile] [--rounds 9] [--steps 3] [--threads N] [--dtype float32]
        [--cpu-time]

The matched network: 28×28×1 images in 7×7 patches (16 tokens), width 128, 4 blocks of 4 heads,
MLP ratio 4, a 16-d code z. The reference's `DiT` is built with learn_sigma=False, its timestep
embedder at frequency_embedding_size=128 (ours: 128 sinusoidal features), and its label embedder
replaced by the z-MLP of ours, Linear(16, 128) → SiLU → Linear(128, 128); so both have the same
1,284,785 trained parameters (its fixed position table is a buffer-like parameter without
gradient, not counted). Everything else is the reference's code, unmodified: adaLN-Zero blocks
of timm's `Attention` (fused scaled_dot_product_attention) and `Mlp` (tanh GELU).

A train step, on both sides: the network's prediction at fixed random (x_t, t, z), the mean
squared error to a fixed random target, its gradient and one AdamW update (PyTorch: fused
AdamW; ours: optax.adamw, jitted with the parameters and optimiser state donated). A forward
step: the prediction alone (PyTorch under torch.no_grad). The reference runs eager
(`eager`) and under torch.compile (`compile`, inductor); float32 everywhere unless --dtype
bfloat16, which runs our matmuls in bfloat16 (model.dit_dtype) and leaves the reference in
float32.

Each implementation lives in a process of its own (so that neither's thread pool competes with
the other's), started and warmed up (compiled) once; the processes then take turns: in each of
--rounds rounds, each case, each implementation in turn runs --steps timed steps while the
others wait. Figures are medians over all timed steps. PyTorch runs with --threads threads
(default: the cores this process may use); XLA:CPU uses all of them.

The reference imports timm, and timm imports torchvision at its top level for data pipelines
and a frozen BatchNorm that DiT never uses. Where torchvision is not installed (its wheels pin a
torch of their own), the loader answers `import torchvision…` with stand-in modules whose every
attribute is a placeholder class that raises when called (said on the output's first line).
Without torch or timm, or with a --reference that is not such a checkout, the script prints one
line saying so and exits with status 2; `--impls ours` needs neither.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_FILES = ("models.py",)
IMAGE = (28, 28, 1)
PATCH, WIDTH, DEPTH, HEADS, LATENT = 7, 128, 4, 4, 16
# case → (train?, batch)
CASES = {"train128": (True, 128), "train32": (True, 32), "forward500": (False, 500)}
IMPLS = {"ours": "ours (JAX, jit)", "eager": "PyTorch eager", "compile": "PyTorch torch.compile"}
LR = 1e-4


def fail(message: str):
  """Prints one line and exits with status 2 (a missing requirement, not a failed run)."""
  print(f"vs_dit: {message}", flush=True)
  sys.exit(2)


def check_requirements(path: str | None, need_torch: bool):
  """Exits (status 2, one line) unless `path` is a checkout of facebookresearch/DiT and torch
  and timm import (nothing, when only ours is timed)."""
  if not need_torch:
    return
  if not path:
    fail("give --reference PATH, your checkout of https://github.com/facebookresearch/DiT")
  missing = [f for f in REFERENCE_FILES if not os.path.isfile(os.path.join(path, f))]
  if missing:
    fail(f"{path!r} is not a checkout of https://github.com/facebookresearch/DiT (no "
         f"{', '.join(missing)})")
  try:
    import torch  # noqa: F401
    missing = None if importlib.util.find_spec("timm") else "timm"
  except ImportError:
    missing = "PyTorch"
  if missing:
    fail(f"{missing} is not installed; PyTorch and timm are an optional extra: "
         "pip install -e '.[reference]' (a CPU build is enough)")


# ---------------------------------------------------------------- the reference (PyTorch side)

class _Placeholder(type):
  """A stand-in class: any attribute is another stand-in class; calling one raises."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _placeholder(f"{cls.__name__}.{name}")


def _placeholder(name: str) -> type:
  def refuse(self, *args, **kwargs):
    raise RuntimeError(f"torchvision stand-in: {name} is not available")
  return _Placeholder(name, (), {"__init__": refuse})


class _StandInModule(types.ModuleType):
  __path__: list = []

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    value = _placeholder(f"{self.__name__}.{name}")
    setattr(self, name, value)
    return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Answers `import torchvision[.…]` with stand-in modules (see the module docstring)."""

  def find_spec(self, fullname, path, target=None):
    if fullname == "torchvision" or fullname.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    return _StandInModule(spec.name)

  def exec_module(self, module):
    pass


def import_reference(path: str) -> tuple[types.ModuleType, list[str]]:
  """The reference's `models` module from checkout `path`, and a note per stand-in used."""
  notes = []
  if importlib.util.find_spec("torchvision") is None:
    sys.meta_path.insert(0, _StandInFinder())
    notes.append("torchvision (imported by timm, unused by DiT) answered by stand-in modules")
  sys.path.insert(0, os.path.abspath(path))
  return importlib.import_module("models"), notes


def reference_network(models):
  """The reference DiT at the matched sizes, its label embedder replaced by the z-MLP."""
  import torch
  from torch import nn

  class ZEmbedder(nn.Module):
    """Linear(d, W) → SiLU → Linear(W, W) of z, called as the label embedder is."""

    def __init__(self):
      super().__init__()
      self.mlp = nn.Sequential(nn.Linear(LATENT, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))

    def forward(self, z, train=None):
      del train
      return self.mlp(z)

  torch.manual_seed(0)
  net = models.DiT(input_size=IMAGE[0], patch_size=PATCH, in_channels=IMAGE[2],
                   hidden_size=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0,
                   learn_sigma=False)
  net.t_embedder = models.TimestepEmbedder(WIDTH, frequency_embedding_size=128)
  net.y_embedder = ZEmbedder()
  return net


def torch_worker(reference: str, compiled: bool, cases: list[str], threads: int):
  """Builds the reference's steps; yields (name, step function, trained parameter count)."""
  import torch

  torch.set_num_threads(threads)
  models, notes = import_reference(reference)
  net = reference_network(models)
  count = sum(p.numel() for p in net.parameters() if p.requires_grad)
  runner = torch.compile(net) if compiled else net
  optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR,
                                fused=True)
  gen = torch.Generator().manual_seed(1)
  steps = {}
  for case in cases:
    train, batch = CASES[case]
    h, w, c = IMAGE
    x = torch.randn(batch, c, h, w, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen).float()
    z = torch.randn(batch, LATENT, generator=gen)
    target = torch.randn(batch, c, h, w, generator=gen)

    if train:
      def step(x=x, t=t, z=z, target=target):
        net.train()
        loss = ((runner(x, t, z) - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()
    else:
      def step(x=x, t=t, z=z):
        net.eval()
        with torch.no_grad():
          return float(runner(x, t, z)[0, 0, 0, 0])
    steps[case] = step
  return steps, count, notes + [f"torch {torch.__version__}, {torch.get_num_threads()} threads"]


# ------------------------------------------------------------------------------------- ours

def ours_worker(cases: list[str], dtype: str):
  """Builds our jitted steps (parameters and optimiser state donated and carried)."""
  import jax
  import jax.numpy as jnp
  import optax

  sys.path.insert(0, ROOT)
  from diffenc_jax import models

  net = models.DiTDenoiser(image_shape=IMAGE, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                           num_heads=HEADS, mlp_ratio=4.0, latent_dim=LATENT,
                           **({} if dtype == "float32" else {"dtype": dtype}))
  keys = jax.random.split(jax.random.key(1), 4)
  optimizer = optax.adamw(LR)

  def loss_fn(params, x, t, z, target):
    return jnp.mean((net.apply({"params": params}, x, t, z) - target) ** 2)

  def train_step(carry, x, t, z, target):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, x, t, z, target)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  train_jit = jax.jit(train_step, donate_argnums=0)
  forward_jit = jax.jit(lambda params, x, t, z: net.apply({"params": params}, x, t, z))
  state = {}
  steps = {}
  for case in cases:
    train, batch = CASES[case]
    x = jax.random.normal(keys[0], (batch, *IMAGE))
    t = jax.random.uniform(keys[1], (batch,))
    z = jax.random.normal(keys[2], (batch, LATENT))
    target = jax.random.normal(keys[3], (batch, *IMAGE))
    if "params" not in state:
      state["params"] = net.init(jax.random.key(0), x[:1], t[:1], z[:1])["params"]
      state["carry"] = (state["params"], optimizer.init(state["params"]))
    if train:
      def step(x=x, t=t, z=z, target=target):
        state["carry"], loss = train_jit(state["carry"], x, t, z, target)
        return float(loss)
    else:
      def step(x=x, t=t, z=z):
        return float(forward_jit(state["carry"][0], x, t, z)[0, 0, 0, 0])
    steps[case] = step
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state["params"]))
  return steps, count, [f"jax {jax.__version__}, {jax.devices()}, dtype {dtype}"]


def serve(args):
  """A worker: builds its steps, warms each up, then runs `CASE N` commands from stdin,
  answering each with a JSON list of N step times in seconds."""
  cases = args.cases.split(",")
  if args.worker == "ours":
    steps, count, notes = ours_worker(cases, args.dtype)
  else:
    steps, count, notes = torch_worker(args.reference, args.worker == "compile", cases,
                                       args.threads)
  first = {}
  for case, step in steps.items():
    start = time.perf_counter()
    step()
    first[case] = time.perf_counter() - start
    for _ in range(args.warmup):
      step()
  print(json.dumps({"params": count, "notes": notes, "first": first}), flush=True)
  clock = time.process_time if args.cpu_time else time.perf_counter
  for line in sys.stdin:
    case, n = line.split()
    times = []
    for _ in range(int(n)):
      start = clock()
      steps[case]()
      times.append(clock() - start)
    print(json.dumps(times), flush=True)


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reference", metavar="PATH",
                      help="your checkout of https://github.com/facebookresearch/DiT")
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per turn")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="PyTorch's intra-op threads (default: the usable cores)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="our matmuls' dtype (model.dit_dtype); the reference stays float32")
  parser.add_argument("--cpu-time", action="store_true",
                      help="time steps by each process's CPU time, not wall-clock time: steadier "
                           "on a loaded host, meaningful with one core (taskset -c N, --threads 1)")
  parser.add_argument("--worker", choices=tuple(IMPLS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  cases, impls = args.cases.split(","), args.impls.split(",")
  bad = [c for c in cases if c not in CASES] + [i for i in impls if i not in IMPLS]
  if bad:
    parser.error(f"unknown --cases/--impls {bad}; cases {tuple(CASES)}, impls {tuple(IMPLS)}")
  check_requirements(args.reference, any(i != "ours" for i in impls))
  if args.worker:
    return serve(args)

  workers = {}
  for impl in impls:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--impls", impl,
           "--cases", args.cases,
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--dtype", args.dtype]
    cmd += ["--reference", args.reference] if args.reference else []
    cmd += ["--cpu-time"] if args.cpu_time else []
    workers[impl] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
    info = workers[impl].stdout.readline()
    if not info.startswith("{"):
      fail(f"the {impl} worker ended before it was ready: {info.strip() or 'its error is above'}")
    info = json.loads(info)
    workers[impl].info = info
    print(f"{IMPLS[impl]}: {info['params']:,} trained parameters; "
          + "; ".join(info["notes"]) + "; first call (compile + 1 step): "
          + ", ".join(f"{c} {s:.1f} s" for c, s in info["first"].items()), flush=True)
  times = {(i, c): [] for i in impls for c in cases}
  for _ in range(args.rounds):
    for case in cases:
      for impl in impls:
        workers[impl].stdin.write(f"{case} {args.steps}\n")
        workers[impl].stdin.flush()
        times[impl, case] += json.loads(workers[impl].stdout.readline())
  for w in workers.values():
    w.stdin.close()
    w.wait()

  print()
  print("| case | " + " | ".join(f"{IMPLS[i]}: ms (img/s)" for i in impls) + " | "
        + " | ".join(f"{IMPLS[i]} / ours" for i in impls if i != "ours") + " |")
  print("|---" * (1 + len(impls) + sum(i != "ours" for i in impls)) + "|")
  for case in cases:
    batch = CASES[case][1]
    med = {i: float(np.median(times[i, case])) for i in impls}
    cells = [f"{1e3 * med[i]:.1f} ({batch / med[i]:,.0f})" for i in impls]
    ratios = [f"{med[i] / med['ours']:.2f}×" for i in impls if i != "ours" and "ours" in med]
    print(f"| {case} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
  print(f"\nmedians of {args.rounds} rounds × {args.steps} alternating timed steps of each "
        f"(processes taking turns), after {args.warmup} warm-up steps; "
        f"{'CPU' if args.cpu_time else 'wall-clock'} time")


if __name__ == "__main__":
  main()
