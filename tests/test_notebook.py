"""Executes examples/norms_tour.ipynb top to bottom so the tour cannot rot.

The kernel is this interpreter (``sys.executable``): a kernelspec pointing at it is
written to a temporary Jupyter data directory that is put first on
``JUPYTER_PATH``, so the run never depends on which kernels a machine has
installed (a clean checkout after ``pip install -e .[dev]`` is enough).
"""

import json
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "norms_tour.ipynb"
KERNEL = "norms-tour-python"


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch):
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return KERNEL


@pytest.mark.slow
def test_norms_tour_notebook_runs(this_python_kernel):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=this_python_kernel,
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOK.parents[1])}},
    )
    client.execute()
    outputs = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    errors = [
        out for cell in nb.cells for out in cell.get("outputs", []) if out.output_type == "error"
    ]
    assert not errors
    assert "CpuDevice(id=7)" in outputs  # the first cell got its 8 devices
    assert "all_gather ops: 1  all_reduce ops: 0" in outputs
    assert "PreciseBN var - population var" in outputs
