"""Prometheus metrics of the server (``GET /metrics``), one registry per app."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "cosyvoice2"
        self.first_chunk = Histogram(f"{p}_first_chunk_seconds", "Time from request to its first audio chunk "
                                     "(the whole file when not streaming)", ["stream"], buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.rtf = Histogram(f"{p}_real_time_factor", "Request wall time / seconds of audio produced", ["stream"],
                             buckets=RTF_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Requests waiting for an LM slot", registry=r)
        self.active_rows = Gauge(f"{p}_active_slots", "LM slots decoding a request", registry=r)
        self.active_streams = Gauge(f"{p}_active_streams", "Streams holding a streaming flow cache", registry=r)
        self.lm_batch = Histogram(f"{p}_lm_batch_size", "Active rows per batched LM decode call",
                                  buckets=BATCH_BUCKETS, registry=r)
        self.t2w_batch = Histogram(f"{p}_token2wav_batch_size", "Segments per batched flow + HiFT call",
                                   buckets=BATCH_BUCKETS, registry=r)
        self.stage_seconds = Counter(f"{p}_stage_seconds", "Engine time per stage", ["stage"], registry=r)
        self.requests = Counter(f"{p}_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter(f"{p}_errors", "Failed requests by error kind", ["kind"], registry=r)
        self.rejected = Counter(f"{p}_rejected", "Requests refused with 429: the queue was full (queue_full) or a "
                                "stream waited too long for the streaming memory budget (stream_budget)", ["reason"],
                                registry=r)
        self.stream_bytes = Gauge(f"{p}_stream_bytes_reserved", "Streaming flow-cache bytes reserved by running "
                                  "streams (each by its worst case)", registry=r)
        self.stream_budget = Gauge(f"{p}_stream_budget_bytes", "Streaming flow-cache budget (0: a stream count "
                                   "limit instead)", registry=r)
        self.streams_waiting = Gauge(f"{p}_streams_waiting", "Streaming requests waiting for the memory budget",
                                     registry=r)
        self.audio_seconds = Counter(f"{p}_audio_seconds", "Seconds of audio produced", registry=r)
