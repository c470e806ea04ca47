"""Full-size (CosyVoice2-0.5B shapes) hidden-state parity vs transformers, random weights.

Slow (builds two 2 GB models): ``.venv/bin/python -m pytest tests/test_llm_slow.py -m slow -q``.
Acceptance (issue 3): max abs diff of the final hidden states <= 1e-4.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.config import ModelConfig
from cosyvoice2_jax.llm import modeling as M
from cosyvoice2_jax.llm import params as P
from oracle_client import unflatten_state_dict
from test_llm import qwen_json

pytestmark = pytest.mark.slow


def test_full_size_hidden_states_match_transformers(oracle):
    cfg = ModelConfig.cosyvoice2().llm
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 37, cfg.qwen.hidden_size)).astype(np.float32)
    lengths = np.array([37, 23])
    out = oracle("llm:full_parity", {"x": x, "lengths": lengths}, cfg=qwen_json(cfg), seed=1)
    ref_h, ref_logits = out.pop("h"), out.pop("logits")
    params = P.from_release(unflatten_state_dict(out), cfg)
    del out
    model = M.Qwen2LM(cfg)
    import jax

    h = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b, method=M.Qwen2LM.hidden_states))(
        params, jnp.asarray(x), jnp.asarray(lengths))
    logits = jax.jit(lambda p, a: model.apply({"params": p}, a, method=M.Qwen2LM.speech_logits))(params, h)
    diffs = []
    for i, n in enumerate(lengths):
        diffs.append(float(np.abs(np.asarray(h[i, :n]) - ref_h[i, :n]).max()))
    print(f"full-size max |dh| = {max(diffs):.2e}, max |dlogits| = "
          f"{max(float(np.abs(np.asarray(logits[i, :n]) - ref_logits[i, :n]).max()) for i, n in enumerate(lengths)):.2e}")
    assert max(diffs) <= 1e-4
