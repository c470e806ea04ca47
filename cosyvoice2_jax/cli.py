"""``cosyvoice2-jax``: command-line entry point.

Subcommands:
  synth      synthesise speech from a release (or converted) directory: all five modes, streaming
  convert    convert the official release directory to our Orbax checkpoint directory
  export     write the official release layout back from a converted directory
  config     print the resolved model config (preset or YAML, plus ``--set`` overrides)
  features   compute the front-end features of a wav (flow mel, whisper mel, CAM++ fbank)
  normalize  normalise and split text the way synthesis does
  train      train the LM / flow / HiFT-GAN / DPO objective (configs/train/*.yaml)
  eval       WER/CER (Whisper) and speaker similarity on a Seed-TTS-eval list (cosyvoice2_jax/evaluation.py)

User errors (bad file, bad option, bad config key) print one line ``error: ...`` and exit 2,
before any model loads wherever the input alone decides it (README "Bad input" table). Input
that works but will likely sound wrong prints ``warning: ...`` lines (:class:`InputWarning`).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .errors import CosyVoiceError, InputWarning

DESCRIPTION = """\
cosyvoice2-jax: CosyVoice 2 text-to-speech in JAX (CPU, GPU, TPU).

Examples (cosyvoice2_jax/data/prompt_en.wav is the prompt shipped with the package):
  cosyvoice2-jax synth --model-dir pretrained_models/CosyVoice2-0.5B --mode zero_shot \
      --text "Hello, nice to meet you." --prompt-wav cosyvoice2_jax/data/prompt_en.wav \
      --prompt-text "The quick brown fox jumps over the lazy dog." --out hello.wav
  cosyvoice2-jax synth --model-dir DIR --mode cross_lingual --text-file lines.txt \
      --prompt-wav cosyvoice2_jax/data/prompt_en.wav --out outdir/
  cosyvoice2-jax convert pretrained_models/CosyVoice2-0.5B converted/
  cosyvoice2-jax config --preset cosyvoice2 --set flow.cfm.inference_cfg_rate=0.5
  cosyvoice2-jax features cosyvoice2_jax/data/prompt_en.wav --out prompt_features.npz
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

    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)  # multi-process only
    from .train.run import run  # after initialize: importing the models may touch the backend (jnp constants)

    out = run(args.config, args.overrides, progress=not args.no_progress)
    hist = [h for h in out["history"] if h.get("split") == "train"]
    if hist and jax_process_index() == 0:
        print(f"step {hist[-1]['step']}: loss {hist[-1]['loss']:.4f} ({out['steps_per_s']:.2f} steps/s)")
    return 0


MODES = ("zero_shot", "cross_lingual", "instruct2", "sft", "vc")


def _read_text_file(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines of a UTF-8 file (a byte-order mark is accepted)."""
    from .errors import ConfigError
    from .frontend.text import is_blank

    if not path.is_file():
        raise ConfigError(f"--text-file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"--text-file {path} is not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                          f"(line {line}) cannot be decoded; re-save the file as UTF-8 "
                          "(e.g. iconv -f GBK -t UTF-8 in.txt > out.txt)") from None
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines()) if not is_blank(ln)]
    if not lines:
        raise ConfigError(f"--text-file {path} has no non-empty lines")
    return lines


def _check_synth_args(args) -> list[tuple[int, str]]:
    """Mode requirements, text, speed and input audio, checked before the (slow) model load.
    Returns ``(line number, text)`` pairs (line 1 for --text); loaded prompts are kept on ``args``."""
    from .errors import ConfigError
    from .frontend.text import is_blank
    from .pipeline.frontend import prompt_audio

    need = {"zero_shot": ("prompt_wav|spk_id", "prompt_text|spk_id"), "cross_lingual": ("prompt_wav|spk_id",),
            "instruct2": ("prompt_wav|spk_id", "instruct_text"), "sft": ("spk_id",), "vc": ("source_wav", "prompt_wav")}
    for req in need[args.mode]:
        if not any(getattr(args, k) for k in req.split("|")):
            flags = " or ".join("--" + k.replace("_", "-") for k in req.split("|"))
            raise ConfigError(f"--mode {args.mode} needs {flags}")
    if getattr(args, "speaker_tag", None) is not None and args.mode not in ("sft", "zero_shot"):
        raise ConfigError(f"--speaker-tag applies to --mode sft and zero_shot, not {args.mode}")
    if args.mode != "vc":
        if (args.text is None) == (args.text_file is None):
            raise ConfigError(f"--mode {args.mode} needs exactly one of --text or --text-file")
        if args.text_file is not None:
            texts = _read_text_file(args.text_file)
        else:
            if is_blank(args.text):
                raise ConfigError("--text is empty (or only whitespace / zero-width characters); give the sentence "
                                  "to synthesise")
            texts = [(1, args.text)]
    else:
        texts = [(1, "")]
    if not math.isfinite(args.speed) or args.speed <= 0:
        raise ConfigError(f"--speed must be a finite number > 0 (1.0 = normal rate), got {args.speed}")
    if args.stream and args.speed != 1.0:
        raise ConfigError("--speed only works without --stream (as the official)")
    from .flow import sampling

    sampling.sampler_from_args(args)  # bad --flow-* values fail here, before the model load
    # load once here (one-line AudioError if unreadable, too long, too low a rate); reused for synthesis
    args.prompt_audio = prompt_audio(args.prompt_wav) if args.prompt_wav else None
    args.source_audio = prompt_audio(args.source_wav, "source") if args.source_wav else None
    return texts


def _probe_writable(path: Path) -> None:
    """Create (and remove) ``<path>.partial`` so an unwritable --out fails now, not after the model ran."""
    from .errors import ConfigError

    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb"):
            pass
        tmp.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}; choose an --out in a writable folder") from None


def _outputs(args, texts: list[tuple[int, str]]) -> list[Path]:
    """Output paths: --out itself, or ``<out>/<line number>.wav`` with --text-file (line 3 -> 0003.wav;
    blank lines make no file). Existing files are refused without --overwrite; the folder must be writable."""
    from .errors import ConfigError

    out = Path(args.out)
    if args.text_file is not None:
        if out.suffix.lower() == ".wav":
            raise ConfigError("with --text-file, --out is a directory (one <line number>.wav per non-empty line)")
        paths = [out / f"{n:04d}.wav" for n, _ in texts]
    else:
        paths = [out]
    clash = [str(p) for p in paths if p.exists()]
    if clash and not args.overwrite:
        raise ConfigError(f"{clash[0]} exists" + (f" (and {len(clash) - 1} more)" if len(clash) > 1 else "")
                          + "; pass --overwrite to replace")
    for p in paths:
        if p.is_dir():
            raise ConfigError(f"--out {p} is a directory; give a .wav file name")
    _probe_writable(paths[0])
    return paths


def enable_compilation_cache(path: Path | None = None) -> None:
    """JAX's persistent compilation cache in ``path`` (default ``<cache root>/xla``) for *every*
    program: no minimum compile time or size (the default 1 s minimum left the many sub-second
    programs of a tiny model, and the small eager ones, to be recompiled by every process); and the
    traced (exported) programs of the model's entry points in ``<path>-programs``
    (:mod:`cosyvoice2_jax.aot`), so a later process skips tracing and lowering the model code."""
    import jax

    from .pipeline.loading import cache_root

    from . import aot

    path = Path(path or cache_root() / "xla")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    aot.enable(path.parent / (path.name + "-programs"))  # traced programs too: a new process skips tracing


def cmd_synth(args) -> int:
    import time

    import numpy as np
    import soundfile as sf

    from .pipeline.loading import is_converted
    from .pipeline.release import check_release_dir

    if not args.no_cache:  # compiled programs persist too: the second run skips XLA compilation
        enable_compilation_cache()  # first: checking the --flow-* sampler already runs small programs
    texts = _check_synth_args(args)
    paths = _outputs(args, texts)
    if not is_converted(args.model_dir):
        check_release_dir(args.model_dir)
    from .pipeline.model import CosyVoice2

    t0 = time.perf_counter()
    from .flow import sampling

    tts = CosyVoice2.from_pretrained(args.model_dir, cache=not args.no_cache,
                                     sampling="greedy" if args.greedy else "ras", seed=args.seed,
                                     quant=args.int8)
    if sampling.cli_given(args):  # --flow-* flags over the config's sampler (flow.sampler, else flow.cfm's)
        tts.flow_sampler = sampling.sampler_from_args(args, tts.config.flow)
    print(f"loaded {args.model_dir} in {time.perf_counter() - t0:.1f} s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in tts.loaded.timings.items())})", file=sys.stderr)
    from tqdm import tqdm

    prompt, source = args.prompt_audio, args.source_audio
    tf = not args.no_text_frontend
    for (_, text), path in tqdm(list(zip(texts, paths)), disable=len(texts) < 2 or args.quiet, unit="line"):
        kw = dict(stream=args.stream, speed=args.speed)
        if args.mode == "zero_shot":
            gen = tts.inference_zero_shot(text, args.prompt_text or "", prompt, args.spk_id or "", text_frontend=tf,
                                          speaker_tag=args.speaker_tag, **kw)
        elif args.mode == "cross_lingual":
            gen = tts.inference_cross_lingual(text, prompt, args.spk_id or "", text_frontend=tf, **kw)
        elif args.mode == "instruct2":
            gen = tts.inference_instruct2(text, args.instruct_text, prompt, args.spk_id or "", text_frontend=tf, **kw)
        elif args.mode == "sft":
            gen = tts.inference_sft(text, args.spk_id, text_frontend=tf, speaker_tag=args.speaker_tag, **kw)
        else:
            gen = tts.inference_vc(source, prompt, **kw)
        # per-segment progress for one long --text (a --text-file shows per-line progress instead)
        n_seg = len(tts.text.normalize(text, split=True, text_frontend=tf)) if args.mode != "vc" else 1
        bar = tqdm(total=None if args.stream else n_seg, unit="chunk" if args.stream else "segment",
                   disable=args.quiet or len(texts) > 1 or (n_seg < 2 and not args.stream))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        t1, first, n = time.perf_counter(), None, 0
        try:
            with bar, sf.SoundFile(str(tmp), "w", samplerate=tts.sample_rate, channels=1, subtype="PCM_16",
                                   format="WAV") as f:
                for out in gen:
                    if first is None:
                        first = time.perf_counter() - t1
                    a = np.asarray(out["tts_speech"]).reshape(-1)
                    f.write(a)
                    n += a.shape[0]
                    bar.update(1)
            tmp.replace(path)
        except BaseException:  # failure or Ctrl-C: no truncated file under any name
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
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


def cmd_serve(args) -> int:
    from .pipeline.loading import is_converted
    from .pipeline.release import check_release_dir

    if not is_converted(args.model_dir):
        check_release_dir(args.model_dir)
    if args.lm_cache <= 0 or args.lm_cache % 512:
        raise CosyVoiceError(f"--lm-cache {args.lm_cache}: give a positive multiple of 512 (e.g. 2048)")
    for name in ("slots", "max_queue", "max_streams"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CosyVoiceError(f"--{name.replace('_', '-')} {v}: give a positive number")
    if not (args.timeout > 0 and args.stream_memory_mb > 0 and args.stream_wait >= 0):
        raise CosyVoiceError("--timeout and --stream-memory-mb must be positive, --stream-wait >= 0")
    try:
        from .serve import serve
        import fastapi  # noqa: F401
    except ImportError as e:
        raise CosyVoiceError(f"the server needs the serve extra ({e.name} is missing): pip install -e '.[serve]'")
    if not args.no_cache:
        enable_compilation_cache(args.xla_cache)
    from .config import StreamingConfig

    streaming = StreamingConfig(stream_scale_factor=args.stream_hop_growth, flow_cache_dtype=args.stream_cache_dtype)
    engine_kw = dict(rows=args.slots, cache_slots=args.lm_cache, max_queue=args.max_queue, timeout_s=args.timeout,
                     stream_budget_bytes=int(args.stream_memory_mb * 2**20), max_streams=args.max_streams,
                     stream_wait_s=args.stream_wait)
    serve(args.model_dir, host=args.host, port=args.port, voices_dir=args.voices_dir,
          sampling="greedy" if args.greedy else "ras", quant=args.int8, streaming=streaming, engine_kw=engine_kw,
          warmup=not args.no_warmup, max_input_chars=args.max_input_chars, cache=not args.no_cache,
          log_level=args.log_level, warmup_text=args.warmup_text, bistream_max_tokens=args.bistream_max_tokens,
          warmup_batches=tuple(args.warmup_batches), warmup_stream=not args.no_warmup_stream)
    return 0


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the speech server (OpenAI-compatible HTTP, WebSocket bistream)",
                       description="Serve a release or converted directory over HTTP (needs the serve extra). "
                                   "POST /v1/audio/speech, /v1/audio/voices, WS /v1/audio/speech/stream, "
                                   "/healthz, /metrics; see README 'Speech server'.")
    p.add_argument("--model-dir", type=Path, required=True, help="release or converted directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--voices-dir", type=Path,
                   help="where registered voices persist (default ~/.cache/cosyvoice2_jax/voices/<model>)")
    p.add_argument("--slots", type=int, default=8, help="LM requests decoded together (default 8)")
    p.add_argument("--lm-cache", type=int, default=2048,
                   help="KV-cache positions per slot, a multiple of 512 (default 2048)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait for a slot before 429")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    p.add_argument("--stream-memory-mb", type=float, default=4096.0,
                   help="memory budget of the streaming flow caches, each stream counted at its worst case; "
                        "streams past it wait (default 4096)")
    p.add_argument("--max-streams", type=int, help="concurrent streams (overrides --stream-memory-mb)")
    p.add_argument("--stream-wait", type=float, default=60.0,
                   help="seconds a stream may wait for the memory budget before a 429 (default 60)")
    p.add_argument("--stream-cache-dtype", choices=["float32", "bfloat16"],
                   help="streaming flow attention caches (bfloat16: half the memory; default the flow's dtype)")
    p.add_argument("--stream-hop-growth", type=int, default=2,
                   help="streaming hop growth factor (official HEAD 2; 1 = fixed 25-token hops)")
    p.add_argument("--max-input-chars", type=int, default=4096, help="longest accepted input text")
    p.add_argument("--bistream-max-tokens", type=int, default=1500,
                   help="cap on the speech tokens of one WebSocket bistream (default 1500 = 60 s of audio)")
    p.add_argument("--greedy", action="store_true", help="greedy LM decoding instead of RAS sampling")
    p.add_argument("--int8", action="store_true", help="int8 LM decode (faster on CPU)")
    p.add_argument("--no-warmup", action="store_true", help="ready at once (the first requests compile)")
    p.add_argument("--warmup-text", default="Hi there.", help="text whose shapes the warm-up compiles")
    p.add_argument("--warmup-batches", type=int, nargs="+", default=[1], metavar="B",
                   help="token2wav batch sizes (powers of two <= --slots) compiled before ready; others on first use")
    p.add_argument("--no-warmup-stream", action="store_true", help="do not compile the streaming shapes at warm-up")
    p.add_argument("--xla-cache", type=Path, help="persistent XLA compilation cache (default in the cache dir)")
    p.add_argument("--no-cache", action="store_true", help="no converted-model or compilation cache")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser. ``command``: the subcommand about to run (``main`` peeks at argv) - other
    subcommands then leave out the options whose definitions import JAX (the synth flow-sampler
    flags), so ``--help``, ``config`` and ``normalize`` start without importing JAX."""
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
    p.add_argument("--text-file", type=Path,
                   help="UTF-8 file, one text per line; --out is then a directory with one <line number>.wav per "
                        "non-empty line (line 3 -> 0003.wav; blank lines make no file)")
    p.add_argument("--prompt-wav", help="prompt speech file (16 kHz or more, any channels; 3-10 s of clean speech; "
                                        "over 15 s warns, over 30 s is refused)")
    p.add_argument("--prompt-text", help="transcript of --prompt-wav (zero_shot)")
    p.add_argument("--instruct-text", help="instruction (instruct2)")
    p.add_argument("--spk-id", help="speaker id (sft; or a saved zero-shot speaker)")
    p.add_argument("--speaker-tag", help="sft/zero_shot with an mSFT model (configs/train/msft.yaml): LM prefix "
                                         "'Speaker <tag><|endofprompt|>' ('' = unknown)")
    p.add_argument("--source-wav", help="speech to convert (vc)")
    p.add_argument("--stream", action="store_true", help="stream: write audio chunks as they are produced")
    p.add_argument("--speed", type=float, default=1.0, help="speaking rate > 0 (non-streaming only; default 1.0)")
    p.add_argument("--out", type=Path, required=True,
                   help="output .wav (or a directory with --text-file); written as <out>.partial and renamed "
                        "when complete")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--greedy", action="store_true", help="greedy LM decoding instead of RAS sampling")
    p.add_argument("--int8", action="store_true", help="int8 LM decode (faster on CPU)")
    p.add_argument("--no-text-frontend", action="store_true", help="skip text normalisation")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the caches (converted model, compiled XLA programs)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    if command in (None, "synth"):
        from .flow.sampling import add_cli_arguments  # imports jax

        add_cli_arguments(p)
    p.set_defaults(func=cmd_synth)

    _serve_parser(sub)

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

    p = sub.add_parser("train", help="train from a training YAML (LM, flow, HiFT-GAN, DPO, token ASR, ASR reward, mSFT)",
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

    p = sub.add_parser("eval", help="WER/CER and speaker similarity on a Seed-TTS-eval list",
                       description="Synthesise a Seed-TTS-eval meta.lst (utt|prompt_text|prompt_wav|target_text) and "
                                   "score it: WER/CER by Whisper (JAX), speaker similarity by CAM++. Writes "
                                   "OUT/results.csv and OUT/summary.json.")
    from .evaluation import add_arguments as _eval_arguments

    _eval_arguments(p)
    p.set_defaults(func=cmd_eval)
    return parser


def cmd_eval(args) -> int:
    import json

    from .evaluation import run_cli

    summary = run_cli(args)
    print(json.dumps({k: v for k, v in summary.items() if k in ("n", "wer", "wer_corpus", "sim")}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, InputWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    try:
        return args.func(args)
    except CosyVoiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
