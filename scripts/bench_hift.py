"""Benchmark: JAX HiFT inference vs the official PyTorch HiFTGenerator.inference, same weights.

    .venv/bin/python scripts/bench_hift.py [--frames 200 400] [--repeats 5] [--threads 2]

Runs the official module in the oracle venv (``.oracle-venv``, or ``$COSYVOICE2_ORACLE_PYTHON``)
in a subprocess, then the JAX jitted ``make_inference_fn`` (folded weight norm, polynomial Snake)
in this process, one after the other (never at the same time). Prints one JSON object: median
seconds per call for each frame count, the thread counts and the ratio jax / torch
(< 1 means JAX is faster), and the process CPU seconds per call (user + system; more robust
than wall time on a shared machine). Both sides use the same re-drawn weights (``reinit_`` seed 0).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

TORCH_SIDE = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    sys.path.insert(0, {oracle_dir!r})
    import common, torch
    torch.set_num_threads({threads})
    import hift
    m = hift.model(0)
    np.savez({sd_path!r}, **common.state_dict_np(m))
    out, cpus = {{}}, {{}}
    for frames in {frames!r}:
        mel = torch.from_numpy(np.random.default_rng(frames).standard_normal((1, 80, frames)).astype(np.float32) - 3)
        m.inference(mel)  # warm-up
        ts, cs = [], []
        for _ in range({repeats}):
            t, c = time.perf_counter(), cpu(); m.inference(mel)
            ts.append(time.perf_counter() - t); cs.append(cpu() - c)
        out[frames], cpus[frames] = ts, cs
    print(json.dumps({{"times": out, "cpu": cpus, "threads": torch.get_num_threads()}}))
""")


def torch_side(frames, repeats, threads, sd_path):
    py = os.environ.get("COSYVOICE2_ORACLE_PYTHON", str(REPO / ".oracle-venv" / "bin" / "python"))
    code = TORCH_SIDE.format(oracle_dir=str(REPO / "tests" / "oracle"), threads=threads, sd_path=sd_path,
                             frames=list(frames), repeats=repeats)
    env = dict(os.environ, ORACLE_THREADS=str(threads))
    env.pop("PYTHONPATH", None)
    res = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO))
    if res.returncode:
        raise SystemExit(f"official side failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def jax_side(frames, repeats, sd_path, fast_snake=True):
    import jax

    from cosyvoice2_jax.config import HiFTConfig
    from cosyvoice2_jax.hift.modeling import make_inference_fn
    from cosyvoice2_jax.hift.params import from_torch

    cfg = HiFTConfig()
    with np.load(sd_path) as z:
        sd = {k: z[k] for k in z.files}
    params = jax.device_put(from_torch(sd, cfg, fold=True))
    run = make_inference_fn(cfg, fast_snake=fast_snake)
    key = jax.random.PRNGKey(0)
    import resource

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    out, cpus, compile_s = {}, {}, {}
    for f in frames:
        mel = np.random.default_rng(f).standard_normal((1, f, 80)).astype(np.float32) - 3
        t = time.perf_counter()
        jax.block_until_ready(run(params, mel, key))
        compile_s[f] = time.perf_counter() - t
        ts, cs = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), cpu()
            jax.block_until_ready(run(params, mel, key))
            ts.append(time.perf_counter() - t)
            cs.append(cpu() - c)
        out[f], cpus[f] = ts, cs
    return out, cpus, compile_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[200, 400])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses its default pool)")
    ap.add_argument("--exact-snake", action="store_true", help="jnp.sin Snake instead of the polynomial")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sd_path = os.path.join(tmp, "hift_sd.npz")
        load_before = os.getloadavg()
        tr = torch_side(args.frames, args.repeats, args.threads, sd_path)
        jt, jc, compile_s = jax_side(args.frames, args.repeats, sd_path, fast_snake=not args.exact_snake)
    result = {"device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": tr["threads"],
              "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "repeats": args.repeats,
              "fast_snake": not args.exact_snake, "frames": {}}
    for f in args.frames:
        t_med = float(np.median(tr["times"][str(f)]))
        j_med = float(np.median(jt[f]))
        result["frames"][f] = {"torch_median_s": round(t_med, 4), "jax_median_s": round(j_med, 4),
                               "ratio_jax_over_torch": round(j_med / t_med, 3),
                               "torch_cpu_median_s": round(float(np.median(tr["cpu"][str(f)])), 4),
                               "jax_cpu_median_s": round(float(np.median(jc[f])), 4),
                               "cpu_ratio_jax_over_torch": round(float(np.median(jc[f]) / np.median(tr["cpu"][str(f)])), 3),
                               "jax_first_call_s": round(compile_s[f], 2),
                               "torch_all_s": [round(x, 4) for x in tr["times"][str(f)]],
                               "jax_all_s": [round(x, 4) for x in jt[f]]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
