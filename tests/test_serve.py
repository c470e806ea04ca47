"""The speech server (``cosyvoice2-jax serve``), started for real on a free loopback port.

The tiny random-weight release is written once per module by ``scripts/make_random_release.py``
(official modules, through the oracle); the server runs as a subprocess of the CLI, with the
converted-model and compiled-program caches in the module's temporary directory, so the restart
test (voices survive it) reuses the compiled programs. No mocks: every check decodes the audio it
got back over HTTP / WebSocket.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
websockets_sync = pytest.importorskip("websockets.sync.client")

from conftest import REPO  # noqa: E402
from test_random_release import _speechlike, mrr  # noqa: E402

SR = 24000
SLOTS = 2
# Random weights decode to the LM's length limit (20 x the text tokens): one text, one set of shapes
# (the warm-up compiles them), so the slow tests measure serving rather than XLA compilation.
TEXT = "Hi there."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """``cosyvoice2-jax serve`` in a subprocess; ``url``, ``stop()``, the log in ``log``."""

    def __init__(self, model_dir, tmp, *extra, ready_timeout: float = 600.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   COSYVOICE2_JAX_CACHE=str(tmp / "cache"), XLA_FLAGS="")
        cmd = [sys.executable, "-m", "cosyvoice2_jax.cli", "serve", "--model-dir", str(model_dir),
               "--port", str(self.port), "--voices-dir", str(tmp / "voices"), "--slots", str(SLOTS),
               "--lm-cache", "512", "--stream-hop-growth", "1", "--max-queue", "4", "--log-level", "warning",
               "--bistream-max-tokens", "60",
               *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        end = time.time() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                r = httpx.get(self.url + "/healthz", timeout=5)
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and r.json()["status"] == "warming", r.text
            except httpx.TransportError:
                pass
            if time.time() > end:
                self.stop()
                raise RuntimeError(f"server not ready after {ready_timeout} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def env(oracle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    rel = tmp / "CosyVoice2-tiny"
    mrr.make_release(rel, "tiny", seed=0, oracle=oracle)
    prompt = tmp / "prompt.wav"
    sf.write(prompt, _speechlike(2.0, seed=3), 16000)
    return {"tmp": tmp, "release": rel, "prompt": prompt}


@pytest.fixture(scope="module")
def quick_server(env):
    """A server without warm-up (ready at once): for the checks that compile nothing. Its streaming
    budget holds one bistream session (60 tokens, no prompt: the 200-frame tier, 14.4 MB) but not two.
    ``test_sigterm_with_a_session_open_exits_0`` (the last test that uses it) stops it."""
    s = ServerProc(env["release"], env["tmp"], "--no-warmup", "--stream-memory-mb", "20", "--stream-wait", "3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def quick(quick_server):
    with httpx.Client(base_url=quick_server.url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def server(env):
    # streaming flow-cache budget of one stream of TEXT (120 tokens: the 200-frame tier grown to 400;
    # while it grows, the 26.7 MB of the 400 tier plus one array of the 200 tier) but not two: the second waits
    s = ServerProc(env["release"], env["tmp"], "--warmup-text", TEXT, "--stream-memory-mb", "40",
                   "--stream-wait", "600")  # (a loaded CI box: the second stream may wait long)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def _metric(client, name: str, labels: str = "") -> float:
    text = client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
            if labels or line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _speech(client, **kw):
    body = {"model": "cosyvoice2", "input": TEXT, "voice": "英文男", "response_format": "wav", "seed": 1}
    body.update(kw)
    return client.post("/v1/audio/speech", json=body)


def _assert_error(r, status: int, *words):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    for w in words:
        assert w in err["message"], err["message"]


# --------------------------------------------------------------------------------------- basics
def test_health_voices_metrics(quick):
    h = quick.get("/healthz").json()
    assert h["status"] == "ready" and h["sample_rate"] == SR and h["slots"] == SLOTS
    assert set(h["formats"]) >= {"wav", "pcm", "flac"}
    names = [v["name"] for v in quick.get("/v1/audio/voices").json()["data"]]
    assert sorted(names) == sorted(mrr.SPEAKERS)
    text = quick.get("/metrics").text
    for name in ("cosyvoice2_first_chunk_seconds", "cosyvoice2_real_time_factor", "cosyvoice2_queue_depth",
                 "cosyvoice2_lm_batch_size", "cosyvoice2_token2wav_batch_size", "cosyvoice2_errors_total",
                 "cosyvoice2_stream_bytes_reserved", "cosyvoice2_streams_waiting"):
        assert name in text, name
    # streaming budget: 20 MiB; the per-stream cache limit is the 200-frame tier (growing to 400
    # would hold both tiers, > 20 MiB); the longest request a slot admits (512 LM positions) is
    # capped by it, so one such stream fits at a time
    assert h["stream_budget_bytes"] == 20 * 2**20 == _metric(quick, "cosyvoice2_stream_budget_bytes")
    assert 20 * 2**20 // 2 < h["stream_cache_limit_bytes"] == h["per_stream_bytes"] <= 20 * 2**20
    assert h["max_streams"] == 1 and h["stream_bytes_reserved"] == 0 and h["active_streams"] == 0


@pytest.mark.slow
def test_formats_decode(client, server):
    """Every format decodes to 24 kHz audio of the same length (same seed, same request)."""
    ref = _speech(client, response_format="wav")
    assert ref.status_code == 200, ref.text
    wav, sr = sf.read(io.BytesIO(ref.content), dtype="float32")
    assert sr == SR and wav.ndim == 1 and wav.shape[0] > SR // 10 and np.abs(wav).max() > 0
    pcm = _speech(client, response_format="pcm")
    assert pcm.status_code == 200 and pcm.headers["content-type"].startswith("audio/pcm")
    wav_i, _ = sf.read(io.BytesIO(ref.content), dtype="int16")
    np.testing.assert_array_equal(np.frombuffer(pcm.content, "<i2"), wav_i)
    formats = client.get("/healthz").json()["formats"]
    for fmt in ("flac", "mp3", "opus"):
        if fmt not in formats:
            continue
        r = _speech(client, response_format=fmt)
        assert r.status_code == 200, (fmt, r.text)
        a, sr = sf.read(io.BytesIO(r.content), dtype="float32")
        assert sr == SR, fmt
        if fmt == "flac":  # lossless 16 bit (libsndfile rounds float -> int for FLAC, truncates for WAV)
            assert np.abs(a - wav).max() <= 1.0 / 32768
        else:  # lossy codecs pad / delay a little
            assert abs(a.shape[0] - wav.shape[0]) < 0.1 * SR, (fmt, a.shape, wav.shape)
    # speed 2: half as many mel frames, so about half the samples
    fast = _speech(client, response_format="wav", speed=2.0)
    a, _ = sf.read(io.BytesIO(fast.content), dtype="float32")
    assert abs(a.shape[0] - wav.shape[0] / 2) <= 480 * 2


@pytest.mark.slow
def test_streaming_audio_and_sse(client):
    ref = _speech(client, response_format="pcm")
    ref_a = np.frombuffer(ref.content, "<i2")
    # chunked pcm as the model streams
    with client.stream("POST", "/v1/audio/speech", json={"input": TEXT, "voice": "英文男", "seed": 1,
                                                         "response_format": "pcm", "stream": True}) as r:
        assert r.status_code == 200
        chunks = [c for c in r.iter_bytes() if c]
    streamed = np.frombuffer(b"".join(chunks), "<i2")
    assert streamed.shape[0] > SR // 10
    assert abs(streamed.shape[0] - ref_a.shape[0]) < 0.25 * ref_a.shape[0]  # same tokens, chunked vocoding
    # SSE: deltas then one done event, in this order, with base64 pcm
    with client.stream("POST", "/v1/audio/speech", json={"input": TEXT, "voice": "英文男", "seed": 1,
                                                         "response_format": "pcm", "stream_format": "sse"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    types = [e["type"] for e in events]
    assert types[-1] == "speech.audio.done" and set(types[:-1]) == {"speech.audio.delta"} and len(types) >= 3
    sse = np.frombuffer(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "<i2")
    assert events[-1]["samples"] == sse.shape[0]
    np.testing.assert_array_equal(sse, streamed)  # same seed, same stream


@pytest.mark.slow
def test_concurrent_equals_single(client):
    """Requests decoded together in the slot batch give the audio they give alone (per-row keys)."""
    reqs = [dict(input=TEXT, seed=s) for s in (7, 8, 9, 10)]
    single = [_speech(client, response_format="pcm", **r).content for r in reqs]
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(lambda r: _speech(client, response_format="pcm", **r), reqs))
    assert _metric(client, "cosyvoice2_lm_batch_size_bucket", 'le="1.0"') < _metric(
        client, "cosyvoice2_lm_batch_size_count")  # some decode calls really ran several rows
    for s, t in zip(single, together):
        assert t.status_code == 200, t.text
        a, b = (np.frombuffer(x, "<i2").astype(np.int32) for x in (s, t.content))
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1  # float rounding of the batched flow/HiFT at most one pcm step
    assert single[0] != single[2]  # different seeds, different audio


def test_bad_input_is_4xx_json(quick):
    """Each bad request gets one 4xx JSON error naming the problem; the server keeps serving."""
    cases = [
        (dict(voice="nobody"), 400, "unknown voice"),
        (dict(input="   "), 400, "empty"),
        (dict(input="a" * 5000), 413, "characters"),
        (dict(response_format="ogg-vorbis"), 400, "response_format"),
        (dict(speed=9.0), 400, "speed"),
        (dict(stream_format="sse", response_format="wav"), 400, "pcm"),
        (dict(stream=True, speed=1.5, response_format="pcm"), 400, "speed"),
        (dict(instructions="Speak slowly."), 400, "registered voice"),
        (dict(input=123), 400, "input"),
        # the LM cache of a slot (512 positions here) bounds one text segment: refused up front
        (dict(input="word " * 60, response_format="pcm"), 413, "cache"),
    ]
    for kw, status, word in cases:
        _assert_error(_speech(quick, **kw), status, word)
    nan = b'{"input": "Hi.", "voice": "\\u82f1\\u6587\\u7537", "speed": NaN}'  # Python's json accepts NaN
    _assert_error(quick.post("/v1/audio/speech", content=nan, headers={"content-type": "application/json"}),
                  400, "speed")
    r = quick.post("/v1/audio/speech", content=b"not json", headers={"content-type": "application/json"})
    _assert_error(r, 400, "JSON")
    _assert_error(quick.post("/v1/audio/speech", json=["a list"]), 400, "object")
    _assert_error(quick.post("/v1/audio/speech", json={"voice": "英文男"}), 400, "input")
    _assert_error(quick.delete("/v1/audio/voices/英文男"), 400, "built-in")
    _assert_error(quick.delete("/v1/audio/voices/nobody"), 404, "unknown voice")
    _assert_error(quick.post("/v1/audio/voices", data={"name": "../x"},
                             files={"file": ("p.wav", b"RIFF", "audio/wav")}), 400, "name")
    _assert_error(quick.post("/v1/audio/voices", data={"name": "bad"},
                             files={"file": ("p.wav", b"garbage", "audio/wav")}), 400)
    _assert_error(quick.post("/v1/audio/voices", data={"name": "中文女"},
                             files={"file": ("p.wav", b"garbage", "audio/wav")}), 409, "built-in")
    ws_url = str(quick.base_url).rstrip("/").replace("http", "ws") + "/v1/audio/speech/stream"
    for first, word in (("not json", "JSON"), (json.dumps(["a list"]), "voice"), (json.dumps({"voice": "nobody"}),
                                                                                  "unknown voice")):
        with websockets_sync.connect(ws_url, open_timeout=30) as ws:  # bistream: a JSON error, then closed
            ws.send(first)
            err = json.loads(ws.recv(timeout=60))
        assert err["type"] == "error" and err["status"] == 400 and word in err["message"], err
    assert quick.get("/healthz").status_code == 200  # still serving
    assert _metric(quick, "cosyvoice2_requests_total", 'endpoint="/v1/audio/speech",status="400"') >= 8


def test_stream_budget_full_429_and_cancel_while_waiting(quick):
    """A bistream session reserves its worst case of the streaming budget while it runs; a stream
    that does not fit next to it waits --stream-wait (3 s) and gets 429 with Retry-After (HTTP) or an
    error message with retry_after (WebSocket); a client that hangs up while its stream waits is
    cancelled; the reservation is given back when the session ends. Nothing here computes audio
    (the session never gets text), so nothing compiles."""
    url = str(quick.base_url).rstrip("/").replace("http", "ws") + "/v1/audio/speech/stream"
    cancelled0 = _metric(quick, "cosyvoice2_errors_total", 'kind="Cancelled"')

    def ws_refused():
        with websockets_sync.connect(url, open_timeout=30) as ws2:
            ws2.send(json.dumps({"voice": "英文男"}))
            return json.loads(ws2.recv(timeout=60))

    def hang_up():
        with pytest.raises(httpx.ReadTimeout):
            quick.post("/v1/audio/speech", json={"input": TEXT, "voice": "英文男", "response_format": "pcm",
                                                 "stream": True}, timeout=0.5)

    with websockets_sync.connect(url, open_timeout=30, close_timeout=30) as ws:
        ws.send(json.dumps({"voice": "英文男", "seed": 3}))
        end = time.time() + 60
        while time.time() < end and (h := quick.get("/healthz").json())["active_streams"] == 0:
            time.sleep(0.1)
        assert h["active_streams"] == 1 and 0 < h["stream_bytes_reserved"] <= h["stream_budget_bytes"], h
        assert 2 * h["stream_bytes_reserved"] > h["stream_budget_bytes"]
        with cf.ThreadPoolExecutor(3) as ex:
            http = ex.submit(_speech, quick, response_format="pcm", stream=True)
            sock = ex.submit(ws_refused)
            gone = ex.submit(hang_up)
            r, err = http.result(), sock.result()
            gone.result()
        _assert_error(r, 429, "streaming memory budget")
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "busy"
        assert err["type"] == "error" and err["status"] == 429 and err["retry_after"] >= 1, err
        h = quick.get("/healthz").json()
        assert h["active_streams"] == 1 and h["streams_waiting"] == 0 and h["queue_depth"] == 0, h
    end = time.time() + 60  # the client hung up: the session ends, its reservation is released
    while time.time() < end and (h := quick.get("/healthz").json())["active_streams"]:
        time.sleep(0.1)
    assert h["active_streams"] == 0 and h["stream_bytes_reserved"] == 0, h
    assert _metric(quick, "cosyvoice2_rejected_total", 'reason="stream_budget"') >= 2
    assert _metric(quick, "cosyvoice2_errors_total", 'kind="Cancelled"') >= cancelled0 + 1
    assert quick.get("/healthz").status_code == 200


@pytest.mark.slow
def test_voices_register_use_delete(client, env):
    with open(env["prompt"], "rb") as f:
        r = client.post("/v1/audio/voices", data={"name": "alice", "transcript": "A prompt transcript."},
                        files={"file": ("p.wav", f, "audio/wav")})
    assert r.status_code == 201, r.text
    assert r.json()["modes"][0] == "zero_shot"
    assert (env["tmp"] / "voices" / "alice.npz").is_file()
    assert not list((env["tmp"] / "voices").glob("*.partial"))
    with open(env["prompt"], "rb") as f:
        dup = client.post("/v1/audio/voices", data={"name": "alice"}, files={"file": ("p.wav", f, "audio/wav")})
    _assert_error(dup, 409, "exists")
    a = _speech(client, voice="alice", response_format="pcm")
    b = _speech(client, voice="alice", response_format="pcm", instructions="Speak slowly.")
    assert a.status_code == 200 and b.status_code == 200 and a.content != b.content


@pytest.mark.slow
def test_bistream_websocket(server, client):
    url = server.url.replace("http", "ws") + "/v1/audio/speech/stream"
    with websockets_sync.connect(url, open_timeout=30, close_timeout=30) as ws:
        ws.send(json.dumps({"voice": "英文男", "seed": 3}))
        for piece in ("Hello ", "there, ", "my ", "friend."):
            ws.send(json.dumps({"text": piece}))
        ws.send(json.dumps({"end": True}))
        audio, done = [], None
        while done is None:
            msg = ws.recv(timeout=300)
            if isinstance(msg, bytes):
                audio.append(msg)
            else:
                done = json.loads(msg)
    assert done["type"] == "done", done
    pcm = np.frombuffer(b"".join(audio), "<i2")
    assert len(audio) >= 2 and pcm.shape[0] == done["samples"] > 0 and done["sample_rate"] == SR
    with websockets_sync.connect(url, open_timeout=30) as ws:  # a bad first message: JSON error, closed
        ws.send(json.dumps({"voice": "nobody"}))
        err = json.loads(ws.recv(timeout=60))
    assert err["type"] == "error" and "unknown voice" in err["message"]


@pytest.mark.slow
def test_cancellation_frees_the_slot(client, server):
    with client.stream("POST", "/v1/audio/speech", json={"input": TEXT, "voice": "英文男",
                                                         "response_format": "pcm", "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_bytes())  # the first chunk, then hang up
    end = time.time() + 60
    while time.time() < end:
        h = client.get("/healthz").json()
        if h["active_slots"] == 0 and h["active_streams"] == 0:
            break
        time.sleep(0.2)
    assert h["active_slots"] == 0 and h["active_streams"] == 0, h
    assert _metric(client, "cosyvoice2_errors_total", 'kind="Cancelled"') >= 1
    assert _speech(client, response_format="pcm").status_code == 200


@pytest.mark.slow
def test_stream_memory_budget(client):
    """Past the streaming flow-cache budget a stream waits for the running one to end (and a
    non-streaming request is not held up by it); both finish with their full audio."""
    h = client.get("/healthz").json()
    # one stream of TEXT reserves the 400-frame tier and one array of the 200 tier (growth), more than
    # half the budget
    assert h["stream_budget_bytes"] == 40 * 2**20 and h["max_streams"] == 1
    assert h["per_stream_bytes"] <= 40 * 2**20 < 2 * h["per_stream_bytes"]

    def stream(seed):
        t = {}
        with client.stream("POST", "/v1/audio/speech", json={"input": TEXT, "voice": "英文男", "seed": seed,
                                                             "response_format": "pcm", "stream": True}) as r:
            n = 0
            for chunk in r.iter_bytes():
                if chunk and "first" not in t:
                    t["first"] = time.perf_counter()
                n += len(chunk)
        t["end"], t["n"], t["status"] = time.perf_counter(), n, r.status_code
        return t

    with cf.ThreadPoolExecutor(2) as ex:
        a, b = ex.map(stream, (21, 22))
    assert a["status"] == b["status"] == 200 and a["n"] == b["n"] > 0
    first, second = sorted((a, b), key=lambda t: t["first"])
    assert second["first"] >= first["end"] - 0.05, (first, second)  # never two flow caches at once


@pytest.mark.slow
def test_back_pressure_429(client):
    """More requests than slots + queue: the extra ones get 429 with Retry-After, the rest finish."""
    n = SLOTS + 4 + 6
    with cf.ThreadPoolExecutor(n) as ex:
        rs = list(ex.map(lambda i: _speech(client, input=TEXT, seed=i, response_format="pcm"),
                         range(n)))
    codes = [r.status_code for r in rs]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    busy = next(r for r in rs if r.status_code == 429)
    assert int(busy.headers["retry-after"]) >= 1 and busy.json()["error"]["code"] == "busy"
    assert _speech(client, response_format="pcm").status_code == 200


@pytest.mark.slow
def test_official_request_shapes(client, env):
    r = client.post("/inference_sft", data={"tts_text": "Hi there.", "spk_id": "英文男"})
    assert r.status_code == 200 and len(r.content) > 2 * SR // 10
    with open(env["prompt"], "rb") as f:
        r = client.post("/inference_zero_shot", data={"tts_text": "Hi there.", "prompt_text": "A prompt."},
                        files={"prompt_wav": ("p.wav", f, "audio/wav")})
    assert r.status_code == 200 and len(r.content) > 2 * SR // 10
    for path, data in (("/inference_cross_lingual", {}), ("/inference_instruct2", {"instruct_text": "Speak slowly."})):
        with open(env["prompt"], "rb") as f:
            r = client.post(path, data={"tts_text": "Hi there.", **data}, files={"prompt_wav": ("p.wav", f, "audio/wav")})
        assert r.status_code == 200 and len(r.content) % 2 == 0 and len(r.content) > 2 * SR // 10, (path, r.text)
    _assert_error(client.post("/inference_sft", data={"tts_text": " ", "spk_id": "英文男"}), 400, "tts_text")


@pytest.mark.slow
def test_voice_survives_restart(env, server, client):
    """Registered voices persist in the voices directory: a new server process serves them."""
    if "keep" not in [v["name"] for v in client.get("/v1/audio/voices").json()["data"]]:
        with open(env["prompt"], "rb") as f:
            assert client.post("/v1/audio/voices", data={"name": "keep"},
                               files={"file": ("p.wav", f, "audio/wav")}).status_code == 201
    before = _speech(client, voice="keep", response_format="pcm").content
    server.stop()
    s2 = ServerProc(env["release"], env["tmp"], "--no-warmup")
    try:
        with httpx.Client(base_url=s2.url, timeout=300) as c2:
            voices = {v["name"]: v for v in c2.get("/v1/audio/voices").json()["data"]}
            assert voices["keep"]["type"] == "registered" and voices["keep"]["modes"][0] == "cross_lingual"
            after = _speech(c2, voice="keep", response_format="pcm").content
            assert after == before
            assert c2.delete("/v1/audio/voices/keep").status_code == 200
            assert "keep" not in [v["name"] for v in c2.get("/v1/audio/voices").json()["data"]]
        assert not (env["tmp"] / "voices" / "keep.npz").exists()
    finally:
        s2.stop()


def test_voice_store_follows_a_shared_directory(tmp_path):
    """Two stores on one directory (two server processes, e.g. Ray Serve replicas): a voice file
    written or deleted by one is seen by the other at its next lookup; built-in names stay built-in."""
    import types

    from cosyvoice2_jax.serve.voices import VoiceNotFound, VoiceStore

    a, b = (VoiceStore(types.SimpleNamespace(spk2info={"builtin1": {}}), tmp_path) for _ in range(2))
    assert b.names() == ["builtin1"]
    feats = {"prompt_text": np.zeros((0,), np.int32), "embedding": np.ones((4,), np.float32)}
    np.savez(tmp_path / "bob.npz", transcript=np.asarray("hi"), created=np.asarray(1.0), **feats)
    assert b.kind("bob") == "registered" and "bob" in b.tts.spk2info  # one stat, no restart
    assert a.names() == ["builtin1", "bob"] and a.meta["bob"]["transcript"] == "hi"
    np.savez(tmp_path / "bob.npz", transcript=np.asarray("hello"), created=np.asarray(2.0), **feats)
    os.utime(tmp_path / "bob.npz", ns=(1, 10**18))  # a new version (mtime) of the same voice
    assert b.describe()[1]["transcript"] == "hello"
    a.delete("bob")
    with pytest.raises(VoiceNotFound, match="unknown voice 'bob'"):
        b.kind("bob")
    assert "bob" not in b.tts.spk2info and b.names() == ["builtin1"]


# --------------------------------------------------------------------------------------- shutdown
def _assert_clean_exit(s: ServerProc, t_signal: float, bound: float) -> str:
    """``s`` was sent SIGTERM at ``t_signal``: it exits 0 within ``bound`` s, with no abort on the way
    (a thread ended inside XLA at interpreter exit prints ``terminate called ... FATAL: exception not
    rethrown``) and no traceback."""
    try:
        rc = s.proc.wait(bound + 30)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.proc.wait()
        raise AssertionError(f"no exit {bound + 30} s after SIGTERM:\n{s.log.read_text()[-3000:]}")
    took = time.time() - t_signal
    log = s.log.read_text(errors="replace")
    assert rc == 0, f"exit status {rc}:\n{log[-3000:]}"
    assert took < bound, (took, log[-3000:])
    for word in ("terminate called", "FATAL", "Traceback"):
        assert word not in log, log[-3000:]
    return log


@pytest.mark.slow
def test_timed_out_streams_stop_and_sigterm_exits_0(env):
    """Streams that reach the server's own request timeout (--timeout 2) while their work is in flight
    (a longer text than the warm-up's: new shapes compile in the LM and the stream threads) are cut:
    504 / a truncated stream, their LM rows, stream threads and budget reservations freed. Then the
    same with SIGTERM right behind: the server cancels what is left, joins its threads and exits 0
    (before the fix: the stream threads kept computing, up to the final flow chunk, and a thread still
    inside XLA at interpreter exit aborted the process, ``terminate called ...``; a SIGTERM exited -15)."""
    s = ServerProc(env["release"], env["tmp"], "--warmup-text", TEXT, "--timeout", "2")
    text = "Hello there, my good friend. How are you today?"

    def stream(c, seed):
        try:
            with c.stream("POST", "/v1/audio/speech", json={"input": text, "voice": "英文男", "seed": seed,
                                                             "response_format": "pcm", "stream": True}) as r:
                return r.status_code, sum(len(b) for b in r.iter_bytes())
        except httpx.TransportError as e:  # (round 2: the server went away)
            return type(e).__name__, 0

    try:
        with httpx.Client(base_url=s.url, timeout=120) as c, cf.ThreadPoolExecutor(3) as ex:
            res = list(ex.map(lambda k: stream(c, k), (1, 2, 3)))
            assert {code for code, _ in res} <= {200, 504}, res
            assert _metric(c, "cosyvoice2_errors_total", 'kind="Timeout"') >= 1, res
            end = time.time() + 120
            while time.time() < end:
                h = c.get("/healthz").json()
                if not (h["active_slots"] or h["active_streams"] or h["stream_bytes_reserved"] or h["queue_depth"]):
                    break
                time.sleep(0.2)
            assert (h["active_slots"], h["active_streams"], h["stream_bytes_reserved"], h["queue_depth"]) == (
                0, 0, 0, 0), h
            # round 2: other seeds (other token counts: more shapes), SIGTERM while they run
            futs = [ex.submit(stream, c, k) for k in (4, 5, 6)]
            end = time.time() + 60
            while time.time() < end and not (h := c.get("/healthz").json())["active_streams"]:
                time.sleep(0.05)
            assert h["active_streams"], h
            t0 = time.time()
            s.proc.send_signal(signal.SIGTERM)
            _assert_clean_exit(s, t0, bound=40)  # exit 0 in time, no abort / traceback in the log
            for f in futs:  # every round-2 stream ended: 200 (cut short), 504, or the connection closed
                code, _ = f.result()
                assert code in (200, 504) or "Error" in str(code), code
    finally:
        s.stop()


def test_sigterm_with_a_session_open_exits_0(quick_server, quick):
    """SIGTERM while a bistream session holds the streaming budget (its thread waits for text): the
    session is closed, its thread stops, the server exits 0 within seconds (uvicorn re-raises the
    signal after its shutdown: the process used to end with -15). Stops the module's quick server:
    keep this the last test that uses it."""
    url = quick_server.url.replace("http", "ws") + "/v1/audio/speech/stream"
    with websockets_sync.connect(url, open_timeout=30, close_timeout=5) as ws:
        ws.send(json.dumps({"voice": "英文男", "seed": 3}))
        end = time.time() + 60
        while time.time() < end and (h := quick.get("/healthz").json())["active_streams"] == 0:
            time.sleep(0.1)
        assert h["active_streams"] == 1 and h["stream_bytes_reserved"] > 0, h
        t0 = time.time()
        quick_server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(Exception) as closed:  # the server closes the socket (1012 service restart)
            while True:
                ws.recv(timeout=30)
        assert type(closed.value).__name__.startswith("ConnectionClosed"), repr(closed.value)
        _assert_clean_exit(quick_server, t0, bound=15)
