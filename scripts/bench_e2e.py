"""Benchmark: the whole product, ours vs the official PyTorch pipeline, same run, same release.

    .venv/bin/python scripts/bench_e2e.py --model-dir REL [--repeats 3] [--source-seconds 20] \\
        [--json out.json] [--md out.md] [--no-stages] [--skip-official]

One command measures every row of issue 20's table on a release directory
(``scripts/make_random_release.py``; random weights, so the LM runs to its length limit and the
audio is noise-like: only the timing is meaningful). Both sides use greedy LM decoding, the same
HiFT source noise, the fixed 25-token streaming hop (official 2025 snapshot), ``ORACLE_THREADS``
torch threads (default 2) and XLA's default thread pool; the run records the load average, CPU
count, thread settings and the versions. Sections:

* ``modes``: every mode (sft, zero_shot, cross_lingual, instruct2, vc), offline (seconds per call)
  and streaming (first chunk, whole stream); medians of ``--repeats`` after one warm-up pass
  (ours: compile time reported as ``ours_warmup_s``; official: model build). Each call runs on both
  sides back to back, the side that goes first alternating per repeat, so the drift of a shared
  machine falls on both alike; ``pair_ratios_ours_over_official`` is the median over repeats of
  ours / official within a repeat (the markdown shows it as "per pair").
* ``vc_chunks``: per-chunk seconds of a streaming ``inference_vc`` of a ``--source-seconds``
  utterance (the tokens are all known, so a chunk costs token2wav alone: our cached flow vs the
  official re-run from token 0).
* ``fresh``: separate processes, one streaming zero_shot each: seconds from process start to the
  first chunk, load time and peak RSS. Ours twice (empty persistent XLA cache = first-ever run,
  then the same cache = second run; converted-model cache present), the official once.
* ``stages`` (unless ``--no-stages``): the per-stage scripts side by side, run as subprocesses
  one after another (``bench_llm.py``, ``bench_flow.py``, ``bench_hift.py``,
  ``bench_flow_stream.py``; full size, random weights of their own; see each script).

Prints the JSON; ``--json``/``--md`` also write it and a markdown table (the README's table).
Memory: the warm sections hold ours (this process) and the official (the oracle process) at once;
the fresh-process rows measure each side alone.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402

MODES = ("sft", "zero_shot", "cross_lingual", "instruct2", "vc")
PROMPT_TEXT = "This is the prompt transcript."
INSTRUCT = "Speak slowly and calmly."


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.8 * t)) / 16000
    env = (1 + np.sin(2 * np.pi * 3.5 * t)) / 2
    return (0.2 * env * sum(np.sin(k * phase) / k for k in range(1, 8))
            + 0.005 * rng.standard_normal(t.shape)).astype(np.float32)


def _noise(seconds: float) -> np.ndarray:
    """HiFT source noise shared by both sides, long enough for ``seconds`` of source plus the longest
    synthesis a random LM runs to (its length limit: 24 s on the tiny release's long text)."""
    return np.random.default_rng(0).standard_normal((24000 * int(seconds + 60), 9)).astype(np.float32)


def _med(xs) -> float:
    return round(float(statistics.median(xs)), 3)


def _timed(gen) -> list[float]:
    """Cumulative seconds from the call to each yielded chunk."""
    times, t0 = [], time.perf_counter()
    for _ in gen:
        times.append(time.perf_counter() - t0)
    return times


def _load_ours(model_dir: Path, noise: np.ndarray, **streaming):
    """Our pipeline as both benchmarks load it; ``streaming``: extra ``StreamingConfig`` fields."""
    from cosyvoice2_jax.config import StreamingConfig
    from cosyvoice2_jax.pipeline.model import CosyVoice2

    def noise_fn(batch, samples):
        return np.broadcast_to(noise[:samples][None], (batch, samples, 9))

    return CosyVoice2.from_pretrained(model_dir, sampling="greedy", hift_noise=noise_fn,
                                      streaming=StreamingConfig(stream_scale_factor=1, **streaming),
                                      use_wetext=False)


def _ours_call(tts, mode: str, text: str, prompt, source, stream: bool, spk_id: str):
    if mode == "sft":
        return tts.inference_sft(text, spk_id, stream=stream)
    if mode == "zero_shot":
        return tts.inference_zero_shot(text, PROMPT_TEXT, prompt, stream=stream)
    if mode == "cross_lingual":
        return tts.inference_cross_lingual(text, prompt, stream=stream)
    if mode == "instruct2":
        return tts.inference_instruct2(text, INSTRUCT, prompt, stream=stream)
    return tts.inference_vc(source, prompt, stream=stream)


def _summary(runs: dict) -> dict:
    """``{(mode, stream): [times per repeat]}`` -> per mode medians."""
    out = {}
    for mode in {m for m, _ in runs}:
        off = runs.get((mode, False), [])
        on = runs.get((mode, True), [])
        out[mode] = {"offline_s": _med([t[-1] for t in off]) if off else None,
                     "stream_first_s": _med([t[0] for t in on]) if on else None,
                     "stream_total_s": _med([t[-1] for t in on]) if on else None,
                     "stream_chunks": len(on[0]) if on else None}
    return out


# ----------------------------------------------------------------------------- child: fresh process
def _peak_rss_bytes() -> int:
    """VmHWM of this process: its own peak resident set. (``getrusage``'s ``ru_maxrss`` is not: on
    Linux a child started by fork + exec reports the parent's peak when that is higher.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child_fresh(args) -> int:
    """One streaming zero_shot in this (fresh) process, with the CLI's persistent XLA cache."""
    from cosyvoice2_jax.cli import enable_compilation_cache

    enable_compilation_cache(args.xla_cache)
    noise = _noise(4.0)
    t = time.perf_counter()
    tts = _load_ours(args.model_dir, noise)
    load_s = time.perf_counter() - t
    first, t0 = None, time.perf_counter()
    for _ in tts.inference_zero_shot(args.text, PROMPT_TEXT, _speechlike(3.0, 0), stream=True):
        if first is None:
            first = time.time()
    total = time.perf_counter() - t0
    print(json.dumps({"load_s": load_s, "first_chunk_epoch": first, "total_s": total,
                      "peak_rss": _peak_rss_bytes()}))
    return 0


def _fresh_ours(args, xla_cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--child-fresh", "--model-dir", str(args.model_dir), "--text", args.text,
           "--xla-cache", str(xla_cache)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if p.returncode:
        raise RuntimeError(f"fresh child failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"first_chunk_from_start_s": round(r["first_chunk_epoch"] - t0, 2), "load_s": round(r["load_s"], 2),
            "stream_total_s": round(r["total_s"], 2), "peak_rss_gb": round(r["peak_rss"] / 1e9, 2)}


def _fresh_official(args, inputs) -> dict:
    from oracle_client import Oracle

    t0 = time.time()
    o = Oracle()
    try:
        r = o("bench_e2e:fresh_stream", inputs, model_dir=str(args.model_dir), tts_text=args.text,
              prompt_text=PROMPT_TEXT)
    finally:
        o.close()
    return {"first_chunk_from_start_s": round(float(r["first_chunk_epoch"]) - t0, 2),
            "load_s": round(float(r["load_s"]), 2), "stream_total_s": round(float(r["total_s"]), 2),
            "peak_rss_gb": round(int(r["peak_rss"]) / 1e9, 2)}


# ----------------------------------------------------------------------------- stages
STAGES = {  # script -> extra arguments (each prints one JSON object last)
    "bench_llm": [],
    "bench_flow": ["--tokens", "75", "--prompt-tokens", "87"],
    "bench_hift": ["--frames", "150"],
    "bench_flow_stream": ["--schedules", "fixed", "--official-chunks", "4"],
}


def _stages(args) -> dict:
    out = {}
    for name, extra in STAGES.items():
        cmd = [sys.executable, str(REPO / "scripts" / f"{name}.py"), "--repeats", str(args.repeats), *extra]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
        lines = p.stdout.splitlines()
        starts = [i for i, ln in enumerate(lines) if ln.startswith("{")]  # the last top-level JSON object
        out[name] = (json.loads("\n".join(lines[starts[-1]:])) if p.returncode == 0 and starts
                     else {"error": f"rc {p.returncode}: {p.stderr[-500:]}"})
        out[name]["wall_s"] = round(time.perf_counter() - t, 1)
    return out


# ----------------------------------------------------------------------------- table
def markdown(res: dict) -> str:
    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b else "-"

    def fmt(x, unit=" s"):
        return "-" if x is None else f"{x:g}{unit}"

    rows = ["| call | official | ours (warm) | ratio |", "|---|---|---|---|"]
    off = res.get("official", {}).get("modes", {})
    pairs = res.get("pair_ratios_ours_over_official", {})
    for mode, o in res.get("ours", {}).get("modes", {}).items():
        f = off.get(mode, {})
        for key, what in (("offline_s", "offline"), ("stream_first_s", "streaming: first chunk"),
                          ("stream_total_s", "streaming: whole")):
            pr = pairs.get(f"{mode}.{key}")
            rows.append(f"| `inference_{mode}`, {what} | {fmt(f.get(key))} | {fmt(o[key])} | "
                        f"{ratio(o[key], f.get(key))}{'' if pr is None else f' (per pair {pr:.2f})'} |")
    vo, vf = res.get("ours", {}).get("vc_chunks"), res.get("official", {}).get("vc_chunks")
    if vo:
        n = len(vo["chunk_s"])
        rows.append(f"| vc {res['source_seconds']:g} s, streaming: median chunk of {n} | "
                    f"{fmt(vf and vf['median_chunk_s'])} | {fmt(vo['median_chunk_s'])} | "
                    f"{ratio(vo['median_chunk_s'], vf and vf['median_chunk_s'])} |")
        rows.append(f"| same: last chunk | {fmt(vf and vf['last_chunk_s'])} | {fmt(vo['last_chunk_s'])} | "
                    f"{ratio(vo['last_chunk_s'], vf and vf['last_chunk_s'])} |")
    fo, ff = res.get("fresh", {}).get("ours", []), res.get("fresh", {}).get("official")
    for i, r in enumerate(fo):
        label = "first-ever run (empty XLA cache)" if i == 0 else "second run"
        of = ff["first_chunk_from_start_s"] if ff else None
        rows.append(f"| fresh process to first streamed chunk, {label} | {fmt(of)} | "
                    f"{fmt(r['first_chunk_from_start_s'])} | {ratio(r['first_chunk_from_start_s'], of)} |")
    if fo:
        r = fo[-1]
        rows.append(f"| model load (fresh process) | {fmt(ff and ff['load_s'])} | {fmt(r['load_s'])} | "
                    f"{ratio(r['load_s'], ff and ff['load_s'])} |")
        rows.append(f"| peak RSS, one streaming zero_shot, fresh process | {fmt(ff and ff['peak_rss_gb'], ' GB')} | "
                    f"{fmt(r['peak_rss_gb'], ' GB')} | {ratio(r['peak_rss_gb'], ff and ff['peak_rss_gb'])} |")
    st = res.get("stages", {})
    for name, r in st.items():
        rows.append(f"| stage `{name}` | see JSON | {r.get('wall_s', '-')} s wall | - |")
    env = res["env"]
    rows.append("")
    rows.append(f"Load average {env['loadavg_start']} -> {env['loadavg_end']}, {env['cpu_count']} CPUs, "
                f"official torch threads {env['oracle_threads']}, XLA_FLAGS `{env['xla_flags']}`, "
                f"OMP_NUM_THREADS {env['omp_num_threads']}"
                + (f"; medians of {res['repeats']} repeats; ours warm-up (compiles) {res['ours']['warmup_s']} s."
                   if "ours" in res else "; fresh processes only."))
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--source-seconds", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text", default="Hello there, this is a streaming synthesis benchmark.")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--skip-official", action="store_true")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage scripts (full size only)")
    ap.add_argument("--no-fresh", action="store_true", help="skip the fresh-process measurements")
    ap.add_argument("--fresh-only", action="store_true",
                    help="only the fresh-process measurements (no warm calls, no stages)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    ap.add_argument("--md", type=Path, help="also write the markdown table here")
    ap.add_argument("--child-fresh", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--xla-cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_fresh:
        return child_fresh(args)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")

    import jax

    noise = _noise(args.source_seconds)
    prompt, source = _speechlike(3.0, 0), _speechlike(args.source_seconds, 5)
    vc_source = _speechlike(3.0, 7)  # the modes table: a 3 s source, as the other modes' ~3 s outputs
    res = {"model_dir": str(args.model_dir), "repeats": args.repeats, "source_seconds": args.source_seconds,
           "text": args.text,
           "env": {"jax": jax.__version__, "jax_devices": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
                   "python": platform.python_version(), "oracle_threads": int(os.environ.get("ORACLE_THREADS", "2")),
                   "xla_flags": os.environ.get("XLA_FLAGS", ""), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                   "loadavg_start": [round(x, 2) for x in os.getloadavg()]}}

    if args.fresh_only:
        return _report(args, res, fresh_only=True)

    # ---- both sides warm, timed in alternating pairs (ours in this process, the official in the oracle's)
    t = time.perf_counter()
    tts = _load_ours(args.model_dir, noise)
    res["ours"] = {"load_s": round(time.perf_counter() - t, 2),
                   "load_timings": {k: round(v, 2) for k, v in tts.loaded.timings.items()}}
    spk_id = (tts.list_available_spks() or [""])[0]
    calls = [(m, s) for m in modes for s in (False, True)]
    t = time.perf_counter()
    for m, s in calls:  # warm-up: compiles every program these calls use
        _timed(_ours_call(tts, m, args.text, prompt, vc_source, s, spk_id))
    _timed(tts.inference_vc(source, prompt, stream=True))
    res["ours"]["warmup_s"] = round(time.perf_counter() - t, 2)

    inputs = {"prompt_wav_16k": prompt, "source_wav_16k": vc_source, "hift_noise": noise}
    vc_inputs = dict(inputs, source_wav_16k=source)
    o = None
    if not args.skip_official:
        from oracle_client import Oracle

        o = Oracle()

    def official(m, s, inp=inputs):
        r = o("bench_e2e:timed_tts", inp, model_dir=str(args.model_dir), mode=m, tts_text=args.text,
              prompt_text=PROMPT_TEXT, instruct_text=INSTRUCT, spk_id=spk_id, stream=s, repeats=1)
        return list(map(float, r["t_0"]))

    runs, chunks = {c: [] for c in calls}, []
    oruns, ochunks = {c: [] for c in calls}, []
    try:
        if o is not None:
            t = time.perf_counter()
            for m, s in calls:
                official(m, s)
            official("vc", True, vc_inputs)
            res["official"] = {"warmup_s": round(time.perf_counter() - t, 2)}
        for r in range(args.repeats):
            # each call runs on both sides back to back, the side that goes first alternating per
            # repeat, so that the drift of a shared machine falls on both alike
            for m, s in calls + [("vc_long", True)]:
                def ours_once(m=m, s=s):
                    if m == "vc_long":
                        chunks.append(np.diff([0.0] + _timed(tts.inference_vc(source, prompt, stream=True))))
                    else:
                        runs[(m, s)].append(_timed(_ours_call(tts, m, args.text, prompt, vc_source, s, spk_id)))

                def official_once(m=m, s=s):
                    if m == "vc_long":
                        ochunks.append(np.diff([0.0] + official("vc", True, vc_inputs)))
                    else:
                        oruns[(m, s)].append(official(m, s))

                sides = [ours_once] + ([official_once] if o is not None else [])
                for f in (sides if r % 2 == 0 else sides[::-1]):
                    f()
    finally:
        if o is not None:
            o.close()
    res["ours"]["modes"] = _summary(runs)
    och = np.median(np.array(chunks), axis=0)
    res["ours"]["vc_chunks"] = {"chunk_s": [round(float(x), 3) for x in och], "median_chunk_s": _med(och),
                                "last_chunk_s": round(float(och[-1]), 3)}
    tts = None  # ours is freed before the fresh-process measurements
    gc.collect()

    if o is not None:
        res["official"]["modes"] = _summary(oruns)
        fch = np.median(np.array(ochunks), axis=0)
        res["official"]["vc_chunks"] = {"chunk_s": [round(float(x), 3) for x in fch], "median_chunk_s": _med(fch),
                                        "last_chunk_s": round(float(fch[-1]), 3)}
        pairs = {}  # median over repeats of ours / official of the same repeat
        for m, s in calls:
            for k, idx in ((("stream_first_s", 0), ("stream_total_s", -1)) if s else (("offline_s", -1),)):
                per_repeat = [a[idx] / b[idx] for a, b in zip(runs[(m, s)], oruns[(m, s)])]
                pairs[f"{m}.{k}"] = round(statistics.median(per_repeat), 3)
        res["pair_ratios_ours_over_official"] = pairs
        ratios = {}
        for m in modes:
            for k in ("offline_s", "stream_first_s", "stream_total_s"):
                a, b = res["ours"]["modes"][m][k], res["official"]["modes"][m][k]
                ratios[f"{m}.{k}"] = round(a / b, 3) if a is not None and b else None
        res["ratios_ours_over_official"] = ratios

    return _report(args, res)


def _report(args, res: dict, fresh_only: bool = False) -> int:
    """Fresh processes and stages (as asked), then print / write the results."""
    inputs = {"prompt_wav_16k": _speechlike(3.0, 0), "source_wav_16k": _speechlike(3.0, 7),
              "hift_noise": _noise(args.source_seconds)}
    # ---- fresh processes
    if not args.no_fresh:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-xla-") as xla:
            res["fresh"] = {"ours": [_fresh_ours(args, Path(xla)) for _ in range(2)]}
        if not args.skip_official:
            res["fresh"]["official"] = _fresh_official(args, inputs)

    if not args.no_stages and not fresh_only:
        res["stages"] = _stages(args)
    res["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(res)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.md:
        args.md.write_text(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
