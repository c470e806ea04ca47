"""The serving engine: slot-based continuous batching of the LM, batched token2wav, streaming.

One engine thread owns the LM's slot batch (:meth:`LMGenerator.slots_init`): ``rows`` requests
decode together in one compiled shape, ``steps_per_call`` tokens per jitted call. Between calls,
finished or cancelled rows leave and queued requests join (each is prefilled alone, with bucketed
shapes, and written into a free row). Every row has its own cache position and PRNG key, so a
request's tokens do not depend on the other requests in the batch: the same request with the same
seed gives the same audio alone or under load.

* Non-streaming segments whose LM finished in the same decode call go through one batched flow +
  HiFT call (:meth:`Token2Wav.full_batch`), rows padded to a power of two so few shapes compile.
* Streaming segments: the engine pushes each row's new tokens to a per-request thread that runs
  the pipeline's streaming token2wav (:meth:`Token2Wav.stream`, the official chunk schedule), which
  sends audio chunks back as they are made.
* Memory budget of the streaming flow caches: every stream holds a ``FlowStreamer`` state
  (``per_stream_bytes``, measured at warm-up; 4.6 MB per mel frame at full size fp32). At most
  ``max_streams`` streams run at once (``stream_budget_bytes // per_stream_bytes``, at least 1);
  further streaming requests wait in the queue (the LM does not start them) until a stream ends, or
  until their timeout. Non-streaming requests are not limited by it and pass waiting streams.
* Back-pressure: at most ``max_queue`` requests wait for a slot; :meth:`submit` raises
  :class:`Busy` (HTTP 429 with ``Retry-After``) beyond that.
* Per-request deadline (``timeout_s``) and cancellation (client gone): the row is freed at the
  next decode call, the stream thread stops, the job gets a :class:`Cancelled` / :class:`Timeout`.

Results reach the caller through ``Job.events`` (``("audio", float32 array)`` chunks, then
``("done", info)`` or ``("error", exception)``), delivered into an asyncio queue when the job was
made with a loop, else a plain ``queue.Queue``.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Any, Optional

import jax
import numpy as np

from ..errors import CosyVoiceError
from ..llm.generate import GenerationError, Request

log = logging.getLogger(__name__)


class EngineError(CosyVoiceError):
    """Base of the engine's per-request failures (mapped to HTTP statuses by the app)."""

    status = 500


class Busy(EngineError):
    """The request queue is full (HTTP 429); ``retry_after`` seconds is an estimate."""

    status = 429

    def __init__(self, msg: str, retry_after: float):
        super().__init__(msg)
        self.retry_after = retry_after


class Timeout(EngineError):
    status = 504


class Cancelled(EngineError):
    status = 499


class TooLong(EngineError):
    """The request does not fit one LM slot's cache (HTTP 413)."""

    status = 413


@dataclasses.dataclass
class Segment:
    mi: Any                  # pipeline ModelInput
    k_lm: Any
    k_voc: Any
    tokens: list = dataclasses.field(default_factory=list)
    token_q: "queue.Queue" = dataclasses.field(default_factory=queue.Queue)  # streaming only


class Job:
    """One synthesis request in the engine."""

    _ids = itertools.count()

    def __init__(self, segments: list, *, stream: bool, speed: float, deadline: float,
                 loop: Optional[asyncio.AbstractEventLoop] = None, label: str = "speech"):
        self.id = next(Job._ids)
        self.segments, self.stream, self.speed, self.deadline = segments, stream, speed, deadline
        self.loop = loop
        self.events: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.label = label
        self.next_seg = 0               # next segment to admit to the LM
        self.audio: dict[int, np.ndarray] = {}
        self.t_submit = time.perf_counter()
        self.t_first: Optional[float] = None
        self.samples = 0
        self.has_stream_permit = False
        self.admitted = threading.Event()  # streaming: the permit is held, the flow cache may be built
        self.error: Optional[BaseException] = None

    def emit(self, kind: str, value) -> None:
        if kind == "audio":
            if self.t_first is None:
                self.t_first = time.perf_counter()
            self.samples += int(value.shape[0])
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is closed: nobody listens any more
                pass
        else:
            self.events.put((kind, value))

    def cancel(self) -> None:
        self.cancelled.set()
        for s in self.segments:
            s.token_q.put(None)


class Engine:
    """Continuous-batching engine over a :class:`cosyvoice2_jax.pipeline.CosyVoice2` pipeline.

    Args:
      tts: the pipeline (its LM generator, token2wav and front end are used).
      rows: LM slots decoded together (one compiled batch shape).
      cache_slots: KV-cache positions per slot (a multiple of the LM's ``cache_bucket``); a request
        needing more is refused with :class:`TooLong`.
      max_queue: requests allowed to wait for a slot.
      timeout_s: per-request deadline from submission.
      stream_budget_bytes / max_streams: streaming flow-cache budget (module docstring).
      metrics: a :class:`cosyvoice2_jax.serve.metrics.Metrics` (or None).
    """

    def __init__(self, tts, *, rows: int = 8, cache_slots: int = 2048, max_queue: int = 32,
                 timeout_s: float = 300.0, stream_budget_bytes: int = 4 << 30, max_streams: int | None = None,
                 metrics=None):
        self.tts, self.lm = tts, tts.lm
        self.rows, self.cache_slots = rows, cache_slots
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.stream_budget_bytes, self._max_streams_arg = stream_budget_bytes, max_streams
        self.max_streams = max_streams or 1
        self.per_stream_bytes = 0
        self.metrics = metrics
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._front: collections.deque[Job] = collections.deque()  # jobs with a next segment (priority)
        self._slots: list[Optional[tuple[Job, int]]] = [None] * rows
        self._streams = 0
        self._stop = False
        self._state = None
        self._thread: Optional[threading.Thread] = None
        self._service_s = 1.0  # EMA of request service time (Retry-After estimate)

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._state = self.lm.slots_init(self.rows, self.cache_slots)
        self._thread = threading.Thread(target=self._loop, name="cosyvoice2-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def measure_stream_bytes(self, flow_prompt) -> int:
        """Bytes of one streaming flow state (its caches), sets ``max_streams`` from the budget."""
        t2w = self.tts.token2wav
        if not t2w.flow_cache:
            self.per_stream_bytes = 0
        else:
            st = t2w.flow.streamer().start(flow_prompt.token, flow_prompt.feat, flow_prompt.embedding)
            self.per_stream_bytes = int(sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(st)))
            del st
        if self._max_streams_arg:
            self.max_streams = self._max_streams_arg
        elif self.per_stream_bytes:
            self.max_streams = max(1, self.stream_budget_bytes // self.per_stream_bytes)
        else:
            self.max_streams = self.rows
        return self.per_stream_bytes

    # ------------------------------------------------------------------------------ public
    def queue_depth(self) -> int:
        return len(self._waiting)

    def active_rows(self) -> int:
        return sum(s is not None for s in self._slots)

    def active_streams(self) -> int:
        return self._streams

    def make_job(self, model_inputs: list, *, key, stream: bool, speed: float, timeout_s: float | None = None,
                 loop=None, label: str = "speech") -> Job:
        """A job from the pipeline's per-segment model inputs (``CosyVoice2._inputs``); segment ``i``
        uses ``fold_in(key, i)`` split into (LM, vocoder) keys, as ``CosyVoice2.tts``."""
        segs = []
        for i, mi in enumerate(model_inputs):
            k_lm, k_voc = jax.random.split(jax.random.fold_in(key, i))
            seg = Segment(mi, k_lm, k_voc)
            if mi.source_speech is None:
                need = self.lm.slot_fits(self._request(seg))
                if need > self.cache_slots:
                    raise TooLong(f"text segment {i} needs {need} LM cache positions, a slot has {self.cache_slots}: "
                                  "send shorter text (or start the server with a larger --lm-cache)")
            segs.append(seg)
        if not segs:
            raise GenerationError("nothing to synthesise")
        return Job(segs, stream=stream, speed=speed, deadline=time.perf_counter() + (timeout_s or self.timeout_s),
                   loop=loop, label=label)

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raises :class:`Busy` when ``max_queue`` jobs already wait."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: list) -> list:
        """Queue several jobs at once (they can join the same decode call), all or none."""
        with self._cv:
            if len(self._waiting) + len(jobs) > self.max_queue:
                retry = 1.0 + self._service_s * (len(self._waiting) + 1) / max(self.rows, 1)
                if self.metrics:
                    self.metrics.rejected.inc()
                raise Busy(f"server busy: {len(self._waiting)} requests already wait for a slot "
                           f"(max_queue={self.max_queue}); retry later", retry_after=retry)
            self._waiting.extend(jobs)
            self._cv.notify_all()
        for job in jobs:
            if job.stream:
                threading.Thread(target=self._stream_worker, args=(job,), name=f"stream-{job.id}",
                                 daemon=True).start()
        return jobs

    def acquire_stream(self, timeout: float) -> bool:
        """Take a streaming permit outside the LM batch (bistream sessions); False on timeout."""
        end = time.perf_counter() + timeout
        with self._cv:
            while self._streams >= self.max_streams:
                left = end - time.perf_counter()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
            self._streams += 1
            return True

    def release_stream(self) -> None:
        with self._cv:
            self._streams -= 1
            self._cv.notify_all()

    # ------------------------------------------------------------------------------ engine thread
    def _request(self, seg: Segment) -> Request:
        mi = seg.mi
        return Request(text=list(mi.text), prompt_text=list(mi.prompt_text),
                       prompt_speech=[int(t) for t in mi.llm_prompt_speech])

    def _fail(self, job: Job, err: BaseException) -> None:
        if job.finished.is_set():
            return
        job.error = err
        job.cancel()  # stops its stream thread
        job.finished.set()
        if self.metrics:
            self.metrics.errors.labels(kind=type(err).__name__).inc()
        job.emit("error", err)

    def _finish(self, job: Job) -> None:
        if job.finished.is_set():
            return
        job.finished.set()
        took = time.perf_counter() - job.t_submit
        self._service_s = 0.8 * self._service_s + 0.2 * took
        dur = job.samples / self.tts.sample_rate
        if self.metrics and dur > 0:
            self.metrics.rtf.labels(stream=str(job.stream).lower()).observe(took / dur)
            self.metrics.audio_seconds.inc(dur)
        job.emit("done", {"samples": job.samples, "seconds": took})

    def _drop_dead(self, now: float) -> None:
        """Free the rows of cancelled / expired jobs, drop them from the queues."""
        for r, occ in enumerate(self._slots):
            if occ is None:
                continue
            job = occ[0]
            if job.cancelled.is_set() or job.finished.is_set() or now > job.deadline:
                self._state = self.lm.slot_free(self._state, r)
                self._slots[r] = None
                if not job.finished.is_set():
                    self._fail(job, Cancelled("request cancelled") if job.cancelled.is_set()
                               else Timeout(f"request timed out after {self.timeout_s:.0f} s"))
        for dq in (self._waiting, self._front):
            for job in list(dq):
                if job.cancelled.is_set() or job.finished.is_set() or now > job.deadline:
                    dq.remove(job)
                    if not job.finished.is_set():
                        self._fail(job, Cancelled("request cancelled") if job.cancelled.is_set()
                                   else Timeout(f"request waited {now - job.t_submit:.0f} s for a slot "
                                                f"(timeout {self.timeout_s:.0f} s)"))

    def _next_job(self) -> Optional[Job]:
        if self._front:
            return self._front.popleft()
        for job in self._waiting:
            if job.stream and not job.has_stream_permit:
                if self._streams >= self.max_streams:
                    continue  # waits for a stream to end (memory budget); non-streaming jobs pass
                self._streams += 1
                job.has_stream_permit = True
            self._waiting.remove(job)
            job.admitted.set()
            return job
        return None

    def _admit(self, t2w_pending: list) -> None:
        while None in self._slots:
            job = self._next_job()
            if job is None:
                return
            seg_i = job.next_seg
            seg = job.segments[seg_i]
            job.next_seg += 1
            if seg.mi.source_speech is not None:  # vc: no LM
                seg.tokens = [int(t) for t in seg.mi.source_speech]
                self._segment_done(job, seg_i, t2w_pending)
                continue
            r = self._slots.index(None)
            try:
                key = seg.k_lm if self.lm.sampling == "ras" else None
                self._state = self.lm.slot_insert(self._state, r, self._request(seg), key)
            except Exception as e:  # noqa: BLE001 - reported to the one request
                self._fail(job, e)
                continue
            self._slots[r] = (job, seg_i)

    def _segment_done(self, job: Job, seg_i: int, t2w_pending: list) -> None:
        seg = job.segments[seg_i]
        if job.stream:
            seg.token_q.put(None)
        elif not seg.tokens:
            self._fail(job, GenerationError(f"segment {seg_i}: the LM produced no speech tokens"))
            return
        else:
            t2w_pending.append((job, seg_i))
        if job.next_seg < len(job.segments):
            self._front.append(job)

    def _loop(self) -> None:
        while True:
            t2w_pending: list = []
            with self._cv:
                if self._stop:
                    break
                self._drop_dead(time.perf_counter())
                self._admit(t2w_pending)
                idle = all(s is None for s in self._slots) and not t2w_pending
                if self.metrics:
                    self.metrics.queue_depth.set(len(self._waiting))
                    self.metrics.active_rows.set(self.active_rows())
                    self.metrics.active_streams.set(self._streams)
                if idle:
                    self._cv.wait(0.05)
                    continue
            try:
                self._step(t2w_pending)
            except Exception as e:  # noqa: BLE001 - an engine bug must not kill the server silently
                log.exception("engine step failed")
                with self._cv:
                    for r, occ in enumerate(self._slots):
                        if occ is not None:
                            self._fail(occ[0], e)
                            self._slots[r] = None
                    self._state = self.lm.slots_init(self.rows, self.cache_slots)

    def _step(self, t2w_pending: list) -> None:
        active = [r for r, s in enumerate(self._slots) if s is not None]
        if active:
            t0 = time.perf_counter()
            self._state, toks, done = self.lm.slots_step(self._state)
            if self.metrics:
                self.metrics.lm_batch.observe(len(active))
                self.metrics.stage_seconds.labels(stage="lm_decode").inc(time.perf_counter() - t0)
            with self._cv:
                for r in active:
                    occ = self._slots[r]
                    if occ is None:
                        continue
                    job, seg_i = occ
                    seg = job.segments[seg_i]
                    new = [int(t) for t in toks[r] if t >= 0]
                    seg.tokens.extend(new)
                    if job.stream and new:
                        seg.token_q.put(new)
                    if done[r]:
                        self._slots[r] = None
                        self._segment_done(job, seg_i, t2w_pending)
        if t2w_pending:
            self._token2wav(t2w_pending)

    def _token2wav(self, pending: list) -> None:
        pending = [(j, i) for j, i in pending if not j.finished.is_set()]
        if not pending:
            return
        t0 = time.perf_counter()
        n = len(pending)
        rows = 1 << (n - 1).bit_length()  # pad to a power of two: few compiled batch shapes
        items = pending + [pending[0]] * (rows - n)
        segs = [j.segments[i] for j, i in items]
        try:
            audio = self.tts.token2wav.full_batch([np.asarray(s.tokens, np.int32) for s in segs],
                                                  [s.mi.flow for s in segs], [s.k_voc for s in segs],
                                                  [j.speed for j, _ in items])
        except Exception as e:  # noqa: BLE001
            for j, _ in pending:
                self._fail(j, e)
            return
        if self.metrics:
            self.metrics.t2w_batch.observe(n)
            self.metrics.stage_seconds.labels(stage="token2wav").inc(time.perf_counter() - t0)
        for (job, seg_i), a in zip(pending, audio[:n]):
            job.audio[seg_i] = a
            if len(job.audio) == len(job.segments):
                full = np.concatenate([job.audio[k] for k in range(len(job.segments))]).astype(np.float32)
                job.emit("audio", full)
                if self.metrics and job.t_first is not None:
                    self.metrics.first_chunk.labels(stream="false").observe(job.t_first - job.t_submit)
                self._finish(job)

    # ------------------------------------------------------------------------------ stream threads
    def _stream_worker(self, job: Job) -> None:
        t2w = self.tts.token2wav

        def source(seg: Segment):
            while True:
                try:
                    item = seg.token_q.get(timeout=0.5)
                except queue.Empty:
                    if job.cancelled.is_set() or job.finished.is_set():
                        return
                    continue
                if item is None or job.cancelled.is_set():
                    return
                yield item

        try:
            while not job.admitted.wait(0.5):  # no flow cache before the budget allows it
                if job.cancelled.is_set() or job.finished.is_set():
                    return
            for seg in job.segments:
                t0 = time.perf_counter()
                for chunk in t2w.stream(source(seg), seg.mi.flow, seg.k_voc):
                    if job.cancelled.is_set() or job.finished.is_set():
                        return
                    first = job.t_first is None
                    job.emit("audio", np.asarray(chunk, np.float32))
                    if first and self.metrics:
                        self.metrics.first_chunk.labels(stream="true").observe(job.t_first - job.t_submit)
                if self.metrics:
                    self.metrics.stage_seconds.labels(stage="token2wav_stream").inc(time.perf_counter() - t0)
                if job.cancelled.is_set() or job.finished.is_set():
                    return
            with self._cv:
                self._finish(job)
        except Exception as e:  # noqa: BLE001 - reported to the request
            if not (job.cancelled.is_set() or job.finished.is_set()):
                with self._cv:
                    self._fail(job, e)
        finally:
            with self._cv:
                if job.has_stream_permit:
                    job.has_stream_permit = False
                    self._streams -= 1
                self._cv.notify_all()
