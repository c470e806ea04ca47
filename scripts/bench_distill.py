"""Flow time per utterance: the official sampler (10 Euler steps x 2 CFG rows = 20 estimator passes)
vs a distilled single-pass student at 1 and 2 passes (random weights: the time does not depend on them).

    PYTHONPATH=. python scripts/bench_distill.py --model full --tokens 200 --prompt-tokens 75 --repeats 3

Prints JSON: median wall seconds after a warm-up (compile excluded) per sampler and the load average.
The student is the same network with the step-size input (``FlowConfig.student``), so its estimator
pass costs what the teacher's costs for one row.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import numpy as np


def main(argv=None):
    from cosyvoice2_jax.config import FlowStudentConfig, ModelConfig
    from cosyvoice2_jax.flow import modeling as M

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("full", "tiny"), default="full")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=75)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    cfg = (ModelConfig.cosyvoice2() if a.model == "full" else ModelConfig.tiny()).flow
    student = dataclasses.replace(cfg, student=FlowStudentConfig(True, ("d",)),
                                  cfm=dataclasses.replace(cfg.cfm, t_scheduler="linear"))
    params = M.init_params(student, jax.random.key(0))  # the teacher reads its own keys only
    teacher_params = {k: v for k, v in params.items()}
    teacher_params["decoder"] = {"estimator": {k: v for k, v in params["decoder"]["estimator"].items()
                                               if not k.startswith("time_mlp_") or k == "time_mlp"}}
    r = np.random.default_rng(0)
    args = (r.integers(0, cfg.vocab_size, (1, a.tokens)), r.integers(0, cfg.vocab_size, (1, a.prompt_tokens)),
            r.normal(size=(1, 2 * a.prompt_tokens, cfg.output_size)).astype(np.float32),
            r.normal(size=(1, cfg.spk_embed_dim)).astype(np.float32))
    runs = {"teacher_20_passes": (teacher_params, cfg, {}),
            "student_1_pass": (params, student, {"n_timesteps": 1}),
            "student_2_passes": (params, student, {"n_timesteps": 2})}
    out = {"model": a.model, "tokens": a.tokens, "prompt_tokens": a.prompt_tokens}
    for name, (p, c, kw) in runs.items():
        t0 = time.perf_counter()
        M.inference(p, c, *args, **kw)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            M.inference(p, c, *args, **kw)
            times.append(time.perf_counter() - t0)
        out[name] = {"median_s": round(statistics.median(times), 4), "first_call_s": round(compile_s, 2)}
    out["loadavg"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
