#!/usr/bin/env python3
"""Extract S3Tokenizer v2 speech tokens for training data, batched (JAX).

Same output as the official ``tools/extract_speech_token.py`` (which runs the ONNX model one
utterance at a time): ``utt2speech_token.pt``, a ``torch.save`` dict ``utt -> list[int]`` that
``tools/make_parquet_list.py`` reads, written when torch is importable; and always the torch-free
``utt2speech_token.npz`` (one int32 array per utterance id).

Differences from the official tool: utterances are batched (grouped by length buckets), and
audio longer than 30 s is tokenized in 30 s windows with 4 s overlap (s3tokenizer 0.3.0's
scheme) instead of being skipped with an empty token list.

Input: ``--dir DATA`` with a Kaldi ``wav.scp`` (``utt path`` per line), or ``--wav-dir FOLDER``
(every audio file; utt id = file name without extension). Output goes to ``--out`` (default: the
data dir, as the official tool).

Weights: ``--model-dir`` (a CosyVoice2 release dir: ``speech_tokenizer_v2.onnx``), ``--onnx FILE``,
``--torch-ckpt FILE`` (an ``S3TokenizerV2`` state dict) or ``--random-init SEED`` (smoke tests and
benchmarks only).

    python scripts/extract_speech_tokens.py --wav-dir my_wavs --out /tmp/tok --random-init 0
    python scripts/extract_speech_tokens.py --dir data/train --model-dir pretrained_models/CosyVoice2-0.5B

Prints a JSON summary (utterances/s; with ``--bench`` of a second, already compiled pass).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))



def read_wav_list(args) -> list[tuple[str, str]]:
    from cosyvoice2_jax.errors import CosyVoiceError
    from cosyvoice2_jax.frontend.datalist import read_wav_list as _read

    try:
        return _read(args.dir, args.wav_dir, args.repeat)
    except CosyVoiceError as e:
        sys.exit(f"error: {e}")


def load_params(args, config):
    from cosyvoice2_jax.tokenizer import params as tparams

    if args.random_init is not None:
        import jax
        import jax.numpy as jnp

        from cosyvoice2_jax.tokenizer.modeling import S3TokenizerV2

        mel = jnp.zeros((1, 16, config.n_mels))
        return S3TokenizerV2(config).init(jax.random.PRNGKey(args.random_init), mel, jnp.array([16]))["params"]
    if args.torch_ckpt:
        from cosyvoice2_jax.params_util import load_torch_checkpoint

        return tparams.from_torch_state_dict(load_torch_checkpoint(args.torch_ckpt), config)
    path = Path(args.onnx) if args.onnx else Path(args.model_dir) / "speech_tokenizer_v2.onnx"
    return tparams.from_onnx(path, config)


def save_outputs(out_dir: Path, name: str, mapping: dict, as_list) -> list[str]:
    from cosyvoice2_jax.frontend.datalist import save_mapping

    return save_mapping(out_dir, name, mapping, as_list)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", help="data dir with wav.scp")
    src.add_argument("--wav-dir", help="folder of audio files")
    w = ap.add_mutually_exclusive_group(required=True)
    w.add_argument("--model-dir")
    w.add_argument("--onnx")
    w.add_argument("--torch-ckpt")
    w.add_argument("--random-init", type=int, metavar="SEED")
    ap.add_argument("--out", help="output dir (default: --dir)")
    ap.add_argument("--batch-size", type=int, default=16, help="utterances per model call (1 = one at a time)")
    ap.add_argument("--frame-bucket", type=int, default=500, help="mel frames are padded to a multiple of this")
    ap.add_argument("--repeat", type=int, default=1, help="benchmark: list every utterance N times")
    ap.add_argument("--bench", action="store_true", help="benchmark: time a second, warm (compiled) pass")
    args = ap.parse_args(argv)
    if args.out is None and args.dir is None:
        ap.error("--out is required with --wav-dir")

    from tqdm import tqdm

    from cosyvoice2_jax.config import SpeechTokenizerConfig
    from cosyvoice2_jax.frontend.audio import load_wav, whisper_log_mel
    from cosyvoice2_jax.tokenizer.modeling import SpeechTokenizer

    items = read_wav_list(args)
    config = SpeechTokenizerConfig()
    tok = SpeechTokenizer(load_params(args, config), config, frame_bucket=args.frame_bucket,
                          max_batch=args.batch_size)

    def run_pass(desc):
        """One pass over all utterances in chunks of ``8 * batch_size`` (grouped by length inside)."""
        out, t_feat, t_model, audio_s = {}, 0.0, 0.0, 0.0
        chunk_size = 8 * args.batch_size
        t0 = time.perf_counter()
        with tqdm(total=len(items), unit="utt", desc=desc) as bar:
            for s in range(0, len(items), chunk_size):
                chunk = items[s:s + chunk_size]
                t = time.perf_counter()
                wavs = [load_wav(p, 16000) for _, p in chunk]
                mels = [whisper_log_mel(x) for x in wavs]
                t_feat += time.perf_counter() - t
                audio_s += sum(len(x) for x in wavs) / 16000
                t = time.perf_counter()
                toks = tok.tokenize(mels)
                t_model += time.perf_counter() - t
                for (u, _), ids in zip(chunk, toks):
                    out[u] = ids
                bar.update(len(chunk))
        return out, time.perf_counter() - t0, t_feat, t_model, audio_s

    if args.bench:  # a first pass compiles every shape; the timed pass below is warm
        run_pass("warm-up")
    utt2token, wall, t_feat, t_model, audio_s = run_pass("speech tokens")
    out_dir = Path(args.out or args.dir)
    written = save_outputs(out_dir, "utt2speech_token", utt2token, lambda v: [int(i) for i in v])
    print(json.dumps({
        "utterances": len(items), "audio_seconds": round(audio_s, 2), "batch_size": args.batch_size,
        "wall_s": round(wall, 3), "features_s": round(t_feat, 3), "model_s": round(t_model, 3),
        "compiled_programs": tok.compiled_programs(),
        "utt_per_s": round(len(items) / wall, 3),
        "warm": bool(args.bench), "utt_per_s_model": round(len(items) / t_model, 3),
        "tokens": int(sum(len(v) for v in utt2token.values())), "written": written}))


if __name__ == "__main__":
    main()
