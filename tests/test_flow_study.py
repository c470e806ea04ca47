"""scripts/flow_study.py on the tiny random-weight release: its estimator is the pipeline's flow
(the official sampler reproduces ``flow.modeling.inference_batch``), and a small sweep writes the
CSV, JSON and Pareto PNG; bad sweeps and existing results are refused."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import load_script


FS = load_script("flow_study")

SWEEP = """\
reference: {solver: Bosh3, rtol: 1.0e-3, atol: 1.0e-3}
utterances: {count: 2, prompt_tokens: 4, tokens: 8, seed: 0}
samplers:
  - {}
  - {grid: uniform}
"""


@pytest.fixture(scope="module")
def loaded(tiny_release):
    return FS.load_flow(tiny_release[0])


def test_estimate_is_the_pipeline_flow(loaded):
    """sample(estimate, official sampler) == flow.modeling.inference_batch on the same inputs."""
    import jax

    from cosyvoice2_jax.flow import cfm
    from cosyvoice2_jax.flow import modeling as FM
    from cosyvoice2_jax.flow import sampling as S

    cfg, flow_params, _ = loaded
    utt = FS.make_utterances(FS.Utterances(count=2, prompt_tokens=4, tokens=8), cfg)
    inputs = FS.packed_inputs(cfg, utt)
    B, S_ = inputs["tokens"].shape
    z = cfm.initial_noise("official", B, 2 * S_, 80)
    mel = jax.jit(lambda z: S.sample(FS.make_estimate(flow_params, cfg, inputs), z)[0])(z)
    n0 = int(utt["prompt_frames"])
    want, _ = FM.inference_batch(flow_params, cfg.flow, utt["tokens"][:, 4:], [8, 8], utt["tokens"][:, :4], [4, 4],
                                 utt["prompt_feat"], [n0, n0], utt["embedding"], token_bucket=12)
    np.testing.assert_allclose(np.asarray(mel)[:, n0:], np.stack(want), atol=1e-5, rtol=0)


def test_study_writes_csv_json_png(tiny_release, loaded, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(FS, "load_flow", lambda d: loaded)  # the module fixture's conversion
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    out = tmp_path / "out"
    assert FS.main(["--model-dir", str(tiny_release[0]), "--sweep", str(sweep), "--out", str(out), "--quiet",
                    "--no-perceptual"]) == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["euler/cosine/cfg0.7/10", "euler/uniform/cfg0.7/10"]
    off, uni = rows
    assert off["official"] == "True" and uni["official"] == "False"
    assert off["nfe"] == "10" and off["rows"] == "2" and off["estimator_passes"] == "20"
    for r in rows:
        assert 0 < float(r["mel_l1"]) <= float(r["mel_max_abs"]) < 50 and np.isfinite(float(r["lsd_db"]))
        assert int(r["ref_nfe"]) > 10 and float(r["wall_s"]) > 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["reference"]["rtol"] == 1e-3 and len(data["rows"]) == 2
    assert data["rows"][0]["config"]["grid"] == "cosine"
    assert data["meta"]["perceptual"] == [] and all(r["dnsmos_ovrl"] is None for r in data["rows"])
    import matplotlib.image

    img = matplotlib.image.imread(out / "pareto.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    assert not list(out.glob("*.partial*"))
    # results are not overwritten without asking
    assert FS.main(["--model-dir", str(tiny_release[0]), "--sweep", str(sweep), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("with_student", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_reference_model(tiny_release, loaded, tmp_path, monkeypatch, with_student):
    """``--reference-model``: models measured against another model's fixed-sampler output on the same
    inputs and noise. Hand-checkable: the teacher at the reference's own sampler is at distance 0;
    slow: so is a freshly initialised student measured in the same study (its extra time inputs have
    zero effect, so it equals the teacher), run as the pipeline runs it (one row, passes counted on the
    resolved sampler)."""
    dirs = {"teacher": tmp_path / "teacher"}
    models = {dirs["teacher"]: loaded}
    if with_student:
        import dataclasses

        import jax

        from cosyvoice2_jax.flow.distill import DistillOptions
        from cosyvoice2_jax.train.distill import DistillObjective

        cfg, flow_params, hift_params = loaded
        obj = DistillObjective(cfg.flow, DistillOptions(method="meanflow"), init_from=flow_params)
        assert obj.cfg.student.enabled and obj.cfg.student.inputs
        dirs["student"] = tmp_path / "student"
        models[dirs["student"]] = (dataclasses.replace(cfg, flow=obj.cfg),
                                   obj.init_params(jax.random.key(0))["student"], hift_params)
    monkeypatch.setattr(FS, "load_flow", lambda d: models[d])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("reference: {sampler: {steps: 2, grid: uniform, guidance: none}}\n"
                     "utterances: {count: 1, prompt_tokens: 4, tokens: 8, seed: 0}\nvocoder: false\n"
                     "samplers:\n  - {steps: 2, grid: uniform, guidance: none}\n  - {steps: 2, guidance: none}\n")
    out = tmp_path / "out"
    argv = [a for d in dirs.values() for a in ("--model-dir", str(d))]
    assert FS.main(argv + ["--reference-model", str(dirs["teacher"]), "--sweep", str(sweep), "--out", str(out),
                           "--quiet"]) == 0
    with open(out / "results.csv", newline="") as f:
        rows = {(r["model"], r["label"]): r for r in csv.DictReader(f)}
    assert len(rows) == 2 * len(dirs)
    two, cos = "euler/uniform/nocfg/2", "euler/cosine/nocfg/2"  # one compiled structure per model
    assert float(rows["teacher", two]["mel_l1"]) == 0.0  # the reference itself: bit-identical program
    if with_student:
        assert float(rows["student", two]["mel_l1"]) < 1e-6  # zero-effect extra inputs
    for m in dirs:
        assert float(rows[m, cos]["mel_l1"]) > 1e-3  # another grid lands elsewhere
        assert rows[m, two]["estimator_passes"] == rows[m, cos]["estimator_passes"] == "2"
        assert rows[m, two]["ref_nfe"] == "2" and rows[m, two]["reference"] == "euler/uniform/nocfg/2"
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["reference_model"] == str(dirs["teacher"])
    assert data["meta"]["model_dir"] == [str(d) for d in dirs.values()]
    assert (out / "pareto.png").stat().st_size > 10_000


def test_reference_model_must_take_the_same_inputs(loaded):
    import dataclasses
    import types

    cfg = loaded[0]
    other = types.SimpleNamespace(flow=dataclasses.replace(cfg.flow, vocab_size=cfg.flow.vocab_size + 1))
    with pytest.raises(FS.ConfigError, match="vocab_size"):
        FS.check_same_inputs(cfg, other, "REF")


@pytest.mark.parametrize("text,msg", [
    ("samplers:\n  - {solver: rk5}\n", "sampler.solver"),
    ("samplers: []\n", "no sampler configs"),
    ("bogus: 1\nsamplers:\n  - {}\n", "unknown keys"),
    ("product: {steps: 4}\n", "product"),
    ("noise: gaussian\nsamplers:\n  - {}\n", "noise"),
    ("reference: {sampler: {steps: 0}}\nsamplers:\n  - {}\n", "reference.sampler"),
])
def test_bad_sweep(tmp_path, capsys, text, msg):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    assert FS.main(["--model-dir", str(tmp_path), "--sweep", str(p), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert msg in capsys.readouterr().err


def _tone(seconds=1.5, sr=16000, f0=180.0):
    """A voiced-like test signal: harmonics of f0 with a syllable-rate envelope."""
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (0.2 * x / np.max(np.abs(x))).astype(np.float32)


def test_word_error_rate_hand_values():
    pytest.importorskip("jiwer")
    assert FS.word_error_rate("the cat sat down", "the bat sat") == pytest.approx(0.5)  # 1 sub + 1 del of 4
    assert FS.word_error_rate("hello world", "hello world") == 0.0
    assert FS.word_error_rate("", "anything") is None  # no reference words: undefined


@pytest.mark.slow  # DNSMOS + pocketsphinx model loads: ~20 s of CPU on the 2-core CI machine
def test_perceptual_columns_on_generated_audio(loaded, tmp_path):
    """The optional perceptual columns of a study on the tiny release's vocoded audio: every installed
    metric is filled and in its range (DNSMOS 1..5, WER >= 0 or None without reference words,
    speaker similarity in [-1, 1]); the others stay empty."""
    metrics = FS.perceptual_available()
    if not metrics:
        pytest.skip("no perceptual package installed (pip install -e '.[perceptual]'; spk_sim: resemblyzer)")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("reference: {solver: Bosh3, rtol: 1.0e-3, atol: 1.0e-3}\n"
                     "utterances: {count: 1, prompt_tokens: 4, tokens: 40, seed: 0}\nsamplers:\n  - {}\n")
    (row,) = FS.run_study(tmp_path, FS.load_sweep(sweep), progress=False, loaded=loaded, perceptual=metrics)
    if "dnsmos" in metrics:
        assert all(1.0 <= row[c] <= 5.0 for c in ("dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak"))
    if "wer" in metrics:
        assert row["wer"] is None or row["wer"] >= 0.0
    if "spk_sim" in metrics:
        assert -1.0 <= row["spk_sim"] <= 1.0 + 1e-6
    missing = {"dnsmos": "dnsmos_ovrl", "wer": "wer", "spk_sim": "spk_sim"}
    assert all(row[c] is None for m, c in missing.items() if m not in metrics)


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["dnsmos", "wer", "spk_sim"])
def test_perceptual_metric_runs(metric):
    if metric not in FS.perceptual_available():
        pytest.skip(f"{metric}: its package is not installed (pip install -e '.[perceptual]'; spk_sim: resemblyzer)")
    x, noise = _tone(), np.random.default_rng(0).normal(0, 0.3, 24000).astype(np.float32)
    if metric == "dnsmos":
        clean, noisy = FS.dnsmos(x), FS.dnsmos(np.clip(x + noise, -1, 1))
        assert all(1.0 <= v <= 5.0 for v in clean.values())
        assert noisy["dnsmos_bak"] < clean["dnsmos_bak"]  # background noise is what BAK scores
        assert FS.dnsmos(np.zeros(10, np.float32))["dnsmos_ovrl"] is None  # too short: no score, no hang
    elif metric == "wer":
        assert isinstance(FS.transcribe(x), str)
        assert FS.word_error_rate(FS.transcribe(x), FS.transcribe(x)) in (None, 0.0)  # deterministic decoder
    else:
        assert FS.speaker_similarity(x, x) == pytest.approx(1.0, abs=1e-5)
