"""``python -m cosyvoice2_jax.whisper OUT_DIR [--seed N]``: write a tiny random Whisper HF directory
(for trying the evaluation harness on a tiny release; its transcripts are meaningless)."""
import argparse
import sys
from pathlib import Path

from .params import save_random_hf_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.out_dir.exists() and any(a.out_dir.iterdir()):
        sys.exit(f"error: {a.out_dir} is not empty; choose a new folder")
    print(save_random_hf_dir(a.out_dir, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
