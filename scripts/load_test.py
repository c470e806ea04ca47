#!/usr/bin/env python
"""Load test of the speech server on 127.0.0.1 (bounded in request count and time).

    # start a server itself (tiny release, warm-up first), run 1/4/8/16 clients, streaming and not
    python scripts/load_test.py --model-dir /tmp/CosyVoice2-tiny --out load.json
    # or against a running server (loopback only)
    python scripts/load_test.py --url http://127.0.0.1:8000 --pid <server pid> --out load.json

For every (mode, concurrency) level, ``--requests`` requests (default 2 x concurrency, at most 64)
go out from that many client threads, with seeds 0.. so the levels do the same work. Reported per
level: first-chunk latency p50/p95 (streaming: first audio bytes; non-streaming: the whole file),
aggregate audio-seconds per wall-second, throughput relative to concurrency 1, errors, and the
server's engine time per stage (from /metrics). The server's RSS is sampled every 0.5 s
(``rss``), and ``--soak N`` adds N more non-streaming requests with RSS after 20 and after N.
Output: one JSON document (``--out``, and a table on stderr).
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


def one_request(url: str, body: dict, stream: bool, timeout: float) -> dict:
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
              client: httpx.Client) -> dict:
    bodies = [{"input": text, "voice": voice, "response_format": "pcm", "seed": i, "stream": stream}
              for i in range(n)]
    st0 = stage_seconds(client)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        res = list(ex.map(lambda b: one_request(url, b, stream, timeout), bodies))
    wall = time.perf_counter() - t0
    st1 = stage_seconds(client)
    ok = [r for r in res if r["ok"]]
    firsts = np.array([r["first"] for r in ok]) if ok else np.zeros(0)
    audio = sum(r["audio_s"] for r in ok)
    return {"mode": "stream" if stream else "file", "concurrency": conc, "requests": n, "ok": len(ok),
            "errors": n - len(ok), "error_samples": [r for r in res if not r["ok"]][:3],
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
           "--max-queue", str(max(64, 2 * max(args.concurrency))), *args.server_arg]
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
    ap.add_argument("--modes", default="file,stream", help="file (non-streaming), stream, or both")
    ap.add_argument("--requests", type=int, help="requests per level (default 2 x concurrency, max 64)")
    ap.add_argument("--soak", type=int, default=0, help="extra non-streaming requests for the RSS check (<= 500)")
    ap.add_argument("--text", default="Hi there.")
    ap.add_argument("--voice", help="voice name (default: the first the server lists)")
    ap.add_argument("--slots", type=int, default=8, help="server slots (with --model-dir)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    ap.add_argument("--server-log", type=Path)
    ap.add_argument("--ready-timeout", type=float, default=900)
    ap.add_argument("--timeout", type=float, default=600, help="per-request client timeout")
    ap.add_argument("--max-seconds", type=float, default=1800, help="stop starting new levels after this")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.soak > 500 or (args.requests or 0) > 64:
        ap.error("bounded load test: --requests <= 64, --soak <= 500")
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
    levels = []
    try:
        for mode in args.modes.split(","):
            for c in args.concurrency:
                if time.perf_counter() - t_start > args.max_seconds:
                    print(f"time budget reached, skipping {mode} c={c}", file=sys.stderr)
                    continue
                n = args.requests or min(64, 2 * c)
                lv = run_level(url, args.text, voice, c, n, mode == "stream", args.timeout, client)
                lv["rss_mb_after"] = rss_mb(pid) if pid else None
                levels.append(lv)
                print(json.dumps({k: v for k, v in lv.items() if k != "error_samples"}), file=sys.stderr)
        base = {lv["mode"]: lv["audio_s_per_wall_s"] for lv in levels if lv["concurrency"] == 1}
        for lv in levels:
            if base.get(lv["mode"]):
                lv["throughput_vs_1"] = round(lv["audio_s_per_wall_s"] / base[lv["mode"]], 2)
        soak = None
        if args.soak:
            rss = {}
            done = 0
            with ThreadPoolExecutor(4) as ex:
                for batch in range(0, args.soak, 20):
                    k = min(20, args.soak - batch)
                    bodies = [{"input": args.text, "voice": voice, "response_format": "pcm", "seed": batch + i}
                              for i in range(k)]
                    res = list(ex.map(lambda b: one_request(url, b, False, args.timeout), bodies))
                    done += k
                    rss[done] = rss_mb(pid) if pid else None
                    if any(not r["ok"] for r in res):
                        rss.setdefault("errors", 0)
                        rss["errors"] += sum(not r["ok"] for r in res)
            soak = {"requests": args.soak, "rss_mb_after": rss}
            if pid and 20 in rss and args.soak in rss:
                soak["rss_growth_20_to_n"] = round(rss[args.soak] / rss[20] - 1, 4)
    finally:
        sampler.stop.set()
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {"url": url, "voice": voice, "text": args.text, "server": health, "ready_s": round(ready_s, 1),
              "levels": levels, "soak": soak, "rss": sampler.samples, "cpu_count": os.cpu_count(),
              "loadavg": os.getloadavg()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print("mode    conc  reqs  err  first p50  first p95  audio s/wall s  x vs 1", file=sys.stderr)
    for lv in levels:
        print(f"{lv['mode']:<7} {lv['concurrency']:>4} {lv['requests']:>5} {lv['errors']:>4}  "
              f"{lv['first_chunk_p50_s'] or 0:>9.2f}  {lv['first_chunk_p95_s'] or 0:>9.2f}  "
              f"{lv['audio_s_per_wall_s']:>14.3f}  {lv.get('throughput_vs_1', 0):>6.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
