"""Speech server: OpenAI-compatible HTTP, WebSocket bistream, continuous batching, Prometheus metrics.

    cosyvoice2-jax serve --model-dir pretrained_models/CosyVoice2-0.5B --port 8000

Needs the ``serve`` extra (``pip install -e '.[serve]'``). :mod:`.app` holds the endpoints,
:mod:`.engine` the continuous-batching scheduler, :mod:`.voices` the registered voices.
"""
from __future__ import annotations

from pathlib import Path


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **build_kw) -> None:
    """Load the model and run the app with uvicorn until interrupted."""
    import uvicorn

    from .app import build

    app = build(model_dir, **build_kw)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
