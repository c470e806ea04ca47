"""Training-side flow options (cosyvoice2_jax/flow/train_options.py): time laws and per-t weights
against their formulas, the official default leaves the draws untouched, the YAML block, errors."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.config import CFMConfig
from cosyvoice2_jax.errors import ConfigError
from cosyvoice2_jax.flow import cfm
from cosyvoice2_jax.flow import train_options as TO
from cosyvoice2_jax.train.run import load_train_file

from conftest import REPO

U = jnp.asarray([0.0, 0.1, 0.5, 0.8413447460685429, 0.99], jnp.float32)  # 0.8413.. = Phi(1)


def test_time_laws():
    np.testing.assert_array_equal(TO.flow_time(U, TO.FlowTrainOptions()), cfm.schedule(U, "cosine"))
    np.testing.assert_array_equal(TO.flow_time(U, TO.FlowTrainOptions(time_law="uniform")), U)
    t = TO.flow_time(U, TO.FlowTrainOptions(time_law="logit_normal", logit_mean=0.3, logit_std=2.0))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert abs(float(t[2]) - sig(0.3)) < 1e-6  # median
    assert abs(float(t[3]) - sig(0.3 + 2.0)) < 1e-5  # u = Phi(1) -> m + s
    assert 0.0 < float(t[0]) < 1e-3  # u = 0 is clipped, not -inf


def test_loss_weights():
    t = jnp.asarray([0.0, 0.5, 0.9])
    assert TO.loss_weight(t, TO.FlowTrainOptions()) is None
    np.testing.assert_allclose(TO.loss_weight(t, TO.FlowTrainOptions(loss_weighting="cosmap")),
                               [2 / math.pi, 4 / math.pi, 2 / (math.pi * (1 - 1.8 + 1.62))], rtol=1e-6)
    w = TO.loss_weight(t, TO.FlowTrainOptions(loss_weighting="logit_normal"))
    assert abs(float(w[1]) - 1 / (math.sqrt(2 * math.pi) * 0.25)) < 1e-5  # density at t = 1/2
    z = math.log(0.9 / 0.1)
    assert abs(float(w[2]) - math.exp(-z * z / 2) / (math.sqrt(2 * math.pi) * 0.09)) < 1e-5


def test_official_default_leaves_draws_and_config():
    draws = {"t_u": U, "z": jnp.zeros((5, 2, 1))}
    assert TO.apply_to_draws(draws, TO.FlowTrainOptions()) is draws
    assert TO.apply_to_cfm(CFMConfig(), TO.FlowTrainOptions()) == CFMConfig()
    assert TO.apply_to_cfm(CFMConfig(), TO.FlowTrainOptions(cfg_drop=0.1)).training_cfg_rate == 0.1
    d = TO.apply_to_draws(draws, TO.FlowTrainOptions(time_law="uniform", loss_weighting="cosmap"))
    np.testing.assert_array_equal(d["t"], U)
    assert d["loss_weight"].shape == (5,)


def test_options_reach_the_loss():
    """With the cfm_loss hook, a zero estimator gives loss = sum_b w_b |x1 - (1 - s) z|^2 / (N C)
    and y is on the path at the law's t."""
    opts = TO.FlowTrainOptions(time_law="uniform", loss_weighting="cosmap")
    r = np.random.default_rng(0)
    B, Fr, C = 3, 4, 2
    x1, z = r.normal(size=(B, Fr, C)).astype(np.float32), r.normal(size=(B, Fr, C)).astype(np.float32)
    u = np.float32([0.2, 0.5, 0.7])
    draws = TO.apply_to_draws({"t_u": jnp.asarray(u), "z": jnp.asarray(z), "cfg_u": jnp.ones((B,)),
                               "prompt_len": jnp.zeros((B,), jnp.int32)}, opts)
    cfg = CFMConfig()
    loss, y = cfm.cfm_loss(lambda y, v, mu, t, s, c: jnp.zeros_like(y), jnp.asarray(x1), jnp.ones((B, Fr), bool),
                           jnp.asarray(x1), jnp.ones((B, 1)), jnp.asarray(x1), draws, cfg)
    s = cfg.sigma_min
    w = 2 / (np.pi * (1 - 2 * u + 2 * u * u))
    want = np.sum(w[:, None, None] * (x1 - (1 - s) * z) ** 2) / (B * Fr * C)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y), (1 - (1 - s) * u[:, None, None]) * z + u[:, None, None] * x1, atol=1e-6)


def test_bad_options_and_yaml():
    for kw, field in [(dict(time_law="beta"), "flow.time_law"), (dict(loss_weighting="snr"), "flow.loss_weighting"),
                      (dict(logit_std=0.0), "flow.logit_std"), (dict(cfg_drop=1.0), "flow.cfg_drop")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            TO.FlowTrainOptions(**kw)
    tf = load_train_file(REPO / "configs" / "train" / "flow.yaml")
    assert tf.flow == TO.FlowTrainOptions() and tf.flow.official
    tf = load_train_file(REPO / "configs" / "train" / "flow.yaml", ["flow.time_law=logit_normal", "flow.cfg_drop=0.1"])
    assert tf.flow.time_law == "logit_normal" and tf.flow.cfg_drop == 0.1
    with pytest.raises(ConfigError, match="flow.time_law"):
        load_train_file(REPO / "configs" / "train" / "flow.yaml", ["flow.time_law=beta"])
