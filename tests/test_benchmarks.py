"""The benchmark scripts run: breakdown.py prints every part of a round, timed and positive, at
tiny size, and dit_breakdown.py every part of the DiT step; vs_reference.py, vs_dit.py and
conv.py --torch say in one line what is missing (no torch, no
reference checkout) and exit with status 2."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")

PARTS = {
    "mnist": ["encoder: z⁰ by latent DDIM (encode)", "· encoder features h(x)",
              "Langevin/MALA chain (posterior_sample)", "· Gauss-Newton precision (jacfwd)",
              "· factor of the precision", "encoder update (grad + Adam + EMA)",
              "latent prior step", "M-steps (×2)", "whole round"],
    "diffae64": ["encoder forward + backward", "· encoder forward",
                 "U-Net forward + backward (decoder loss)", "· U-Net forward",
                 "latent prior loss + grad", "optimiser update (all groups)", "EMA update",
                 "z statistics (encoder forward again)", "whole round"],
}


def load(name):
  """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
  spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def rows(text):
  """{part: (ms, % of round)} of the markdown tables that breakdown.py prints."""
  found = {}
  for m in re.finditer(r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \|", text, flags=re.M):
    found[m.group(1)] = (float(m.group(2)), float(m.group(3)))
  return found


@pytest.mark.parametrize("config", list(PARTS))
def test_breakdown_prints_every_part(config):
  # a process of its own, so that XLA compiles its dozen small programs unoptimised (-O0, about
  # half the compile time): the test checks what is printed, not how fast it runs
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
         "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""),
                                "--xla_backend_optimization_level=0"])}
  proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "breakdown.py"), "--tiny",
                         "--configs", config, "--repeats", "1"], env=env, capture_output=True,
                        text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert f"### {config} (" in out
  found = rows(out)
  parts = {k: v for k, v in found.items() if not k.startswith("sum of")}
  assert list(parts) == PARTS[config], out
  assert all(ms > 0 for ms, _ in found.values()), out
  assert found["whole round"][1] == 100


@pytest.mark.parametrize("script, reference_file", [("vs_reference", "templates.py"),
                                                    ("vs_dit", "models.py")])
def test_side_by_side_without_a_checkout(script, reference_file, tmp_path, capsys):
  module = load(script)
  with pytest.raises(SystemExit) as exit_:
    module.main(["--reference", str(tmp_path / "nowhere")])
  assert exit_.value.code == 2
  out = capsys.readouterr().out.strip()
  assert len(out.splitlines()) == 1 and "not a checkout of" in out and reference_file in out


@pytest.mark.parametrize("script", ["vs_reference", "vs_dit"])
def test_side_by_side_without_torch(script, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  module = load(script)
  for f in module.REFERENCE_FILES:  # a checkout's files, empty
    (tmp_path / f).parent.mkdir(exist_ok=True)
    (tmp_path / f).write_text("")
  with pytest.raises(SystemExit) as exit_:
    module.main(["--reference", str(tmp_path)])
  assert exit_.value.code == 2
  out = capsys.readouterr().out.strip()
  assert len(out.splitlines()) == 1 and "PyTorch is not installed" in out
  assert "[reference]" in out


def test_conv_torch_column_without_torch(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  module = load("conv")
  with pytest.raises(SystemExit) as exit_:
    module.main(["--torch", "--configs", ""])
  assert exit_.value.code == 2
  out = capsys.readouterr().out.strip()
  assert len(out.splitlines()) == 1 and "needs PyTorch" in out and "[reference]" in out


def test_dit_breakdown_prints_every_part():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
         "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""),
                                "--xla_backend_optimization_level=0"])}
  proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "dit_breakdown.py"), "--tiny",
                         "--repeats", "1"], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = {}
  for m in re.finditer(r"^\| ([^|]+?) \| ([\d.]+) \| (\d+) \| ([\d.e+-]+) \|", proc.stdout,
                       flags=re.M):
    found[m.group(1)] = (float(m.group(2)), float(m.group(4)))
  assert list(found) == [
      "whole step (loss, gradient, AdamW)", "· network forward + backward", "· network forward",
      "attention core (scores, softmax, sum)", "QKV + output projections",
      "MLP (Dense, GELU, Dense)", "LayerNorm + adaLN modulation + gates",
      "conditioning (t, z MLPs; adaLN Dense)", "patchify, in/out projections",
      "optimizer update (AdamW)"], proc.stdout
  assert all(ms > 0 and gflop > 0 for ms, gflop in found.values()), proc.stdout
  # the backward pass costs more FLOPs than the forward pass alone
  assert found["· network forward + backward"][1] > 2 * found["· network forward"][1]
  assert "float32 peak" in proc.stdout


def test_vs_dit_ours_alone_times_every_case(capsys):
  """Without the reference (--impls ours) the script needs neither torch nor a real checkout's
  code: it times our step in a worker process and prints a row per case."""
  module = load("vs_dit")
  module.main(["--impls", "ours", "--cases", "train32", "--rounds", "1", "--steps", "1", "--warmup", "0"])
  out = capsys.readouterr().out
  assert "1,284,785 trained parameters" in out
  row = re.search(r"^\| train32 \| ([\d.]+) \(([\d,]+)\) \|", out, flags=re.M)
  assert row and float(row.group(1)) > 0, out
