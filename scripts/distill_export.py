"""Export a distilled flow student (an ``objective: distill`` training run) as a release directory.

    python scripts/distill_export.py --config configs/train/distill_meanflow.yaml \\
        --set train.workdir=runs/distill_meanflow --release CosyVoice2-0.5B --out CosyVoice2-0.5B-meanflow

Restores the student from the run's latest Orbax checkpoint (``--step`` for another), copies the
release directory ``--release`` to ``--out`` (which must not exist) with ``flow.pt`` replaced by the
student (``flow.to_release``: the official keys plus the documented ``time_mlp_*`` / ``student.*``
keys, see ``cosyvoice2_jax/flow/params.py``). The pipeline and ``cosyvoice2-jax synth --model-dir
OUT`` read the student's settings from that file and run its 1-2 step, single-pass sampler.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None):
    from cosyvoice2_jax.errors import ConfigError
    from cosyvoice2_jax.train import run as R
    from cosyvoice2_jax.train.distill import export_student, restore_student

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path, help="the distill training YAML of the run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the run's overrides")
    ap.add_argument("--release", required=True, type=Path, help="release directory to copy (the teacher's)")
    ap.add_argument("--out", required=True, type=Path, help="new release directory (must not exist)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    a = ap.parse_args(argv)
    tf = R.load_train_file(a.config, a.set)
    if tf.objective != "distill":
        raise ConfigError(f"{a.config}: objective is {tf.objective!r}, not distill")
    obj = R.build_objective(tf, R.model_config(tf))
    student = restore_student(tf.train.workdir, obj, tf.train.optim, a.step)
    out = export_student(student, obj.cfg, a.release, a.out)
    print(f"wrote {out} (flow.pt: {tf.distill.method} student, {obj.cfg.cfm.n_timesteps} steps, one pass each)")


if __name__ == "__main__":
    main()
