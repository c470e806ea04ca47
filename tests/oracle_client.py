"""Client side of the parity harness: talks to ``tests/oracle/server.py`` in the oracle venv.

The official PyTorch code needs numpy<2 and transformers 4.51 while the project uses current
versions, so the oracle lives in its own venv (``scripts/setup_oracle_env.sh``) and runs as one
long-lived subprocess per test session. Arrays travel as ``.npz`` files in a temp directory.

Oracle python: ``$COSYVOICE2_ORACLE_PYTHON``, else ``<repo>/.oracle-venv/bin/python``.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "tests" / "oracle" / "server.py"


class OracleUnavailable(RuntimeError):
    pass


class OracleError(RuntimeError):
    pass


def oracle_python() -> Path | None:
    env = os.environ.get("COSYVOICE2_ORACLE_PYTHON")
    cand = Path(env) if env else REPO / ".oracle-venv" / "bin" / "python"
    return cand if cand.exists() else None


class Oracle:
    """``oracle("module:function", {"x": array}, key=value) -> dict of numpy arrays``."""

    def __init__(self, python: Path | None = None, threads: int | None = None):
        python = python or oracle_python()
        if python is None:
            raise OracleUnavailable(
                "oracle environment not found: run `bash scripts/setup_oracle_env.sh` (creates "
                ".oracle-venv) or set COSYVOICE2_ORACLE_PYTHON")
        env = dict(os.environ)
        env["ORACLE_THREADS"] = str(threads or env.get("ORACLE_THREADS", "2"))
        env.pop("PYTHONPATH", None)
        self._tmp = tempfile.TemporaryDirectory(prefix="cv2-oracle-")
        self._count = itertools.count()
        self._proc = subprocess.Popen(
            [str(python), str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None if os.environ.get("ORACLE_VERBOSE") else subprocess.DEVNULL,
            text=True, env=env, cwd=str(REPO))
        hello = self._proc.stdout.readline()
        if not hello:
            raise OracleUnavailable(f"oracle server failed to start with {python}; run it by hand: "
                                    f"{python} {SERVER} --selftest")

    def __call__(self, task: str, inputs: Mapping[str, Any] | None = None, **kwargs) -> dict[str, np.ndarray]:
        i = next(self._count)
        pin = os.path.join(self._tmp.name, f"in{i}.npz")
        pout = os.path.join(self._tmp.name, f"out{i}.npz")
        np.savez(pin, **{k: np.asarray(v) for k, v in (inputs or {}).items()})
        req = {"task": task, "in": pin, "out": pout, "kwargs": kwargs}
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise OracleError(f"oracle server died during {task}")
        rep = json.loads(line)
        os.unlink(pin)
        if not rep.get("ok"):
            raise OracleError(f"oracle task {task} failed:\n{rep.get('error')}")
        with np.load(pout, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        os.unlink(pout)
        return out

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._tmp.cleanup()


def unflatten_state_dict(flat: Mapping[str, np.ndarray], prefix: str = "sd/") -> dict[str, np.ndarray]:
    """Oracle tasks return state dicts under ``sd/<torch key>``; strip that prefix."""
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


if __name__ == "__main__":  # manual smoke test
    o = Oracle()
    print(o("frontend:ping", {"x": np.arange(3)}))
    o.close()
    sys.exit(0)
