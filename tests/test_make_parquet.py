"""scripts/make_parquet.py: folder of wavs + transcripts -> official parquet shards -> TrainData."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import load_script
import soundfile as sf

from cosyvoice2_jax.train import data as D

ROOT = Path(__file__).resolve().parent.parent


def _script():
    return load_script("make_parquet")


def _folder(tmp_path, shared_wavs):
    d = tmp_path / "corpus" / "spkA"
    d.mkdir(parents=True)
    for i, w in enumerate(shared_wavs):
        shutil.copy(w, d / f"real{i}.wav")
        (d / f"real{i}.txt").write_text(f"真实语音第{i}句。", encoding="utf-8")
    t = np.arange(24000 * 2) / 24000
    sf.write(d / "tone.flac", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)
    (d / "tone.lab").write_text("A two second tone.", encoding="utf-8")
    sf.write(d / "notext.wav", np.zeros(1600, np.float32) + 0.1, 16000)  # skipped: no transcript
    return tmp_path / "corpus"


def test_make_parquet_from_folder(tmp_path, shared_wavs):
    corpus = _folder(tmp_path, shared_wavs)
    feats = tmp_path / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    utts = [f"real{i}" for i in range(len(shared_wavs))] + ["tone"]
    tokens = {u: rng.integers(0, 6561, 25 * (2 + i)).astype(np.int32) for i, u in enumerate(utts)}
    np.savez(feats / "utt2speech_token.npz", **tokens)
    np.savez(feats / "utt2embedding.npz", **{u: rng.standard_normal(192).astype(np.float32) for u in utts})
    np.savez(feats / "spk2embedding.npz", spkA=rng.standard_normal(192).astype(np.float32))
    out = tmp_path / "shards"
    mp = _script()
    mp.main(["--wav-dir", str(corpus), "--feats-dir", str(feats), "--out", str(out), "--num-utts-per-parquet", "2"])
    shards = D.read_data_list(out / "data.list")
    assert len(shards) == 2
    rows = [r for s in shards for r in pq.read_table(s).to_pylist()]
    assert sorted(r["utt"] for r in rows) == sorted(utts)
    for r in rows:
        assert r["spk"] == "spkA" and r["speech_token"] == tokens[r["utt"]].tolist()
        wav, sr = sf.read(__import__("io").BytesIO(r["audio_data"]))
        assert wav.shape[0] > 0
    assert next(r for r in rows if r["utt"] == "tone")["text"] == "A two second tone."
    # the training pipeline reads them
    cfg = D.DataConfig(data_list=str(out / "data.list"), token_buckets=(100,), max_frames_in_batch=800, min_length=10,
                       num_threads=1)
    b = next(D.TrainData(cfg, lambda t: list(t.encode())[:50]))
    assert b["valid"].any()
    # nothing is overwritten without asking
    with pytest.raises(SystemExit, match="exists"):
        mp.main(["--wav-dir", str(corpus), "--feats-dir", str(feats), "--out", str(out)])


def test_make_parquet_errors(tmp_path):
    mp = _script()
    with pytest.raises(SystemExit, match="wav.scp"):
        mp.main(["--dir", str(tmp_path), "--out", str(tmp_path / "o")])
    (tmp_path / "w").mkdir()
    sf.write(tmp_path / "w" / "a.wav", np.ones(1600, np.float32) * 0.1, 16000)
    (tmp_path / "w" / "a.txt").write_text("hi")
    with pytest.raises(SystemExit, match="lacks utt2speech_token"):
        mp.main(["--wav-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o")])


@pytest.mark.slow  # ~30-50 s on the 2-core CI machine; run with -m slow
def test_extract_scripts_then_make_parquet(tmp_path, shared_wavs):
    """The three data-prep steps chained on real speech (random extractor weights): tokens at
    25 Hz and 192-d embeddings land in the shards."""
    corpus = tmp_path / "c" / "spk1"
    corpus.mkdir(parents=True)
    wav, sr = sf.read(shared_wavs[-1], dtype="float32")
    sf.write(corpus / "u1.wav", wav[: int(1.6 * sr)], sr)
    (corpus / "u1.txt").write_text("你好。", encoding="utf-8")
    feats = tmp_path / "feats"
    mp = _script()
    mp.main(["--wav-dir", str(tmp_path / "c"), "--feats-dir", str(feats), "--out", str(tmp_path / "o"),
             "--random-init", "0"])
    row = pq.read_table(D.read_data_list(tmp_path / "o" / "data.list")[0]).to_pylist()[0]
    assert row["utt"] == "u1" and row["spk"] == "spk1"
    assert len(row["speech_token"]) == 40  # 1.6 s at 25 Hz
    assert all(0 <= t < 6561 for t in row["speech_token"])
    assert len(row["utt_embedding"]) == 192 and np.isfinite(row["utt_embedding"]).all()
    with np.load(feats / "spk2embedding.npz") as z:
        assert list(z.files) == ["spk1"]
