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

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


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


def main(argv=None):
    from cosyvoice2_jax.train import extract as X

    ap = X.build_parser(__doc__.split("\n\n")[0], "data dir with wav.scp and utt2spk",
                        "fbank frames are padded to a multiple of this")
    ap.add_argument("--utt2spk", help="utt2spk file (default: DIR/utt2spk; none: one speaker per utterance)")
    args, items = X.parse(ap, argv)

    from cosyvoice2_jax.config import SpeakerConfig
    from cosyvoice2_jax.frontend.audio import kaldi_fbank
    from cosyvoice2_jax.speaker import SpeakerEncoder
    from cosyvoice2_jax.train.datalist import save_mapping

    spk_file = Path(args.utt2spk) if args.utt2spk else (Path(args.dir) / "utt2spk" if args.dir else None)
    utt2spk = read_utt2spk(spk_file, items)
    config = SpeakerConfig()
    params, config = X.load_weights(args, "speaker", config)
    enc = SpeakerEncoder(params, config, frame_bucket=args.frame_bucket, max_batch=args.batch_size)
    utt2emb, stats = X.run(items, kaldi_fbank, enc.embed, args.batch_size, "embeddings", args.bench)
    spk2list: dict[str, list] = {}
    for u, e in utt2emb.items():
        spk2list.setdefault(utt2spk[u], []).append(e)
    spk2emb = {s: np.mean(np.stack(v), axis=0).astype(np.float32) for s, v in spk2list.items()}
    out_dir = Path(args.out or args.dir)
    as_list = lambda v: [float(x) for x in v]  # noqa: E731
    written = save_mapping(out_dir, "utt2embedding", utt2emb, as_list)
    written += save_mapping(out_dir, "spk2embedding", spk2emb, as_list)
    print(json.dumps({**stats, "speakers": len(spk2emb), "compiled_programs": enc.compiled_programs(),
                      "written": written}))


if __name__ == "__main__":
    main()
