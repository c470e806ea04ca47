#!/usr/bin/env python3
"""Preference pairs for DPO (CosyVoice 2 paper, section 2.7): rank LM samples by WER and speaker similarity.

For every row of the training shards (official parquet layout, ``data.list``), the LM samples
``--num-candidates`` token sequences from the row's text (RAS sampling, one PRNG key per candidate
derived from ``--seed`` and the utterance id, all rows of a batch in one batched LM run), the flow
and HiFT turn them into audio conditioned on the row's ``utt_embedding``, and the evaluation harness
(:mod:`cosyvoice2_jax.evaluation`) scores each candidate against the row: WER/CER of its Whisper
transcript against ``text`` and the cosine similarity of its speaker embedding with the row's own
audio (``audio_data``). Reward = ``--sim-weight * sim - --wer-weight * wer``; the best candidate
becomes ``speech_token`` and the worst ``reject_speech_token`` (all other columns kept, plus
``chosen_wer``, ``chosen_sim``, ``reject_wer``, ``reject_sim``). Rows whose best and worst tokens are
equal carry no preference and are dropped. Candidates the LM leaves empty score wer 1, sim -1.

Output: ``OUT/<shard name>`` for every input shard plus ``OUT/data.list``, which
``configs/train/dpo.yaml`` trains on::

    python scripts/make_preference_pairs.py --data-list data/train/parquet/data.list \\
        --model-dir CosyVoice2-0.5B --whisper-dir whisper-large-v3 --out data/dpo --num-candidates 4
    cosyvoice2-jax train --config configs/train/dpo.yaml --set data.data_list=data/dpo/data.list ...

Deterministic given ``--seed`` (keys per utterance, not per position or batch). Resumable: shards
already in OUT are skipped, each shard is written to a temp file and renamed, so an interrupted
run leaves no truncated shard; rerun the same command to continue (a shard without any pair
leaves ``<name>.empty`` instead and stays out of ``data.list``).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cosyvoice2_jax.errors import ConfigError, CosyVoiceError  # noqa: E402


def candidate_keys(seed: int, utt: str, n: int):
    """``(n, 2)`` LM keys and ``(n, 2)`` vocoder keys of one row (from the seed and the utterance id)."""
    import jax

    from cosyvoice2_jax.evaluation import row_key

    k_lm, k_voc = jax.random.split(row_key(seed, utt))
    return jax.random.split(k_lm, n), jax.random.split(k_voc, n)


def pick(rewards: np.ndarray) -> tuple[int, int]:
    """(best, worst) indices; ties go to the lowest index (deterministic)."""
    return int(np.argmax(rewards)), int(np.argmin(rewards))


def score_rows(tts, scorer, rows: list[dict], n_cand: int, seed: int, wer_weight: float, sim_weight: float
               ) -> list[dict | None]:
    """Sample, synthesise and score ``n_cand`` candidates per row; -> output row (or None: no preference)."""
    import jax.numpy as jnp

    from cosyvoice2_jax.evaluation import language_of, to_16k
    from cosyvoice2_jax.flow.runtime import FlowPrompt
    from cosyvoice2_jax.llm.generate import Request
    from cosyvoice2_jax.train.data import decode_audio

    reqs, lm_keys, voc_keys = [], [], []
    for r in rows:
        ids = tts.text_tokenizer.encode(r["text"])
        if not ids:
            raise ConfigError(f"row {r['utt']!r}: text {r['text']!r} has no tokens")
        kl, kv = candidate_keys(seed, r["utt"], n_cand)
        reqs += [Request(text=ids)] * n_cand
        lm_keys.append(kl)
        voc_keys += list(kv)
    tokens = tts.lm.generate(reqs, key=jnp.concatenate(lm_keys))
    mels = tts.config.flow.output_size
    live = [i for i, t in enumerate(tokens) if t]
    flows = [FlowPrompt(np.zeros((0,), np.int32), np.zeros((0, mels), np.float32),
                        np.asarray(rows[i // n_cand]["utt_embedding"], np.float32).reshape(-1)) for i in live]
    audio = tts.token2wav.full_batch([np.asarray(tokens[i], np.int32) for i in live], flows,
                                     [voc_keys[i] for i in live], [1.0] * len(live)) if live else []
    refs = [decode_audio(r["audio_data"], 16000) for r in rows]
    scored = scorer.score([to_16k(a, tts.sample_rate) for a in audio], [rows[i // n_cand]["text"] for i in live],
                          [refs[i // n_cand] for i in live], [language_of(rows[i // n_cand]["text"]) for i in live])
    wer = np.ones(len(tokens))
    sim = -np.ones(len(tokens))
    for i, s in zip(live, scored):
        wer[i], sim[i] = s["wer"], s["sim"]
    out: list[dict | None] = []
    for j, r in enumerate(rows):
        sl = slice(j * n_cand, (j + 1) * n_cand)
        best, worst = pick(sim_weight * sim[sl] - wer_weight * wer[sl])
        cands = tokens[sl]
        if cands[best] == cands[worst]:
            out.append(None)
            continue
        o = j * n_cand
        out.append({**r, "speech_token": list(cands[best]), "reject_speech_token": list(cands[worst]),
                    "chosen_wer": float(wer[o + best]), "chosen_sim": float(sim[o + best]),
                    "reject_wer": float(wer[o + worst]), "reject_sim": float(sim[o + worst])})
    return out


def write_shard(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cosyvoice2_jax.evaluation import atomic_write_bytes

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    atomic_write_bytes(path, buf.getvalue())


def _empty_marker(target: Path) -> Path:
    return target.with_name(target.name + ".empty")


def make_pairs(tts, scorer, shards: list[Path], out: Path, *, n_cand: int = 4, seed: int = 0, batch_rows: int = 4,
               wer_weight: float = 1.0, sim_weight: float = 1.0, progress: bool = True) -> dict:
    """Process every shard not yet in ``out``; write ``out/data.list``. Returns counts."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from cosyvoice2_jax.evaluation import atomic_write_bytes

    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ConfigError("input shards share file names; the output shard is named after its input")
    stats = {"shards_done": 0, "shards_skipped": 0, "rows": 0, "pairs": 0, "no_preference": 0}
    for shard in tqdm(shards, desc="shards", disable=not progress):
        target = out / shard.name
        if target.exists() or _empty_marker(target).exists():
            stats["shards_skipped"] += 1
            continue
        rows = pq.read_table(shard).to_pylist()
        kept = []
        for start in range(0, len(rows), batch_rows):
            for o in score_rows(tts, scorer, rows[start:start + batch_rows], n_cand, seed, wer_weight, sim_weight):
                if o is None:
                    stats["no_preference"] += 1
                else:
                    kept.append(o)
        stats["rows"] += len(rows)
        stats["pairs"] += len(kept)
        if kept:
            write_shard(target, kept)
        else:  # nothing to train on: a marker keeps the shard finished on resume, data.list skips it
            atomic_write_bytes(_empty_marker(target), b"")
        stats["shards_done"] += 1
    lines = [str((out / s.name).resolve()) for s in shards if (out / s.name).exists()]
    atomic_write_bytes(out / "data.list", ("\n".join(lines) + "\n").encode())
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-list", type=Path, required=True, help="data.list of the training parquet shards")
    p.add_argument("--model-dir", type=Path, required=True, help="release or converted directory (the base model)")
    p.add_argument("--out", type=Path, required=True, help="output folder (shards + data.list)")
    p.add_argument("--num-candidates", type=int, default=4, help="LM samples per row (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-rows", type=int, default=4, help="rows per batched LM/flow/ASR run")
    p.add_argument("--wer-weight", type=float, default=1.0)
    p.add_argument("--sim-weight", type=float, default=1.0)
    p.add_argument("--asr", default="whisper", help="'whisper' (needs --whisper-dir) or module:factory")
    p.add_argument("--whisper-dir", type=Path, help="local Hugging Face Whisper directory")
    p.add_argument("--speaker", default="campplus", help="'campplus' (the model's CAM++) or module:factory")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.num_candidates < 2:
            raise ConfigError(f"--num-candidates must be >= 2 (a best and a worst), got {args.num_candidates}")
        from cosyvoice2_jax.evaluation import build_scorer
        from cosyvoice2_jax.pipeline import CosyVoice2
        from cosyvoice2_jax.train.data import read_data_list

        shards = read_data_list(args.data_list)
        tts = CosyVoice2.from_pretrained(args.model_dir, sampling="ras", seed=args.seed)
        scorer = build_scorer(args.asr, args.speaker, tts, whisper_dir=args.whisper_dir)
        stats = make_pairs(tts, scorer, shards, args.out, n_cand=args.num_candidates, seed=args.seed,
                           batch_rows=args.batch_rows, wer_weight=args.wer_weight, sim_weight=args.sim_weight,
                           progress=not args.no_progress)
    except CosyVoiceError as e:
        sys.exit(f"error: {e}")
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
