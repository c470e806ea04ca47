#!/usr/bin/env python3
"""Evaluate a model on a Seed-TTS-eval style list: WER/CER (Whisper, in JAX) and speaker similarity (CAM++).

    python scripts/evaluate.py --list seedtts_testset/en/meta.lst --model-dir CosyVoice2-0.5B \\
        --whisper-dir whisper-large-v3 --out eval/en --lang en

Same as ``cosyvoice2-jax eval``; see :mod:`cosyvoice2_jax.evaluation` for the metrics and
README "Evaluation" for the formats. Writes OUT/results.csv (one row per utterance) and
OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cosyvoice2_jax.errors import CosyVoiceError  # noqa: E402
from cosyvoice2_jax.evaluation import add_arguments, run_cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        summary = run_cli(args)
    except CosyVoiceError as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: v for k, v in summary.items() if k in ("n", "wer", "wer_corpus", "sim")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
