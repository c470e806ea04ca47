"""Training objectives of the CosyVoice 2 LM: sequence assembly, cross entropy, DPO, the
differentiable ASR reward (Gumbel-softmax speech tokens through a frozen token ASR).

Official code: ``cosyvoice/llm/llm.py`` (``Qwen2LM.prepare_lm_input_target``, ``forward``,
``forward_dpo``), ``cosyvoice/transformer/label_smoothing_loss.py`` and ``DPOLoss``
(``cosyvoice/utils/losses.py``); paper sections 2.3 (unified uni/bistream sequences) and 2.7 (DPO).
The trainer's objectives (:mod:`cosyvoice2_jax.train.lm`) and the parity tests both call
:func:`lm_forward` / :func:`dpo_logps`, so there is one training forward.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .modeling import Qwen2LM

IGNORE_ID = -1


# ----------------------------------------------------------------------------------- sequence assembly
def choose_bistream(key, text_len_b, speech_len_b, mix_ratio=(5, 15), prob: float = 0.5):
    """Per-example sequence type, the official rule: bistream with probability ``prob`` and only
    when ``speech_len / text_len > mix[1] / mix[0]`` (so every full text chunk has a full speech
    chunk). Returns a bool (B,)."""
    u = jax.random.uniform(key, text_len_b.shape)
    return bistream_from_uniforms(u, text_len_b, speech_len_b, mix_ratio, prob)


def bistream_from_uniforms(u_b, text_len_b, speech_len_b, mix_ratio=(5, 15), prob: float = 0.5):
    a, s = mix_ratio
    return (u_b < prob) & (speech_len_b * a > s * text_len_b)


def sequence_layout(text_len_b, speech_len_b, bistream_b, t_out: int, speech_token_size: int,
                    mix_ratio=(5, 15)):
    """Index form of ``Qwen2LM.prepare_lm_input_target`` for fixed length ``t_out``.

    Row layout (paper section 2.3; official ``prepare_lm_input_target``), ``a:s`` = mix ratio:
      * unistream: ``[sos, text, task, speech]`` -> targets ``[-1]*(1+Lt), speech, eos``;
      * bistream: ``sos``, then ``Lt // a`` full chunks ``[a text, s speech]`` with targets
        ``[-1]*(a-1), s speech, fill``, then a tail ``[rest text, task, rest speech]`` with
        targets ``[-1]*len(rest text), rest speech, eos``.
    Both have length ``Lt + Ls + 2``; unistream is the bistream formula with zero full chunks.

    Returns ``(src_kind, src_idx, target, length)``: kind per position (B,T) in
    {0 sos, 1 task, 2 text, 3 speech, 4 pad}, the index into the text/speech sequence, the target
    id (-1 = ignored) and the row length (B,).
    """
    a, s = mix_ratio
    w = a + s
    eos, fill = speech_token_size, speech_token_size + 2
    lt, ls = text_len_b[:, None], speech_len_b[:, None]
    nfull = jnp.where(bistream_b, text_len_b // a, 0)[:, None]
    p = jnp.arange(t_out)[None, :]
    q = p - 1                                  # position after sos
    j, o = q // w, q % w                       # chunk index / offset inside a full chunk
    in_full = (q >= 0) & (j < nfull)
    u = q - w * nfull                          # offset inside the tail
    r = lt - a * nfull                         # text tokens in the tail
    rest = ls - s * nfull                      # speech tokens in the tail
    length = lt + ls + 2

    # full chunks
    f_kind = jnp.where(o < a, 2, 3)
    f_idx = jnp.where(o < a, a * j + o, s * j + o - a)
    f_tgt = jnp.where(o < a - 1, IGNORE_ID, jnp.where(o < w - 1, 0, fill))
    f_tgt_idx = s * j + o - (a - 1)
    # tail
    t_kind = jnp.where(u < r, 2, jnp.where(u == r, 1, 3))
    t_idx = jnp.where(u < r, a * nfull + u, s * nfull + u - r - 1)
    k = u - r                                  # target k of the tail: speech[s*n + k] or eos
    t_tgt = jnp.where(u < r, IGNORE_ID, jnp.where(k < rest, 0, eos))
    t_tgt_idx = s * nfull + k

    kind = jnp.where(q < 0, 0, jnp.where(in_full, f_kind, t_kind))
    idx = jnp.where(q < 0, 0, jnp.where(in_full, f_idx, t_idx))
    tgt_is_speech = jnp.where(in_full, (o >= a - 1) & (o < w - 1), (u >= r) & (k < rest)) & (q >= 0)
    tgt = jnp.where(q < 0, IGNORE_ID, jnp.where(in_full, f_tgt, t_tgt))
    tgt_idx = jnp.where(in_full, f_tgt_idx, t_tgt_idx)
    valid = p < length
    tgt = jnp.where(valid, tgt, IGNORE_ID)
    kind = jnp.where(valid, kind, 4)
    idx = jnp.where(valid, jnp.maximum(idx, 0), 0)
    return kind, idx, tgt, tgt_is_speech & valid, jnp.maximum(tgt_idx, 0), length[:, 0]


def prepare_lm_input_target(text_emb_bld, speech_emb_bsd, special_emb_2d, text_len_b, speech_token_bs,
                            speech_len_b, bistream_b, t_out: int, speech_token_size: int,
                            mix_ratio=(5, 15), pad_value: float = float(IGNORE_ID)):
    """Fixed-shape ``prepare_lm_input_target``: lm_input (B,T,D), lm_target (B,T), lengths (B,).

    Padded input positions hold ``pad_value`` (the official ``pad_sequence(padding_value=-1)``).
    """
    kind, idx, tgt, tgt_is_speech, tgt_idx, length = sequence_layout(
        text_len_b, speech_len_b, bistream_b, t_out, speech_token_size, mix_ratio)
    b, lmax, d = text_emb_bld.shape
    smax = speech_emb_bsd.shape[1]
    dt = text_emb_bld.dtype
    table = jnp.concatenate([
        jnp.broadcast_to(special_emb_2d[None].astype(dt), (b, 2, d)),
        text_emb_bld, speech_emb_bsd.astype(dt), jnp.full((b, 1, d), pad_value, dt)], axis=1)
    offset = jnp.select([kind == 0, kind == 1, kind == 2, kind == 3], [0, 1, 2, 2 + lmax], 2 + lmax + smax)
    gather = jnp.where(kind >= 2, offset + idx, offset)
    gather = jnp.where(kind == 4, 2 + lmax + smax, gather)
    lm_input = jnp.take_along_axis(table, gather[..., None], axis=1)
    speech_tgt = jnp.take_along_axis(speech_token_bs, jnp.minimum(tgt_idx, smax - 1), axis=1)
    lm_target = jnp.where(tgt_is_speech, speech_tgt, tgt)
    return lm_input, lm_target.astype(jnp.int32), length.astype(jnp.int32)


def ce_loss(logits_btv, target_bt, lsm_weight: float = 0.0, normalize_length: bool = True):
    """Official ``LabelSmoothingLoss`` (KL to the smoothed one-hot, -1 ignored) and ``th_accuracy``.

    Returns ``(loss, acc)``; the loss is divided by the number of valid targets when
    ``normalize_length`` else by the batch size.
    """
    v = logits_btv.shape[-1]
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    valid = target_bt != IGNORE_ID
    tgt = jnp.where(valid, target_bt, 0)
    lp_t = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    conf = 1.0 - lsm_weight
    if lsm_weight > 0:
        off = lsm_weight / (v - 1)
        kl = (conf * (np.log(conf) - lp_t)
              + off * ((v - 1) * np.log(off) - (jnp.sum(logp, -1) - lp_t)))
    else:
        kl = -lp_t
    total = jnp.sum(valid)
    denom = total if normalize_length else logits_btv.shape[0]
    loss = jnp.sum(jnp.where(valid, kl, 0.0)) / denom
    pred = jnp.argmax(logits_btv, axis=-1)
    acc = jnp.sum((pred == target_bt) & valid) / total
    return loss, acc


def target_logps(logits_btv, target_bt, official_mask: bool = True):
    """Mean per-position target log-prob of each row, as the official ``forward_dpo``.

    The official code multiplies by ``target == IGNORE_ID`` (so it averages the log-prob of token
    0 at the *ignored* positions, padding included) and divides by the padded length; it also
    uses the chosen rows' mask for the rejected rows. ``official_mask=False`` gives the intended
    mean over valid targets instead.
    """
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    ignore = target_bt == IGNORE_ID
    lp = jnp.take_along_axis(logp, jnp.where(ignore, 0, target_bt)[..., None], axis=-1)[..., 0]
    if official_mask:
        return jnp.mean(lp * ignore, axis=-1)
    valid = ~ignore
    return jnp.sum(lp * valid, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1)


def lm_forward(model: Qwen2LM, params, batch: Mapping, bistream_b, t_out: int, valid_b=None):
    """``Qwen2LM.forward``: batch with ``text_token (B,L)``, ``text_token_len``, ``speech_token
    (B,S)``, ``speech_token_len``; returns dict(loss, acc, logits, lm_target, lm_input, lengths).

    ``valid_b`` (B,) bool marks real rows of a fixed-shape batch: padding rows get empty
    sequences and no targets, so they add nothing to the loss."""
    cfg = model.cfg
    v = {"params": params}
    text_len, speech_len = batch["text_token_len"], batch["speech_token_len"]
    if valid_b is not None:
        text_len, speech_len = jnp.where(valid_b, text_len, 0), jnp.where(valid_b, speech_len, 0)
    text_emb = model.apply(v, batch["text_token"], method=Qwen2LM.embed_text)
    speech_emb = model.apply(v, batch["speech_token"], method=Qwen2LM.embed_speech)
    special = model.apply(v, jnp.arange(2), method=Qwen2LM.embed_special)
    lm_input, lm_target, lengths = prepare_lm_input_target(
        text_emb, speech_emb, special, text_len, batch["speech_token"], speech_len, bistream_b, t_out,
        cfg.speech_token_size, cfg.mix_ratio)
    if valid_b is not None:
        lm_target = jnp.where(valid_b[:, None], lm_target, IGNORE_ID)  # padding rows predict nothing
        logits = model.apply(v, lm_input, jnp.maximum(lengths, 1))
    else:
        logits = model.apply(v, lm_input, lengths)
    loss, acc = ce_loss(logits, lm_target, cfg.lsm_weight, cfg.length_normalized_loss)
    return {"loss": loss, "acc": acc, "logits": logits, "lm_target": lm_target, "lm_input": lm_input,
            "lengths": lengths}


def dpo_logps(model: Qwen2LM, params, batch: Mapping, bistream_2b, t_out: int | None = None,
              official_mask: bool = True, valid_b=None):
    """Chosen (``speech_token``) and rejected (``reject_speech_token``) sequences in one batch of 2B
    -> ``(chosen_logps (B,), rejected_logps (B,), forward of the chosen rows)``.

    ``bistream_2b`` holds the per-example choice for the chosen rows then the rejected rows;
    ``t_out`` defaults to ``L + max(S_chosen, S_rejected) + 2``; ``official_mask`` as
    :func:`target_logps` (the official also applies the chosen rows' mask to the rejected rows)."""
    b = batch["text_token"].shape[0]
    sp, rj = batch["speech_token"], batch["reject_speech_token"]
    smax = max(sp.shape[1], rj.shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, smax - x.shape[1])))  # noqa: E731
    two = lambda x: jnp.concatenate([x, x])  # noqa: E731
    both = {
        "text_token": two(batch["text_token"]),
        "text_token_len": two(batch["text_token_len"]),
        "speech_token": jnp.concatenate([pad(sp), pad(rj)]),
        "speech_token_len": jnp.concatenate([batch["speech_token_len"], batch["reject_speech_token_len"]]),
    }
    if t_out is None:
        t_out = batch["text_token"].shape[1] + smax + 2
    out = lm_forward(model, params, both, bistream_2b, t_out, None if valid_b is None else two(valid_b))
    logits, tgt = out["logits"], out["lm_target"]
    if official_mask:
        ignore_c = tgt[:b] == IGNORE_ID
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lp = jnp.take_along_axis(logp, jnp.where(tgt == IGNORE_ID, 0, tgt)[..., None], axis=-1)[..., 0]
        chosen = jnp.mean(lp[:b] * ignore_c, axis=-1)
        rejected = jnp.mean(lp[b:] * ignore_c, axis=-1)
    else:
        chosen = target_logps(logits[:b], tgt[:b], False)
        rejected = target_logps(logits[b:], tgt[b:], False)
    chosen_out = {k: out[k][:b] for k in ("logits", "lm_target")}
    return chosen, rejected, chosen_out


def lm_forward_dpo(model: Qwen2LM, params, batch: Mapping, bistream_2b, t_out: int,
                   official_mask: bool = True):
    """``Qwen2LM.forward_dpo``: loss/acc on the chosen rows and chosen/rejected logps (see
    :func:`dpo_logps`)."""
    chosen, rejected, out = dpo_logps(model, params, batch, bistream_2b, t_out, official_mask)
    loss, acc = ce_loss(out["logits"], out["lm_target"], model.cfg.lsm_weight, model.cfg.length_normalized_loss)
    return {"loss": loss, "acc": acc, "chosen_logps": chosen, "rejected_logps": rejected}


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.01, label_smoothing: float = 0.0,
               ipo: bool = False):
    """Official ``DPOLoss`` per example: (losses (B,), chosen_rewards, rejected_rewards); the
    official loss is ``losses.mean()``."""
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
                  - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    return losses, jax.lax.stop_gradient(beta * (chosen - ref_chosen)), \
        jax.lax.stop_gradient(beta * (rejected - ref_rejected))


# ----------------------------------------------------------------------------------- differentiable ASR reward
def gumbel_softmax(key, logits, temperature: float = 1.0, straight_through: bool = True):
    """A Gumbel-softmax sample of ``softmax(logits)`` over the last axis.

    Relaxed: ``y = softmax((logits + g) / temperature)`` with ``g ~ Gumbel(0, 1)`` drawn from
    ``key``; as ``temperature -> 0`` it tends to the one-hot of ``argmax(logits + g)``, an exact
    sample of the categorical (Gumbel-max). ``straight_through``: the forward value is that one-hot
    and the gradient is the relaxed sample's (``hard + y - stop_gradient(y)``).
    """
    g = jax.random.gumbel(key, logits.shape, jnp.float32)
    y = jax.nn.softmax((logits.astype(jnp.float32) + g) / temperature, axis=-1)
    if not straight_through:
        return y
    hard = jax.nn.one_hot(jnp.argmax(y, axis=-1), y.shape[-1], dtype=y.dtype)
    return hard + y - jax.lax.stop_gradient(y)


def speech_target_positions(text_len_b, speech_len_b, bistream_b, t_out: int, s_out: int, speech_token_size: int,
                            mix_ratio=(5, 15)):
    """(B, T, S) float one-hot: sequence position ``t`` predicts speech token ``s`` (the layout of
    :func:`sequence_layout`; eos, fill and ignored positions map to nothing)."""
    _, _, _, is_speech, idx, _ = sequence_layout(text_len_b, speech_len_b, bistream_b, t_out, speech_token_size,
                                                 mix_ratio)
    hit = is_speech[..., None] & (idx[..., None] == jnp.arange(s_out)[None, None, :])
    return hit.astype(jnp.float32)


def sampled_speech_codes(key, logits_btv, text_len_b, speech_len_b, bistream_b, s_out: int, speech_token_size: int,
                         mix_ratio=(5, 15), temperature: float = 1.0, straight_through: bool = True,
                         fsq_dim: int = 8, fsq_levels: int = 3):
    """The LM's speech-token distribution at every speech target position -> a Gumbel-softmax sample
    over the ``speech_token_size`` FSQ ids (eos and specials excluded) -> its soft FSQ code vector
    (``fsq_soft_decode``), put in speech order: ``(B, S, fsq_dim)``, differentiable in the logits.

    Teacher forcing as in LM training: position ``i``'s distribution is conditioned on the
    reference tokens before it (one parallel forward), the paper's ``P(mu_i | mu_{1:i-1}, Y)``.
    """
    from ..tokenizer.fsq import fsq_soft_decode

    y = gumbel_softmax(key, logits_btv[..., :speech_token_size], temperature, straight_through)
    codes_btk = fsq_soft_decode(y, fsq_dim, fsq_levels)
    where = speech_target_positions(text_len_b, speech_len_b, bistream_b, logits_btv.shape[1], s_out,
                                    speech_token_size, mix_ratio)
    return jnp.einsum("bts,btk->bsk", where, codes_btk)


def asr_reward_loss(key, logits_btv, batch: Mapping, bistream_b, asr_logits_fn, *, speech_token_size: int,
                    mix_ratio=(5, 15), temperature: float = 1.0, straight_through: bool = True, valid_b=None,
                    blank_id: int, fsq_dim: int = 8, fsq_levels: int = 3):
    """Differentiable ASR loss ``L_ASR`` (paper section 2.7): Gumbel-softmax speech tokens from the
    LM logits of the teacher-forced sequence (``lm_forward`` of the same batch and bistream choice),
    their soft FSQ codes into the frozen ASR (``asr_logits_fn(codes (B,S,k), lengths (B,)) -> CTC
    logits``) and the CTC loss against the batch's ``text_token`` (after the mSFT speaker prefix,
    ``text_prompt_len``, when present) per text token.

    Returns ``(loss, per_row (B,))``. Rows with ``valid_b`` False add nothing."""
    from ..token_asr.modeling import ctc_mean_loss, spoken_text

    text_len, speech_len = batch["text_token_len"], batch["speech_token_len"]
    if valid_b is not None:
        text_len, speech_len = jnp.where(valid_b, text_len, 0), jnp.where(valid_b, speech_len, 0)
    s_out = batch["speech_token"].shape[1]
    codes = sampled_speech_codes(key, logits_btv, text_len, speech_len, bistream_b, s_out, speech_token_size,
                                 mix_ratio, temperature, straight_through, fsq_dim, fsq_levels)
    logits = asr_logits_fn(codes, speech_len)
    labels, label_len = spoken_text(batch["text_token"], text_len, batch.get("text_prompt_len"))
    return ctc_mean_loss(logits, speech_len, labels, label_len, blank_id, valid_b)
