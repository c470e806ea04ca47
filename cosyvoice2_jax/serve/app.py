"""The HTTP / WebSocket app (FastAPI): OpenAI-compatible speech, voices, bistream, health, metrics.

Endpoints (README "Speech server"):

* ``POST /v1/audio/speech``: OpenAI fields ``model`` (ignored), ``input``, ``voice``,
  ``response_format`` (wav, pcm, flac, mp3, opus; pcm is 16-bit little-endian mono at 24 kHz),
  ``speed`` (0.25-4, non-streaming only), ``instructions`` (-> instruct2), ``stream_format``
  (``audio``: the file; ``sse``: ``speech.audio.delta`` events with base64 pcm, then
  ``speech.audio.done``). Extra fields: ``seed`` (same seed, same audio), ``stream`` (with
  ``stream_format=audio``: chunked pcm/wav as the model streams).
  A built-in voice of the release speaks in sft mode; a registered voice in zero_shot (it has a
  transcript) or cross_lingual, and in instruct2 when ``instructions`` is given.
* ``GET/POST /v1/audio/voices``, ``DELETE /v1/audio/voices/{name}``: registered voices
  (:mod:`.voices`); POST is multipart: ``name``, ``file`` (prompt audio, any rate), optional
  ``transcript``, ``overwrite``.
* ``WS /v1/audio/speech/stream``: bistream. Client sends ``{"voice": ..., ["instructions", "seed"]}``,
  then ``{"text": piece}`` messages and ``{"end": true}``; server sends binary pcm16 chunks and
  finally ``{"type": "done", "samples": N, "sample_rate": 24000}`` (or ``{"type": "error", ...}``).
* ``GET /healthz``: 200 once warm-up compiled the common shapes, else 503.
* ``GET /metrics``: Prometheus text.
* Official FastAPI server shapes (``runtime/python/fastapi/server.py``): ``/inference_sft``,
  ``/inference_zero_shot``, ``/inference_cross_lingual``, ``/inference_instruct2`` (form fields,
  raw pcm16 response).

Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import queue
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal, Optional

import jax
import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError, CosyVoiceError
from . import audio as A
from .engine import Busy, Cancelled, Engine, EngineError, ShuttingDown
from .metrics import Metrics
from .voices import VoiceError, VoiceStore

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _from_exception(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Busy):
        return ApiError(429, str(e), code="busy", headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))})
    if isinstance(e, EngineError):
        return ApiError(e.status, str(e), code=type(e).__name__.lower())
    if isinstance(e, VoiceError):
        return ApiError(e.status, str(e), param="voice")
    if isinstance(e, CosyVoiceError):
        return ApiError(400, str(e), code=type(e).__name__)
    log.exception("internal error", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}")


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = "cosyvoice2"
    input: str
    voice: str
    response_format: str = "mp3"
    speed: float = 1.0
    instructions: Optional[str] = None
    stream_format: Literal["audio", "sse"] = "audio"
    seed: Optional[int] = None
    stream: bool = False

    @field_validator("voice", mode="before")
    @classmethod
    def _voice(cls, v):  # the newer OpenAI API also accepts {"id": "..."}
        if isinstance(v, dict) and "id" in v:
            return v["id"]
        return v

    @field_validator("speed")
    @classmethod
    def _speed(cls, v):
        if not math.isfinite(v) or not 0.25 <= v <= 4.0:
            raise ValueError(f"speed must be a finite number in [0.25, 4.0], got {v}")
        return v


class Server:
    """State of one app: pipeline, engine, voices, metrics, readiness."""

    def __init__(self, tts, *, voices_dir: str | Path, engine_kw: dict | None = None, warmup: bool = True,
                 max_input_chars: int = 4096, warmup_text: str = "Hi there.",
                 warmup_batches: tuple[int, ...] = (1,), warmup_stream: bool = True):
        self.tts = tts
        self.metrics = Metrics()
        self.engine = Engine(tts, metrics=self.metrics, **(engine_kw or {}))
        self.voices = VoiceStore(tts, voices_dir)
        self.max_input_chars = max_input_chars
        self.do_warmup, self.warmup_text = warmup, warmup_text
        bad = [b for b in warmup_batches if b < 1 or b & (b - 1) or b > self.engine.rows]
        if bad:
            raise ConfigError(f"warm-up batches {bad}: token2wav batches are powers of two up to --slots "
                              f"{self.engine.rows}; use e.g. --warmup-batches 1 2 4")
        self.warmup_batches, self.warmup_stream = tuple(sorted(set(warmup_batches))), warmup_stream
        self.ready = threading.Event()
        self.warmup_error: Optional[str] = None
        self.warmup_seconds: Optional[float] = None
        self.formats = A.available_formats()

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.engine.start()
        self.engine.spawn(self._warmup, name="warmup")

    def stop(self, timeout: float | None = None) -> list[str]:
        """Stop the engine: cancel the requests in flight, join its threads (:meth:`Engine.stop`).
        Returns the names of threads still running after ``timeout``; idempotent."""
        return self.engine.stop(timeout)

    def _warmup(self) -> None:
        """Compile what the first requests of ``warmup_text`` need, nothing more: the LM (prefill and
        the slot batch's decode: one shape), token2wav at the ``warmup_batches`` batch sizes (default 1:
        a lone request; larger power-of-two batches, used when requests finish in the same decode
        call, compile on first use) and, with ``warmup_stream``, the streaming chunk shapes. Other
        text lengths and prompt sizes compile on first use too; everything persists in the XLA cache
        across restarts."""
        t0 = time.perf_counter()
        try:
            names = self.voices.names()
            if self.do_warmup and names:
                runs = [(b, False) for b in self.warmup_batches] + ([(1, True)] if self.warmup_stream else [])
                for n, stream in runs:
                    # (no request timeout: the warm-up's first calls compile)
                    jobs = [self._job(SpeechRequest(input=self.warmup_text, voice=names[0], seed=i,
                                                    response_format="pcm", stream=stream), loop=None,
                                      timeout_s=math.inf) for i in range(n)]
                    self.engine.submit_many(jobs)
                    for job in jobs:
                        while True:
                            kind, val = job.events.get()
                            if kind == "error":
                                raise val
                            if kind == "done":
                                break
            else:  # ready at once; the first requests compile
                self.ready.set()
            self.warmup_seconds = time.perf_counter() - t0
            log.info("warm-up done in %.1f s", self.warmup_seconds)
            self.ready.set()
        except Exception as e:  # noqa: BLE001 - reported by /healthz
            if self.engine.stopping.is_set():  # shut down while warming up
                self.warmup_error = "the server shut down during warm-up"
                return
            log.exception("warm-up failed")
            self.warmup_error = f"{type(e).__name__}: {e}"

    def bistream_reservation(self, spk: str) -> int:
        """Stream budget bytes of a bistream session of voice ``spk``: its prompt plus at most
        ``bistream_max_tokens`` speech tokens (no cap: as many as the streaming caches hold)."""
        n_prompt = len(self.tts._flow_from_info(self.tts.spk2info[spk]).token)
        cap = self.tts.bistream_max_tokens
        fs = self.engine._streamer
        if cap is None and fs is not None:
            cap = fs.cap_t - n_prompt
        return self.engine.stream_reservation(n_prompt, cap or 0)

    # ------------------------------------------------------------------------- requests
    def resolve(self, voice: str, instructions: Optional[str]) -> tuple[str, str]:
        """(mode, spk_id) for a voice name."""
        try:
            kind = self.voices.kind(voice)
        except VoiceError as e:  # a bad request field (400), unlike DELETE of a missing voice (404)
            raise ApiError(400, str(e), param="voice") from None
        if instructions is not None and instructions.strip():
            if kind == "builtin":
                raise ApiError(400, f"instructions need a registered voice (prompt audio); {voice!r} is a built-in "
                                    "speaker without one. Register a voice with POST /v1/audio/voices",
                               param="instructions")
            return "instruct2", voice
        if kind == "builtin":
            return "sft", voice
        return ("zero_shot" if self.voices.meta[voice]["transcript"] else "cross_lingual"), voice

    def key_for(self, seed: Optional[int]) -> tuple[Any, int]:
        if seed is None:
            seed = secrets.randbits(31)
        return jax.random.PRNGKey(int(seed)), int(seed)

    def _job(self, req: SpeechRequest, loop, *, stream: bool | None = None, timeout_s: float | None = None):
        from ..pipeline.model import SynthesisRequest

        mode, spk = self.resolve(req.voice, req.instructions)
        key, _ = self.key_for(req.seed)
        sr = SynthesisRequest(mode, req.input, spk_id=spk, instruct_text=req.instructions or "", speed=req.speed,
                              key=key)
        mis = self.tts._inputs(sr)  # the pipeline's mode table (front end, prompt features)
        return self.engine.make_job(mis, key=key, stream=req.stream if stream is None else stream,
                                    speed=req.speed, loop=loop, timeout_s=timeout_s)

    def validate(self, req: SpeechRequest) -> None:
        if not req.input.strip():
            raise ApiError(400, "input is empty; give the text to speak", param="input")
        if len(req.input) > self.max_input_chars:
            raise ApiError(413, f"input has {len(req.input)} characters, at most {self.max_input_chars} are "
                                "accepted; split the text into several requests", param="input")
        if req.response_format not in A.FORMATS:
            raise ApiError(400, f"unknown response_format {req.response_format!r}; use one of "
                                f"{', '.join(self.formats)}", param="response_format")
        if req.response_format not in self.formats:
            raise ApiError(400, f"response_format {req.response_format!r} is not supported by this libsndfile; "
                                f"use one of {', '.join(self.formats)}", param="response_format")
        streaming = req.stream_format == "sse" or req.stream
        if streaming and req.speed != 1.0:
            raise ApiError(400, "speed only works without streaming (as the official); drop speed or use "
                                "stream_format=audio without stream", param="speed")
        if req.stream_format == "sse" and req.response_format != "pcm":
            raise ApiError(400, "stream_format=sse sends base64 pcm deltas: set response_format to 'pcm'",
                           param="response_format")
        if req.stream and req.response_format not in ("pcm", "wav"):
            raise ApiError(400, "stream=true sends audio as it is made: use response_format 'pcm' or 'wav'",
                           param="response_format")


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e}); send a JSON object with "
                            "Content-Type: application/json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _validation_message(e: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    errs = e.errors()
    if not errs:
        return "invalid request", None
    first = errs[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        msg = "field required"
    return f"{param}: {msg}" if param else msg, param


def create_app(server: Server) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        # (uvicorn gave open requests their grace period and cancelled the rest); in a worker thread so
        # the event loop can still deliver the cancelled requests' last events
        left = await asyncio.to_thread(server.stop)
        if left:
            log.error("shutdown: threads %s still inside a compiled call after %.0f s", left,
                      server.engine.shutdown_timeout_s)

    app = FastAPI(title="cosyvoice2-jax", lifespan=lifespan)
    app.state.server = server
    m = server.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        m.requests.labels(endpoint=request.url.path, status=str(e.status)).inc()
        return _error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _val_error(request, e):
        msg, param = _validation_message(e)
        m.requests.labels(endpoint=request.url.path, status="400").inc()
        return _error_response(400, msg, param)

    @app.exception_handler(CosyVoiceError)
    async def _cv_error(request, e):
        a = _from_exception(e)
        m.requests.labels(endpoint=request.url.path, status=str(a.status)).inc()
        return _error_response(a.status, a.message, a.param, a.code, a.headers)

    def need_ready():
        if not server.ready.is_set():
            msg = (f"warm-up failed: {server.warmup_error}" if server.warmup_error
                   else "the server is warming up (compiling); retry shortly")
            raise ApiError(503, msg, code="not_ready", headers={"Retry-After": "5"})

    # ----------------------------------------------------------------------------- health, metrics
    @app.get("/healthz")
    async def healthz():
        e = server.engine
        body = {"status": "ready" if server.ready.is_set() else ("error" if server.warmup_error else "warming"),
                "warmup_seconds": server.warmup_seconds, "error": server.warmup_error,
                "sample_rate": server.tts.sample_rate, "formats": server.formats,
                "slots": e.rows, "active_slots": e.active_rows(), "queue_depth": e.queue_depth(),
                "max_queue": e.max_queue, "active_streams": e.active_streams(),
                "streams_waiting": e.streams_waiting(),
                # streaming flow-cache budget (README "Speech server"): bytes reserved by the running
                # streams, the budget (null with --max-streams), the per-stream cache limit (recompute
                # fallback past it), the longest admissible request's reservation and how many of those fit
                "stream_bytes_reserved": e.stream_bytes_reserved(),
                "stream_budget_bytes": None if e._max_streams_arg else e.stream_budget_bytes,
                "stream_cache_limit_bytes": e.stream_cache_limit, "per_stream_bytes": e.per_stream_bytes,
                "max_streams": e.max_streams}
        return JSONResponse(body, status_code=200 if server.ready.is_set() else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    # ----------------------------------------------------------------------------- speech
    async def _next_event(job, request: Optional[Request]):
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), 0.25)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancel()
                    raise Cancelled("client disconnected") from None

    async def _submit(req: SpeechRequest, stream: bool):
        loop = asyncio.get_running_loop()
        try:
            job = await run_in_threadpool(server._job, req, loop, stream=stream)
            server.engine.submit(job)
        except Exception as e:  # noqa: BLE001
            raise _from_exception(e) from None
        return job

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        need_ready()
        body = await _json_body(request)
        try:
            req = SpeechRequest.model_validate(body)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise ApiError(400, msg, param=param) from None
        server.validate(req)
        sse = req.stream_format == "sse"
        stream = sse or req.stream
        job = await _submit(req, stream)
        sr = server.tts.sample_rate
        headers = {"X-Sample-Rate": str(sr)}
        if req.seed is not None:
            headers["X-Seed"] = str(req.seed)
        try:
            first = await _next_event(job, request)
        except BaseException:
            job.cancel()
            raise
        if first[0] == "error":
            raise _from_exception(first[1])
        if not stream:
            kind, val = first
            chunks = [val] if kind == "audio" else []
            try:
                while kind != "done":
                    kind, val = await _next_event(job, request)
                    if kind == "error":
                        raise _from_exception(val)
                    if kind == "audio":
                        chunks.append(val)
            except Cancelled:
                m.requests.labels(endpoint="/v1/audio/speech", status="499").inc()
                return Response(status_code=499)
            audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
            data = await run_in_threadpool(A.encode, audio, sr, req.response_format)
            m.requests.labels(endpoint="/v1/audio/speech", status="200").inc()
            return Response(data, media_type=A.FORMATS[req.response_format][2], headers=headers)

        async def events():
            kind, val = first
            done = False
            try:
                if not sse and req.response_format == "wav":
                    yield A.streaming_wav_header(sr)
                while True:
                    if kind == "error":
                        if sse:
                            e = _from_exception(val)
                            yield ("event: error\ndata: " + json.dumps({"type": "error", "error": {
                                "message": e.message, "code": e.code}}) + "\n\n").encode()
                        return
                    if kind == "done":
                        if sse:
                            yield ("event: speech.audio.done\ndata: " + json.dumps({
                                "type": "speech.audio.done", "samples": val["samples"], "sample_rate": sr,
                                "usage": {"input_characters": len(req.input)}}) + "\n\n").encode()
                        done = True
                        m.requests.labels(endpoint="/v1/audio/speech", status="200").inc()
                        return
                    pcm = A.pcm16(val)
                    if sse:
                        yield ("event: speech.audio.delta\ndata: " + json.dumps({
                            "type": "speech.audio.delta", "audio": base64.b64encode(pcm).decode()}) + "\n\n").encode()
                    else:
                        yield pcm
                    kind, val = await job.events.get()
            finally:
                if not done:
                    job.cancel()  # client gone (or error): the engine frees the slot

        media = "text/event-stream" if sse else A.FORMATS[req.response_format][2]
        return StreamingResponse(events(), media_type=media, headers=headers)

    # ----------------------------------------------------------------------------- voices
    @app.get("/v1/audio/voices")
    async def list_voices():
        return {"object": "list", "data": server.voices.describe()}

    @app.post("/v1/audio/voices", status_code=201)
    async def add_voice(name: str = Form(...), file: UploadFile = File(...), transcript: str = Form(""),
                        overwrite: bool = Form(False)):
        server.voices.check_name(name)
        data = await file.read()
        if not data:
            raise ApiError(400, "the uploaded prompt audio is empty", param="file")
        suffix = Path(file.filename or "prompt.wav").suffix or ".wav"
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"prompt{suffix}"
            p.write_bytes(data)
            try:
                out = await run_in_threadpool(server.voices.add, name, transcript, p, overwrite)
            except Exception as e:  # noqa: BLE001
                raise _from_exception(e) from None
        m.requests.labels(endpoint="/v1/audio/voices", status="201").inc()
        return JSONResponse(out, status_code=201)

    @app.delete("/v1/audio/voices/{name}")
    async def delete_voice(name: str):
        try:
            server.voices.delete(name)
        except Exception as e:  # noqa: BLE001
            raise _from_exception(e) from None
        return {"deleted": name}

    # ----------------------------------------------------------------------------- bistream
    @app.websocket("/v1/audio/speech/stream")
    async def bistream(ws: WebSocket):
        await ws.accept()

        async def fail(status: int, message: str):
            m.requests.labels(endpoint="/v1/audio/speech/stream", status=str(status)).inc()
            await ws.send_json({"type": "error", "status": status, "message": message})
            await ws.close(code=1008 if status < 500 else 1011)

        if not server.ready.is_set():
            return await fail(503, "the server is warming up; retry shortly")
        try:
            start = await ws.receive_json()
        except (json.JSONDecodeError, KeyError, WebSocketDisconnect):
            return await fail(400, 'first message must be JSON: {"voice": ..., ["instructions", "seed"]}')
        if not isinstance(start, dict) or not isinstance(start.get("voice"), str):
            return await fail(400, 'first message must be a JSON object with a "voice"')
        try:
            mode, spk = server.resolve(start["voice"], start.get("instructions"))
            seed = start.get("seed")
            key, _ = server.key_for(int(seed) if seed is not None else None)
            nbytes = server.bistream_reservation(spk)
        except Exception as e:  # noqa: BLE001
            a = _from_exception(e)
            return await fail(a.status, a.message)
        try:
            got = await run_in_threadpool(server.engine.acquire_stream, nbytes, server.engine.stream_wait_s)
        except ShuttingDown as e:
            return await fail(503, str(e))
        if not got:
            retry = max(1, math.ceil(server.engine.stream_retry_after()))
            m.requests.labels(endpoint="/v1/audio/speech/stream", status="429").inc()
            await ws.send_json({"type": "error", "status": 429, "retry_after": retry,
                                "message": f"streaming memory budget full: waited {server.engine.stream_wait_s:.0f} s "
                                           f"for {nbytes / 2**20:.0f} MiB of flow caches; retry after {retry} s"})
            return await ws.close(code=1013)  # "try again later"
        loop = asyncio.get_running_loop()
        text_q: queue.Queue = queue.Queue()
        out_q: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        tts = server.tts

        def gone() -> bool:  # the client hung up or the server stops
            return cancelled.is_set() or server.engine.stopping.is_set()

        def pieces():
            while True:
                try:
                    item = text_q.get(timeout=0.5)
                except queue.Empty:
                    item = ""
                if gone():
                    raise Cancelled("client disconnected" if cancelled.is_set() else "the server is shutting down")
                if item is None:
                    return
                if item:
                    yield item

        def run():
            t0 = time.perf_counter()
            n, first, gen = 0, None, None
            try:
                if mode == "sft":
                    gen = tts.inference_sft(pieces(), spk, stream=True, key=key)
                elif mode == "instruct2":
                    gen = tts.inference_instruct2(pieces(), start["instructions"], zero_shot_spk_id=spk,
                                                  stream=True, key=key)
                elif mode == "zero_shot":
                    gen = tts.inference_zero_shot(pieces(), "", zero_shot_spk_id=spk, stream=True, key=key)
                else:
                    gen = tts.inference_cross_lingual(pieces(), zero_shot_spk_id=spk, stream=True, key=key)
                for out in gen:
                    if gone():  # stop at this chunk boundary (closing gen frees its caches)
                        raise Cancelled("client disconnected" if cancelled.is_set() else "the server is shutting down")
                    a = np.asarray(out["tts_speech"], np.float32).reshape(-1)
                    if first is None:
                        first = time.perf_counter() - t0
                        m.first_chunk.labels(stream="bistream").observe(first)
                    n += a.shape[0]
                    loop.call_soon_threadsafe(out_q.put_nowait, ("audio", a))
                loop.call_soon_threadsafe(out_q.put_nowait, ("done", n))
            except BaseException as e:  # noqa: BLE001
                try:
                    loop.call_soon_threadsafe(out_q.put_nowait, ("error", e))
                except RuntimeError:
                    pass
            finally:
                if gen is not None:
                    gen.close()
                server.engine.release_stream(nbytes)

        try:
            server.engine.spawn(run, name="bistream")
        except ShuttingDown as e:
            server.engine.release_stream(nbytes)
            return await fail(503, str(e))

        async def reader():
            try:
                while True:
                    msg = await ws.receive_json()
                    if not isinstance(msg, dict):
                        raise ValueError("messages must be JSON objects")
                    if msg.get("end"):
                        text_q.put(None)
                        return
                    t = msg.get("text")
                    if not isinstance(t, str):
                        raise ValueError('text messages look like {"text": "..."}; end with {"end": true}')
                    text_q.put(t)
            except WebSocketDisconnect:
                cancelled.set()
                text_q.put(None)
            except (ValueError, json.JSONDecodeError) as e:
                cancelled.set()
                text_q.put(None)
                loop.call_soon_threadsafe(out_q.put_nowait, ("bad", str(e)))

        rtask = asyncio.create_task(reader())
        try:
            while True:
                kind, val = await out_q.get()
                if kind == "audio":
                    await ws.send_bytes(A.pcm16(val))
                elif kind == "done":
                    m.requests.labels(endpoint="/v1/audio/speech/stream", status="200").inc()
                    await ws.send_json({"type": "done", "samples": int(val), "sample_rate": tts.sample_rate})
                    await ws.close()
                    return
                elif kind == "bad":
                    return await fail(400, val)
                else:
                    if cancelled.is_set():
                        return
                    a = _from_exception(val)
                    return await fail(a.status, a.message)
        except WebSocketDisconnect:
            pass
        finally:  # (also when the server's shutdown cancels this handler): the session's thread stops
            cancelled.set()
            text_q.put(None)
            rtask.cancel()

    # ----------------------------------------------------------------------------- official shapes
    async def _official(request: Request, mode: str, tts_text: str, spk_id: str = "", prompt_text: str = "",
                        instruct_text: str = "", prompt_wav: Optional[UploadFile] = None):
        from ..pipeline.model import SynthesisRequest

        need_ready()
        if not tts_text.strip():
            raise ApiError(400, "tts_text is empty", param="tts_text")
        key, _ = server.key_for(None)
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory() as d:
            wav = None
            if prompt_wav is not None:
                wav = Path(d) / ("prompt" + (Path(prompt_wav.filename or "p.wav").suffix or ".wav"))
                wav.write_bytes(await prompt_wav.read())
            sr = SynthesisRequest(mode, tts_text, prompt_wav=str(wav) if wav else None, prompt_text=prompt_text,
                                  instruct_text=instruct_text, spk_id=spk_id, key=key)
            try:
                mis = await run_in_threadpool(server.tts._inputs, sr)
                job = server.engine.make_job(mis, key=key, stream=False, speed=1.0, loop=loop)
                server.engine.submit(job)
            except Exception as e:  # noqa: BLE001
                raise _from_exception(e) from None
        chunks = []
        while True:
            kind, val = await _next_event(job, request)
            if kind == "error":
                raise _from_exception(val)
            if kind == "done":
                break
            chunks.append(A.pcm16(val))
        return Response(b"".join(chunks), media_type="audio/pcm")

    @app.api_route("/inference_sft", methods=["GET", "POST"])
    async def official_sft(request: Request, tts_text: str = Form(...), spk_id: str = Form(...)):
        return await _official(request, "sft", tts_text, spk_id=spk_id)

    @app.api_route("/inference_zero_shot", methods=["GET", "POST"])
    async def official_zero_shot(request: Request, tts_text: str = Form(...), prompt_text: str = Form(...),
                                 prompt_wav: UploadFile = File(...)):
        return await _official(request, "zero_shot", tts_text, prompt_text=prompt_text, prompt_wav=prompt_wav)

    @app.api_route("/inference_cross_lingual", methods=["GET", "POST"])
    async def official_cross_lingual(request: Request, tts_text: str = Form(...), prompt_wav: UploadFile = File(...)):
        return await _official(request, "cross_lingual", tts_text, prompt_wav=prompt_wav)

    @app.api_route("/inference_instruct2", methods=["GET", "POST"])
    async def official_instruct2(request: Request, tts_text: str = Form(...), instruct_text: str = Form(...),
                                 prompt_wav: UploadFile = File(...)):
        return await _official(request, "instruct2", tts_text, instruct_text=instruct_text, prompt_wav=prompt_wav)

    return app


def build(model_dir: str | Path, *, voices_dir: str | Path | None = None, sampling: str = "ras", quant: bool = False,
          streaming=None, engine_kw: dict | None = None, warmup: bool = True, max_input_chars: int = 4096,
          cache: bool = True, warmup_text: str = "Hi there.", bistream_max_tokens: int | None = 1500,
          warmup_batches: tuple[int, ...] = (1,), warmup_stream: bool = True) -> FastAPI:
    """Load ``model_dir`` and return the app (uvicorn runs it; see :func:`cosyvoice2_jax.serve.serve`)."""
    from ..pipeline.loading import cache_root
    from ..pipeline.model import CosyVoice2

    tts = CosyVoice2.from_pretrained(model_dir, cache=cache, sampling=sampling, quant=quant, streaming=streaming,
                                     bistream_max_tokens=bistream_max_tokens)
    if voices_dir is None:
        voices_dir = cache_root() / "voices" / Path(model_dir).resolve().name
    server = Server(tts, voices_dir=voices_dir, engine_kw=engine_kw, warmup=warmup, max_input_chars=max_input_chars,
                    warmup_text=warmup_text, warmup_batches=warmup_batches, warmup_stream=warmup_stream)
    return create_app(server)

