"""Full-size flow parity (release config, random re-drawn weights) against the official
``CausalMaskedDiffWithXvec.inference``. Acceptance: max abs diff <= 1e-4 on the mel.

Slow (~minutes on 2 cores: official build + JAX compile of the full model):
``.venv/bin/python -m pytest -m slow tests/test_flow_slow.py -q``
"""
from __future__ import annotations

import numpy as np
import pytest

from cosyvoice2_jax.config import ModelConfig
from cosyvoice2_jax.flow import modeling
from cosyvoice2_jax.flow import params as flow_params
from oracle_client import unflatten_state_dict

pytestmark = pytest.mark.slow


def test_full_size_inference_parity(oracle):
    cfg = ModelConfig.cosyvoice2().flow
    params = flow_params.from_torch(unflatten_state_dict(oracle("flow:state_dict", {}, seed=3)), cfg)
    r = np.random.default_rng(3)
    inputs = {"token": r.integers(0, 6561, (1, 43)), "prompt_token": r.integers(0, 6561, (1, 20)),
              "prompt_feat": r.normal(size=(1, 40, 80)).astype(np.float32),
              "embedding": r.normal(size=(1, 192)).astype(np.float32)}
    cases = [(False, True), (True, False)]
    ref = oracle("flow:inference", inputs, seed=3, cases=[[str(int(s)), str(int(f))] for s, f in cases])
    for streaming, finalize in cases:
        mel = modeling.inference(params, cfg, **inputs, streaming=streaming, finalize=finalize)
        want = np.transpose(ref[f"mel_{int(streaming)}{int(finalize)}"], (0, 2, 1))
        assert mel.shape == want.shape
        err = float(np.max(np.abs(mel - want)))
        print(f"full-size streaming={streaming} finalize={finalize}: max abs diff {err:.3g}")
        assert err <= 1e-4, err
