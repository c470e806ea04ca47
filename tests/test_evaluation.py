"""Evaluation harness (cosyvoice2_jax/evaluation.py, scripts/evaluate.py, `cosyvoice2-jax eval`) and
DPO preference pairs (scripts/make_preference_pairs.py)."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import load_script
from cosyvoice2_jax import cli
from cosyvoice2_jax import evaluation as E


# ------------------------------------------------------------------------------ text + metrics
def test_normalisation_as_seed_tts_eval():
    # punctuation deleted (apostrophe kept), case folded, spaces squeezed
    assert E.normalize_text("Hello,  World! It's a well-known (test).", "en") == "hello world it's a wellknown test"
    # Chinese: full-width punctuation deleted, one token per character, spaces dropped
    assert E.normalize_text("你好，世界！ 再见。", "zh") == "你 好 世 界 再 见"
    assert E.normalize_text("“引号”《书名》", "zh") == "引 号 书 名"
    assert E.language_of("Hello 世界") == "zh" and E.language_of("Hello world") == "en"
    with pytest.raises(Exception, match="'en'.*'zh'"):
        E.normalize_text("x", "de")


def test_error_rates_hand_counted():
    # 6 reference words; hyp: 1 deletion (first "the"), 1 substitution (sat->sit), 1 insertion (please)
    e = E.error_rate("The cat sat on the mat.", "cat sit on the mat please", "en")
    assert (e["sub"], e["del"], e["ins"], e["n_ref"]) == (1, 1, 1, 6) and e["wer"] == pytest.approx(3 / 6)
    assert E.error_rate("Hi, there!", "HI THERE", "en")["wer"] == 0.0  # normalisation makes it exact
    # CER: 4 characters, one substituted, one deleted
    e = E.error_rate("今天天气", "今天晴", "zh")
    assert e["n_ref"] == 4 and e["sub"] + e["del"] + e["ins"] == 2 and e["wer"] == pytest.approx(0.5)
    e = E.error_rate("one two", "", "en")  # nothing recognised: all deleted
    assert e == {"wer": 1.0, "sub": 0, "del": 2, "ins": 0, "n_ref": 2}
    np.testing.assert_allclose(E.cosine(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [-1.0, 0.0]])),
                               [1.0, -np.sqrt(0.5)])
    s = E.summarize([{"lang": "en", "wer": 0.5, "sub": 1, "del": 0, "ins": 0, "n_ref": 2, "sim": 0.2},
                     {"lang": "zh", "wer": 0.0, "sub": 0, "del": 0, "ins": 0, "n_ref": 8, "sim": 0.6}])
    assert s["wer"] == 0.25 and s["wer_corpus"] == 0.1 and s["sim"] == pytest.approx(0.4)
    assert s["by_lang"]["zh"]["n"] == 1


def test_read_list_seed_tts_format(tmp_path, prompt_wav):
    shutil.copy(prompt_wav[0], tmp_path / "p.wav")
    (tmp_path / "meta.lst").write_text(f"u1|prompt one|p.wav|Target one.\nu2|prompt two|{prompt_wav[0]}|目标|p.wav\n\n")
    rows = E.read_list(tmp_path / "meta.lst")
    assert [r.utt for r in rows] == ["u1", "u2"] and rows[0].prompt_wav == tmp_path / "p.wav"
    assert rows[1].target_text == "目标" and rows[1].gt_wav == tmp_path / "p.wav"
    for bad, msg in [("u1|a|p.wav\n", "4 or 5 fields"), ("u1|a|missing.wav|t\n", "does not exist"),
                     ("u1|a|p.wav|t\nu1|a|p.wav|t\n", "twice"), ("\n", "no rows")]:
        (tmp_path / "bad.lst").write_text(bad)
        with pytest.raises(E.EvalListError, match=msg):
            E.read_list(tmp_path / "bad.lst")


def test_eval_cli_errors(tmp_path, prompt_wav, capsys):
    lst = tmp_path / "meta.lst"
    lst.write_text(f"u1|p|{prompt_wav[0]}|t\n")
    assert cli.main(["eval", "--list", str(lst), "--out", str(tmp_path / "o")]) == 2
    assert "--model-dir" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "summary.json").write_text("{}")
    assert cli.main(["eval", "--list", str(lst), "--out", str(tmp_path / "o"), "--wav-dir", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["eval", "--list", str(lst), "--out", str(tmp_path / "o2"), "--wav-dir", str(tmp_path),
                     "--asr", "nomodule"]) == 2
    assert "module:factory" in capsys.readouterr().err


class FakeASR:
    """Returns fixed transcripts (the harness's plumbing, not a recogniser)."""

    def __init__(self, texts):
        self.texts, self.calls = list(texts), []

    def transcribe(self, wavs, language):
        self.calls.append((len(wavs), language))
        return [self.texts.pop(0) for _ in wavs]


class FakeSpeaker:
    def embed_wavs(self, wavs):  # the embedding is the wave's first two samples
        return np.stack([np.asarray(w[:2], np.float64) for w in wavs])


def test_scoring_existing_wavs(tmp_path):
    """--wav-dir mode with plugged-in ASR and speaker: the numbers are hand-derived."""
    import soundfile as sf

    sf.write(tmp_path / "p.wav", np.array([0.5, 0.0] + [0.1] * 3000, np.float32), 16000)
    (tmp_path / "syn").mkdir()
    sf.write(tmp_path / "syn" / "a.wav", np.array([0.5, 0.0] + [0.1] * 3000, np.float32), 16000)
    sf.write(tmp_path / "syn" / "b.wav", np.array([0.0, 0.5] + [0.1] * 3000, np.float32), 16000)
    (tmp_path / "meta.lst").write_text("a|x|p.wav|Good morning, Sir.\nb|x|p.wav|早上好\n")
    scorer = E.Scorer(FakeASR(["good morning sir", "早上"]), FakeSpeaker())
    summary = E.evaluate(None, E.read_list(tmp_path / "meta.lst"), tmp_path / "out", scorer,
                         wav_dir=tmp_path / "syn", progress=False, batch_size=2)
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [r["utt"] for r in rows] == ["a", "b"]
    assert float(rows[0]["wer"]) == 0.0 and float(rows[1]["wer"]) == pytest.approx(1 / 3)
    assert float(rows[0]["sim"]) == pytest.approx(1.0) and float(rows[1]["sim"]) == pytest.approx(0.0, abs=1e-6)
    assert scorer.asr.calls == [(1, "en"), (1, "zh")]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert summary["wer"] == pytest.approx(1 / 6) and summary["n"] == 2
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temp files


def fake_asr():  # `--asr test_evaluation:fake_asr` (the CLI's plugin path)
    class Echo:
        def transcribe(self, wavs, language):
            return ["good morning sir" if language == "en" else "早上"] * len(wavs)
    return Echo()


def fake_speaker():  # `--speaker test_evaluation:fake_speaker`
    return FakeSpeaker()


def test_eval_cli_scores_wavs_with_mos(tmp_path, capsys):
    """`cosyvoice2-jax eval --wav-dir ... --mos` (plug-in ASR and speaker): the DNSMOS columns are in the
    CSV (after sim) and finite in 1..5, their means in the summary; a clip too short to score is empty."""
    import soundfile as sf

    if not E.dnsmos_available():
        pytest.skip("DNSMOS needs the 'perceptual' extra (speechmos, onnxruntime)")
    t = np.arange(24000) / 16000  # 1.5 s: a voiced-like tone with a 3 Hz envelope
    tone = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    sf.write(tmp_path / "p.wav", tone, 16000)
    (tmp_path / "syn").mkdir()
    sf.write(tmp_path / "syn" / "a.wav", tone, 16000)
    sf.write(tmp_path / "syn" / "b.wav", tone[:800], 16000)  # 0.05 s: no DNSMOS score
    (tmp_path / "meta.lst").write_text("a|x|p.wav|Good morning, Sir.\nb|x|p.wav|早上好\n")
    argv = ["eval", "--list", str(tmp_path / "meta.lst"), "--wav-dir", str(tmp_path / "syn"), "--out",
            str(tmp_path / "out"), "--asr", "test_evaluation:fake_asr", "--speaker", "test_evaluation:fake_speaker",
            "--no-progress", "--mos"]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    cols = list(rows[0])
    assert cols[cols.index("sim") + 1: cols.index("sim") + 4] == list(E.MOS_COLUMNS)
    assert all(1.0 <= float(rows[0][c]) <= 5.0 for c in E.MOS_COLUMNS)
    assert all(rows[1][c] == "" for c in E.MOS_COLUMNS)
    assert float(rows[0]["wer"]) == 0.0 and float(rows[1]["wer"]) == pytest.approx(1 / 3)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["mos"] is True and s["dnsmos_ovrl"] == pytest.approx(float(rows[0]["dnsmos_ovrl"]))
    assert s["by_lang"]["zh"]["dnsmos_ovrl"] is None and s["n"] == 2
    # without --mos: no MOS columns
    assert cli.main(argv[:-1] + ["--overwrite"]) == 0
    assert "dnsmos_ovrl" not in (tmp_path / "out" / "results.csv").read_text().splitlines()[0]


def test_mos_without_perceptual_extra_names_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "speechmos" else real(name, *a))
    with pytest.raises(E.ConfigError, match=r"speechmos.*cosyvoice2-jax\[perceptual\]"):
        E.dnsmos(np.zeros(16000, np.float32))
    (tmp_path / "meta.lst").write_text(f"u1|p|{tmp_path / 'meta.lst'}|t\n")
    assert cli.main(["eval", "--list", str(tmp_path / "meta.lst"), "--wav-dir", str(tmp_path), "--out",
                     str(tmp_path / "o"), "--mos"]) == 2
    assert "perceptual" in capsys.readouterr().err


def test_make_preference_pairs_cli_errors(tmp_path, capsys):
    """The script's command line (the end-to-end test below drives its library functions): bad
    arguments give one line naming the option, before any model is loaded."""
    mpp = load_script("make_preference_pairs")
    base = ["--data-list", str(tmp_path / "data.list"), "--model-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--num-candidates must be >= 2"):
        mpp.main(base + ["--num-candidates", "1"])
    with pytest.raises(SystemExit, match="data.list"):
        mpp.main(base)


# ------------------------------------------------------------------------------ end to end
def test_preference_pairs_dpo_and_eval_before_after(tiny_release, tmp_path, prompt_wav, compiles):
    """Acceptance: pairs from generated shards, 20 DPO steps, evaluation before/after (files, shapes).

    Sized for CI (compiles dominate): 2 one-row shards, 2 candidates, a 1-layer Whisper, one model
    instance for pairs and both evaluations, texts of 2 tokens (<= 40 speech tokens) and audio of
    ~3 s (the prompt's length), so that pairs and evaluation share the LM decode, flow, HiFT,
    Whisper and CAM++ programs; the resume and the second evaluation compile nothing (checked);
    one DPO batch shape. The command-line wrappers of the three
    steps are tested on their own (test_eval_cli_scores_wavs_with_mos, test_train*.py)."""
    import pyarrow.parquet as pq

    from test_train_data import make_shards

    from cosyvoice2_jax.pipeline import CosyVoice2
    from cosyvoice2_jax.train import data as D
    from cosyvoice2_jax.whisper import params as WP

    release, _ = tiny_release
    wdir = WP.save_random_hf_dir(tmp_path / "whisper", 0, {**WP.TINY_HF_CONFIG, "encoder_layers": 1,
                                                           "decoder_layers": 1, "max_target_positions": 16})
    data = tmp_path / "data"
    data.mkdir()
    lst, rows = make_shards(data, n_rows=2, n_shards=2, seed=3, texts=["Hello", "你好"], seconds=(3.0, 3.4))
    mpp = load_script("make_preference_pairs")
    out = tmp_path / "dpo"
    tts = CosyVoice2.from_pretrained(release, sampling="ras", seed=7, cache=False)
    scorer = E.build_scorer("whisper", "campplus", tts, whisper_dir=wdir, asr_batch=1)
    stats = mpp.make_pairs(tts, scorer, D.read_data_list(lst), out, n_cand=2, seed=7, batch_rows=1, progress=False)
    assert stats["shards_done"] == 2 and stats["rows"] == 2
    shards = D.read_data_list(out / "data.list")
    pairs = [r for s in shards for r in pq.read_table(s).to_pylist()]
    assert pairs and {r["utt"] for r in pairs} <= {r["utt"] for r in rows}
    for r in pairs:
        assert r["speech_token"] != r["reject_speech_token"]
        assert all(0 <= t < 6561 for t in r["speech_token"] + r["reject_speech_token"])
        assert r["chosen_sim"] - r["chosen_wer"] >= r["reject_sim"] - r["reject_wer"]
    # deterministic given the seed, and resumable: a removed shard is redone identically, others skipped
    first = {s.name: s.read_bytes() for s in shards}
    shards[0].unlink()
    compiles.mark()
    stats = mpp.make_pairs(tts, scorer, D.read_data_list(lst), out, n_cand=2, seed=7, batch_rows=1, progress=False)
    assert stats["shards_done"] == 1 and stats["shards_skipped"] == 1
    assert {s.name: s.read_bytes() for s in D.read_data_list(out / "data.list")} == first
    assert compiles.since() == []  # same shapes as the first pass: nothing recompiled

    # 20 DPO steps on the pairs (configs/train/dpo.yaml with tiny overrides; one token/text bucket)
    from cosyvoice2_jax.train.run import run

    over = [f"data.data_list={out / 'data.list'}", f"tokenizer_dir={release / 'CosyVoice-BlankEN'}",
            f"init_from={release}", "model=tiny", "train.steps=20", "train.save_every=20", "train.log_every=1",
            f"train.workdir={tmp_path / 'run'}", "train.async_save=false", "data.num_threads=1",
            "data.min_length=0", "data.token_buckets=[64]", "data.text_buckets=[16]", "data.max_frames_in_batch=256",
            "train.mesh.data=1", "train.mesh.fsdp=1", "train.mesh.tensor=1"]
    res = run("configs/train/dpo.yaml", over, progress=False)
    assert len(res["history"]) >= 1
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20 and all(np.isfinite(m["loss"]) for m in metrics)

    # evaluate before / after with the harness (the same model instance; the trained LM swapped in)
    meta = tmp_path / "meta.lst"
    meta.write_text(f"e1|{prompt_wav[1]}|{prompt_wav[0]}|Hello\ne2|{prompt_wav[1]}|{prompt_wav[0]}|你好\n")
    lrows = E.read_list(meta)
    before = E.evaluate(tts, lrows, tmp_path / "before", scorer, seed=0, batch_size=2, save_wavs=True, progress=False)
    E.use_llm_checkpoint(tts, tmp_path / "run")
    compiles.mark()
    after = E.evaluate(tts, lrows, tmp_path / "after", scorer, seed=0, batch_size=2, save_wavs=True, progress=False,
                       meta={"llm_checkpoint": str(tmp_path / "run")})
    assert not [c for c in compiles.since() if c in ("jit(_prefill)", "jit(_decode)")]  # trained LM: same programs
    for d, s in (("before", before), ("after", after)):
        assert json.loads((tmp_path / d / "summary.json").read_text()) == s
        assert s["n"] == 2 and set(s["by_lang"]) == {"en", "zh"} and -1 <= s["sim"] <= 1 and s["wer"] >= 0
        rows = list(csv.DictReader((tmp_path / d / "results.csv").open()))
        assert [r["utt"] for r in rows] == ["e1", "e2"] and all(float(r["seconds"]) > 0 for r in rows)
        assert all((tmp_path / d / "wavs" / f"{u}.wav").is_file() for u in ("e1", "e2"))
    assert after["llm_checkpoint"] == str(tmp_path / "run")
