"""CosyVoice 2 flow: speech tokens + prompt -> mel (paper section 2.4).

Official module: ``cosyvoice.flow.flow.CausalMaskedDiffWithXvec``. Pipeline, channel-last::

    x-vector (B, 192) -> L2 normalise -> spk_embed_affine_layer -> spk (B, n_mels = 80)
    [prompt tokens ++ tokens] (B, S) -> input_embedding * valid -> encoder -> encoder_proj
        -> mu (B, F = 2S, n_mels)
    cond (B, F, n_mels) = prompt mel on the first ``mel_len1`` frames, zeros after
    CFM with the U-Net estimator (flow/sampling.py SamplerConfig; official: 10 Euler steps, cosine
    grid, CFG 0.7; fixed noise) -> mel
    output = mel[:, mel_len1 : 2 * S_out]

Public entry points:

* :func:`inference` - the official single-utterance ``inference(token, prompt_token,
  prompt_feat, embedding, streaming, finalize)`` semantics (numpy in, numpy out).
* :func:`inference_batch` - the same for a batch with per-row lengths (the official code asserts
  batch 1); rows are packed ``prompt ++ tokens`` and padded to a geometric length bucket
  (:func:`cosyvoice2_jax.buckets.geometric`: 16 per octave, under 6.25% padding, about 2% on
  average, from 128 packed tokens up) or to a multiple of ``token_bucket``, so requests of similar
  length reuse one compiled program.
* :func:`training_loss` - the official ``forward`` loss given explicit random draws.

A distilled student (``FlowConfig.student``, ``flow/distill.py``) runs the same code with one
estimator row per evaluation (its sampler's guidance is ``none``: :func:`resolve_sampler`; the
CFG is folded in) and its extra inputs (:func:`student_extra`: ``w`` = the sampler's CFG rate,
``d`` = the Euler step's size).

``finalize=False`` (streaming, more tokens to come): the last ``pre_lookahead_len`` tokens only
feed the encoder's look-ahead and produce no frames (official ``context`` argument).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import buckets
from ..config import STUDENT_INPUTS, FlowConfig, FlowTrainMasks, Solver, TScheduler
from ..errors import ConfigError
from ..layers.attention import Window, torch_linear
from ..layers.masks import valid_mask
from . import cfm as cfm_lib
from . import sampling
from .decoder import CausalConditionalDecoder
from .encoder import UpsampleConformerEncoder

Array = jax.Array


def compute_dtype(cfg: FlowConfig):
    """The flow's compute dtype (``FlowConfig.dtype``: ``"float32"`` or ``"bfloat16"``)."""
    try:
        return jnp.dtype(cfg.dtype)
    except TypeError:
        raise ConfigError(f"flow.dtype={cfg.dtype!r} is not a dtype; use float32 or bfloat16") from None


class ConditionalCFM(nn.Module):
    """Holds the estimator under the torch name ``decoder.estimator``."""

    cfg: FlowConfig

    def setup(self):
        self.estimator = CausalConditionalDecoder(self.cfg.decoder, compute_dtype(self.cfg),
                                                  student_inputs(self.cfg))

    def __call__(self, x, valid, mu, t, spks, cond, chunk=0, extra=None):
        return self.estimator(x, valid, mu, t, spks, cond, chunk, extra)

    def time_embedding(self, t, extra=None):
        return self.estimator.time_embedding(t, extra)

    def forward_features(self, h, valid, t_emb, chunk=0, cache=None, window=None):
        return self.estimator.forward_features(h, valid, t_emb, chunk, cache, window)


class CausalMaskedDiffWithXvec(nn.Module):
    """Flow parameters and its pieces; the solver loop lives in the functions below.

    Params: ``input_embedding/embedding (V, D)``, ``spk_embed_affine_layer``, ``encoder/...``,
    ``encoder_proj``, ``decoder/estimator/...`` (torch names with ``.`` -> ``/`` and list indices
    as ``_{i}``). Compute dtype: ``cfg.dtype`` (params stay as given, fp32 when loaded).
    """

    cfg: FlowConfig

    def setup(self):
        c = self.cfg
        dt = compute_dtype(c)
        self.input_embedding = nn.Embed(c.vocab_size, c.input_size, embedding_init=nn.initializers.normal(1.0))
        self.spk_embed_affine_layer = torch_linear(c.output_size, dtype=dt)
        self.encoder = UpsampleConformerEncoder(c.encoder, dt)
        self.encoder_proj = torch_linear(c.output_size, dtype=dt)
        self.decoder = ConditionalCFM(c)

    def __call__(self, tokens, valid, embedding, x, t):
        """Touches every parameter (for ``init``): one estimator call on the encoded tokens."""
        spk = self.embed_speaker(embedding)
        mu, valid_f = self.encode(tokens, valid)
        extra = {n: jnp.zeros_like(t) for n in student_inputs(self.cfg)} or None
        return self.decoder(x, valid_f, mu, t, spk, jnp.zeros_like(mu), 0, extra)

    def embed_speaker(self, embedding: Array) -> Array:
        """``(B, spk_embed_dim)`` x-vector -> ``(B, n_mels)`` float32: ``F.normalize`` (eps 1e-12)
        then the affine layer."""
        norm = jnp.sqrt(jnp.sum(embedding * embedding, axis=-1, keepdims=True))
        return self.spk_embed_affine_layer(embedding / jnp.maximum(norm, 1e-12)).astype(jnp.float32)

    def _embed_tokens(self, tokens: Array, keep: Array) -> Array:
        return self.input_embedding(jnp.maximum(tokens, 0)) * keep[..., None].astype(jnp.float32)

    def encode(self, tokens: Array, valid: Array, chunk: int | Array = 0,
               lookahead_valid: Array | None = None) -> tuple[Array, Array]:
        """``tokens (B, S)`` int, ``valid (B, S)`` -> ``(mu (B, 2S, n_mels) f32, valid_frames (B, 2S))``.

        ``valid``: tokens that produce frames (attention). ``lookahead_valid``: tokens the
        pre-lookahead layer may read (``None``: every embedded frame, the official training
        behaviour); tokens in either are embedded, others are zero.
        """
        emb_valid = valid if lookahead_valid is None else (valid | lookahead_valid)
        x = self._embed_tokens(tokens, emb_valid)
        h, valid_f = self.encoder(x, valid, chunk=chunk, lookahead_valid=lookahead_valid)
        return self.encoder_proj(h).astype(jnp.float32), valid_f

    def encode_stream(self, tokens: Array, readable: Array, cache: dict, pos_tables: dict, window: Window
                      ) -> tuple[Array, dict]:
        """Streaming :meth:`encode` of one window (:meth:`UpsampleConformerEncoder.stream`):
        ``tokens (B, W + L)`` at positions ``window.offset ..``, ``readable (B, W + L)`` the tokens
        that exist -> ``(mu (B, 2W, n_mels) f32, cache)``."""
        x = self._embed_tokens(tokens, readable)
        h, cache = self.encoder.stream(x, readable, cache, pos_tables, window)
        return self.encoder_proj(h).astype(jnp.float32), cache

    def pos_tables(self, tokens: int, tables: dict | None = None) -> dict:
        return self.encoder.pos_tables(tokens, tables)

    def time_embedding(self, t, extra=None):
        """``t (B,)`` (+ the student's ``extra`` inputs) -> the estimator's time embedding."""
        return self.decoder.time_embedding(t, extra)

    def estimate_features(self, h, valid, t_emb, chunk=0, cache=None, window=None):
        """Estimator on the packed input: ``(v (B, F, n_mels) f32, cache)`` (see
        :meth:`CausalConditionalDecoder.forward_features`)."""
        return self.decoder.forward_features(h, valid, t_emb, chunk, cache, window)

    def estimate(self, x, valid, mu, t, spks, cond, chunk=0, extra=None):
        return self.decoder(x, valid, mu, t, spks, cond, chunk, extra)


def student_inputs(cfg: FlowConfig) -> tuple[str, ...]:
    """The student's extra estimator inputs (``FlowConfig.student.inputs``; checked)."""
    inputs = tuple(cfg.student.inputs)
    bad = [n for n in inputs if n not in STUDENT_INPUTS] + [n for i, n in enumerate(inputs) if n in inputs[:i]]
    if bad:
        raise ConfigError(f"flow.student.inputs={list(inputs)}: {bad} not allowed; use distinct names from "
                          f"{list(STUDENT_INPUTS)} (w: guidance rate, d: step size)")
    if inputs and not cfg.student.enabled:
        raise ConfigError(f"flow.student.inputs={list(inputs)} needs flow.student.enabled: true")
    return inputs


def student_extra(cfg: FlowConfig, rows: int, arrays, structure: tuple | None, t: Array, k: Array) -> dict | None:
    """The student's extra inputs for ``rows`` estimator rows at evaluation ``k`` (time ``t``) of the
    sampler (``structure`` / ``arrays``, flow/sampling.py): guidance rate ``w`` = the step's CFG
    weight, step size ``d = r - t`` with ``r`` the end of the step (:func:`step_end`). ``None`` for
    the official flow."""
    names = student_inputs(cfg)
    if not names:
        return None
    if arrays is None or structure is None:
        raise ConfigError("flow: a distilled student (flow.student.enabled) needs the sampler's arrays and "
                          "structure for its extra inputs; call it through inference_batch / FlowStreamer")
    solver = structure[0]
    vals = {"w": arrays["w"][jnp.minimum(k // sampling.stages(solver), arrays["w"].shape[0] - 1)],
            "d": step_end(arrays["ts"], k, t, solver) - t}
    return {n: jnp.broadcast_to(jnp.asarray(vals[n], jnp.float32), (rows,)) for n in names}


def step_end(ts: Array, k: Array, t: Array, solver: str) -> Array:
    """End time ``r`` of the solver step holding evaluation ``k`` (at time ``t``) for a
    step-size-conditioned student: ``ts[k + 1]`` for Euler (one evaluation per step, so the Euler
    step is the MeanFlow step ``x + (r - t) u(x, t, r)``); other solvers (and reference solves)
    evaluate the instantaneous velocity (``r = t``)."""
    if solver != "euler":
        return t
    return ts[jnp.minimum(k + 1, ts.shape[0] - 1)]


def init_params(cfg: FlowConfig, key: Array) -> dict:
    """Random parameters (plain nested dict) for ``cfg``."""
    model = CausalMaskedDiffWithXvec(cfg)
    tok = jnp.zeros((1, 4), jnp.int32)
    variables = model.init(key, tok, jnp.ones((1, 4), bool), jnp.ones((1, cfg.spk_embed_dim)),
                           jnp.zeros((1, 8, cfg.output_size)), jnp.zeros((1,)))
    return dict(variables["params"])


def abstract_params(cfg: FlowConfig) -> dict:
    """``jax.eval_shape`` of :func:`init_params` (no compute): the expected param tree."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


# ----------------------------------------------------------------------------- inference core
def packed_estimate(params, cfg: FlowConfig, tokens, in_len, out_len, prompt_mel_len, prompt_feat, embedding, *,
                    streaming: bool = False, arrays=None, structure: tuple | None = None) -> "sampling.Estimate":
    """The offline ODE's ``estimate(x_rows, t, k, state) -> (v_rows, state)`` (flow/sampling.py
    protocol) on packed rows; call it inside a jitted function. ``tokens (B, S)`` packed
    ``prompt ++ tokens``; ``in_len (B,)`` tokens read by the encoder; ``out_len (B,)`` tokens that
    produce frames; ``prompt_mel_len (B,)``; ``prompt_feat (B, 2S, n_mels)``; ``embedding (B, 192)``.
    ``x_rows`` has ``B`` rows (no guidance) or ``2B`` (CFG: conditioned rows, then rows with
    ``mu``, speaker and prompt zeroed, as the official batch). Offline inference and
    ``scripts/flow_study.py`` use this one set-up. ``arrays``/``structure``: the sampler's
    (``sampling.sample_arrays``), needed only by a distilled student (:func:`student_extra`)."""
    model = CausalMaskedDiffWithXvec(cfg)
    p = {"params": params}
    B, S = tokens.shape
    F = cfg.token_mel_ratio * S
    enc_chunk = cfg.encoder.static_chunk_size if streaming else 0
    dec_chunk = cfg.decoder.static_chunk_size if streaming else 0
    spk = model.apply(p, embedding, method=model.embed_speaker)
    mu, valid_f = model.apply(p, tokens, valid_mask(out_len, S), enc_chunk, valid_mask(in_len, S),
                              method=model.encode)
    cond = prompt_feat * valid_mask(prompt_mel_len, F)[..., None].astype(prompt_feat.dtype)
    # step-invariant part of the estimator input; CFG rows: conditioned, then all-zero
    rest = jnp.concatenate([mu, jnp.broadcast_to(spk[:, None], (B, F, spk.shape[-1])), cond], axis=-1)
    by_rows = {1: (rest, valid_f),
               2: (jnp.concatenate([rest, jnp.zeros_like(rest)], axis=0), jnp.concatenate([valid_f, valid_f], axis=0))}

    def estimate(x_rows, t, k, state):
        rest_r, valid_r = by_rows[x_rows.shape[0] // B]
        extra = student_extra(cfg, x_rows.shape[0], arrays, structure, t, k)
        t_emb = model.apply(p, jnp.broadcast_to(t, (x_rows.shape[0],)), extra, method=model.time_embedding)
        h = jnp.concatenate([x_rows, rest_r], axis=-1)
        return model.apply(p, h, valid_r, t_emb, dec_chunk, method=model.estimate_features)
    return estimate


@functools.partial(jax.jit, static_argnames=("cfg", "streaming", "structure"))
def _solve_packed(params, tokens, in_len, out_len, prompt_mel_len, prompt_feat, embedding, z, arrays,
                  *, cfg: FlowConfig, streaming: bool, structure: tuple):
    """Jitted core: :func:`packed_estimate` integrated from the noise ``z (B, 2S, n_mels)`` by
    ``sampling.sample_arrays`` -> mel ``(B, 2S, n_mels)``. One program per sampler ``structure``
    (solver, steps, guidance, gated); the grid and guidance weights are the traced ``arrays``."""
    estimate = packed_estimate(params, cfg, tokens, in_len, out_len, prompt_mel_len, prompt_feat, embedding,
                               streaming=streaming, arrays=arrays, structure=structure)
    return sampling.sample_arrays(estimate, z, structure, arrays)[0]




def resolve_sampler(cfg: FlowConfig, sampler: "sampling.SamplerConfig | None" = None, *,
                    n_timesteps: int | None = None, cfg_rate: float | None = None,
                    solver: Solver | str | None = None, t_scheduler: TScheduler | str | None = None
                    ) -> "sampling.SamplerConfig":
    """The sampler of one call: ``sampler`` (default: ``cfg.inference_sampler``, the config's) with
    the older per-call overrides ``n_timesteps``/``cfg_rate``/``solver``/``t_scheduler`` applied.
    A distilled student (``cfg.student.enabled``) folds the guidance into the network: its sampler
    runs with guidance ``none`` (one estimator row) and feeds ``cfg_rate`` to the student's ``w``."""
    s = cfg.inference_sampler if sampler is None else sampler
    if not isinstance(s, sampling.SamplerConfig):
        raise ConfigError(f"sampler must be a flow.sampling.SamplerConfig, got {type(s).__name__}; build one with "
                          "SamplerConfig(steps=..., solver=...) or SamplerConfig.from_dict({...})")
    over = {"steps": n_timesteps or None, "cfg_rate": cfg_rate,
            "solver": getattr(solver, "value", solver), "grid": getattr(t_scheduler, "value", t_scheduler)}
    if over["grid"] == "linear":  # TScheduler.LINEAR is the uniform grid
        over["grid"] = "uniform"
    over = {k: v for k, v in over.items() if v is not None}
    if cfg.student.enabled and s.guidance != "none":
        if s.cfg_schedule or s.cfg_interval != (0.0, 1.0) or s.guidance != "cfg":
            raise ConfigError(f"flow.student: a distilled student takes one constant guidance rate (its input w), "
                              f"not guidance={s.guidance!r} with cfg_schedule/cfg_interval; use guidance cfg or none "
                              "with cfg_rate")
        over["guidance"] = "none"
    return dataclasses.replace(s, **over) if over else s


def packed_length(total: int, token_bucket: int | None = None) -> int:
    """Padded packed length (tokens) of a row of ``total`` prompt + speech tokens: the geometric
    bucket (``token_bucket=None``) or the next multiple of ``token_bucket``."""
    return buckets.geometric(total) if token_bucket is None else buckets.round_up(total, token_bucket)


def inference_batch(params: dict, cfg: FlowConfig, token: np.ndarray, token_len: Sequence[int],
                    prompt_token: np.ndarray, prompt_token_len: Sequence[int], prompt_feat: np.ndarray,
                    prompt_feat_len: Sequence[int], embedding: np.ndarray, *, streaming: bool = False,
                    finalize: bool = True, noise: Any = "official", sampler: "sampling.SamplerConfig | None" = None,
                    n_timesteps: int | None = None, cfg_rate: float | None = None, solver: Solver | str | None = None,
                    t_scheduler: TScheduler | str | None = None, token_bucket: int | None = None,
                    place: Any = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Batched official inference with per-row lengths.

    Args:
      token: ``(B, S1)`` int speech tokens, row ``b`` valid up to ``token_len[b]``.
      prompt_token: ``(B, S0)`` prompt speech tokens, valid up to ``prompt_token_len[b]``.
      prompt_feat: ``(B, F0, n_mels)`` prompt mel, valid up to ``prompt_feat_len[b]`` (= ``mel_len1``).
      embedding: ``(B, 192)`` speaker x-vectors.
      streaming: static-chunk attention (25 tokens / 50 frames) instead of full attention.
      finalize: False = the last ``pre_lookahead_len`` tokens of each row are look-ahead only.
      noise: ``"official"`` (fixed noise, same for all rows), a ``jax.random`` key, or an array.
      sampler: a :class:`~cosyvoice2_jax.flow.sampling.SamplerConfig` (default: the config's,
        ``cfg.inference_sampler``: the official 10 Euler steps, cosine grid, CFG 0.7);
        ``n_timesteps``/``cfg_rate``/``solver``/``t_scheduler`` override single fields of it.
      token_bucket: packed rows are padded to a multiple of this many tokens; ``None`` (default): to a
        geometric bucket (:func:`packed_length`; padding under 6.25%, bounded program count).
      place: optional ``array -> array`` applied to every per-row input (e.g. ``jax.device_put`` with
        a batch-sharded ``NamedSharding``: the solve then runs data-parallel over the mesh).
    Returns:
      ``(mels, mel_lens)``: a list of ``(F_b, n_mels)`` float32 arrays (frames after the prompt) and
      their lengths.
    """
    smp = resolve_sampler(cfg, sampler, n_timesteps=n_timesteps, cfg_rate=cfg_rate, solver=solver,
                          t_scheduler=t_scheduler)
    token, prompt_token = np.asarray(token), np.asarray(prompt_token)
    prompt_feat = np.asarray(prompt_feat, np.float32)
    B = token.shape[0]
    tl, ptl, pfl = (np.asarray(v, np.int64).reshape(-1) for v in (token_len, prompt_token_len, prompt_feat_len))
    if not (len(tl) == len(ptl) == len(pfl) == prompt_token.shape[0] == prompt_feat.shape[0] == B):
        raise ConfigError(f"flow inference: batch sizes differ (token {B}, lengths {len(tl)}/{len(ptl)}/{len(pfl)}, "
                          f"prompt_token {prompt_token.shape[0]}, prompt_feat {prompt_feat.shape[0]}); "
                          "pass one row per utterance everywhere")
    total = ptl + tl
    L = cfg.pre_lookahead_len
    out_tok = total if finalize else total - L
    if np.any(out_tok <= 0):
        raise ConfigError(f"flow inference: a row has {int(out_tok.min())} tokens to decode; with finalize=False "
                          f"each row needs more than pre_lookahead_len={L} tokens")
    if np.any(pfl > 2 * out_tok):
        raise ConfigError("flow inference: prompt_feat is longer than twice the tokens that produce frames "
                          f"({pfl.tolist()} vs {(2 * out_tok).tolist()}); trim the prompt mel to 2 frames per prompt token")
    S = packed_length(int(total.max()), token_bucket)
    F = cfg.token_mel_ratio * S
    packed = np.zeros((B, S), np.int32)
    feat = np.zeros((B, F, cfg.output_size), np.float32)
    for b in range(B):
        packed[b, : ptl[b]] = prompt_token[b, : ptl[b]]
        packed[b, ptl[b]: total[b]] = token[b, : tl[b]]
        feat[b, : pfl[b]] = prompt_feat[b, : pfl[b]]
    z = cfm_lib.initial_noise(noise, B, F, cfg.output_size)
    put = place or jnp.asarray
    mel = _solve_packed(params, put(packed), put(total.astype(np.int32)), put(out_tok.astype(np.int32)),
                        put(pfl.astype(np.int32)), put(feat), put(np.asarray(embedding, np.float32)), put(z),
                        sampling.cached_guidance_arrays(smp), cfg=dataclasses.replace(cfg, sampler=None),
                        streaming=bool(streaming), structure=smp.structure)
    mel = np.asarray(mel)
    ends = cfg.token_mel_ratio * out_tok
    return [mel[b, pfl[b]: ends[b]] for b in range(B)], (ends - pfl)


def inference(params: dict, cfg: FlowConfig, token: np.ndarray, prompt_token: np.ndarray, prompt_feat: np.ndarray,
              embedding: np.ndarray, streaming: bool = False, finalize: bool = True, **kwargs) -> np.ndarray:
    """Official ``CausalMaskedDiffWithXvec.inference`` for one utterance.

    ``token (1, S1)``, ``prompt_token (1, S0)``, ``prompt_feat (1, F0, n_mels)``, ``embedding (1, 192)``
    -> mel ``(1, F, n_mels)`` (channel-last; the official returns ``(1, 80, F)``).
    """
    token, prompt_token, prompt_feat = np.asarray(token), np.asarray(prompt_token), np.asarray(prompt_feat)
    if token.ndim != 2 or token.shape[0] != 1:
        raise ConfigError(f"flow inference: token must be (1, S), got {token.shape}; use inference_batch for batches")
    mels, _ = inference_batch(params, cfg, token, [token.shape[1]], prompt_token, [prompt_token.shape[1]],
                              prompt_feat, [prompt_feat.shape[1]], np.asarray(embedding).reshape(1, -1),
                              streaming=streaming, finalize=finalize, **kwargs)
    return mels[0][None]


# ----------------------------------------------------------------------------- training
def loss_masks(cfg: FlowConfig, key: Array, batch: int) -> Array:
    """Per-example encoder chunk sizes (tokens; 0 = full attention) for one training batch.

    ``OFFICIAL``: one coin per batch, static chunk (25) or full. ``PAPER``: per example one of
    non-causal (0), full-causal (1), chunk-M (25) and chunk-2M (50) (paper section 2.5).
    The decoder uses twice these sizes (frames).
    """
    m = cfg.encoder.static_chunk_size
    if FlowTrainMasks(cfg.cfm.train_masks) is FlowTrainMasks.OFFICIAL:
        return jnp.where(jax.random.uniform(key) < 0.5, m, 0) * jnp.ones((batch,), jnp.int32)
    choices = jnp.asarray([0, 1, m, 2 * m], jnp.int32)
    return choices[jax.random.randint(key, (batch,), 0, 4)]


def training_loss(params: dict, cfg: FlowConfig, speech_token: Array, speech_token_len: Array, speech_feat: Array,
                  speech_feat_len: Array, embedding: Array, draws: dict[str, Array],
                  chunk: int | Array = 0) -> Array:
    """Official ``CausalMaskedDiffWithXvec.forward`` loss.

    ``speech_token (B, S)``, ``speech_feat (B, F=2S, n_mels)``, ``embedding (B, 192)``; ``draws`` from
    :func:`cfm.sample_loss_draws` (``t_u``, ``z (B, F, n_mels)``, ``cfg_u``, ``prompt_len``); ``chunk``:
    encoder chunk in tokens, int or ``(B,)`` (see :func:`loss_masks`; decoder uses twice it).
    The encoder's look-ahead reads padded frames' embeddings as the official training does.
    """
    model = CausalMaskedDiffWithXvec(cfg)
    p = {"params": params}
    B, S = speech_token.shape
    spk = model.apply(p, embedding, method=model.embed_speaker)
    valid_tok = valid_mask(speech_token_len, S)
    mu, valid_f = model.apply(p, speech_token, valid_tok, chunk, method=model.encode)
    F = mu.shape[1]
    if speech_feat.shape[1] != F:
        raise ConfigError(f"flow loss: speech_feat has {speech_feat.shape[1]} frames but the tokens give {F} "
                          f"({cfg.token_mel_ratio} per token); pad/trim the batch consistently")
    cond = speech_feat * valid_mask(draws["prompt_len"], F)[..., None].astype(speech_feat.dtype)
    dec_chunk = chunk * cfg.token_mel_ratio

    def estimator(y, valid, mu_, t, spks, cond_):
        return model.apply(p, y, valid, mu_, t, spks, cond_, dec_chunk, method=model.estimate)

    loss, _ = cfm_lib.cfm_loss(estimator, speech_feat, valid_f, mu, spk, cond, draws, cfg.cfm)
    return loss
