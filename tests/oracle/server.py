"""Oracle server: runs the official PyTorch code in its own environment for the parity tests.

Started by ``tests/oracle_client.py`` as ``<oracle python> tests/oracle/server.py``. It reads one
JSON request per line on stdin::

    {"task": "frontend:flow_mel", "in": "/tmp/x/in.npz", "out": "/tmp/x/out.npz", "kwargs": {}}

imports ``tests/oracle/<module>.py``, calls ``<function>(inputs: dict[str, np.ndarray], **kwargs)``
which returns a dict of numpy arrays, writes it to ``out`` with ``np.savez`` and answers one JSON
line ``{"ok": true}`` or ``{"ok": false, "error": "<traceback>"}``. Replies go to a private copy
of the original stdout; everything the official code prints is sent to stderr.

``--selftest`` imports every oracle family once and exits (used by scripts/setup_oracle_env.sh).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _serve() -> None:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by the official code goes to stderr
    sys.stdout = sys.stderr
    import numpy as np

    import common  # noqa: F401  (installs import shims, sets threads)

    reply.write(json.dumps({"ok": True, "ready": True}) + "\n")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            modname, fname = req["task"].split(":")
            fn = getattr(importlib.import_module(modname), fname)
            inputs = {}
            if req.get("in"):
                with np.load(req["in"], allow_pickle=False) as z:
                    inputs = {k: z[k] for k in z.files}
            out = fn(inputs, **req.get("kwargs", {}))
            np.savez(req["out"], **{k: np.asarray(v) for k, v in (out or {}).items()})
            reply.write(json.dumps({"ok": True}) + "\n")
        except Exception:  # report everything to the client; keep serving
            reply.write(json.dumps({"ok": False, "error": traceback.format_exc()}) + "\n")


def _selftest() -> None:
    import common

    common.selftest()
    print("oracle selftest ok")


if __name__ == "__main__":
    if "--selftest" in sys.argv:
        _selftest()
    else:
        _serve()
