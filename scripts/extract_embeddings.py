#!/usr/bin/env python3
"""Extract CAM++ speaker embeddings for training data, batched (JAX).

Same outputs as the official ``tools/extract_embedding.py`` (ONNX, one utterance at a time):
``utt2embedding.pt`` (``utt -> list[float]``, 192 values) and ``spk2embedding.pt`` (``spk -> list[float]``,
the mean of that speaker's utterance embeddings), ``torch.save`` dicts that
``tools/make_parquet_list.py`` reads, written when torch is importable; and always the torch-free
``utt2embedding.npz`` / ``spk2embedding.npz`` (one float32 (192,) array per id).

Input: ``--dir DATA`` with Kaldi ``wav.scp`` and ``utt2spk``, or ``--wav-dir FOLDER`` (utt id = file
name without extension; ``--utt2spk FILE`` optional, else every utterance is its own speaker).
Weights: ``--model-dir`` (release dir: ``campplus.onnx``), ``--onnx FILE``, ``--torch-ckpt FILE`` (a
3D-Speaker ``CAMPPlus`` state dict) or ``--random-init SEED`` (smoke tests and benchmarks only).

    python scripts/extract_embeddings.py --wav-dir my_wavs --out /tmp/emb --random-init 0
    python scripts/extract_embeddings.py --dir data/train --model-dir pretrained_models/CosyVoice2-0.5B

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


def read_utt2spk(path: Path, items) -> dict[str, str]:
    if path is None or not path.is_file():
        return {u: u.split("#")[0] for u, _ in items}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = parts[1]
    missing = [u for u, _ in items if u.split("#")[0] not in out]
    if missing:
        sys.exit(f"error: {path} has no speaker for {len(missing)} utterance(s), e.g. {missing[:3]}")
    return {u: out[u.split("#")[0]] for u, _ in items}


def load_params(args, config):
    from cosyvoice2_jax.speaker import params as sparams

    if args.random_init is not None:
        import jax
        import jax.numpy as jnp

        from cosyvoice2_jax.speaker.modeling import CAMPPlus

        feat = jnp.zeros((1, 16, config.feat_dim))
        return CAMPPlus(config).init(jax.random.PRNGKey(args.random_init), feat, jnp.array([16]))["params"]
    if args.torch_ckpt:
        from cosyvoice2_jax.params_util import load_torch_checkpoint

        return sparams.from_torch_state_dict(load_torch_checkpoint(args.torch_ckpt), config)
    path = Path(args.onnx) if args.onnx else Path(args.model_dir) / "campplus.onnx"
    return sparams.from_onnx(path, config)


def save_outputs(out_dir: Path, name: str, mapping: dict, as_list) -> list[str]:
    from cosyvoice2_jax.frontend.datalist import save_mapping

    return save_mapping(out_dir, name, mapping, as_list)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", help="data dir with wav.scp and utt2spk")
    src.add_argument("--wav-dir", help="folder of audio files")
    ap.add_argument("--utt2spk", help="utt2spk file (default: DIR/utt2spk; none: one speaker per utterance)")
    w = ap.add_mutually_exclusive_group(required=True)
    w.add_argument("--model-dir")
    w.add_argument("--onnx")
    w.add_argument("--torch-ckpt")
    w.add_argument("--random-init", type=int, metavar="SEED")
    ap.add_argument("--out", help="output dir (default: --dir)")
    ap.add_argument("--batch-size", type=int, default=16, help="utterances per model call (1 = one at a time)")
    ap.add_argument("--frame-bucket", type=int, default=500, help="fbank frames are padded to a multiple of this")
    ap.add_argument("--repeat", type=int, default=1, help="benchmark: list every utterance N times")
    ap.add_argument("--bench", action="store_true", help="benchmark: time a second, warm (compiled) pass")
    args = ap.parse_args(argv)
    if args.out is None and args.dir is None:
        ap.error("--out is required with --wav-dir")

    from tqdm import tqdm

    from cosyvoice2_jax.config import CampplusConfig
    from cosyvoice2_jax.frontend.audio import kaldi_fbank, load_wav
    from cosyvoice2_jax.speaker.modeling import SpeakerEncoder

    items = read_wav_list(args)
    spk_file = Path(args.utt2spk) if args.utt2spk else (Path(args.dir) / "utt2spk" if args.dir else None)
    utt2spk = read_utt2spk(spk_file, items)
    config = CampplusConfig()
    enc = SpeakerEncoder(load_params(args, config), config, frame_bucket=args.frame_bucket,
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
                feats = [kaldi_fbank(x) for x in wavs]
                t_feat += time.perf_counter() - t
                audio_s += sum(len(x) for x in wavs) / 16000
                t = time.perf_counter()
                embs = enc.embed(feats)
                t_model += time.perf_counter() - t
                for (u, _), e in zip(chunk, embs):
                    out[u] = e
                bar.update(len(chunk))
        return out, time.perf_counter() - t0, t_feat, t_model, audio_s

    if args.bench:  # a first pass compiles every shape; the timed pass below is warm
        run_pass("warm-up")
    utt2emb, wall, t_feat, t_model, audio_s = run_pass("embeddings")
    spk2list: dict[str, list] = {}
    for u, e in utt2emb.items():
        spk2list.setdefault(utt2spk[u], []).append(e)
    spk2emb = {s: np.mean(np.stack(v), axis=0).astype(np.float32) for s, v in spk2list.items()}
    out_dir = Path(args.out or args.dir)
    as_list = lambda v: [float(x) for x in v]  # noqa: E731
    written = save_outputs(out_dir, "utt2embedding", utt2emb, as_list)
    written += save_outputs(out_dir, "spk2embedding", spk2emb, as_list)
    print(json.dumps({
        "utterances": len(items), "speakers": len(spk2emb), "audio_seconds": round(audio_s, 2),
        "batch_size": args.batch_size, "wall_s": round(wall, 3), "features_s": round(t_feat, 3),
        "model_s": round(t_model, 3), "compiled_programs": enc.compiled_programs(),
        "utt_per_s": round(len(items) / wall, 3),
        "warm": bool(args.bench), "utt_per_s_model": round(len(items) / t_model, 3),
        "written": written}))


if __name__ == "__main__":
    main()
