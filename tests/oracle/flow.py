"""Oracle tasks for the flow (official CausalMaskedDiffWithXvec and its submodules).

Models are built once per ``dims`` (a dict, see ``_build``) and ``seed``, with every weight
re-drawn by ``common.reinit_``. The official encoder hard-codes 512 channels in its
pre-lookahead/upsample layers and 4 up-encoders; for tiny sizes those three attributes are
replaced by the same official classes built at the tiny size.
"""
from __future__ import annotations

import numpy as np
import torch

from common import reinit_, state_dict_np, to_np, to_torch

FULL = dict(input_size=512, enc_heads=8, enc_units=2048, enc_blocks=6, enc_up_blocks=4,
            dec_channels=256, dec_head_dim=64, dec_heads=8, dec_blocks=4, dec_mid=12)
_CACHE: dict = {}


def _build(dims: dict | None, seed: int):
    dims = dict(FULL, **(dims or {}))
    key = (tuple(sorted(dims.items())), seed)
    if key in _CACHE:
        return _CACHE[key]
    from omegaconf import DictConfig
    from cosyvoice.flow.decoder import CausalConditionalDecoder
    from cosyvoice.flow.flow import CausalMaskedDiffWithXvec
    from cosyvoice.flow.flow_matching import CausalConditionalCFM
    from cosyvoice.transformer.upsample_encoder import (PreLookaheadLayer, Upsample1D,
                                                        UpsampleConformerEncoder)

    d = dims["input_size"]

    def make_encoder(n):
        return UpsampleConformerEncoder(
            output_size=d, attention_heads=dims["enc_heads"], linear_units=dims["enc_units"], num_blocks=n,
            dropout_rate=0.1, positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True,
            input_layer="linear", pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn",
            input_size=d, use_cnn_module=False, macaron_style=False, static_chunk_size=25)

    encoder = make_encoder(dims["enc_blocks"])
    if d != 512 or dims["enc_up_blocks"] != 4:
        encoder.pre_lookahead_layer = PreLookaheadLayer(channels=d, pre_lookahead_len=3)
        encoder.up_layer = Upsample1D(channels=d, out_channels=d, stride=2)
        encoder.up_encoders = make_encoder(dims["enc_up_blocks"]).encoders
    estimator = CausalConditionalDecoder(
        in_channels=320, out_channels=80, channels=[dims["dec_channels"]], dropout=0.0,
        attention_head_dim=dims["dec_head_dim"], n_blocks=dims["dec_blocks"], num_mid_blocks=dims["dec_mid"],
        num_heads=dims["dec_heads"], act_fn="gelu", static_chunk_size=50, num_decoding_left_chunks=-1)
    cfm_params = DictConfig(dict(sigma_min=1e-06, solver="euler", t_scheduler="cosine", training_cfg_rate=0.2,
                                 inference_cfg_rate=0.7, reg_loss_type="l1"))
    decoder = CausalConditionalCFM(in_channels=240, n_spks=1, spk_emb_dim=80, cfm_params=cfm_params,
                                   estimator=estimator)
    flow = CausalMaskedDiffWithXvec(
        input_size=d, output_size=80, spk_embed_dim=192, output_type="mel", vocab_size=6561,
        input_frame_rate=25, only_mask_loss=True, token_mel_ratio=2, pre_lookahead_len=3,
        encoder=encoder, decoder=decoder)
    reinit_(flow, seed)
    flow.eval()
    _CACHE.clear()
    _CACHE[key] = flow
    return flow


def official_noise(inputs):
    """torch CPU randn(1, 80, 15000) drawn right after seed 0 (CausalConditionalCFM.__init__)."""
    from cosyvoice.utils.common import set_all_random_seed

    set_all_random_seed(0)
    return {"noise": to_np(torch.randn([1, 80, 50 * 300]))}


def state_dict(inputs, dims=None, seed=0):
    flow = _build(dims, seed)
    return {f"sd/{k}": v for k, v in state_dict_np(flow).items()}


def _pad_mask(lens, T):
    return torch.arange(T)[None, :] < lens[:, None]


@torch.no_grad()
def encoder_parts(inputs, dims=None, seed=0, streaming=False):
    """Submodule outputs of the encoder on ``xs (B, T, D)``, ``lens (B,)``."""
    from cosyvoice.utils.mask import add_optional_chunk_mask

    enc = _build(dims, seed).encoder
    xs, lens = to_torch(inputs["xs"]).float(), to_torch(inputs["lens"]).long()
    T = xs.shape[1]
    masks = _pad_mask(lens, T)[:, None]
    x, pos_emb, _ = enc.embed(xs, masks)
    chunk = add_optional_chunk_mask(x, masks, False, False, 0, 25 if streaming else 0, -1)
    pre = enc.pre_lookahead_layer(x)
    layer0 = enc.encoders[0]
    att = layer0.self_attn(layer0.norm_mha(pre), layer0.norm_mha(pre), layer0.norm_mha(pre), chunk, pos_emb)[0]
    l0 = layer0(pre, chunk, pos_emb, masks)[0]
    ctx = enc.pre_lookahead_layer(x[:, :-3], context=x[:, -3:])
    up = enc.up_layer(x.transpose(1, 2), lens)[0].transpose(1, 2)
    h, hm = enc(xs, lens, streaming=streaming)
    return {"embed": to_np(x), "pos_emb": to_np(pos_emb), "pre": to_np(pre), "attn": to_np(att),
            "layer0": to_np(l0), "pre_ctx": to_np(ctx), "up": to_np(up), "out": to_np(h),
            "out_mask": to_np(hm)}


@torch.no_grad()
def decoder_parts(inputs, dims=None, seed=0, streaming=False):
    """Estimator outputs on ``x, mu, cond (B, 80, F)``, ``mask (B, 1, F)``, ``t (B,)``, ``spks (B, 80)``."""
    from cosyvoice.utils.common import mask_to_bias
    from cosyvoice.utils.mask import add_optional_chunk_mask

    est = _build(dims, seed).decoder.estimator
    x, mu, cond = (to_torch(inputs[k]).float() for k in ("x", "mu", "cond"))
    mask, t, spks = to_torch(inputs["mask"]).float(), to_torch(inputs["t"]).float(), to_torch(inputs["spks"]).float()
    out = est(x, mask, mu, t, spks, cond, streaming=streaming)
    t_emb = est.time_mlp(est.time_embeddings(t).to(t.dtype))
    packed = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)
    resnet, tblocks, _ = est.down_blocks[0]
    r = resnet(packed, mask, t_emb)
    h = r.transpose(1, 2)
    if streaming:
        am = add_optional_chunk_mask(h, mask.bool(), False, False, 0, 50, -1)
    else:
        am = add_optional_chunk_mask(h, mask.bool(), False, False, 0, 0, -1).repeat(1, h.size(1), 1)
    tb = tblocks[0](hidden_states=h, attention_mask=mask_to_bias(am, h.dtype), timestep=t_emb)
    return {"out": to_np(out), "t_emb": to_np(t_emb), "resnet": to_np(r), "tblock": to_np(tb)}


@torch.no_grad()
def cfm_solve(inputs, dims=None, seed=0, streaming=False, n_timesteps=1):
    """CausalConditionalCFM.forward (official noise, CFG 0.7) on ``mu, cond (1, 80, F)``, ``spks (1, 80)``."""
    cfm = _build(dims, seed).decoder
    mu, cond, spks = (to_torch(inputs[k]).float() for k in ("mu", "cond", "spks"))
    mask = torch.ones(1, 1, mu.shape[-1])
    out, _ = cfm(mu=mu, mask=mask, n_timesteps=n_timesteps, spks=spks, cond=cond, streaming=streaming)
    return {"out": to_np(out)}


@torch.no_grad()
def inference(inputs, dims=None, seed=0, cases=(("0", "0"),)):
    """CausalMaskedDiffWithXvec.inference for each (streaming, finalize) in ``cases``."""
    flow = _build(dims, seed)
    token, ptoken = to_torch(inputs["token"]).long(), to_torch(inputs["prompt_token"]).long()
    pfeat, emb = to_torch(inputs["prompt_feat"]).float(), to_torch(inputs["embedding"]).float()
    out = {}
    for s, f in cases:
        feat, _ = flow.inference(token, torch.tensor([token.shape[1]]), ptoken, torch.tensor([ptoken.shape[1]]),
                                 pfeat, torch.tensor([pfeat.shape[1]]), emb, streaming=s == "1", finalize=f == "1")
        out[f"mel_{s}{f}"] = to_np(feat)
    return out


@torch.no_grad()
def training_loss(inputs, dims=None, seed=0, streaming=False):
    """CausalMaskedDiffWithXvec.forward with its random draws injected.

    inputs: speech_token (B, S), speech_token_len, speech_feat (B, F, 80), speech_feat_len,
    embedding (B, 192), prompt_len (B,) cond prefix per row (0 = none), t_u (B,), z (B, 80, F),
    cfg_u (B,).
    """
    import cosyvoice.flow.flow as flow_mod

    flow = _build(dims, seed)
    prompt_len = [int(v) for v in inputs["prompt_len"]]
    draws = [0.0 if streaming else 0.9]
    ints = []
    for p in prompt_len:
        draws.append(0.9 if p > 0 else 0.1)
        if p > 0:
            ints.append(p)

    class Scripted:
        @staticmethod
        def random():
            return draws.pop(0)

        @staticmethod
        def randint(a, b):
            v = ints.pop(0)
            assert a <= v <= b, (a, v, b)
            return v

    t_u, z, cfg_u = (to_torch(inputs[k]).float() for k in ("t_u", "z", "cfg_u"))
    real_rand, real_randn_like, real_random = torch.rand, torch.randn_like, flow_mod.random
    rands = [t_u.view(-1, 1, 1), cfg_u]

    def fake_rand(*args, **kwargs):
        return rands.pop(0)

    try:
        torch.rand, torch.randn_like, flow_mod.random = fake_rand, (lambda x: z.clone()), Scripted
        batch = {k: to_torch(inputs[k]) for k in ("speech_token", "speech_token_len", "speech_feat",
                                                   "speech_feat_len", "embedding")}
        batch["speech_feat"] = batch["speech_feat"].float()
        batch["embedding"] = batch["embedding"].float()
        loss = flow(batch, torch.device("cpu"))["loss"]
    finally:
        torch.rand, torch.randn_like, flow_mod.random = real_rand, real_randn_like, real_random
    assert not draws and not ints and not rands
    return {"loss": to_np(loss)}


@torch.no_grad()
def timed_inference(inputs, dims=None, seed=0, streaming=False, finalize=True, repeats=3, warmup=True):
    """Wall times (s) of ``repeats`` official ``inference`` calls (after one warm-up call unless
    ``warmup=False``: a caller interleaving single timed calls warms up once) and the mel."""
    import time

    flow = _build(dims, seed)
    token, ptoken = to_torch(inputs["token"]).long(), to_torch(inputs["prompt_token"]).long()
    pfeat, emb = to_torch(inputs["prompt_feat"]).float(), to_torch(inputs["embedding"]).float()
    args = (token, torch.tensor([token.shape[1]]), ptoken, torch.tensor([ptoken.shape[1]]), pfeat,
            torch.tensor([pfeat.shape[1]]), emb)
    times = []
    for i in range(repeats + int(warmup)):
        t0 = time.perf_counter()
        feat, _ = flow.inference(*args, streaming=streaming, finalize=finalize)
        if i or not warmup:
            times.append(time.perf_counter() - t0)
    return {"mel": to_np(feat), "times": np.array(times), "threads": np.array(torch.get_num_threads())}
