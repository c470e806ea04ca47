"""Distil a tiny random-weight flow into a 1-2 pass student and compare it with the teacher.

    PYTHONPATH=. python scripts/distill_tiny.py --method reflow --steps 300 --out /tmp/distill_tiny
    PYTHONPATH=. python scripts/distill_tiny.py --release /tmp/cv2-tiny --export /tmp/cv2-tiny-reflow ...

Teacher: the tiny flow (``ModelConfig.tiny()``, weights re-drawn variance-preserving so that its
output depends on its inputs) sampled the official way (10 Euler steps, cosine grid, CFG 0.7 =
20 estimator passes). Student: :class:`~cosyvoice2_jax.train.distill.DistillObjective` trained on
random token/prompt/x-vector batches (every batch is new, so the evaluation utterances were never
seen). Evaluation on ``--eval`` held-out utterances with the official fixed noise: mel L1 to the
teacher's 20-pass output of the student at 1 and 2 passes, and of the teacher itself at the same
number of passes (1 pass: one Euler step of v_c; 2 passes: the better of one CFG step and two
v_c steps). Writes ``results.json`` (and prints a table).

``--release DIR``: the teacher is DIR's ``flow.pt`` (e.g. the tiny random release of
``scripts/make_random_release.py``) at its own config instead of the re-drawn ``ModelConfig.tiny()``
flow; ``--export OUT``: write the student as a release directory (a copy of ``--release`` whose
``flow.pt`` is the student, ``train.distill.export_student``) for ``scripts/flow_study.py
--reference-model`` (docs/distillation.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _redraw(tree, seed):
    from cosyvoice2_jax import params_util

    return jax.tree.map(jnp.asarray, params_util.redraw(tree, seed))


def batch(rng: np.random.Generator, cfg, B: int, S: int, mel_offset: float = 0.0) -> dict:
    """Random tokens, mel (standard normal + ``mel_offset``; -5 is the log-mel range of
    ``scripts/flow_study.py``'s utterances) and x-vectors."""
    tl = rng.integers(S // 2, S + 1, B)
    return {"speech_token": rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32), "speech_token_len": tl,
            "speech_feat": (rng.normal(size=(B, 2 * S, cfg.output_size)) + mel_offset).astype(np.float32),
            "speech_feat_len": 2 * tl, "embedding": rng.normal(size=(B, cfg.spk_embed_dim)).astype(np.float32),
            "valid": np.ones(B, bool)}


def release_teacher(release: Path):
    """(FlowConfig, flow params) of a release directory's ``flow.pt``."""
    from cosyvoice2_jax import flow
    from cosyvoice2_jax.pipeline.release import check_release_dir, config_from_release_yaml

    paths = check_release_dir(release)
    cfg = config_from_release_yaml(paths.yaml).flow
    return cfg, jax.tree.map(jnp.asarray, flow.from_release(paths.file("flow"), cfg))


def run(method: str = "reflow", steps: int = 300, lr: float = 1e-3, batch_size: int = 4, tokens: int = 20,
        n_eval: int = 4, seed: int = 0, grid_ratio: float = 0.5, couplings: bool = False, log=print,
        teacher=None, mel_offset: float = 0.0) -> dict:
    """``teacher``: ``(FlowConfig, params)`` of the flow to distil (default: the re-drawn tiny flow)."""
    from cosyvoice2_jax.config import ModelConfig
    from cosyvoice2_jax.flow import distill as D
    from cosyvoice2_jax.flow import modeling
    from cosyvoice2_jax.train.distill import DistillObjective

    if teacher is None:
        cfg = ModelConfig.tiny().flow
        teacher = _redraw(modeling.abstract_params(cfg), seed)
    else:
        cfg, teacher = teacher
    opts = D.DistillOptions(method=method, student_steps=1, grid_ratio=grid_ratio, teacher_couplings=couplings)
    obj = DistillObjective(cfg, opts, init_from=teacher)
    params = obj.init_params(jax.random.key(seed))
    tx = optax.multi_transform({"train": optax.adam(lr), "frozen": optax.set_to_zero()},
                               {"student": jax.tree.map(lambda _: "train", params["student"]),
                                "teacher": jax.tree.map(lambda _: "frozen", params["teacher"])})
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, b, key):
        loss, g = jax.value_and_grad(lambda p: obj.loss_fn(p, b, key)[0])(params)
        up, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, up), opt, loss

    # held-out utterances: a separate generator; prompts of 10 tokens from the batch's first tokens
    er = np.random.default_rng(10_000 + seed)
    evals = [batch(er, cfg, 1, tokens, mel_offset) for _ in range(n_eval)]

    def mel(p, fcfg, e, **kw):
        tok = e["speech_token"][:, 10: int(e["speech_token_len"][0])]
        return modeling.inference(p, fcfg, tok, e["speech_token"][:, :10], e["speech_feat"][:, :20],
                                  e["embedding"], token_bucket=tokens, **kw)[0]

    ref = [mel(teacher, cfg, e) for e in evals]  # official sampler: 10 Euler, cosine, CFG 0.7

    def err(p, fcfg, **kw):
        return float(np.mean([np.mean(np.abs(mel(p, fcfg, e, **kw) - r)) for e, r in zip(evals, ref)]))

    lin = dataclasses.replace(cfg.cfm, t_scheduler="linear")
    teacher_1 = err(teacher, dataclasses.replace(cfg, cfm=lin), n_timesteps=1, cfg_rate=0.0)
    teacher_2 = min(err(teacher, dataclasses.replace(cfg, cfm=lin), n_timesteps=1),
                    err(teacher, dataclasses.replace(cfg, cfm=lin), n_timesteps=2, cfg_rate=0.0))
    student_cfg = obj.cfg
    before = {n: err(params["student"], student_cfg, n_timesteps=n) for n in (1, 2)}
    r = np.random.default_rng(seed)
    t0, losses = time.time(), []
    for i in range(steps):
        params, opt, loss = step(params, opt, batch(r, cfg, batch_size, tokens, mel_offset), jax.random.key(i))
        losses.append(float(loss))
        if (i + 1) % max(1, steps // 5) == 0:
            log(f"[distill {method}] step {i + 1}/{steps} loss {np.mean(losses[-20:]):.4f} "
                f"({time.time() - t0:.0f} s)")
    after = {n: err(params["student"], student_cfg, n_timesteps=n) for n in (1, 2)}
    out = {"method": method, "steps": steps, "lr": lr, "grid_ratio": grid_ratio, "teacher_couplings": couplings, "batch": batch_size, "eval_utterances": n_eval,
           "mel_offset": mel_offset,
           "teacher_1pass": teacher_1, "teacher_2pass": teacher_2,
           "student_init_1pass": before[1], "student_init_2pass": before[2],
           "student_1pass": after[1], "student_2pass": after[2], "train_s": time.time() - t0,
           "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}
    return {"result": out, "student": params["student"], "student_cfg": student_cfg}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="reflow", choices=("guidance", "meanflow", "reflow"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--couplings", action="store_true", help="meanflow: interpolate towards the teacher's output")
    ap.add_argument("--grid-ratio", type=float, default=0.5, help="rows drawn on the 1-/2-step grids")
    ap.add_argument("--out", type=Path, default=Path("runs/distill_tiny"))
    ap.add_argument("--mel-offset", type=float, default=0.0,
                    help="added to the random training/eval mel (-5: the log-mel range of flow_study's utterances)")
    ap.add_argument("--release", type=Path, help="teacher: this release directory's flow.pt")
    ap.add_argument("--export", type=Path, help="write the student as a release directory (needs --release)")
    a = ap.parse_args(argv)
    if a.export is not None and a.release is None:
        ap.error("--export copies the --release directory; give --release too")
    if a.export is not None and a.export.exists():
        ap.error(f"--export {a.export} exists; choose a new directory (nothing is overwritten)")
    teacher = None if a.release is None else release_teacher(a.release)
    done = run(a.method, a.steps, a.lr, n_eval=a.eval, seed=a.seed, grid_ratio=a.grid_ratio, couplings=a.couplings,
               teacher=teacher, mel_offset=a.mel_offset)
    res = done["result"]
    if a.export is not None:
        from cosyvoice2_jax.train.distill import export_student

        export_student(done["student"], done["student_cfg"], a.release, a.export)
        res["export"] = str(a.export)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=2))
    print("| passes | teacher (same passes) | student before | student after |")
    print("|---|---|---|---|")
    for n in (1, 2):
        print(f"| {n} | {res[f'teacher_{n}pass']:.4f} | {res[f'student_init_{n}pass']:.4f} | {res[f'student_{n}pass']:.4f} |")


if __name__ == "__main__":
    main()
