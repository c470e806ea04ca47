"""Flow training objective: equals the official loss with the same draws, padding-invariant,
learns on real shards (tiny config)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.frontend import audio as A
from cosyvoice2_jax.train import data as D
from cosyvoice2_jax import sharding as M
from cosyvoice2_jax.train import trainer as TR
from cosyvoice2_jax.train.flow import FlowObjective
from cosyvoice2_jax.train.optim import OptimConfig
from test_flow import CFG, DIMS, params, torch_sd  # noqa: F401  (fixtures)
from test_train_data import make_shards


def _case():
    r = np.random.default_rng(5)
    B, S = 3, 30
    tl = np.array([30, 22, 27])
    tok = r.integers(0, 6561, (B, S)) * (np.arange(S)[None] < tl[:, None])
    fl = 2 * tl
    feat = r.normal(size=(B, 2 * S, 80)).astype(np.float32) * (np.arange(2 * S)[None, :, None] < fl[:, None, None])
    emb = r.normal(size=(B, 192)).astype(np.float32)
    draws = {"t_u": r.uniform(size=B).astype(np.float32), "z": r.normal(size=(B, 2 * S, 80)).astype(np.float32),
             "cfg_u": np.array([0.5, 0.1, 0.9], np.float32), "prompt_len": np.array([0, 9, 12])}
    return tok, tl, feat, fl, emb, draws


@pytest.mark.parametrize("streaming", [False, True])
def test_flow_objective_equals_official_loss_and_ignores_padding(oracle, params, streaming):  # noqa: F811
    tok, tl, feat, fl, emb, draws = _case()

    ref = oracle("flow:training_loss", {
        "speech_token": tok, "speech_token_len": tl, "speech_feat": feat, "speech_feat_len": fl, "embedding": emb,
        "prompt_len": draws["prompt_len"], "t_u": draws["t_u"], "z": np.transpose(draws["z"], (0, 2, 1)),
        "cfg_u": draws["cfg_u"]}, dims=DIMS, seed=1, streaming=streaming)["loss"]
    chunk = CFG.encoder.static_chunk_size if streaming else 0
    obj = FlowObjective(CFG)

    def batch(rows, extra_tok):
        pad_r = rows - 3
        S = tok.shape[1] + extra_tok
        b = {"speech_token": np.pad(tok, ((0, pad_r), (0, extra_tok))), "speech_token_len": np.pad(tl, (0, pad_r)),
             "speech_feat": np.pad(feat, ((0, pad_r), (0, 2 * extra_tok), (0, 0))),
             "speech_feat_len": np.pad(fl, (0, pad_r)), "embedding": np.pad(emb, ((0, pad_r), (0, 0)), constant_values=1.0),
             "valid": np.arange(rows) < 3,
             "draw_t_u": np.pad(draws["t_u"], (0, pad_r), constant_values=0.5),
             "draw_z": np.pad(draws["z"], ((0, pad_r), (0, 2 * extra_tok), (0, 0)), constant_values=0.3),
             "draw_cfg_u": np.pad(draws["cfg_u"], (0, pad_r), constant_values=0.5),
             "draw_prompt_len": np.pad(draws["prompt_len"], (0, pad_r)),
             "draw_chunk": np.full((rows,), chunk, np.int32)}
        assert b["speech_token"].shape == (rows, S)
        return {k: jnp.asarray(v) for k, v in b.items()}

    f = jax.jit(obj.loss_fn)
    exact, _ = f(params, batch(3, 0), jax.random.key(0))
    np.testing.assert_allclose(float(exact), float(ref), rtol=1e-5)
    padded, m = f(params, batch(5, 0), jax.random.key(0))  # padding rows (valid=False) add nothing
    np.testing.assert_allclose(float(padded), float(ref), rtol=1e-5)
    assert float(m["frames"]) == fl.sum()
    # Extra padded *length* (bucketing) is not neutral, in the official code either: the encoder
    # look-ahead of a row's last 3 tokens reads the padded positions' embeddings (LayerNorm of the
    # bias, not zeros), and the official pads only to the batch maximum, so its longest row reads
    # zeros. Bucketed batches make every row read padded embeddings; the loss moves slightly.
    longer, _ = f(params, batch(3, 20), jax.random.key(0))
    assert abs(float(longer) - float(ref)) < 1e-2 * abs(float(ref))


def test_tiny_flow_loss_decreases_on_real_shards(tmp_path, shared_wavs):
    real = [A.load_wav(p, 16000) for p in shared_wavs]
    lst, _ = make_shards(tmp_path, n_rows=8, n_shards=1, real=real, seed=31)
    dcfg = D.DataConfig(data_list=str(lst), max_frames_in_batch=1200, token_buckets=(150,), text_buckets=(64,),
                        num_threads=1, min_length=50)
    data = D.TrainData(dcfg, lambda t: list(t.encode())[:60])
    cfg = TR.TrainConfig(steps=50, save_every=1000, log_every=1, workdir=str(tmp_path / "run"),
                         optim=OptimConfig(lr=2e-3), mesh=M.MeshConfig(1, 1, 1), async_save=False)
    out = TR.train(FlowObjective(CFG), data, cfg, progress=False)
    losses = [h["loss"] for h in out["history"]]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-10:])


def test_trained_flow_exports_to_official_names(oracle, params):  # noqa: F811
    from cosyvoice2_jax.flow import params as flow_params
    from cosyvoice2_jax.params_util import flatten

    tok, tl, feat, fl, emb, _ = _case()
    b = {"speech_token": tok, "speech_token_len": tl, "speech_feat": feat, "speech_feat_len": fl, "embedding": emb,
         "valid": np.ones(3, bool)}
    obj = FlowObjective(CFG, init_from=params)
    mesh = M.make_mesh((1, 1, 1))
    from cosyvoice2_jax.train.optim import make_optimizer

    tx = make_optimizer(OptimConfig(lr=1e-2))
    state, sh = TR.init_state(obj, tx, mesh, 0)
    state, _ = TR.make_train_step(obj, tx, sh, mesh, donate=False)(state, b)
    trained = jax.device_get(state["params"])
    sd = flow_params.to_torch(trained)
    out = oracle("train:flow_load_strict", {f"sd/{k}": v for k, v in sd.items()}, dims=DIMS)
    assert int(out["n"]) == sum(int(np.prod(v.shape)) for v in flatten(trained).values())
    back = flow_params.from_torch(sd, CFG)
    for a, c in zip(jax.tree.leaves(back), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
