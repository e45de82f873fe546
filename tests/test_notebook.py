"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel, outside the repository,
and is committed without outputs."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_quickstart_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:60]


def test_quickstart_runs(tmp_path, monkeypatch):
  pytest.importorskip("ipykernel")
  # the kernel starts in tmp_path, outside the repository: it finds the package by PYTHONPATH
  # (as after `pip install -e .`) and writes its run to its own temporary directory
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  # recon, samples, paths; DiffAE's autoencoding and editing
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 5
  text = "".join(o.get("text", "") for o in outputs)
  assert "psnr_z0" in text and "Autoencoder(method='diffenc'" in text
  runs = [p for p in tmp_path.iterdir() if p.name.startswith("diffenc_quickstart_")]
  assert len(runs) == 1 and (runs[0] / "samples.png").is_file()
  assert not os.path.exists(os.path.join(ROOT, "notebooks", "checkpoints"))
