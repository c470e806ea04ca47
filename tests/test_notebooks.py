"""Execute every notebook in ``notebooks/`` (jupytext ``py:percent`` -> nbclient) top to bottom.

Each notebook builds its own tiny random-weight release with ``scripts/make_random_release.py``
(the official modules, so the oracle venv is needed) and writes everything under
``$COSYVOICE2_NOTEBOOK_OUT`` (here a temporary folder). The kernel is this interpreter
(a kernel spec written into the temporary folder), so the test runs in a fresh venv without
``ipykernel install``. A cell that raises fails the test with the cell and its traceback.

Measured on the shared 2-core development machine while 6-7 other jobs ran (1-minute load average
12-23, so wall times are 3-5x those of an idle 2-core CI machine; CPU = user + system seconds of
the kernel and its subprocesses, the better guide to CI time):

| notebook | set | wall (s) | load | CPU (s) |
|---|---|---|---|---|
| 01_quickstart | slow | 758 | 12-16 | ~230 |
| 02_flow_matching | slow | 587 | 18-21 | 158 |
| 03_streaming | slow | 346 | 17-19 | 105 |
| 04_training | slow | > 1700 (see below) | 20-40 | - |
| 05_weights | CI | 126 (135 under pytest) | 16-23 | 32 |

About half of 05_weights is building the release with the official modules (16 s on an idle machine).
04_training at load 20-40: release 51 s, synthesis of the 8 utterances 347 s, parquet 81 s, LM 100 steps
through the CLI then resumed to 200 in the kernel (0.28 steps/s); flow steps on these 3-18 s utterances took
~36 s each at that load (one program per batch shape), so the notebook runs 20 flow steps. That run was stopped
at flow step 13 for the deadline: the flow, loss-curve, export and reload cells of 04 are not yet verified.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO, REQUIRE_ORACLE
from oracle_client import oracle_python

NOTEBOOKS = REPO / "notebooks"
# (name, slow): the non-slow ones run in CI; see the README for their run times
CASES = [("01_quickstart", True), ("02_flow_matching", True), ("03_streaming", True), ("04_training", True),
         ("05_weights", False)]


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        if REQUIRE_ORACLE:
            pytest.fail(f"{module} is missing: CI installs the notebooks extra (pip install -e '.[notebooks]')")
        pytest.skip(f"{module} not installed: pip install -e '.[notebooks]'")


def _kernel(tmp: Path):
    """A KernelManager for ``sys.executable`` (spec written under ``tmp``)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    d = tmp / "kernels" / "cosyvoice2-jax-test"
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cosyvoice2-jax (test)", "language": "python"}))
    return KernelManager(kernel_name="cosyvoice2-jax-test",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]))


@pytest.mark.oracle
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if slow else []) for n, slow in CASES])
def test_notebook_runs(name, tmp_path, monkeypatch):
    jupytext = _need("jupytext")
    _need("nbclient")
    _need("ipykernel")
    _need("matplotlib")
    if oracle_python() is None:
        msg = "the notebooks build a release with the official modules: run bash scripts/setup_oracle_env.sh"
        if REQUIRE_ORACLE:
            pytest.fail(msg)
        pytest.skip(msg)
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    monkeypatch.setenv("COSYVOICE2_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # conftest's 8 simulated devices are for the sharding tests
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    client = NotebookClient(nb, timeout=1200, km=_kernel(tmp_path), resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    except CellExecutionError as e:
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the kernel's traceback without terminal colours
        pytest.fail(f"notebooks/{name}.py failed:\n{msg}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images > 0, f"{name} drew no plot"
