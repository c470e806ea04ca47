"""scripts/bench_train.py scale: the ``--fast-compile`` XLA flags reach the backend (XLA aborts on a flag it
does not know) and leave the FLOPs and compiled memory of a small step unchanged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _scale(*extra):
    cmd = [sys.executable, str(REPO / "scripts" / "bench_train.py"), "scale", "--objective", "lm", "--model", "tiny",
           "--chips", "1", "--mesh", "1", "1", "1", "--rows-per-shard", "1", "--text", "8", "--speech", "24", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # conftest's simulated devices: the script sets its own count
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)


def test_scale_fast_compile_flags_keep_flops_and_memory():
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_train import FAST_COMPILE_FLAGS

    fast, plain = _scale("--fast-compile"), _scale()
    assert fast["fast_compile"] and not plain["fast_compile"]
    assert FAST_COMPILE_FLAGS in fast["xla_flags"] and FAST_COMPILE_FLAGS not in plain["xla_flags"]
    assert fast["flops_per_step_per_chip"] == plain["flops_per_step_per_chip"] > 0
    assert fast["memory_per_chip_bytes"] == plain["memory_per_chip_bytes"]
    assert fast["memory_per_chip_bytes"]["temp"] > 0
