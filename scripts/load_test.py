#!/usr/bin/env python
"""Load test of the speech server on 127.0.0.1 (bounded in request count and time).

    # start a server itself (tiny release, warm-up first), run 1/4/8/16 clients, streaming and not
    python scripts/load_test.py --model-dir /tmp/CosyVoice2-tiny --out load.json
    # or against a running server (loopback only)
    python scripts/load_test.py --url http://127.0.0.1:8000 --pid <server pid> --out load.json

For every (mode, concurrency) level, ``--requests-per-client`` x concurrency requests (default 2 x,
at least 2, at most 64; or ``--requests`` for every level) go out from that many client threads, with
seeds 0.. (the levels serve the same requests: concurrency 1 serves the first ones one at a time).
Levels run in the order of ``--modes`` and ``--concurrency`` (put the acceptance levels first).
Reported per level: first-chunk latency p50/p95 (streaming: first audio bytes; non-streaming: the
whole file), aggregate audio-seconds per wall-second, throughput relative to concurrency 1 of the
same mode, errors, and the server's engine time per stage from /metrics (``lm_prefill``,
``lm_decode``, ``flow`` and ``hift`` of the batched non-streaming token2wav, ``token2wav_stream``:
the stream threads' flow + HiFT time). The server's RSS is sampled every 0.5 s (``rss``, summarised
in ``rss_summary``), and ``--soak N`` adds N more non-streaming requests at 4 clients with the RSS
after 20 and after N (acceptance at tiny size: within 10 %).

Bounded: ``--max-seconds`` counts from the start (server start-up included); after it no request
starts (the rest of a level is reported as ``skipped``, later levels and the soak are skipped), so
the run ends within about ``--max-seconds`` + one request's ``--timeout``.
Output: one JSON document (``--out``) with an ``acceptance`` summary, and a table on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

SR = 24000
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pid: int | None, t0: float, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.t0, self.every = pid, t0, every
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self):
        while self.pid and not self.stop.is_set():
            r = rss_mb(self.pid)
            if r is not None:
                self.samples.append((round(time.perf_counter() - self.t0, 2), round(r, 1)))
            self.stop.wait(self.every)


def stage_seconds(client: httpx.Client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("cosyvoice2_stage_seconds_total{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            out[stage] = float(line.rsplit(" ", 1)[1])
    return out


def one_request(url: str, body: dict, stream: bool, timeout: float, deadline: float = float("inf")) -> dict:
    if time.perf_counter() > deadline:
        return {"ok": False, "skipped": True}
    t0 = time.perf_counter()
    first = None
    n = 0
    try:
        with httpx.Client(timeout=timeout) as c:
            with c.stream("POST", url + "/v1/audio/speech", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return {"ok": False, "status": r.status_code, "error": r.text[:200]}
                for chunk in r.iter_bytes():
                    if chunk and first is None and stream:
                        first = time.perf_counter() - t0
                    n += len(chunk)
    except httpx.HTTPError as e:
        return {"ok": False, "status": None, "error": f"{type(e).__name__}: {e}"}
    total = time.perf_counter() - t0
    return {"ok": True, "first": first if stream else total, "total": total, "audio_s": n / 2 / SR}


def run_level(url: str, text: str, voice: str, conc: int, n: int, stream: bool, timeout: float,
              client: httpx.Client, deadline: float = float("inf")) -> dict:
    bodies = [{"input": text, "voice": voice, "response_format": "pcm", "seed": i, "stream": stream}
              for i in range(n)]
    st0 = stage_seconds(client)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        res = list(ex.map(lambda b: one_request(url, b, stream, timeout, deadline), bodies))
    wall = time.perf_counter() - t0
    st1 = stage_seconds(client)
    ok = [r for r in res if r["ok"]]
    skipped = sum(bool(r.get("skipped")) for r in res)
    firsts = np.array([r["first"] for r in ok]) if ok else np.zeros(0)
    audio = sum(r["audio_s"] for r in ok)
    return {"mode": "stream" if stream else "file", "concurrency": conc, "requests": n, "ok": len(ok),
            "errors": n - len(ok) - skipped, "skipped": skipped,
            "error_samples": [r for r in res if not r["ok"] and not r.get("skipped")][:3],
            "first_chunk_p50_s": round(float(np.percentile(firsts, 50)), 3) if ok else None,
            "first_chunk_p95_s": round(float(np.percentile(firsts, 95)), 3) if ok else None,
            "wall_s": round(wall, 2), "audio_s": round(audio, 2),
            "audio_s_per_wall_s": round(audio / wall, 3),
            "stage_seconds": {k: round(st1.get(k, 0) - st0.get(k, 0), 2) for k in st1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "cosyvoice2_jax.cli", "serve", "--model-dir", str(args.model_dir),
           "--port", str(port), "--slots", str(args.slots), "--warmup-text", args.text, "--log-level", "warning",
           "--max-queue", str(max(64, 2 * max(args.concurrency + (args.stream_concurrency or [])))),
           *args.server_arg]
    log = open(args.server_log, "wb") if args.server_log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + args.ready_timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} (see --server-log)")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    raise SystemExit(f"server not ready after {args.ready_timeout} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server on the loopback interface")
    src.add_argument("--model-dir", type=Path, help="start `cosyvoice2-jax serve` on this model for the test")
    ap.add_argument("--pid", type=int, help="server pid for RSS sampling (with --url)")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    ap.add_argument("--stream-concurrency", type=lambda s: [int(x) for x in s.split(",")],
                    help="client counts of the streaming levels (default: --concurrency)")
    ap.add_argument("--modes", default="file,stream", help="file (non-streaming), stream, or both")
    ap.add_argument("--requests-per-client", type=int, default=2,
                    help="requests per level = this x concurrency (at least 2, at most 64); default 2")
    ap.add_argument("--requests", type=int, help="requests per level instead (<= 64)")
    ap.add_argument("--soak", type=int, default=0, help="extra non-streaming requests for the RSS check (<= 500)")
    ap.add_argument("--text", default="Hi there.", help="the text of every request (its length sets the work: "
                    "random weights decode to the LM's limit, 20 speech tokens per text token)")
    ap.add_argument("--voice", help="voice name (default: the first the server lists)")
    ap.add_argument("--slots", type=int, default=8, help="server slots (with --model-dir)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    ap.add_argument("--server-log", type=Path)
    ap.add_argument("--ready-timeout", type=float, default=900)
    ap.add_argument("--timeout", type=float, default=600, help="per-request client timeout")
    ap.add_argument("--max-seconds", type=float, default=1800,
                    help="no request starts after this many seconds from the start (server start-up included)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.soak > 500 or (args.requests or 0) > 64 or args.requests_per_client < 1:
        ap.error("bounded load test: --requests <= 64, --requests-per-client >= 1, --soak <= 500")
    proc = None
    t_start = time.perf_counter()
    if args.url:
        host = urlparse(args.url).hostname
        if host not in LOOPBACK:
            ap.error(f"--url must be a loopback address (127.0.0.1), got {host}")
        url, pid = args.url.rstrip("/"), args.pid
    else:
        proc, url = start_server(args)
        pid = proc.pid
    ready_s = time.perf_counter() - t_start
    client = httpx.Client(base_url=url, timeout=60)
    voice = args.voice or client.get("/v1/audio/voices").json()["data"][0]["name"]
    health = client.get("/healthz").json()
    sampler = RssSampler(pid, time.perf_counter())
    sampler.start()
    deadline = t_start + args.max_seconds
    levels = []
    try:
        for mode in args.modes.split(","):
            for c in (args.stream_concurrency or args.concurrency) if mode == "stream" else args.concurrency:
                if time.perf_counter() > deadline:
                    print(f"time budget reached, skipping {mode} c={c}", file=sys.stderr)
                    continue
                n = args.requests or min(64, max(2, args.requests_per_client * c))
                lv = run_level(url, args.text, voice, c, n, mode == "stream", args.timeout, client, deadline)
                lv["rss_mb_after"] = rss_mb(pid) if pid else None
                levels.append(lv)
                print(json.dumps({k: v for k, v in lv.items() if k != "error_samples"}), file=sys.stderr)
        base = {lv["mode"]: lv["audio_s_per_wall_s"] for lv in levels if lv["concurrency"] == 1}
        for lv in levels:
            if base.get(lv["mode"]):
                lv["throughput_vs_1"] = round(lv["audio_s_per_wall_s"] / base[lv["mode"]], 2)
        soak = None
        if args.soak and time.perf_counter() > deadline:
            print("time budget reached, skipping the soak", file=sys.stderr)
        elif args.soak:
            rss, errors, skipped, done = {}, 0, 0, 0
            with ThreadPoolExecutor(4) as ex:
                for batch in range(0, args.soak, 20):
                    k = min(20, args.soak - batch)
                    bodies = [{"input": args.text, "voice": voice, "response_format": "pcm", "seed": batch + i}
                              for i in range(k)]
                    res = list(ex.map(lambda b: one_request(url, b, False, args.timeout, deadline), bodies))
                    skipped += sum(bool(r.get("skipped")) for r in res)
                    errors += sum(not r["ok"] and not r.get("skipped") for r in res)
                    done += k
                    rss[done] = rss_mb(pid) if pid else None
            soak = {"requests": args.soak, "errors": errors, "skipped": skipped, "rss_mb_after": rss}
            if pid and rss.get(20) and rss.get(args.soak):
                soak["rss_growth_20_to_n"] = round(rss[args.soak] / rss[20] - 1, 4)
    finally:
        sampler.stop.set()
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    rss_vals = [r for _, r in sampler.samples]
    rss_summary = ({"first_mb": rss_vals[0], "max_mb": max(rss_vals), "last_mb": rss_vals[-1]} if rss_vals else None)
    result = {"url": url, "voice": voice, "text": args.text, "server": health, "ready_s": round(ready_s, 1),
              "total_s": round(time.perf_counter() - t_start, 1), "levels": levels, "soak": soak,
              "acceptance": acceptance(levels, soak), "rss_summary": rss_summary, "rss": sampler.samples,
              "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(table(levels), file=sys.stderr)
    print(json.dumps({"ready_s": result["ready_s"], "total_s": result["total_s"], "rss": rss_summary,
                      "acceptance": result["acceptance"]}), file=sys.stderr)
    return 0


def acceptance(levels: list, soak: dict | None) -> dict:
    """Issue 15's targets: 8 non-streaming clients >= 1.3x the throughput of one at a time, no
    errors; RSS after the soak within 10 % of RSS after 20 requests (at tiny size)."""
    out: dict = {"errors": sum(lv["errors"] for lv in levels) + (soak or {}).get("errors", 0)}
    f8 = next((lv for lv in levels if lv["mode"] == "file" and lv["concurrency"] == 8), None)
    if f8 is not None and "throughput_vs_1" in f8:
        out["file_8_vs_1"] = f8["throughput_vs_1"]
        out["file_8_vs_1_ok"] = f8["throughput_vs_1"] >= 1.3 and f8["errors"] == 0 and f8["skipped"] == 0
    if soak and "rss_growth_20_to_n" in soak:
        out["rss_growth_20_to_n"] = soak["rss_growth_20_to_n"]
        out["rss_ok"] = abs(soak["rss_growth_20_to_n"]) <= 0.10
    return out


def ratio(lv: dict) -> str:
    return f"{lv['throughput_vs_1']:.2f}x" if "throughput_vs_1" in lv else "-"


STAGES = ("lm_prefill", "lm_decode", "flow", "hift", "token2wav_stream")


def table(levels: list) -> str:
    """Markdown table of the levels (the README's load-test table), engine seconds per stage."""
    head = ("| mode | clients | requests | errors | skipped | first chunk p50 / p95 (s) | audio s / wall s | vs 1 client "
            "| wall s | engine s: " + " / ".join(STAGES) + " |")
    rows = [head, "|" + "---|" * 10]
    for lv in levels:
        st = lv["stage_seconds"]
        rows.append(f"| {lv['mode']} | {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {lv['skipped']} | "
                    f"{lv['first_chunk_p50_s'] or 0:.2f} / {lv['first_chunk_p95_s'] or 0:.2f} | "
                    f"{lv['audio_s_per_wall_s']:.3f} | {ratio(lv)} | {lv['wall_s']:.1f} | "
                    + " / ".join(f"{st.get(k, 0):.1f}" for k in STAGES) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
