"""Test configuration shared by all tests.

* 8 simulated CPU devices (for the sharding tests); must be set before jax is imported.
* fp32 matmuls at "highest" precision for parity.
* ``oracle`` fixture: the official PyTorch code in its own venv (see tests/oracle_client.py).
  Tests that use it skip with the reason when the oracle venv is absent, unless
  ``COSYVOICE2_REQUIRE_ORACLE=1`` (set by .ci/run), where a missing oracle is an error.
* ``compiles``: names of the XLA programs compiled so far (jax's compile events), to check that
  bucketed entry points do not recompile; library code keeps no test counters.
* ``prompt_wav``: the prompt shipped in the package (``cosyvoice2_jax/data/prompt_en.wav``,
  espeak-ng, 22.05 kHz, with its transcript); ``speech_wavs``: it plus the two real-speech wavs the
  s3tokenizer package ships (found through the oracle): enough for front-end parity, no team data.
* ``real_wavs``: ``../shared/audio`` of the team checkout plus the s3tokenizer wavs, for the
  full-size tokenizer / CAM++ parity tests that need several real speakers.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

from oracle_client import Oracle, OracleUnavailable  # noqa: E402

REQUIRE_ORACLE = os.environ.get("COSYVOICE2_REQUIRE_ORACLE") == "1"

_COMPILED: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **kw: _COMPILED.append(kw.get("fun_name", "?"))
    if event == "/jax/core/compile/backend_compile_duration" else None)


class CompileLog:
    """``log.mark()`` then ``log.since()``: the programs XLA compiled in between (e.g.
    ``['jit(_solve_packed)']``); eager one-op programs (``jit(broadcast_in_dim)``) included."""

    def __init__(self):
        self._mark = len(_COMPILED)

    def mark(self) -> None:
        self._mark = len(_COMPILED)

    def since(self) -> list[str]:
        return list(_COMPILED[self._mark:])


def load_script(name: str):
    """Import ``scripts/<name>.py`` as module ``name`` (once per session)."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture
def compiles() -> CompileLog:
    return CompileLog()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "oracle" in item.fixturenames:
            item.add_marker(pytest.mark.oracle)


@pytest.fixture(scope="session")
def oracle():
    try:
        o = Oracle()
    except OracleUnavailable as e:
        if REQUIRE_ORACLE:
            pytest.fail(f"COSYVOICE2_REQUIRE_ORACLE=1 but {e}")
        pytest.skip(str(e))
    yield o
    o.close()


@pytest.fixture(scope="session")
def prompt_wav() -> tuple[Path, str]:
    from cosyvoice2_jax.pipeline.frontend import example_prompt

    return example_prompt()


@pytest.fixture(scope="session")
def speech_wavs(prompt_wav, oracle) -> list[Path]:
    """The shipped prompt plus the two s3tokenizer package wavs (real speech)."""
    out = oracle("frontend:s3tokenizer_assets")
    return [prompt_wav[0]] + [Path(str(p)) for p in out["paths"].tolist()]


SHARED_AUDIO = REPO.parent / "shared" / "audio"


@pytest.fixture(scope="session")
def shared_wavs() -> list[Path]:
    wavs = sorted(SHARED_AUDIO.glob("*.wav")) if SHARED_AUDIO.is_dir() else []
    if not wavs:
        if REQUIRE_ORACLE:
            pytest.fail(f"no real speech found in {SHARED_AUDIO}")
        pytest.skip(f"real speech not found in {SHARED_AUDIO} (team data checkout)")
    return wavs


@pytest.fixture(scope="session")
def real_wavs(shared_wavs, oracle) -> list[Path]:
    """shared/audio wavs plus the two s3tokenizer package wavs."""
    out = oracle("frontend:s3tokenizer_assets")
    extra = [Path(str(p)) for p in out["paths"].tolist()]
    return list(shared_wavs) + extra


@pytest.fixture(scope="session")
def tiny_release(oracle, tmp_path_factory):
    """One tiny random-weight release per session (scripts/make_random_release.py, made by the
    official modules): ``(directory, summary)``."""
    mrr = load_script("make_random_release")
    out = tmp_path_factory.mktemp("release") / "CosyVoice2-tiny"
    return out, mrr.make_release(out, "tiny", seed=0, oracle=oracle)
