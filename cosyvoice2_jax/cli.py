"""``cosyvoice2-jax``: command-line entry point.

Subcommands:
  synth      synthesise speech from a release (or converted) directory: all five modes, streaming
  convert    convert the official release directory to our Orbax checkpoint directory
  export     write the official release layout back from a converted directory
  config     print the resolved model config (preset or YAML, plus ``--set`` overrides)
  features   compute the front-end features of a wav (flow mel, whisper mel, CAM++ fbank)
  normalize  normalise and split text the way synthesis does
  train      train the LM / flow / HiFT-GAN / DPO objective (configs/train/*.yaml)

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
  cosyvoice2-jax synth --model-dir pretrained_models/CosyVoice2-0.5B --mode zero_shot \
      --text "Hello, nice to meet you." --prompt-wav prompt.wav --prompt-text "transcript of prompt.wav" \
      --out hello.wav
  cosyvoice2-jax synth --model-dir DIR --mode cross_lingual --text-file lines.txt --prompt-wav prompt.wav --out outdir/
  cosyvoice2-jax convert pretrained_models/CosyVoice2-0.5B converted/
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


def jax_process_index() -> int:
    import jax

    return jax.process_index()


def cmd_train(args) -> int:
    from .train.distributed import initialize
    from .train.run import run

    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)  # multi-process only
    out = run(args.config, args.overrides, progress=not args.no_progress)
    hist = [h for h in out["history"] if h.get("split") == "train"]
    if hist and jax_process_index() == 0:
        print(f"step {hist[-1]['step']}: loss {hist[-1]['loss']:.4f} ({out['steps_per_s']:.2f} steps/s)")
    return 0


MODES = ("zero_shot", "cross_lingual", "instruct2", "sft", "vc")


def _check_synth_args(args) -> list[str]:
    """Mode requirements and input files, checked before the (slow) model load."""
    from .errors import ConfigError
    from .frontend.audio import load_wav

    need = {"zero_shot": ("prompt_wav|spk_id", "prompt_text|spk_id"), "cross_lingual": ("prompt_wav|spk_id",),
            "instruct2": ("prompt_wav|spk_id", "instruct_text"), "sft": ("spk_id",), "vc": ("source_wav", "prompt_wav")}
    for req in need[args.mode]:
        if not any(getattr(args, k) for k in req.split("|")):
            flags = " or ".join("--" + k.replace("_", "-") for k in req.split("|"))
            raise ConfigError(f"--mode {args.mode} needs {flags}")
    texts: list[str] = []
    if args.mode != "vc":
        if (args.text is None) == (args.text_file is None):
            raise ConfigError(f"--mode {args.mode} needs exactly one of --text or --text-file")
        if args.text_file is not None:
            if not args.text_file.is_file():
                raise ConfigError(f"--text-file {args.text_file} not found")
            texts = [ln.strip() for ln in args.text_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if not texts:
                raise ConfigError(f"--text-file {args.text_file} has no non-empty lines")
        else:
            if not args.text.strip():
                raise ConfigError("--text is empty; give the sentence to synthesise")
            texts = [args.text]
    else:
        texts = [""]
    for k in ("prompt_wav", "source_wav"):
        if getattr(args, k):
            load_wav(getattr(args, k), 16000)  # raises a one-line AudioError if unreadable
    if args.speed <= 0:
        raise ConfigError(f"--speed must be > 0, got {args.speed}")
    if args.stream and args.speed != 1.0:
        raise ConfigError("--speed only works without --stream (as the official)")
    return texts


def _outputs(args, n: int) -> list[Path]:
    from .errors import ConfigError

    out = Path(args.out)
    if args.text_file is not None:
        if out.suffix.lower() == ".wav":
            raise ConfigError("with --text-file, --out is a directory (one <line>.wav per line)")
        paths = [out / f"{i + 1:04d}.wav" for i in range(n)]
    else:
        paths = [out]
    clash = [str(p) for p in paths if p.exists()]
    if clash and not args.overwrite:
        raise ConfigError(f"{clash[0]} exists" + (f" (and {len(clash) - 1} more)" if len(clash) > 1 else "")
                          + "; pass --overwrite to replace")
    return paths


def cmd_synth(args) -> int:
    import time

    import numpy as np
    import soundfile as sf

    from .pipeline.loading import is_converted
    from .pipeline.release import check_release_dir

    texts = _check_synth_args(args)
    paths = _outputs(args, len(texts))
    if not is_converted(args.model_dir):
        check_release_dir(args.model_dir)
    if not args.no_cache:  # compiled programs persist too: the second run skips XLA compilation
        import jax

        from .pipeline.loading import cache_root

        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from .pipeline.model import CosyVoice2

    t0 = time.perf_counter()
    tts = CosyVoice2.from_pretrained(args.model_dir, cache=not args.no_cache,
                                     sampling="greedy" if args.greedy else "ras", seed=args.seed,
                                     quant=args.int8)
    print(f"loaded {args.model_dir} in {time.perf_counter() - t0:.1f} s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in tts.loaded.timings.items())})", file=sys.stderr)
    from tqdm import tqdm

    for text, path in tqdm(list(zip(texts, paths)), disable=len(texts) < 2 or args.quiet, unit="line"):
        kw = dict(stream=args.stream, speed=args.speed)
        if args.mode == "zero_shot":
            gen = tts.inference_zero_shot(text, args.prompt_text or "", args.prompt_wav, args.spk_id or "",
                                          text_frontend=not args.no_text_frontend, **kw)
        elif args.mode == "cross_lingual":
            gen = tts.inference_cross_lingual(text, args.prompt_wav, args.spk_id or "",
                                              text_frontend=not args.no_text_frontend, **kw)
        elif args.mode == "instruct2":
            gen = tts.inference_instruct2(text, args.instruct_text, args.prompt_wav, args.spk_id or "",
                                          text_frontend=not args.no_text_frontend, **kw)
        elif args.mode == "sft":
            gen = tts.inference_sft(text, args.spk_id, text_frontend=not args.no_text_frontend, **kw)
        else:
            gen = tts.inference_vc(args.source_wav, args.prompt_wav, **kw)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        t1, first, n = time.perf_counter(), None, 0
        with sf.SoundFile(str(tmp), "w", samplerate=tts.sample_rate, channels=1, subtype="PCM_16", format="WAV") as f:
            for out in gen:
                if first is None:
                    first = time.perf_counter() - t1
                a = np.asarray(out["tts_speech"]).reshape(-1)
                f.write(a)
                n += a.shape[0]
        tmp.replace(path)
        dur = n / tts.sample_rate
        took = time.perf_counter() - t1
        if not args.quiet:
            print(f"wrote {path}: {dur:.2f} s of audio in {took:.1f} s (RTF {took / max(dur, 1e-9):.2f}"
                  + (f", first chunk after {first:.2f} s" if args.stream else "") + ")", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from .pipeline.loading import convert_release

    out = convert_release(args.model_dir, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from .pipeline.loading import export_release, is_converted

    if not is_converted(args.checkpoint):
        raise CosyVoiceError(f"{args.checkpoint} is not a converted directory (no cosyvoice2_jax.json); "
                             "make one with `cosyvoice2-jax convert`")
    out = export_release(args.checkpoint, args.out, onnx_from=args.onnx_from, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyvoice2-jax", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("synth", help="synthesise speech (zero_shot, cross_lingual, instruct2, sft, vc)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Synthesise speech with a CosyVoice2-0.5B release directory (the official download, "
                                   "or one made by scripts/make_random_release.py) or a converted directory.\n"
                                   "The first load converts the release and caches it (~/.cache/cosyvoice2_jax); "
                                   "later loads are fast.\n\n"
                                   "modes and what they need:\n"
                                   "  zero_shot      --prompt-wav + --prompt-text (its transcript): clone the voice\n"
                                   "  cross_lingual  --prompt-wav: the prompt voice speaks --text (any language)\n"
                                   "  instruct2      --prompt-wav + --instruct-text (e.g. 'Speak slowly.')\n"
                                   "  sft            --spk-id: a built-in speaker of spk2info.pt\n"
                                   "  vc             --source-wav + --prompt-wav: voice conversion (no text)")
    p.add_argument("--model-dir", type=Path, required=True, help="release or converted directory")
    p.add_argument("--mode", choices=MODES, default="zero_shot", help="synthesis mode (default zero_shot)")
    p.add_argument("--text", help="text to speak")
    p.add_argument("--text-file", type=Path, help="UTF-8 file, one text per line; --out is then a directory")
    p.add_argument("--prompt-wav", help="prompt speech (any rate; 3-10 s of clean speech)")
    p.add_argument("--prompt-text", help="transcript of --prompt-wav (zero_shot)")
    p.add_argument("--instruct-text", help="instruction (instruct2)")
    p.add_argument("--spk-id", help="speaker id (sft; or a saved zero-shot speaker)")
    p.add_argument("--source-wav", help="speech to convert (vc)")
    p.add_argument("--stream", action="store_true", help="stream: write audio chunks as they are produced")
    p.add_argument("--speed", type=float, default=1.0, help="speaking rate (non-streaming only; default 1.0)")
    p.add_argument("--out", type=Path, required=True, help="output .wav (or a directory with --text-file)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--greedy", action="store_true", help="greedy LM decoding instead of RAS sampling")
    p.add_argument("--int8", action="store_true", help="int8 LM decode (faster on CPU)")
    p.add_argument("--no-text-frontend", action="store_true", help="skip text normalisation")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the caches (converted model, compiled XLA programs)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="convert a release directory to a converted (Orbax) directory")
    p.add_argument("model_dir", type=Path, help="the CosyVoice2-0.5B release directory")
    p.add_argument("out", type=Path, help="output directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write the official release layout from a converted directory")
    p.add_argument("checkpoint", type=Path, help="converted directory")
    p.add_argument("out", type=Path, help="output release directory")
    p.add_argument("--onnx-from", type=Path, help="release directory to copy the two ONNX files from "
                                                  "(default: the one recorded at conversion)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty directory")
    p.set_defaults(func=cmd_export)

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

    p = sub.add_parser("train", help="train the LM, flow, HiFT-GAN or DPO objective from a training YAML",
                       description="Train from a YAML in configs/train/ (its header shows the launch command). "
                                   "Re-running the same command resumes from the latest checkpoint.")
    p.add_argument("--config", type=Path, required=True, help="training YAML, e.g. configs/train/lm.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set train.steps=100 --set data.data_list=... (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-process (pod) runs", "run the same command in every process; on TPU pods "
                             "and SLURM/Open MPI launches these are detected and may be left out")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (jax.distributed coordinator)")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run whose coordinator jax discovers (TPU pod slice, SLURM, Open MPI)")
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
