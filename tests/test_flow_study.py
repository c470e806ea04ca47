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
    assert FS.main(["--model-dir", str(tiny_release[0]), "--sweep", str(sweep), "--out", str(out), "--quiet"]) == 0
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
    import matplotlib.image

    img = matplotlib.image.imread(out / "pareto.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    assert not list(out.glob("*.partial*"))
    # results are not overwritten without asking
    assert FS.main(["--model-dir", str(tiny_release[0]), "--sweep", str(sweep), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("text,msg", [
    ("samplers:\n  - {solver: rk5}\n", "sampler.solver"),
    ("samplers: []\n", "no sampler configs"),
    ("bogus: 1\nsamplers:\n  - {}\n", "unknown keys"),
    ("product: {steps: 4}\n", "product"),
    ("noise: gaussian\nsamplers:\n  - {}\n", "noise"),
])
def test_bad_sweep(tmp_path, capsys, text, msg):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    assert FS.main(["--model-dir", str(tmp_path), "--sweep", str(p), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert msg in capsys.readouterr().err
