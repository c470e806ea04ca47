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


def test_help_starts_without_jax():
    """``--help`` imports neither JAX nor flax (fast start), ``config`` not flax; synth's help still
    lists the flow-sampler flags."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import contextlib, io, sys\nfrom cosyvoice2_jax import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        cli.main(['--help'])\n    except SystemExit:\n        pass\n"
            "    print('jax' in sys.modules, 'flax' in sys.modules, file=sys.stderr)\n"
            "    cli.main(['config', '--preset', 'tiny'])\n"
            "print('flax' in sys.modules, file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(Path(cli.__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stderr
    assert out.split() == ["False", "False", "False"]
    assert "--flow-steps" in cli.build_parser("synth")._subparsers._group_actions[0].choices["synth"].format_help()


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
        (["synth", "--model-dir", str(tmp_path), "--mode", "cross_lingual", "--prompt-wav", "p.wav", "--text", "hi",
          "--speaker-tag", "A", "--out", str(tmp_path / "o.wav")], "--speaker-tag applies to --mode sft and zero_shot"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, err


# ------------------------------------------------------------------ synth: bad input, outputs (no model)
import types  # noqa: E402

import pytest  # noqa: E402

from cosyvoice2_jax.llm.generate import GenerationError  # noqa: E402


class _FakeTTS:
    """Stands in for CosyVoice2 in `synth`: one 0.1 s chunk per '.'-segment; ``fail`` raises after the first."""

    sample_rate = 24000
    loaded = types.SimpleNamespace(timings={})

    def __init__(self, fail=None):
        self.fail, self.calls = fail, []
        self.text = types.SimpleNamespace(normalize=lambda t, split=True, text_frontend=True:
                                          [s.strip() + "." for s in t.split(".") if s.strip()])

    def inference_cross_lingual(self, text, prompt, spk, text_frontend=True, stream=False, speed=1.0):
        self.calls.append((text, prompt))
        for i, _ in enumerate(self.text.normalize(text)):
            if i == 1 and self.fail is not None:
                raise self.fail
            yield {"tts_speech": np.full((1, 2400), 0.1, np.float32)}


@pytest.fixture
def synth(tmp_path, monkeypatch, capsys):
    """``run(extra_args, fake) -> (rc, stderr)`` with the model load replaced by ``fake`` (None: loading fails the test)."""
    from cosyvoice2_jax.pipeline import loading, model

    p16 = tmp_path / "p.wav"
    sf.write(p16, (np.sin(np.arange(48000) * 0.05) * 0.3).astype(np.float32), 16000)

    def run(extra, fake=None):
        def load(cls, *a, **k):
            assert fake is not None, "the model was loaded before the bad input was caught"
            return fake
        monkeypatch.setattr(model.CosyVoice2, "from_pretrained", classmethod(load))
        monkeypatch.setattr(loading, "is_converted", lambda d: True)
        argv = ["synth", "--model-dir", str(tmp_path), "--mode", "cross_lingual", "--no-cache"]
        if "--prompt-wav" not in extra:
            argv += ["--prompt-wav", str(p16)]
        rc = cli.main(argv + extra)
        return rc, capsys.readouterr().err
    return run


BAD_SYNTH = {  # name: (extra args, expected message); {tmp} is the test folder
    "out_proc": (["--text", "Hi.", "--out", "/proc/x.wav"], "cannot write /proc/x.wav"),
    "out_under_file": (["--text", "Hi.", "--out", "{tmp}/file.txt/sub/x.wav"], "cannot write"),
    "text_file_latin1": (["--text-file", "{tmp}/latin1.txt", "--out", "{tmp}/od"],
                         "not UTF-8: byte 0xe9 at byte offset 10 (line 2)"),
    "speed_nan": (["--text", "Hi.", "--speed", "nan", "--out", "{tmp}/o.wav"], "--speed must be a finite number > 0"),
    "speed_inf": (["--text", "Hi.", "--speed", "inf", "--out", "{tmp}/o.wav"], "--speed must be a finite number > 0"),
    "text_zero_width": (["--text", "\u200b\u200d", "--out", "{tmp}/o.wav"], "--text is empty"),
    "prompt_40s": (["--text", "Hi.", "--prompt-wav", "{tmp}/long.wav", "--out", "{tmp}/o.wav"],
                   "40.0 s long; the limit is 30 s"),
    "prompt_8khz": (["--text", "Hi.", "--prompt-wav", "{tmp}/low.wav", "--out", "{tmp}/o.wav"], "8000 Hz"),
    # flow sampler flags: the flag and the field named
    "flow_steps_0": (["--text", "Hi.", "--flow-steps", "0", "--out", "{tmp}/o.wav"], "--flow-steps 0: sampler.steps"),
    "flow_solver": (["--text", "Hi.", "--flow-solver", "rk5", "--out", "{tmp}/o.wav"], "--flow-solver rk5: sampler.solver"),
    "cfg_negative": (["--text", "Hi.", "--cfg-rate", "-0.5", "--out", "{tmp}/o.wav"], "--cfg-rate -0.5: sampler.cfg_rate"),
    "flow_sampler_yaml": (["--text", "Hi.", "--flow-sampler", "{tmp}/s.yaml", "--out", "{tmp}/o.wav"],
                          "s.yaml: sampler.times: must increase strictly from 0 to 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_SYNTH))
def test_synth_bad_input_is_one_line_before_the_model_loads(synth, tmp_path, case):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "s.yaml").write_text("steps: 2\ngrid: explicit\ntimes: [0.0, 0.7, 0.5]\n")
    (tmp_path / "latin1.txt").write_bytes("Hello.\nCaf\xe9 au lait.\n".encode("latin-1"))
    sf.write(tmp_path / "long.wav", (np.sin(np.arange(16000 * 40) * 0.05) * 0.3).astype(np.float32), 16000)
    sf.write(tmp_path / "low.wav", (np.sin(np.arange(8000) * 0.05) * 0.3).astype(np.float32), 8000)
    extra, msg = BAD_SYNTH[case]
    rc, err = synth([a.replace("{tmp}", str(tmp_path)) for a in extra])
    assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("**/*.partial"))


def test_synth_text_file_outputs_by_line_number(synth, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_bytes("\ufeffHello there.\n\n \u200b\nGood morning.\n".encode("utf-8"))  # BOM, blank lines 2-3
    fake = _FakeTTS()
    rc, err = synth(["--text-file", str(lines), "--out", str(tmp_path / "out"), "--quiet"], fake)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0001.wav", "0004.wav"]
    assert [c[0] for c in fake.calls] == ["Hello there.", "Good morning."]  # the BOM is not text
    assert "line 3 -> 0003.wav" in cli.build_parser()._subparsers._group_actions[0].choices["synth"].format_help()


def test_synth_flow_sampler_flags_over_the_config(synth, tmp_path):
    """--flow-* flags replace single fields of the model config's sampler (here the official one)."""
    from cosyvoice2_jax.config import ModelConfig
    from cosyvoice2_jax.flow.sampling import SamplerConfig

    fake = _FakeTTS()
    fake.config = ModelConfig.tiny()
    rc, err = synth(["--text", "Hi.", "--out", str(tmp_path / "o.wav"), "--quiet"], fake)
    assert rc == 0 and not hasattr(fake, "flow_sampler"), err  # no flag: the config's sampler stays
    rc, err = synth(["--text", "Hi.", "--out", str(tmp_path / "o.wav"), "--overwrite", "--quiet", "--flow-steps", "4",
                     "--flow-solver", "heun", "--flow-guidance", "none"], fake)
    assert rc == 0, err
    assert fake.flow_sampler == SamplerConfig(steps=4, solver="heun", guidance="none")


def test_synth_failure_or_interrupt_leaves_no_file(synth, tmp_path):
    for exc, code in ((GenerationError("the LM produced no speech tokens"), 2), (KeyboardInterrupt(), 130),
                      (RuntimeError("XLA out of memory"), None)):
        out = tmp_path / "x.wav"
        if code is None:  # an unexpected error keeps its traceback, and still leaves no file
            with pytest.raises(RuntimeError):
                synth(["--text", "One. Two. Three.", "--out", str(out)], _FakeTTS(fail=exc))
        else:
            rc, err = synth(["--text", "One. Two. Three.", "--out", str(out)], _FakeTTS(fail=exc))
            assert rc == code, err
        assert not out.exists() and not list(tmp_path.glob("*.partial")), list(tmp_path.iterdir())


def test_synth_progress_and_prompt_warning(synth, tmp_path):
    mid = tmp_path / "mid.wav"
    sf.write(mid, (np.sin(np.arange(16000 * 16) * 0.05) * 0.3).astype(np.float32), 16000)
    rc, err = synth(["--text", "One. Two. Three.", "--prompt-wav", str(mid), "--out", str(tmp_path / "y.wav")],
                    _FakeTTS())
    assert rc == 0, err
    assert "3/3" in err and "segment" in err  # per-segment progress for one long --text
    assert "warning: prompt audio" in err and "16.0 s long" in err
    assert sf.read(tmp_path / "y.wav")[0].shape[0] == 3 * 2400
