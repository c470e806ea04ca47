"""Execute every notebook in ``notebooks/`` (jupytext ``py:percent`` sources) top to bottom.

Each notebook builds the tiny random-weight release it needs under ``out/notebooks`` (shared
between notebooks, so only the first one pays for it) and must run without an error. Notebooks
that take minutes are marked slow (their time is in ``SLOW``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))
SLOW = {}  # notebook stem -> measured seconds on the 2-core CI machine


def _params():
    for nb in NOTEBOOKS:
        marks = [pytest.mark.slow] if nb.stem in SLOW else []
        yield pytest.param(nb, id=nb.stem, marks=marks)


def test_notebooks_found():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", list(_params()))
def test_notebook_runs(path: Path, oracle):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(path)
    env_backup = dict(os.environ)
    # the kernel inherits the environment: one CPU device, no test-only XLA flags
    os.environ["XLA_FLAGS"] = ""
    os.environ["MPLBACKEND"] = "Agg"
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
