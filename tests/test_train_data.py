"""grain data pipeline: official parquet layout, fixed shapes, exact resume, clear errors."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from cosyvoice2_jax.frontend import audio as A
from cosyvoice2_jax.train import data as D


def _wav_bytes(wav, sr):
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_shards(tmp_path, n_rows=14, n_shards=2, real=None, seed=0, reject=False, texts=None, seconds=(1.0, 5.0)):
    """Write official-layout parquet shards + data.list; audio: real speech pieces and tones.
    ``texts``: row i gets ``texts[i % len(texts)]`` (default: sentences in English and Chinese);
    ``seconds``: the range of the audio durations."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        dur = float(rng.uniform(*seconds))
        if real is not None and i % 2 == 0:
            src = real[i // 2 % len(real)]
            start = int(rng.integers(0, max(1, src.shape[0] - int(dur * 16000))))
            wav, sr = src[start: start + int(dur * 16000)], 16000
            dur = wav.shape[0] / 16000
        else:
            sr = 22050
            t = np.arange(int(dur * sr)) / sr
            wav = (0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.01 * rng.standard_normal(t.shape))
        n_tok = int(dur * 25)
        row = {
            "utt": f"utt{i:03d}", "wav": f"/nowhere/utt{i:03d}.wav", "audio_data": _wav_bytes(wav.astype(np.float32), sr),
            "text": (texts[i % len(texts)] if texts else
                     "你好世界，这是第%d句话。" % i if i % 3 else f"Sentence number {i} is here."),
            "spk": f"spk{i % 3}", "utt_embedding": rng.standard_normal(192).astype(np.float32).tolist(),
            "spk_embedding": rng.standard_normal(192).astype(np.float32).tolist(),
            "speech_token": rng.integers(0, 6561, n_tok).tolist(),
        }
        if reject:
            row["reject_speech_token"] = rng.integers(0, 6561, max(1, n_tok - 3)).tolist()
        rows.append(row)
    paths = []
    per = -(-n_rows // n_shards)
    for s in range(n_shards):
        part = rows[s * per: (s + 1) * per]
        table = pa.Table.from_pylist(part)
        p = tmp_path / f"parquet_{s:09d}.tar"
        pq.write_table(table, p, row_group_size=4)
        paths.append(p.name)
    lst = tmp_path / "data.list"
    lst.write_text("\n".join(paths) + "\n")
    return lst, rows


def _tok(text):  # a deterministic stand-in text tokenizer (byte values)
    return list(text.encode("utf-8"))[:60]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_wavs):
    real = [A.load_wav(p, 16000) for p in shared_wavs]
    return make_shards(tmp_path_factory.mktemp("shards"), real=real)


def cfg_for(lst, **kw):
    base = dict(data_list=str(lst), max_frames_in_batch=800, token_buckets=(50, 100, 150), text_buckets=(32, 64),
                sort_window=8, num_threads=1, min_length=50)
    base.update(kw)
    return D.DataConfig(**base)


def test_source_reads_official_layout(shards):
    lst, rows = shards
    src = D.ParquetSource(D.read_data_list(lst))
    assert len(src) == len(rows)
    assert [src[i]["utt"] for i in range(len(src))] == [r["utt"] for r in rows]
    np.testing.assert_array_equal(src.token_len, [len(r["speech_token"]) for r in rows])


def test_batches_have_fixed_shapes_and_correct_content(shards):
    lst, rows = shards
    cfg = cfg_for(lst)
    data = D.TrainData(cfg, _tok)
    allowed = {(D.rows_for_bucket(b, cfg), b) for b in cfg.token_buckets}
    seen = set()
    for _ in range(data.batches_per_epoch()):
        b = next(data)
        B, T = b["speech_token"].shape
        assert (B, T) in allowed
        assert b["speech_feat"].shape == (B, 2 * T, 80) and b["text_token"].shape[1] in cfg.text_buckets
        for r in range(B):
            if not b["valid"][r]:
                assert b["speech_token_len"][r] == 0
                continue
            n = b["speech_token_len"][r]
            assert b["speech_feat_len"][r] == 2 * n  # official 1:2 token/frame alignment
            match = [x for x in rows if x["speech_token"][:n] == b["speech_token"][r, :n].tolist()]
            assert len(match) == 1
            x = match[0]
            seen.add(x["utt"])
            np.testing.assert_allclose(np.linalg.norm(b["embedding"][r]), 1.0, rtol=1e-5)
            assert b["text_token"][r, : b["text_token_len"][r]].tolist() == _tok(x["text"])
            wav = D.decode_audio(x["audio_data"], 24000)
            np.testing.assert_allclose(b["speech_feat"][r, : 2 * n], A.mel_24k(wav)[: 2 * n], atol=1e-6)
            assert not b["speech_feat"][r, 2 * n:].any()
    assert seen == {r["utt"] for r in rows}  # every row once per epoch (all pass the filters)


def test_plan_is_deterministic_and_epochs_differ(shards):
    lst, _ = shards
    cfg = cfg_for(lst)
    src = D.ParquetSource(D.read_data_list(lst))
    p0, p0b, p1 = D.plan_epoch(src.token_len, cfg, 0), D.plan_epoch(src.token_len, cfg, 0), D.plan_epoch(src.token_len, cfg, 1)
    assert p0 == p0b and p0 != p1
    assert sorted(i for b in p0 for i in b if i >= 0) == list(range(len(src)))


def test_resume_gives_exactly_the_next_batches(shards):
    lst, _ = shards
    cfg = cfg_for(lst)
    ref = D.TrainData(cfg, _tok)
    n = ref.batches_per_epoch()
    stream = [next(ref) for _ in range(n + 3)]  # crosses an epoch boundary
    for k in (2, n + 1):
        d = D.TrainData(cfg, _tok)
        for _ in range(k):
            next(d)
        state = d.state()
        resumed = D.TrainData(cfg, _tok, state=state)
        for j in range(k, n + 3):
            got = next(resumed)
            for key in stream[j]:
                np.testing.assert_array_equal(got[key], stream[j][key], err_msg=f"batch {j} key {key}")


def test_filters_drop_out_of_range_rows(tmp_path):
    lst, rows = make_shards(tmp_path, n_rows=6, n_shards=1, seed=3)
    cfg = cfg_for(lst, token_buckets=(60,), max_length=400)  # <= 4 s at 100 Hz, <= 60 tokens
    src = D.ParquetSource(D.read_data_list(lst))
    kept = {i for b in D.plan_epoch(src.token_len, cfg, 0) for i in b if i >= 0}
    want = {i for i, r in enumerate(rows) if len(r["speech_token"]) <= 60 and 50 <= 4 * len(r["speech_token"]) <= 400}
    assert kept == want and len(want) < len(rows)


def test_dpo_rows_carry_rejected_tokens(tmp_path):
    lst, rows = make_shards(tmp_path, n_rows=4, n_shards=1, reject=True, seed=5)
    b = next(D.TrainData(cfg_for(lst, need_mel=False), _tok))
    assert "reject_speech_token" in b and b["reject_speech_token_len"][b["valid"]].min() > 0


def test_bad_data_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.read_data_list(tmp_path / "nope.list")
    (tmp_path / "empty.list").write_text("# nothing\n")
    with pytest.raises(D.DataError, match="names no parquet"):
        D.read_data_list(tmp_path / "empty.list")
    (tmp_path / "bad.list").write_text("missing.parquet\n")
    with pytest.raises(D.DataError, match="missing.parquet does not exist"):
        D.read_data_list(tmp_path / "bad.list")
    pq.write_table(pa.Table.from_pylist([{"utt": "a", "text": "x"}]), tmp_path / "cols.parquet")
    with pytest.raises(D.DataError, match="lacks column"):
        D.ParquetSource([tmp_path / "cols.parquet"])
    with pytest.raises(D.DataError, match="cannot decode"):
        D.decode_audio(b"not audio", 24000)
