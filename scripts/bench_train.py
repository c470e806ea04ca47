"""Training-step benchmarks (JSON on stdout).

  python scripts/bench_train.py speed   # tiny LM / flow / DPO / HiFT-GAN steps/s on 1 device and on 8 simulated devices
  python scripts/bench_train.py memory  # full-size LM train step: compiled memory per batch size

``speed`` runs each objective on synthetic fixed-shape batches (the data pipeline is benchmarked
separately) and reports the median step time of ``--repeats`` timed steps after compilation.
``hift`` is one GAN step (discriminator turn + generator turn) of the tiny generator with
``--hift-disc small`` (one period + one spectrogram discriminator, as the tests; default) or
``full`` (the official 5 + 3 sub-discriminators: slow to compile on CPU), 8 crops of 24480 (+480)
samples; ``--only hift`` runs just that objective.
``scale`` compiles (never runs) one train step of the LM or the flow for a mesh of ``--chips``
simulated devices and a global batch, and reports the per-device FLOPs of the partitioned program
(XLA cost analysis), its compiled memory per device, and from those the step time at the peak of a
named accelerator (table ``PEAK`` below) and at an assumed model-FLOPs utilisation, plus the compile
time and the host's peak RSS::

  python scripts/bench_train.py scale --objective lm --chips 64 --mesh 1 64 1 --rows-per-shard 4 --fast-compile
  python scripts/bench_train.py scale --objective flow --chips 8 --mesh 1 8 1 --remat full --cpu-scheduler memory
  python scripts/bench_train.py scale --objective distill-meanflow --chips 8 --mesh -1 8 1  # flow student + teacher
  python scripts/bench_train.py scale --objective distill-reflow --chips 64 --mesh 1 64 1 --no-compile

``--no-compile``: only ``state_per_chip_gib``, the exact per-device size of the sharded params and optimizer
state (shard shapes of the trainer's shardings; frozen params such as a distillation teacher get no
optimizer state). A user's ``XLA_FLAGS`` are kept. ``--fast-compile`` turns LLVM optimisation off
(``FAST_COMPILE_FLAGS``) to shorten a full-size CPU compile from tens of minutes to a few: LLVM codegen runs
after XLA's cost analysis and buffer assignment, so FLOPs and memory are those of the optimised build.
``memory`` compiles the full CosyVoice2-0.5B LM step (fp32 params + Adam, no execution) with
``jax.jit(...).lower(...).compile().memory_analysis()`` for several batch sizes, to find the batch
that fits a 16 GiB and an 80 GiB accelerator.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

for _mode, _flag in (("speed", "--devices"), ("scale", "--chips")):
    if _mode in sys.argv and _flag in sys.argv:
        n = sys.argv[sys.argv.index(_flag) + 1]
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
# --cpu-scheduler memory: XLA CPU's memory-minimising scheduler instead of the default concurrency-optimised
# (breadth-first) one, which runs remat's recomputations right after the forward pass and so hides what
# --remat saves (TPU/GPU compilers schedule for memory). A backend flag: set before jax starts.
if "--cpu-scheduler" in sys.argv and sys.argv[sys.argv.index("--cpu-scheduler") + 1] == "memory":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
# --fast-compile: LLVM optimisation off for the CPU compile (FAST_COMPILE_FLAGS). XLA's HLO passes, its cost
# analysis (FLOPs) and buffer assignment (memory) run before LLVM codegen, so the figures are those of the
# optimised build (checked on the full-size LM at 8 chips, README "Scale model"); it cuts a full-size compile
# from tens of minutes to a few.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "--fast-compile" in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cosyvoice2_jax.config import ModelConfig  # noqa: E402
from cosyvoice2_jax import sharding as M  # noqa: E402
from cosyvoice2_jax.train import trainer as TR  # noqa: E402
from cosyvoice2_jax.train.optim import OptimConfig, make_optimizer  # noqa: E402


def lm_batch(rows, text, speech, reject=False, seed=0):
    r = np.random.default_rng(seed)
    b = {"text_token": r.integers(0, 600, (rows, text)).astype(np.int32),
         "text_token_len": np.full((rows,), text, np.int32),
         "speech_token": r.integers(0, 6561, (rows, speech)).astype(np.int32),
         "speech_token_len": np.full((rows,), speech, np.int32), "valid": np.ones((rows,), bool)}
    if reject:
        b["reject_speech_token"] = r.integers(0, 6561, (rows, speech)).astype(np.int32)
        b["reject_speech_token_len"] = np.full((rows,), speech - 5, np.int32)
    return b


def flow_batch(rows, speech, seed=0):
    r = np.random.default_rng(seed)
    return {"speech_token": r.integers(0, 6561, (rows, speech)).astype(np.int32),
            "speech_token_len": np.full((rows,), speech, np.int32),
            "speech_feat": r.standard_normal((rows, 2 * speech, 80)).astype(np.float32),
            "speech_feat_len": np.full((rows,), 2 * speech, np.int32),
            "embedding": r.standard_normal((rows, 192)).astype(np.float32), "valid": np.ones((rows,), bool)}


def hift_batch(rows, frames=52, seed=0):
    r = np.random.default_rng(seed)
    w = frames * 480
    t = np.arange(w) / 24000.0
    speech = (0.3 * np.sin(2 * np.pi * r.uniform(100, 250, (rows, 1)) * t)
              + 0.02 * r.standard_normal((rows, w))).astype(np.float32)
    return {"speech": speech, "speech_feat": (r.standard_normal((rows, frames, 80)) - 3).astype(np.float32),
            "pitch_feat": r.uniform(80, 250, (rows, frames)).astype(np.float32), "valid": np.ones((rows,), bool)}


def speed(args):
    from cosyvoice2_jax.train.flow import FlowObjective
    from cosyvoice2_jax.train.hift import GANConfig, HiFTGANObjective
    from cosyvoice2_jax.train.lm import DPOObjective, LMObjective

    cfg = ModelConfig.tiny()
    n = len(jax.devices())
    mesh = M.make_mesh((n, 1, 1))
    rows = 8
    gan = GANConfig() if args.hift_disc == "full" else GANConfig(
        mpd_periods=(7,), mrd_fft_sizes=(512,), mrd_hop_sizes=(50,), mrd_win_lengths=(240,))
    cases = {"lm": (LMObjective(cfg.llm), lm_batch(rows, 32, 100)),
             "dpo": (DPOObjective(cfg.llm), lm_batch(rows, 32, 100, reject=True)),
             "flow": (FlowObjective(cfg.flow), flow_batch(rows, 100)),
             "hift": (HiFTGANObjective(cfg.hift, gan), hift_batch(rows))}
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only}
    out = {"devices": n, "mesh": dict(mesh.shape), "rows": rows, "repeats": args.repeats,
           "threads": os.cpu_count(), "hift_disc": args.hift_disc, "results": {}}
    for name, (obj, batch) in cases.items():
        if hasattr(obj, "init_train"):  # two optimizers (GAN)
            state, sh, step = obj.init_train(TR.TrainConfig(optim=OptimConfig(lr=2e-4), optim_d=OptimConfig(lr=2e-4)),
                                              mesh)
        else:
            tx = TR.with_trainable_mask(obj, make_optimizer(OptimConfig(lr=1e-4)))
            state, sh = TR.init_state(obj, tx, mesh, 0)
            step = TR.make_train_step(obj, tx, sh, mesh)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out["results"][name] = {"first_step_s": round(compile_s, 3), "median_step_s": round(med, 4),
                                "steps_per_s": round(1 / med, 2)}
    print(json.dumps(out, indent=2))


def memory(args):
    from cosyvoice2_jax.train.lm import LMObjective

    cfg = ModelConfig.cosyvoice2().llm
    obj = LMObjective(cfg)
    tx = make_optimizer(OptimConfig(lr=1e-5))
    key = jax.random.key(0)

    def init():
        import flax.linen as nn

        p = nn.meta.unbox(obj.init_params(key))
        return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}

    abstract = jax.eval_shape(init)

    def step(state, batch):
        (loss, _), g = jax.value_and_grad(lambda p: obj.loss_fn(p, batch, key), has_aux=True)(state["params"])
        u, o = tx.update(g, state["opt_state"], state["params"])
        import optax

        return {"params": optax.apply_updates(state["params"], u), "opt_state": o, "step": state["step"] + 1}, loss

    res = []
    for rows in args.rows:
        b = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lm_batch(rows, args.text, args.speech))
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0,)).lower(abstract, b).compile()
        ma = compiled.memory_analysis()
        gib = 1024 ** 3
        row = {"rows": rows, "text": args.text, "speech": args.speech, "compile_s": round(time.perf_counter() - t0, 1)}
        for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
                  "generated_code_size_in_bytes"):
            row[k.replace("_in_bytes", "_gib")] = round(getattr(ma, k, 0) / gib, 3)
        row["peak_estimate_gib"] = round((ma.argument_size_in_bytes + ma.output_size_in_bytes
                                          - ma.alias_size_in_bytes + ma.temp_size_in_bytes) / gib, 3)
        res.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"model": "CosyVoice2-0.5B LM", "precision": "fp32 params + Adam", "backend": jax.default_backend(),
                      "scan_layers": cfg.scan_layers, "results": res}, indent=2))


# dense peak FLOP/s per chip (vendor data sheets) and memory per chip. "fp32": what an fp32 matmul
# runs at under JAX's default precision (TPU: one bf16 MXU pass; H100/H200: TF32 tensor cores).
PEAK = {
    "tpu-v5e": {"bf16": 197e12, "fp32": 197e12, "hbm_gib": 16},
    "tpu-v5p": {"bf16": 459e12, "fp32": 459e12, "hbm_gib": 95},
    "h100-sxm": {"bf16": 989e12, "fp32": 494e12, "hbm_gib": 80},
    "h200": {"bf16": 989e12, "fp32": 494e12, "hbm_gib": 141},
}


def state_per_chip_gib(abstract, shardings) -> dict:
    """Per-device GiB of the train state's parts, from their shardings' shard shapes (exact, no
    compile): ``params`` (for a distillation state also ``params/student`` and ``params/teacher``),
    ``opt_state`` and ``trainable`` (the parameters that get gradients: the size of the gradient)."""
    def gib(tree, sh):
        return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sh))) / 1024 ** 3

    p, ps = abstract["params"], shardings["params"]
    out = {"params": gib(p, ps), "opt_state": gib(abstract["opt_state"], shardings["opt_state"])}
    if isinstance(p, dict) and set(p) == {"student", "teacher"}:
        out.update({"params/student": gib(p["student"], ps["student"]), "params/teacher": gib(p["teacher"], ps["teacher"]),
                    "trainable": gib(p["student"], ps["student"])})
    else:
        out["trainable"] = out["params"]
    return {k: round(v, 4) for k, v in out.items()}


def scale(args):
    import flax.linen as nn  # noqa: F401  (abstract_state reads logical partitioning metadata)

    from cosyvoice2_jax.train.flow import FlowObjective
    from cosyvoice2_jax.train.lm import LMObjective

    cfg = ModelConfig.cosyvoice2() if args.model == "full" else ModelConfig.tiny()
    cfg = TR.precision_model_config(cfg, args.precision)
    mesh = M.make_mesh(M.MeshConfig(*args.mesh))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = args.rows_per_shard * shards
    if args.objective == "lm":
        obj, batch = LMObjective(cfg.llm, remat=args.remat), lm_batch(rows, args.text, args.speech)
        tokens = rows * (args.text + args.speech)
    else:
        if args.objective.startswith("distill-"):  # few-step student + frozen teacher (train/distill.py)
            from cosyvoice2_jax.flow.distill import DistillOptions
            from cosyvoice2_jax.train.distill import DistillObjective

            if args.remat != "none":
                raise SystemExit("--remat is implemented for the LM and the flow objective, not distill-*")
            obj = DistillObjective(cfg.flow, DistillOptions(method=args.objective.split("-", 1)[1]))
        else:
            obj = FlowObjective(cfg.flow, remat=args.remat)
        batch = flow_batch(rows, args.speech)
        tokens = rows * args.speech
    tx = TR.with_trainable_mask(obj, make_optimizer(OptimConfig(lr=1e-5)))  # as the trainer: no state for frozen params
    abstract, sh = TR.abstract_state(obj, tx, mesh)
    state_gib = state_per_chip_gib(abstract, sh)
    if args.no_compile:
        print(json.dumps({"objective": args.objective, "model": args.model, "chips": mesh.size, "mesh": dict(mesh.shape),
                          "state_per_chip_gib": state_gib}, indent=2))
        return
    step = TR.make_train_step(obj, tx, sh, mesh, precision=args.precision).step
    bsh = {k: M.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    b = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh[k]) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = jax.jit(step, in_shardings=(sh, bsh), out_shardings=(sh, M.replicated(mesh)),
                       donate_argnums=(0,)).lower(abstract, b).compile()
    compile_s = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    flops_dev = float(ca["flops"])
    ma = compiled.memory_analysis()
    gib = 1024 ** 3
    peak_mem = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                + ma.temp_size_in_bytes) / gib
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    out = {"objective": args.objective, "model": args.model, "precision": args.precision, "remat": args.remat,
           "cpu_scheduler": args.cpu_scheduler, "fast_compile": args.fast_compile,
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "chips": mesh.size,
           "mesh": dict(mesh.shape), "global_rows": rows, "text": args.text, "speech": args.speech,
           "params": n_params, "tokens_per_step": tokens, "compile_s": round(compile_s, 1),
           "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2),
           "flops_per_step_per_chip": flops_dev, "flops_per_step": flops_dev * mesh.size,
           "flops_per_token_per_param": round(flops_dev * mesh.size / tokens / n_params, 2),
           "state_per_chip_gib": state_gib,
           "memory_per_chip_gib": {"arguments": round(ma.argument_size_in_bytes / gib, 3),
                                   "temp": round(ma.temp_size_in_bytes / gib, 3), "peak_estimate": round(peak_mem, 3)},
           "memory_per_chip_bytes": {"arguments": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
                                     "alias": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes},
           "assumed_mfu": args.mfu, "accelerators": {}}
    for name, spec in PEAK.items():
        t_peak = flops_dev / spec[args.precision]
        out["accelerators"][name] = {"peak_flops": spec[args.precision], "step_s_at_peak": float(f"{t_peak:.4g}"),
                                     "step_s_expected": float(f"{t_peak / args.mfu:.4g}"),
                                     "tokens_per_s_expected": round(tokens / (t_peak / args.mfu)),
                                     "fits_memory": peak_mem <= spec["hbm_gib"]}
    print(json.dumps(out, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--devices", type=int, default=1)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--only", nargs="+", choices=["lm", "dpo", "flow", "hift"])
    s.add_argument("--hift-disc", choices=["small", "full"], default="small")
    m = sub.add_parser("memory")
    m.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    m.add_argument("--text", type=int, default=64)
    m.add_argument("--speech", type=int, default=500)
    c = sub.add_parser("scale")
    c.add_argument("--objective", choices=["lm", "flow", "distill-guidance", "distill-meanflow", "distill-reflow"],
                   default="lm")
    c.add_argument("--model", choices=["full", "tiny"], default="full")
    c.add_argument("--chips", type=int, default=8, help="simulated devices (the mesh size)")
    c.add_argument("--mesh", type=int, nargs=3, default=[-1, 1, 1], metavar=("DATA", "FSDP", "TENSOR"))
    c.add_argument("--rows-per-shard", type=int, default=4, help="batch rows per data x fsdp shard")
    c.add_argument("--text", type=int, default=64)
    c.add_argument("--speech", type=int, default=500)
    c.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    c.add_argument("--remat", choices=["none", "full", "dots", "dots_no_batch"], default="none",
                   help="remat policy (layers/remat.py): per LM decoder layer / per flow U-Net stage")
    c.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation for the expected time")
    c.add_argument("--no-compile", action="store_true",
                   help="only the per-chip size of the sharded train state (params, optimizer state; no compile)")
    for p in (m, c):
        p.add_argument("--cpu-scheduler", choices=["default", "memory"], default="default",
                       help="XLA CPU scheduler for the compile (memory: shows what remat saves; see the top of this file)")
        p.add_argument("--fast-compile", action="store_true",
                       help=f"XLA_FLAGS {FAST_COMPILE_FLAGS}: LLVM optimisation off; same FLOPs and memory, "
                            "a much shorter CPU compile (see the top of this file)")
    args = ap.parse_args()
    {"speed": speed, "memory": memory, "scale": scale}[args.what](args)


if __name__ == "__main__":
    main()
