"""Scale-out on Ray Serve: N replicas of the same FastAPI app behind Ray's HTTP proxy.

Each replica is one :func:`cosyvoice2_jax.serve.app.build` (pipeline + continuous-batching engine +
voices); Ray Serve routes requests between replicas, starts and stops them (fixed ``num_replicas`` or
autoscaling on ongoing requests) and restarts failed ones. Registered voices live in one directory
every replica reads (``voices_dir``: a shared file system on a cluster); a voice registered or
deleted through one replica is seen by the others at their next request (:class:`VoiceStore`
re-reads the directory). A replica takes traffic only after its warm-up compiled (its startup waits
for it), so autoscaling never routes requests to a replica that is still compiling.

Needs the ``ray`` extra (``pip install -e '.[serve,ray]'``). On one machine or a running cluster::

    serve run cosyvoice2_jax.serve.ray_app:app_builder model_dir=/shared/CosyVoice2-0.5B \\
        voices_dir=/shared/voices num_replicas=4
    # autoscaling between 1 and 8 replicas, 2 CPUs (or: num_gpus=1) each:
    serve run cosyvoice2_jax.serve.ray_app:app_builder model_dir=... voices_dir=... \\
        min_replicas=1 max_replicas=8 num_cpus=2

or from Python: ``serve.run(cosyvoice2_jax.serve.ray_app.application(model_dir, voices_dir=...))``.
Every response carries an ``x-replica`` header naming the replica that served it.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional

from ray import serve

from ..errors import ConfigError


@serve.deployment(name="cosyvoice2")
@serve.ingress()
class CosyVoice2Replica:
    """One replica: the app of :func:`~cosyvoice2_jax.serve.app.build` with ``build_kw``."""

    def __init__(self, model_dir: str, build_kw: dict):
        self.model_dir, self.build_kw = model_dir, build_kw

    def __serve_build_asgi_app__(self):
        from .app import build

        app = build(self.model_dir, **self.build_kw)
        server = self._server = app.state.server
        inner = app.router.lifespan_context
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (not expected)
            replica = "unknown"

        @asynccontextmanager
        async def lifespan(a):
            async with inner(a):  # starts the engine and the warm-up thread
                while not server.ready.is_set():  # the replica joins the router once warm
                    if server.warmup_error:
                        raise RuntimeError(f"warm-up failed: {server.warmup_error}")
                    await asyncio.sleep(0.5)
                yield

        app.router.lifespan_context = lifespan

        @app.middleware("http")
        async def tag_replica(request, call_next):
            response = await call_next(request)
            response.headers["x-replica"] = replica
            return response

        return app

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose engine thread died is restarted."""
        server = getattr(self, "_server", None)
        thread = None if server is None else server.engine._thread
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the engine thread stopped")


def application(model_dir: str | Path, *, voices_dir: str | Path, num_replicas: Optional[int] = None,
                min_replicas: Optional[int] = None, max_replicas: Optional[int] = None,
                target_ongoing_requests: float = 4.0, max_ongoing_requests: int = 32,
                num_cpus: float = 1.0, num_gpus: float = 0.0, **build_kw: Any):
    """The Ray Serve application (``serve.run`` it). ``voices_dir`` is required: a directory every
    replica sees. Fixed ``num_replicas`` (default 1), or autoscaling between ``min_replicas`` and
    ``max_replicas`` towards ``target_ongoing_requests`` per replica. ``build_kw`` go to
    :func:`~cosyvoice2_jax.serve.app.build` (``engine_kw``, ``warmup``, ``sampling``, ...)."""
    if not voices_dir:
        raise ConfigError("voices_dir is required with Ray Serve: a directory every replica sees (shared file "
                          "system on a cluster), so voices registered through one replica serve on all")
    if num_replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise ConfigError("give num_replicas (fixed) or min_replicas/max_replicas (autoscaling), not both")
    opts: dict[str, Any] = {"max_ongoing_requests": int(max_ongoing_requests),
                            "ray_actor_options": {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)}}
    if min_replicas is not None or max_replicas is not None:
        lo = int(min_replicas if min_replicas is not None else 1)
        hi = int(max_replicas if max_replicas is not None else max(lo, 1))
        if not 0 <= lo <= hi or hi < 1:
            raise ConfigError(f"autoscaling needs 0 <= min_replicas <= max_replicas >= 1, got {lo}..{hi}")
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                      "target_ongoing_requests": float(target_ongoing_requests)}
    else:
        opts["num_replicas"] = int(num_replicas or 1)
    build_kw["voices_dir"] = str(Path(voices_dir).resolve())
    return CosyVoice2Replica.options(**opts).bind(str(model_dir), build_kw)


_INT = ("num_replicas", "min_replicas", "max_replicas", "max_ongoing_requests", "slots", "lm_cache", "max_queue")
_FLOAT = ("target_ongoing_requests", "num_cpus", "num_gpus", "timeout")


def app_builder(args: dict):
    """``serve run cosyvoice2_jax.serve.ray_app:app_builder key=value ...``: ``model_dir``, ``voices_dir``,
    the replica options of :func:`application`, ``slots``, ``lm_cache``, ``max_queue``, ``timeout`` (engine),
    ``warmup`` (true/false)."""
    args = dict(args)
    for k in _INT:
        if k in args:
            args[k] = int(args[k])
    for k in _FLOAT:
        if k in args:
            args[k] = float(args[k])
    engine = {k2: args.pop(k) for k, k2 in (("slots", "rows"), ("lm_cache", "cache_slots"),
                                            ("max_queue", "max_queue"), ("timeout", "timeout_s")) if k in args}
    if engine:
        args["engine_kw"] = engine
    if "warmup" in args:
        args["warmup"] = str(args["warmup"]).lower() not in ("0", "false", "no")
    try:
        model_dir = args.pop("model_dir")
    except KeyError:
        raise ConfigError("model_dir=DIR is required (a CosyVoice2 release directory)") from None
    return application(model_dir, voices_dir=args.pop("voices_dir", ""), **args)
