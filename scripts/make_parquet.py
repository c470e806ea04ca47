#!/usr/bin/env python3
"""Turn a folder of wavs + transcripts into training shards in the official parquet layout.

Input, either
  ``--dir DATA``: Kaldi-style ``wav.scp`` (utt path), ``text`` (utt transcript), optional ``utt2spk``
  (and optional ``instruct``: utt instruction text), or
  ``--wav-dir FOLDER``: every audio file with a transcript beside it (``name.txt`` or ``name.lab``);
  utt id = file name, speaker = the parent folder name.
Speech tokens and speaker embeddings come from ``utt2speech_token.npz`` / ``utt2embedding.npz`` /
``spk2embedding.npz`` (written by scripts/extract_speech_tokens.py and scripts/extract_embeddings.py)
in ``--feats-dir`` (default: the data dir); when missing they are computed here with our JAX
extractors (``--model-dir`` release weights, or ``--random-init SEED`` for smoke tests).
``--reject-tokens FILE.npz`` adds ``reject_speech_token`` (DPO).

Output (as the official ``tools/make_parquet_list.py``): ``OUT/parquet_000000000.tar`` ... with
columns utt, wav, audio_data, text, spk, utt_embedding, spk_embedding, speech_token
[, instruct, reject_speech_token], plus ``OUT/data.list``, ``utt2data.list`` and ``spk2data.list``.

    python scripts/extract_speech_tokens.py --dir data/train --model-dir CosyVoice2-0.5B
    python scripts/extract_embeddings.py --dir data/train --model-dir CosyVoice2-0.5B
    python scripts/make_parquet.py --dir data/train --out data/train/parquet
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _read_kv(path: Path) -> dict[str, str]:
    from cosyvoice2_jax.train.datalist import read_kv

    return read_kv(path)


from cosyvoice2_jax.train.datalist import AUDIO_EXT  # noqa: E402


def collect(args) -> tuple[list[str], dict, dict, dict, dict]:
    """-> utts, utt2wav, utt2text, utt2spk, utt2instruct"""
    if args.dir:
        d = Path(args.dir)
        for f in ("wav.scp", "text"):
            if not (d / f).is_file():
                sys.exit(f"error: {d / f} missing (need wav.scp and text in --dir)")
        utt2wav, utt2text = _read_kv(d / "wav.scp"), _read_kv(d / "text")
        utt2spk = _read_kv(d / "utt2spk") if (d / "utt2spk").is_file() else {u: u for u in utt2wav}
        utt2ins = _read_kv(d / "instruct") if (d / "instruct").is_file() else {}
    else:
        d = Path(args.wav_dir)
        if not d.is_dir():
            sys.exit(f"error: --wav-dir {d} is not a folder")
        utt2wav, utt2text, utt2spk, utt2ins = {}, {}, {}, {}
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() not in AUDIO_EXT:
                continue
            tr = next((p.with_suffix(e) for e in (".txt", ".lab") if p.with_suffix(e).is_file()), None)
            if tr is None:
                print(f"skip {p}: no transcript {p.stem}.txt/.lab", file=sys.stderr)
                continue
            utt2wav[p.stem], utt2text[p.stem] = str(p), tr.read_text(encoding="utf-8").strip()
            utt2spk[p.stem] = p.parent.name
    utts = [u for u in utt2wav if u in utt2text]
    missing = [u for u in utt2wav if u not in utt2text]
    if missing:
        print(f"skip {len(missing)} utterance(s) without text, e.g. {missing[0]}", file=sys.stderr)
    if not utts:
        sys.exit("error: no utterance has both audio and text")
    return utts, utt2wav, utt2text, utt2spk, utt2ins


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def features(args, utts, utt2wav, utt2spk) -> tuple[dict, dict, dict]:
    fdir = Path(args.feats_dir or args.dir or args.out)
    fdir.mkdir(parents=True, exist_ok=True)
    tok_p, emb_p, spk_p = fdir / "utt2speech_token.npz", fdir / "utt2embedding.npz", fdir / "spk2embedding.npz"
    if not (tok_p.is_file() and emb_p.is_file() and spk_p.is_file()):
        if not (args.model_dir or args.random_init is not None):
            sys.exit(f"error: {fdir} lacks utt2speech_token.npz / utt2embedding.npz / spk2embedding.npz; run the "
                     "extract scripts or pass --model-dir (or --random-init SEED) to compute them here")
        scp = fdir / "wav.scp"
        if not scp.is_file():
            scp.write_text("".join(f"{u} {utt2wav[u]}\n" for u in utts), encoding="utf-8")
            (fdir / "utt2spk").write_text("".join(f"{u} {utt2spk[u]}\n" for u in utts), encoding="utf-8")
        w = ["--model-dir", args.model_dir] if args.model_dir else ["--random-init", str(args.random_init)]
        _script("extract_speech_tokens").main(["--dir", str(fdir), "--out", str(fdir), *w])
        _script("extract_embeddings").main(["--dir", str(fdir), "--out", str(fdir), *w])
    return _load_npz(tok_p), _load_npz(emb_p), _load_npz(spk_p)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", help="Kaldi-style data dir (wav.scp, text, [utt2spk], [instruct])")
    src.add_argument("--wav-dir", help="folder of audio files with name.txt transcripts")
    ap.add_argument("--out", required=True, help="output folder for the shards and data.list")
    ap.add_argument("--feats-dir", help="where the extracted token/embedding .npz files are (default: --dir)")
    ap.add_argument("--model-dir", help="release dir, to compute missing tokens/embeddings")
    ap.add_argument("--random-init", type=int, metavar="SEED", help="random extractor weights (smoke tests only)")
    ap.add_argument("--reject-tokens", help="npz utt -> rejected speech tokens (DPO)")
    ap.add_argument("--num-utts-per-parquet", type=int, default=1000)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing data.list in --out")
    args = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(args.out)
    if (out / "data.list").exists() and not args.overwrite:
        sys.exit(f"error: {out / 'data.list'} exists; pass --overwrite to replace the shards")
    out.mkdir(parents=True, exist_ok=True)
    utts, utt2wav, utt2text, utt2spk, utt2ins = collect(args)
    tok, emb, spk_emb = features(args, utts, utt2wav, utt2spk)
    rej = _load_npz(Path(args.reject_tokens)) if args.reject_tokens else None
    keep = [u for u in utts if u in tok and u in emb and utt2spk.get(u, u) in spk_emb]
    if len(keep) < len(utts):
        print(f"skip {len(utts) - len(keep)} utterance(s) without token/embedding", file=sys.stderr)
    shards, utt2data, spk2data = [], {}, {}
    n = args.num_utts_per_parquet
    for i in range(0, len(keep), n):
        rows = []
        for u in keep[i: i + n]:
            spk = utt2spk.get(u, u)
            row = {"utt": u, "wav": utt2wav[u], "audio_data": Path(utt2wav[u]).read_bytes(), "text": utt2text[u],
                   "spk": spk, "utt_embedding": np.asarray(emb[u], np.float32).reshape(-1).tolist(),
                   "spk_embedding": np.asarray(spk_emb[spk], np.float32).reshape(-1).tolist(),
                   "speech_token": np.asarray(tok[u]).astype(int).reshape(-1).tolist()}
            if utt2ins:
                row["instruct"] = utt2ins.get(u, "")
            if rej is not None:
                row["reject_speech_token"] = np.asarray(rej.get(u, [])).astype(int).reshape(-1).tolist()
            rows.append(row)
        path = out / f"parquet_{i // n:09d}.tar"
        pq.write_table(pa.Table.from_pylist(rows), path)
        shards.append(path)
        for r in rows:
            utt2data[r["utt"]] = str(path)
            spk2data.setdefault(r["spk"], str(path))
    (out / "data.list").write_text("".join(f"{p}\n" for p in shards), encoding="utf-8")
    (out / "utt2data.list").write_text("".join(f"{u} {p}\n" for u, p in utt2data.items()), encoding="utf-8")
    (out / "spk2data.list").write_text("".join(f"{s} {p}\n" for s, p in spk2data.items()), encoding="utf-8")
    print(json.dumps({"utterances": len(keep), "shards": len(shards), "data_list": str(out / "data.list")}))


if __name__ == "__main__":
    main()
