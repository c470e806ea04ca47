"""``cosyvoice2-jax``: command-line entry point.

Subcommands (more arrive with their components):
  config     print the resolved model config (preset or YAML, plus ``--set`` overrides)
  features   compute the front-end features of a wav (flow mel, whisper mel, CAM++ fbank)
  normalize  normalise and split text the way synthesis does
  train      train the LM / flow / DPO objective (configs/train/*.yaml)

User errors (bad file, bad option, bad config key) print one line ``error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .errors import CosyVoiceError

DESCRIPTION = """\
cosyvoice2-jax: CosyVoice 2 text-to-speech in JAX (CPU, GPU, TPU).

Examples:
  cosyvoice2-jax config --preset cosyvoice2 --set flow.cfm.inference_cfg_rate=0.5
  cosyvoice2-jax features prompt.wav --out prompt_features.npz
  cosyvoice2-jax normalize "今天是2024年。Hello 42 times!" --tokenizer-dir CosyVoice2-0.5B/CosyVoice-BlankEN
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", type=Path, help="YAML config file (see configs/)")
    g.add_argument("--preset", default="cosyvoice2", help="named preset: cosyvoice2 (default) or tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set flow.cfm.inference_cfg_rate=0.5 (repeatable)")


def _load_config(args):
    from .config import PRESETS, ModelConfig, apply_overrides
    from .errors import ConfigError

    if args.config is not None:
        return ModelConfig.from_yaml(args.config, args.overrides)
    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    return apply_overrides(PRESETS[args.preset](), args.overrides)


def cmd_config(args) -> int:
    print(_load_config(args).to_yaml(), end="")
    return 0


def cmd_features(args) -> int:
    import numpy as np

    from .frontend import audio

    wav16 = audio.load_wav(args.wav, 16000)
    wav24 = audio.load_wav(args.wav, 24000)
    feats = {
        "flow_mel_24k": audio.mel_24k(wav24),
        "whisper_log_mel_128": audio.whisper_log_mel(wav16),
        "kaldi_fbank_80": audio.kaldi_fbank(wav16),
    }
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CosyVoiceError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **feats)
    dur = wav16.shape[0] / 16000
    print(f"{args.wav}: {dur:.2f} s")
    for k, v in feats.items():
        print(f"  {k:22s} {tuple(v.shape)}  min {v.min():8.3f}  max {v.max():8.3f}")
    print(f"wrote {out}")
    return 0


def cmd_normalize(args) -> int:
    from .frontend.text import QwenTextTokenizer, TextFrontend

    tok = QwenTextTokenizer.from_dir(args.tokenizer_dir)
    fe = TextFrontend(tok, use_wetext=False if args.no_wetext else None)
    for piece in fe.normalize(args.text):
        print(f"{len(tok.encode(piece)):4d} tokens | {piece}")
    return 0


def cmd_train(args) -> int:
    from .train.run import run

    out = run(args.config, args.overrides, progress=not args.no_progress)
    hist = [h for h in out["history"] if h.get("split") == "train"]
    if hist:
        print(f"step {hist[-1]['step']}: loss {hist[-1]['loss']:.4f} ({out['steps_per_s']:.2f} steps/s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyvoice2-jax", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved model config as YAML")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("features", help="compute front-end features of a wav file")
    p.add_argument("wav", type=Path, help="audio file (wav/flac/ogg, any rate, any channels)")
    p.add_argument("--out", type=Path, required=True, help="output .npz file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("normalize", help="normalise and split text like synthesis does")
    p.add_argument("text")
    p.add_argument("--tokenizer-dir", type=Path, required=True,
                   help="the release's CosyVoice-BlankEN folder (vocab.json + merges.txt)")
    p.add_argument("--no-wetext", action="store_true", help="rules only, even if wetext is installed")
    p.set_defaults(func=cmd_normalize)

    p = sub.add_parser("train", help="train the LM, flow or DPO objective from a training YAML",
                       description="Train from a YAML in configs/train/ (its header shows the launch command). "
                                   "Re-running the same command resumes from the latest checkpoint.")
    p.add_argument("--config", type=Path, required=True, help="training YAML, e.g. configs/train/lm.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set train.steps=100 --set data.data_list=... (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except CosyVoiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
