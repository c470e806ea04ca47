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
* Memory budget of the streaming flow caches (``stream_budget_bytes``; 4.6 MB per mel frame per
  stream at full size fp32, half with bf16 caches). The caches of a stream start at the tier that
  holds its prompt and double as tokens arrive (``FlowStreamer.tiers``), so a stream is admitted by
  its own worst case, known at submission: the prompt plus the most speech tokens the LM may make for
  its text (``max_token_text_ratio`` x its text tokens; a bistream: ``bistream_max_tokens``), as
  ``FlowStreamer.peak_cache_bytes`` (the tier it ends in plus, while growing, one array of the one before). The
  reservation is taken when the LM starts the stream and given back when it ends; the sum of
  reservations never exceeds the budget. The per-stream cache limit (``stream_cache_limit``, set on
  the streamer: the largest tier whose growth fits the whole budget, or the config's smaller
  ``flow_cache_budget_mb``) caps every reservation: a longer stream drops its caches there and
  continues on the recompute path (slower, same audio), so every stream can run. A stream that does
  not fit waits in the queue (streams in order; the LM does not start it) for at most
  ``stream_wait_s``, then gets :class:`Busy` (HTTP 429, ``Retry-After``); non-streaming requests are
  not limited by it and pass waiting streams. ``max_streams`` instead of a byte budget: a stream count.
  The final unmasked chunk (one offline flow call, after the caches are freed) is not counted.
* Back-pressure: at most ``max_queue`` requests wait for a slot; :meth:`submit` raises
  :class:`Busy` (HTTP 429 with ``Retry-After``) beyond that.
* Per-request deadline (``timeout_s``) and cancellation (client gone): the row is freed at the
  next decode call, the job gets a :class:`Cancelled` / :class:`Timeout`, and its stream thread stops
  at its next chunk boundary (it checks the deadline itself once the LM is done with the request): no
  further flow / HiFT call, not even the final chunk, and its stream reservation is given back.
* Shutdown (:meth:`stop`, the app's lifespan): new requests get :class:`ShuttingDown` (HTTP 503),
  every queued or running request is failed with it (its work stops at the next decode call or chunk
  boundary), then the engine thread and every worker thread (:meth:`spawn`: stream threads, the
  warm-up, bistream sessions) are joined within ``shutdown_timeout_s``. No thread of the engine may
  still be inside a compiled call when the interpreter exits: CPython ends daemon threads at exit,
  and one ended inside XLA aborts the process (``terminate called ...``).

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


class ShuttingDown(EngineError):
    """The server is stopping (HTTP 503): the request was refused or cut short."""

    status = 503


class _Stop(Exception):
    """Internal: a stream's job ended (cancelled, failed, timed out); its stream thread stops here."""


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
        self.stream_bytes = 0           # streaming flow-cache bytes reserved while it streams
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

    def expired(self) -> bool:
        return time.perf_counter() > self.deadline

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
      stream_budget_bytes / max_streams: streaming flow-cache budget in bytes, or a stream count
        instead (module docstring).
      stream_wait_s: how long a stream may wait for the budget before a 429.
      shutdown_timeout_s: how long :meth:`stop` waits for the engine's threads (a thread inside a
        compiled call finishes that call first).
      metrics: a :class:`cosyvoice2_jax.serve.metrics.Metrics` (or None).
    """

    def __init__(self, tts, *, rows: int = 8, cache_slots: int = 2048, max_queue: int = 32,
                 timeout_s: float = 300.0, stream_budget_bytes: int = 4 << 30, max_streams: int | None = None,
                 stream_wait_s: float = 60.0, shutdown_timeout_s: float = 30.0, metrics=None):
        self.tts, self.lm = tts, tts.lm
        self.rows, self.cache_slots = rows, cache_slots
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.stream_budget_bytes, self._max_streams_arg = stream_budget_bytes, max_streams
        self.stream_wait_s, self.shutdown_timeout_s = stream_wait_s, shutdown_timeout_s
        self.max_streams = max_streams or 1   # streams of the longest admissible request that fit at once
        self.per_stream_bytes = 0             # reservation of the longest admissible request
        self.stream_cache_limit: int | None = None  # per-stream cache bytes before the recompute fallback
        self._stream_bytes = 0                # reserved now
        self._streamer = None
        self.metrics = metrics
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._front: collections.deque[Job] = collections.deque()  # jobs with a next segment (priority)
        self._slots: list[Optional[tuple[Job, int]]] = [None] * rows
        self._streams = 0
        self._stop = False
        self.stopping = threading.Event()     # set by stop(): sessions outside the LM batch end too
        self._live: set[Job] = set()          # submitted, not finished (stop() fails them)
        self._workers: set[threading.Thread] = set()  # spawn()ed threads still running
        self._state = None
        self._thread: Optional[threading.Thread] = None
        self._service_s = 1.0  # EMA of request service time (Retry-After estimate)

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.plan_streams()
        self._state = self.lm.slots_init(self.rows, self.cache_slots)
        self._thread = threading.Thread(target=self._loop, name="cosyvoice2-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> list[str]:
        """Fail every queued and running request with :class:`ShuttingDown`, stop the engine thread and
        join it and every :meth:`spawn`\ ed thread within ``timeout`` s (``shutdown_timeout_s``).
        Returns the names of the threads still running after that (empty: all stopped). Idempotent."""
        end = time.perf_counter() + (self.shutdown_timeout_s if timeout is None else timeout)
        with self._cv:
            self._stop = True
            self.stopping.set()
            live = [j for j in list(self._live) if not j.finished.is_set()]
            err = ShuttingDown("the server is shutting down; retry later (or on another replica)")
            for job in live:
                self._fail(job, err)  # its stream thread stops at its next chunk boundary
            self._waiting.clear()
            self._front.clear()
            self._slots = [None] * self.rows  # (the engine thread skips rows it no longer finds)
            self._cv.notify_all()
        if live:
            log.warning("shutdown: %d request(s) in flight cancelled", len(live))
        threads = [self._thread] if self._thread is not None else []
        threads += list(self._workers)
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, end - time.perf_counter()))
        return [t.name for t in threads if t.is_alive()]

    def spawn(self, target, *args, name: str) -> threading.Thread:
        """Run ``target(*args)`` in a worker thread that :meth:`stop` joins (:class:`ShuttingDown`
        once stopping). The target must end soon after ``stopping`` is set or its job is failed."""
        def run():
            try:
                target(*args)
            finally:
                self._workers.discard(threading.current_thread())

        t = threading.Thread(target=run, name=name, daemon=True)
        with self._cv:
            if self.stopping.is_set():
                raise ShuttingDown("the server is shutting down; retry later (or on another replica)")
            self._workers.add(t)
        t.start()
        return t

    def plan_streams(self) -> None:
        """Size the streaming budget: the per-stream cache limit (set on the pipeline's streamer) and
        the reservation of the longest request the LM slots admit (``per_stream_bytes``)."""
        t2w = self.tts.token2wav
        if not t2w.flow_cache:  # recompute path: no caches to budget
            self._streamer, self.per_stream_bytes = None, 0
            self.max_streams = self._max_streams_arg or self.rows
            return
        fs = self._streamer = t2w.flow.streamer()
        if self._max_streams_arg is None:
            configured = t2w.flow.stream_memory_budget  # the config's flow_cache_budget_mb (None: no cap)
            limit, prev = 0, 0
            for frames in fs.tiers(0, fs.cap_t):  # every tier a stream may reach, smallest first
                b = fs.cache_bytes(frames)
                if b + prev > self.stream_budget_bytes:
                    break
                limit, prev = b, b
            self.stream_cache_limit = limit if configured is None else min(limit, configured)
            fs.memory_budget_bytes = self.stream_cache_limit
        # the LM bounds one segment: prompt speech + generated tokens < the slot's cache positions
        self.per_stream_bytes = fs.peak_cache_bytes(0, min(self.cache_slots, fs.cap_t))
        if self._max_streams_arg:
            self.max_streams = self._max_streams_arg
        else:
            self.max_streams = max(1, self.stream_budget_bytes // max(self.per_stream_bytes, 1))
        if self.metrics:
            self.metrics.stream_budget.set(0 if self._max_streams_arg else self.stream_budget_bytes)

    def stream_reservation(self, n_prompt: int, n_tokens: int) -> int:
        """Bytes a stream of ``n_prompt`` prompt and at most ``n_tokens`` speech tokens may hold."""
        if self._streamer is None:
            return 0
        if n_prompt + n_tokens > self._streamer.cap_t:
            raise TooLong(f"streaming this text needs up to {2 * (n_prompt + n_tokens)} flow frames, a stream holds "
                          f"{self._streamer.max_frames}; send shorter text or use non-streaming synthesis")
        return self._streamer.peak_cache_bytes(n_prompt, n_tokens)

    def _stream_fits(self, nbytes: int) -> bool:
        if self._max_streams_arg:
            return self._streams < self._max_streams_arg
        # (a reservation never exceeds the budget: the cache limit caps it; the guard keeps one running)
        return self._stream_bytes + nbytes <= self.stream_budget_bytes or self._streams == 0

    def _take_stream(self, nbytes: int) -> None:
        self._streams += 1
        self._stream_bytes += nbytes

    def _give_stream(self, nbytes: int) -> None:
        self._streams -= 1
        self._stream_bytes -= nbytes
        self._cv.notify_all()

    # ------------------------------------------------------------------------------ public
    def queue_depth(self) -> int:
        return len(self._waiting)

    def active_rows(self) -> int:
        return sum(s is not None for s in self._slots)

    def active_streams(self) -> int:
        return self._streams

    def stream_bytes_reserved(self) -> int:
        return self._stream_bytes

    def streams_waiting(self) -> int:
        return sum(j.stream and not j.has_stream_permit for j in list(self._waiting))  # (a copy: any thread)

    def make_job(self, model_inputs: list, *, key, stream: bool, speed: float, timeout_s: float | None = None,
                 loop=None, label: str = "speech") -> Job:
        """A job from the pipeline's per-segment model inputs (``CosyVoice2._inputs``); segment ``i``
        uses ``fold_in(key, i)`` split into (LM, vocoder) keys, as ``CosyVoice2.tts``."""
        segs, reserve = [], 0
        for i, mi in enumerate(model_inputs):
            k_lm, k_voc = jax.random.split(jax.random.fold_in(key, i))
            seg = Segment(mi, k_lm, k_voc)
            if mi.source_speech is None:
                req = self._request(seg)
                need = self.lm.slot_fits(req)
                if need > self.cache_slots:
                    raise TooLong(f"text segment {i} needs {need} LM cache positions, a slot has {self.cache_slots}: "
                                  "send shorter text (or start the server with a larger --lm-cache)")
                n_tokens = int(len(req.text) * self.lm.cfg.max_token_text_ratio)  # the LM's max_len
            else:
                n_tokens = len(mi.source_speech)
            if stream:  # segments stream one after the other: the largest one's caches
                reserve = max(reserve, self.stream_reservation(len(mi.flow.token), n_tokens))
            segs.append(seg)
        if not segs:
            raise GenerationError("nothing to synthesise")
        job = Job(segs, stream=stream, speed=speed, deadline=time.perf_counter() + (timeout_s or self.timeout_s),
                  loop=loop, label=label)
        job.stream_bytes = reserve
        return job

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raises :class:`Busy` when ``max_queue`` jobs already wait."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: list) -> list:
        """Queue several jobs at once (they can join the same decode call), all or none."""
        with self._cv:
            if self.stopping.is_set():
                raise ShuttingDown("the server is shutting down; retry later (or on another replica)")
            if len(self._waiting) + len(jobs) > self.max_queue:
                retry = 1.0 + self._service_s * (len(self._waiting) + 1) / max(self.rows, 1)
                if self.metrics:
                    self.metrics.rejected.labels(reason="queue_full").inc()
                raise Busy(f"server busy: {len(self._waiting)} requests already wait for a slot "
                           f"(max_queue={self.max_queue}); retry later", retry_after=retry)
            self._waiting.extend(jobs)
            self._live.update(jobs)
            for job in jobs:
                if job.stream:
                    self.spawn(self._stream_worker, job, name=f"stream-{job.id}")
            self._cv.notify_all()
        return jobs

    def acquire_stream(self, nbytes: int, timeout: float) -> bool:
        """Reserve ``nbytes`` of the stream budget outside the LM batch (bistream sessions; see
        :meth:`stream_reservation`); False (and a ``stream_budget`` rejection) after ``timeout`` s."""
        end = time.perf_counter() + timeout
        with self._cv:
            # streams queued for the LM go first (in order)
            while self.streams_waiting() or not self._stream_fits(nbytes):
                if self.stopping.is_set():
                    raise ShuttingDown("the server is shutting down; retry later (or on another replica)")
                left = end - time.perf_counter()
                if left <= 0:
                    if self.metrics:
                        self.metrics.rejected.labels(reason="stream_budget").inc()
                    return False
                self._cv.wait(min(left, 0.1))
            if self.stopping.is_set():
                raise ShuttingDown("the server is shutting down; retry later (or on another replica)")
            self._take_stream(nbytes)
            return True

    def release_stream(self, nbytes: int) -> None:
        with self._cv:
            self._give_stream(nbytes)

    def stream_retry_after(self) -> float:
        """Seconds until a stream's budget is likely free (``Retry-After``)."""
        return 1.0 + self._service_s

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
        self._live.discard(job)
        if self.metrics:
            self.metrics.errors.labels(kind=type(err).__name__).inc()
        job.emit("error", err)

    def _finish(self, job: Job) -> None:
        if job.finished.is_set():
            return
        job.finished.set()
        self._live.discard(job)
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
                elif (job.stream and not job.has_stream_permit and dq is self._waiting
                      and now > job.t_submit + self.stream_wait_s):
                    dq.remove(job)
                    if self.metrics:
                        self.metrics.rejected.labels(reason="stream_budget").inc()
                    self._fail(job, Busy(f"streaming memory budget full: the stream waited {self.stream_wait_s:.0f} s "
                                         f"for {job.stream_bytes / 2**20:.0f} MiB of flow caches "
                                         f"({self._stream_bytes / 2**20:.0f} of {self.stream_budget_bytes / 2**20:.0f} "
                                         "MiB in use); retry later or use non-streaming synthesis",
                                         retry_after=self.stream_retry_after()))

    def _next_job(self) -> Optional[Job]:
        if self._front:
            return self._front.popleft()
        stream_blocked = False
        for job in self._waiting:
            if job.stream and not job.has_stream_permit:
                if stream_blocked or not self._stream_fits(job.stream_bytes):
                    stream_blocked = True  # streams wait in order for the budget; non-streaming jobs pass
                    continue
                self._take_stream(job.stream_bytes)
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
                t0 = time.perf_counter()
                key = seg.k_lm if self.lm.sampling == "ras" else None
                self._state = jax.block_until_ready(self.lm.slot_insert(self._state, r, self._request(seg), key))
                if self.metrics:
                    self.metrics.stage_seconds.labels(stage="lm_prefill").inc(time.perf_counter() - t0)
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
                    self.metrics.stream_bytes.set(self._stream_bytes)
                    self.metrics.streams_waiting.set(self.streams_waiting())
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
        times: dict = {}
        try:
            audio = self.tts.token2wav.full_batch([np.asarray(s.tokens, np.int32) for s in segs],
                                                  [s.mi.flow for s in segs], [s.k_voc for s in segs],
                                                  [j.speed for j, _ in items], times=times)
        except Exception as e:  # noqa: BLE001
            for j, _ in pending:
                self._fail(j, e)
            return
        if self.metrics:
            self.metrics.t2w_batch.observe(n)
            self.metrics.stage_seconds.labels(stage="token2wav").inc(time.perf_counter() - t0)
            for stage, sec in times.items():
                self.metrics.stage_seconds.labels(stage=stage).inc(sec)
        for (job, seg_i), a in zip(pending, audio[:n]):
            job.audio[seg_i] = a
            if len(job.audio) == len(job.segments):
                full = np.concatenate([job.audio[k] for k in range(len(job.segments))]).astype(np.float32)
                job.emit("audio", full)
                if self.metrics and job.t_first is not None:
                    self.metrics.first_chunk.labels(stream="false").observe(job.t_first - job.t_submit)
                self._finish(job)

    # ------------------------------------------------------------------------------ stream threads
    def _alive(self, job: Job) -> bool:
        """False once ``job`` was cancelled or failed; past its deadline it fails it with :class:`Timeout`
        first (the engine thread does that for requests in the LM; a stream outlives its LM rows)."""
        if job.cancelled.is_set() or job.finished.is_set():
            return False
        if job.expired():
            with self._cv:
                self._fail(job, Timeout(f"request timed out after {self.timeout_s:.0f} s"))
            return False
        return True

    def _stream_worker(self, job: Job) -> None:
        t2w = self.tts.token2wav
        waited = [0.0]  # seconds spent waiting for the LM's tokens (not token2wav compute)

        def source(seg: Segment):
            """The LM's new tokens; ends with the segment, raises :class:`_Stop` when the job ended
            (token2wav then computes nothing more, not even its final chunk)."""
            while True:
                t0 = time.perf_counter()
                try:
                    item = seg.token_q.get(timeout=0.5)
                except queue.Empty:
                    item = ()
                waited[0] += time.perf_counter() - t0
                if not self._alive(job):
                    raise _Stop
                if item is None:
                    return
                if item:
                    yield item

        try:
            while not job.admitted.wait(0.5):  # no flow cache before the budget allows it
                if not self._alive(job):
                    return
            for seg in job.segments:
                t0, waited[0] = time.perf_counter(), 0.0
                chunks = t2w.stream(source(seg), seg.mi.flow, seg.k_voc)
                try:
                    for chunk in chunks:
                        if not self._alive(job):
                            return
                        first = job.t_first is None
                        job.emit("audio", np.asarray(chunk, np.float32))
                        if first and self.metrics:
                            self.metrics.first_chunk.labels(stream="true").observe(job.t_first - job.t_submit)
                finally:
                    chunks.close()  # (a stop mid-stream: the flow caches go now)
                if self.metrics:  # the stream thread's own time (flow + HiFT chunks), waits for tokens excluded
                    self.metrics.stage_seconds.labels(stage="token2wav_stream").inc(
                        max(0.0, time.perf_counter() - t0 - waited[0]))
                if not self._alive(job):
                    return
            with self._cv:
                self._finish(job)
        except _Stop:
            pass
        except Exception as e:  # noqa: BLE001 - reported to the request
            if self._alive(job):
                with self._cv:
                    self._fail(job, e)
        finally:
            with self._cv:
                if job.has_stream_permit:
                    job.has_stream_permit = False
                    self._give_stream(job.stream_bytes)
                self._cv.notify_all()
