"""Oracle tasks for the text-speech LM: the official ``cosyvoice.llm.llm.Qwen2LM`` around a
transformers 4.51 ``Qwen2ForCausalLM`` built from a config (no ``from_pretrained``), random
weights re-drawn with ``common.reinit_``. Models are cached per (config, seed) so one test module
builds each once.
"""
from __future__ import annotations

import json
import random as _pyrandom
from functools import partial

import numpy as np
import torch

from common import reinit_, state_dict_np, to_np, to_torch

_MODELS: dict = {}


def _qwen_config(cfg: dict):
    from transformers import Qwen2Config

    base = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                attention_dropout=0.0)
    base.update(cfg)
    c = Qwen2Config(**base)
    c._attn_implementation = "eager"
    return c


def _model(cfg_json: str, seed: int, speech_token_size: int = 6561, reinit: bool = True):
    key = (cfg_json, seed, speech_token_size, reinit)
    if key not in _MODELS:
        from transformers import Qwen2ForCausalLM
        from cosyvoice.llm.llm import Qwen2Encoder, Qwen2LM
        from cosyvoice.utils.common import ras_sampling

        enc = Qwen2Encoder.__new__(Qwen2Encoder)
        torch.nn.Module.__init__(enc)
        enc.model = Qwen2ForCausalLM(_qwen_config(json.loads(cfg_json)))
        d = enc.model.config.hidden_size
        lm = Qwen2LM(llm_input_size=d, llm_output_size=d, speech_token_size=speech_token_size,
                     length_normalized_loss=True, lsm_weight=0, mix_ratio=[5, 15], llm=enc,
                     sampling=partial(ras_sampling, top_p=0.8, top_k=25, win_size=10, tau_r=0.1))
        if reinit:
            reinit_(lm, seed)
            _restore_rope(enc.model)
        lm.eval()
        _MODELS.clear()  # keep one model in memory at a time
        _MODELS[key] = lm
    return _MODELS[key]


@torch.no_grad()
def _restore_rope(model):
    """``common.reinit_`` also re-draws float buffers, including RoPE's (non-persistent)
    ``inv_freq``: put the real frequencies back."""
    c = model.config
    dim = c.hidden_size // c.num_attention_heads
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            buf.copy_(inv)


def build(inputs, cfg: str, seed: int = 0):
    """State dict of a Qwen2LM with the given Qwen2 config (JSON) and seed."""
    lm = _model(cfg, seed)
    return {f"sd/{k}": v for k, v in state_dict_np(lm).items()}


@torch.no_grad()
def hidden(inputs, cfg: str, seed: int = 0):
    """``Qwen2Encoder.forward``: final hidden states for right-padded ``x`` (B,T,D) and ``lengths``."""
    lm = _model(cfg, seed)
    h, _ = lm.llm(to_torch(inputs["x"]).float(), to_torch(inputs["lengths"]).long())
    return {"h": to_np(h)}


class _Uniforms:
    """Stands in for the ``random`` module inside cosyvoice.llm.llm: returns given draws."""

    def __init__(self, draws):
        self.draws = list(draws)

    def random(self):
        return float(self.draws.pop(0))


def _with_uniforms(draws):
    import cosyvoice.llm.llm as mod

    class _Ctx:
        def __enter__(self):
            self.saved = mod.random
            mod.random = _Uniforms(draws)

        def __exit__(self, *a):
            mod.random = self.saved
    return _Ctx()


def _batch(inputs):
    return {k: to_torch(inputs[k]).long() for k in
            ("text_token", "text_token_len", "speech_token", "speech_token_len",
             "reject_speech_token", "reject_speech_token_len") if k in inputs}


@torch.no_grad()
def forward(inputs, cfg: str, seed: int = 0):
    """Official ``Qwen2LM.forward`` (+ the assembled input/target and logits), ``random.random()``
    replaced by ``inputs["uniforms"]``; with ``reject_speech_token`` also ``forward_dpo``."""
    lm = _model(cfg, seed)
    batch = _batch(inputs)
    u = inputs["uniforms"].tolist()
    text_emb = lm.llm.model.model.embed_tokens(batch["text_token"])
    speech_emb = lm.speech_embedding(batch["speech_token"])
    with _with_uniforms(u):
        tgt, inp, inp_len = lm.prepare_lm_input_target(batch["text_token"], text_emb, batch["text_token_len"],
                                                       batch["speech_token"], speech_emb,
                                                       batch["speech_token_len"])
    h, _ = lm.llm(inp, inp_len)
    logits = lm.llm_decoder(h)
    with _with_uniforms(u):
        out = lm.forward(batch, torch.device("cpu"))
    res = {"lm_target": to_np(tgt), "lm_input": to_np(inp), "lm_input_len": to_np(inp_len),
           "logits": to_np(logits), "loss": to_np(out["loss"]), "acc": to_np(out["acc"])}
    if "reject_speech_token" in batch:
        u2 = inputs["dpo_uniforms"].tolist()
        with _with_uniforms(u2):
            d = lm.forward_dpo(batch, torch.device("cpu"))
        res.update({f"dpo_{k}": to_np(v) for k, v in d.items()})
    return res


# --------------------------------------------------------------------------- sampling
class _RecordingMultinomial:
    """Replaces ``Tensor.multinomial(1, replacement=True)`` by torch's own algorithm for one draw
    (``argmax(p / E)``, ``E ~ Exp(1)`` from the global generator) and records ``E``."""

    def __init__(self):
        self.draws = []
        self.saved = None

    def __enter__(self):
        self.saved = torch.Tensor.multinomial
        rec = self

        def mult(p, num_samples, replacement=False, *, generator=None):
            assert num_samples == 1
            e = torch.empty_like(p).exponential_(1)
            rec.draws.append(e.clone())
            return torch.argmax(p / e).reshape(1)
        torch.Tensor.multinomial = mult
        return self

    def __exit__(self, *a):
        torch.Tensor.multinomial = self.saved


def ras(inputs, top_p: float = 0.8, top_k: int = 25, win_size: int = 10, tau_r: float = 0.1):
    """Official ``ras_sampling`` on each row of ``logp`` (R, V) with ``decoded`` histories
    (R, n) of lengths ``n_decoded`` and seeds ``seeds``. Returns the picked ids (real
    ``multinomial``), the same with the recorded exponential draws (to check the model of
    multinomial), the draws (nucleus (R, top_k) zero-padded, random (R, V) or zeros), whether the
    fallback ran, and the candidate sets of ``nucleus_sampling``."""
    from cosyvoice.utils.common import ras_sampling

    logp = to_torch(inputs["logp"]).float()
    r, v = logp.shape
    ids, ids_rec, fell, e_nuc, e_rand, n_cand = [], [], [], np.zeros((r, top_k), np.float32), \
        np.zeros((r, v), np.float32), []
    for i in range(r):
        hist = inputs["decoded"][i, :int(inputs["n_decoded"][i])].tolist()
        torch.manual_seed(int(inputs["seeds"][i]))
        ids.append(int(ras_sampling(logp[i], hist, 25, top_p=top_p, top_k=top_k, win_size=win_size,
                                    tau_r=tau_r)))
        torch.manual_seed(int(inputs["seeds"][i]))
        with _RecordingMultinomial() as rec:
            ids_rec.append(int(ras_sampling(logp[i], hist, 25, top_p=top_p, top_k=top_k,
                                            win_size=win_size, tau_r=tau_r)))
        n_cand.append(rec.draws[0].numel())
        e_nuc[i, :n_cand[-1]] = to_np(rec.draws[0])
        fell.append(len(rec.draws) == 2)
        if len(rec.draws) == 2:
            e_rand[i] = to_np(rec.draws[1])
    return {"ids": np.array(ids), "ids_rec": np.array(ids_rec), "fallback": np.array(fell),
            "e_nuc": e_nuc, "e_rand": e_rand, "n_cand": np.array(n_cand)}


# --------------------------------------------------------------------------- inference
@torch.no_grad()
def greedy_inference(inputs, cfg: str, seed: int = 0, min_ratio: float = 2.0, max_ratio: float = 20.0):
    """Official ``Qwen2LM.inference`` (HF cache loop) with ``sampling`` replaced by argmax."""
    lm = _model(cfg, seed)
    saved = lm.sampling
    lm.sampling = lambda scores, decoded, k: scores.argmax().reshape(1)
    try:
        text = to_torch(inputs["text"]).long()[None]
        ptext = to_torch(inputs["prompt_text"]).long()[None]
        pspeech = to_torch(inputs["prompt_speech"]).long()[None]
        toks = list(lm.inference(text=text, text_len=torch.tensor([text.shape[1]], dtype=torch.int32),
                                 prompt_text=ptext,
                                 prompt_text_len=torch.tensor([ptext.shape[1]], dtype=torch.int32),
                                 prompt_speech_token=pspeech,
                                 prompt_speech_token_len=torch.tensor([pspeech.shape[1]], dtype=torch.int32),
                                 embedding=torch.zeros(1, 0), max_token_text_ratio=max_ratio,
                                 min_token_text_ratio=min_ratio))
    finally:
        lm.sampling = saved
    return {"tokens": np.array(toks, np.int64)}


# --------------------------------------------------------------------------- benchmark
@torch.no_grad()
def bench_decode(inputs, cfg: str, n_prompt_text: int = 150, n_prompt_speech: int = 48, n_tokens: int = 64,
                 repeats: int = 3, seed: int = 0):
    """Official ``Qwen2LM.inference`` (HF DynamicCache loop + RAS) timed: prefill seconds and decode
    seconds/token (medians over ``repeats``), with exactly ``n_tokens`` steps (min = max length)."""
    import time

    _MODELS.clear()
    lm = _model(cfg, seed, reinit=False)
    g = torch.Generator().manual_seed(seed)
    vocab = lm.llm.model.config.vocab_size
    text_len = 10
    ratio = n_tokens / text_len
    pre, per_tok = [], []
    for r in range(repeats):
        torch.manual_seed(r)
        text = torch.randint(0, vocab, (1, text_len), generator=g)
        ptext = torch.randint(0, vocab, (1, n_prompt_text - text_len), generator=g)
        pspeech = torch.randint(0, 6561, (1, n_prompt_speech), generator=g)
        t0 = time.perf_counter()
        stamps = []
        for _ in lm.inference(text=text, text_len=torch.tensor([text_len], dtype=torch.int32), prompt_text=ptext,
                              prompt_text_len=torch.tensor([ptext.shape[1]], dtype=torch.int32),
                              prompt_speech_token=pspeech,
                              prompt_speech_token_len=torch.tensor([n_prompt_speech], dtype=torch.int32),
                              embedding=torch.zeros(1, 0), max_token_text_ratio=ratio,
                              min_token_text_ratio=ratio):
            stamps.append(time.perf_counter())
        pre.append(stamps[0] - t0)
        per_tok.append((stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1))
    _MODELS.clear()
    return {"prefill_s": np.array(pre), "decode_s_per_token": np.array(per_tok),
            "threads": np.array(torch.get_num_threads())}


@torch.no_grad()
def full_parity(inputs, cfg: str, seed: int = 0):
    """Build once, return the state dict and ``Qwen2Encoder.forward`` hidden states, free the model."""
    lm = _model(cfg, seed)
    h, _ = lm.llm(to_torch(inputs["x"]).float(), to_torch(inputs["lengths"]).long())
    logits = lm.llm_decoder(h)
    out = {f"sd/{k}": v for k, v in state_dict_np(lm).items() if k != "llm.model.lm_head.weight"}
    out.update(h=to_np(h), logits=to_np(logits))
    _MODELS.clear()
    return out


def scripted_sampler(fill_at: int, end_at: int, eos: int = 6561, fill: int = 6563):
    """Deterministic stand-in for RAS used by the bistream parity test (the same rule runs on the
    JAX side): the fill token when ``fill_at`` tokens were decoded, EOS from ``end_at`` on, else the
    argmax over ordinary speech tokens."""
    def rule(scores, decoded):
        n = len(decoded)
        if n == fill_at:
            return fill
        if n >= end_at:
            return eos
        return int(np.argmax(np.asarray(scores)[:eos]))
    return rule


@torch.no_grad()
def bistream_inference(inputs, cfg: str, seed: int = 0, fill_at: int = 7, end_at: int = 120):
    """Official ``Qwen2LM.inference_bistream`` with the scripted sampler; text pieces given as
    ``text`` (flat) split by ``piece_lens``."""
    lm = _model(cfg, seed)
    rule = scripted_sampler(fill_at, end_at, lm.speech_token_size, lm.speech_token_size + 2)
    saved = lm.sampling
    lm.sampling = lambda scores, decoded, k: torch.tensor([rule(to_np(scores), decoded)])
    text = inputs["text"].tolist()
    pieces, i = [], 0
    for n in inputs["piece_lens"].tolist():
        pieces.append(torch.tensor([text[i:i + n]], dtype=torch.long))
        i += n
    ptext = to_torch(inputs["prompt_text"]).long()[None]
    pspeech = to_torch(inputs["prompt_speech"]).long()[None]
    try:
        toks = list(lm.inference_bistream(text=iter(pieces), prompt_text=ptext,
                                          prompt_text_len=torch.tensor([ptext.shape[1]]),
                                          prompt_speech_token=pspeech,
                                          prompt_speech_token_len=torch.tensor([pspeech.shape[1]]),
                                          embedding=torch.zeros(1, 0)))
    finally:
        lm.sampling = saved
    return {"tokens": np.array(toks, np.int64)}
