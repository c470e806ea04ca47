"""Speech server: OpenAI-compatible HTTP, WebSocket bistream, continuous batching, Prometheus metrics.

    cosyvoice2-jax serve --model-dir pretrained_models/CosyVoice2-0.5B --port 8000

Needs the ``serve`` extra (``pip install -e '.[serve]'``). :mod:`.app` holds the endpoints,
:mod:`.engine` the continuous-batching scheduler, :mod:`.voices` the registered voices.
"""
from __future__ import annotations

from pathlib import Path


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          shutdown_grace_s: float = 5.0, **build_kw) -> None:
    """Load the model and run the app with uvicorn until SIGINT / SIGTERM.

    Stopping: uvicorn stops accepting connections and gives open requests ``shutdown_grace_s`` seconds,
    cancels the rest, then the app's lifespan stops the engine (requests still queued or running get
    503 and their work stops at the next decode step or chunk; the engine's threads are joined within
    its ``shutdown_timeout_s``). A graceful stop returns normally (the CLI exits 0): uvicorn re-raises
    the signal it caught once it is done, which the handlers installed here absorb. Should a thread
    still be inside a compiled call after that wait, the process exits at once with status 1 (a
    normal interpreter exit would end that thread inside XLA and abort).
    """
    import logging
    import os
    import signal
    import sys
    import threading

    import uvicorn

    from .app import build

    app = build(model_dir, **build_kw)
    server = app.state.server
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: None)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_grace_s)
    finally:
        left = server.stop()  # (done by the lifespan already, unless a second Ctrl-C skipped it)
        for sig, h in handlers.items():
            signal.signal(sig, h)
    if left:
        logging.getLogger(__name__).error(
            "shutdown: threads %s still inside a compiled call after %.0f s; exiting without them", left,
            server.engine.shutdown_timeout_s)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
