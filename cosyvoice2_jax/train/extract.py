"""Shared driver of the batched data-preparation scripts (speech tokens, speaker embeddings).

``scripts/extract_speech_tokens.py`` and ``scripts/extract_embeddings.py`` differ only in the
feature function, the model and what they save; argument parsing, weight loading and the timed,
chunked pass over the utterances live here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import CosyVoiceError
from ..frontend.audio import load_wav
from .datalist import read_wav_list


def build_parser(description: str, dir_help: str, frame_help: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", help=dir_help)
    src.add_argument("--wav-dir", help="folder of audio files")
    w = ap.add_mutually_exclusive_group(required=True)
    w.add_argument("--model-dir", help="CosyVoice2 release dir (its ONNX file is used)")
    w.add_argument("--onnx", help="the ONNX model file")
    w.add_argument("--torch-ckpt", help="a PyTorch state dict of the model")
    w.add_argument("--random-init", type=int, metavar="SEED", help="random weights (smoke tests, benchmarks)")
    ap.add_argument("--out", help="output dir (default: --dir)")
    ap.add_argument("--batch-size", type=int, default=16, help="utterances per model call (1 = one at a time)")
    ap.add_argument("--frame-bucket", type=int, default=500, help=frame_help)
    ap.add_argument("--repeat", type=int, default=1, help="benchmark: list every utterance N times")
    ap.add_argument("--bench", action="store_true", help="benchmark: time a second, warm (compiled) pass")
    return ap


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None):
    args = ap.parse_args(argv)
    if args.out is None and args.dir is None:
        ap.error("--out is required with --wav-dir")
    try:
        items = read_wav_list(args.dir, args.wav_dir, args.repeat)
    except CosyVoiceError as e:
        sys.exit(f"error: {e}")
    return args, items


def load_weights(args, component: str, cfg):
    """``(params, cfg)`` of ``component`` (``"tokenizer"`` or ``"speaker"``) from ``--random-init``
    (its ``init_params``), ``--torch-ckpt`` (a torch state dict) or ``--onnx`` / ``--model-dir``
    (the release's ONNX file, whose sizes replace ``cfg``), all through the component's contract."""
    import importlib

    mod = importlib.import_module(f"cosyvoice2_jax.{component}")
    if args.random_init is not None:
        import jax

        return mod.init_params(cfg, jax.random.PRNGKey(args.random_init)), cfg
    if args.torch_ckpt:
        from ..params_util import load_torch_checkpoint

        return mod.from_release(load_torch_checkpoint(args.torch_ckpt), cfg), cfg
    path = Path(args.onnx) if args.onnx else Path(args.model_dir) / mod.RELEASE_FILE
    cfg = mod.config_from_release(path, cfg)
    return mod.from_release(path, cfg), cfg


def run(items: Sequence[tuple[str, str]], featurize: Callable[[np.ndarray], np.ndarray],
        model: Callable[[list], Sequence], batch_size: int, desc: str, warm_up: bool = False):
    """``model(featurize(load_wav(path, 16 kHz)))`` over all utterances in chunks of
    ``8 * batch_size`` (the model groups by length inside). With ``warm_up`` a first pass
    compiles every shape and the returned timings are of a second pass.

    Returns ``(utt -> output, stats)`` with wall / feature / model seconds and audio seconds.
    """
    from tqdm import tqdm

    def one_pass(label):
        out, t_feat, t_model, audio_s = {}, 0.0, 0.0, 0.0
        chunk_size = 8 * batch_size
        t0 = time.perf_counter()
        with tqdm(total=len(items), unit="utt", desc=label) as bar:
            for s in range(0, len(items), chunk_size):
                chunk = items[s:s + chunk_size]
                t = time.perf_counter()
                wavs = [load_wav(p, 16000) for _, p in chunk]
                feats = [featurize(x) for x in wavs]
                t_feat += time.perf_counter() - t
                audio_s += sum(len(x) for x in wavs) / 16000
                t = time.perf_counter()
                res = model(feats)
                t_model += time.perf_counter() - t
                for (u, _), r in zip(chunk, res):
                    out[u] = r
                bar.update(len(chunk))
        wall = time.perf_counter() - t0
        return out, {"utterances": len(items), "audio_seconds": round(audio_s, 2), "batch_size": batch_size,
                     "wall_s": round(wall, 3), "features_s": round(t_feat, 3), "model_s": round(t_model, 3),
                     "utt_per_s": round(len(items) / wall, 3), "warm": warm_up,
                     "utt_per_s_model": round(len(items) / max(t_model, 1e-9), 3)}

    if warm_up:
        one_pass("warm-up")
    return one_pass(desc)
