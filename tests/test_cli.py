"""CLI: one clear line for user errors, real work for the features command."""
from __future__ import annotations

import numpy as np
import soundfile as sf

from cosyvoice2_jax import cli
from cosyvoice2_jax.frontend import audio


def test_help_and_config(capsys):
    assert cli.main([]) == 0
    assert "cosyvoice2-jax" in capsys.readouterr().out
    assert cli.main(["config", "--preset", "tiny", "--set", "flow.cfm.inference_cfg_rate=0.5"]) == 0
    out = capsys.readouterr().out
    assert "inference_cfg_rate: 0.5" in out


def test_features_command(tmp_path, capsys):
    rng = np.random.default_rng(0)
    wav = (rng.standard_normal(48000) * 0.1).astype(np.float32)
    p = tmp_path / "a.wav"
    sf.write(p, wav, 48000)
    out = tmp_path / "f.npz"
    assert cli.main(["features", str(p), "--out", str(out)]) == 0
    z = np.load(out)
    np.testing.assert_array_equal(z["flow_mel_24k"], audio.mel_24k(audio.load_wav(p, 24000)))
    assert z["whisper_log_mel_128"].shape == (100, 128)
    # an existing output is not overwritten without asking
    assert cli.main(["features", str(p), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
    for argv, msg in [
        (["features", str(tmp_path / "missing.wav"), "--out", str(tmp_path / "o.npz")], "audio file not found"),
        (["config", "--set", "flow.nope=1"], "unknown config key 'flow.nope'"),
        (["config", "--preset", "huge"], "unknown preset"),
        (["normalize", "hi", "--tokenizer-dir", str(tmp_path)], "not a Qwen2 tokenizer directory"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, err
