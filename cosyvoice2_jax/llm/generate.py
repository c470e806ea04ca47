"""Batched, jitted speech-token generation for ``Qwen2LM`` (prefill + KV-cache decode).

Follows the official ``Qwen2LM.inference`` / ``inference_wrapper`` loop (cosyvoice/llm/llm.py),
one row per request, all rows in one jitted computation:

* prompt ``[sos, embed_text(prompt_text ++ text), task, embed_speech(prompt_speech)]``;
* ``min_len = int(len(text) * 2)``, ``max_len = int(len(text) * 20)`` per row (prompt text not
  counted); step ``i`` ignores EOS while ``i < min_len``; the loop stops at EOS or after
  ``max_len`` steps;
* a sampled id above EOS (the two special tokens) is skipped: not emitted, not added to the RAS
  history, and the next step feeds the same input again (as the official ``continue``; at step 0
  the official re-feeds the whole prompt, we re-feed its last position);
* RAS sampling (``sampling.py``) with one PRNG key per row, or greedy argmax.

Fixed shapes: a request batch is padded to ``text_bucket`` / ``speech_bucket`` multiples and a
cache of ``cache_bucket`` multiples, so new requests of similar size reuse the compiled
functions. Rows are right-padded; attention masks by position, so padding never changes a row.
The cache holds the slot of every position (``slot == position``), written per row.

Serving (continuous batching, ``cosyvoice2_jax.serve.engine``) uses the slot API of the same
generator: ``slots_init`` (a fixed batch of free rows), ``slot_insert`` (prefill one request alone and
place it in a row), ``slots_step`` (one decode call of all rows), ``slot_free`` (cancel a row).

Shapes: B rows, Lb text bucket, Pb prompt-speech bucket, T = Lb + Pb + 2, S cache slots,
V speech vocabulary (6564), D model dim, W RAS window.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import aot, sharding
from ..config import LLMConfig
from ..errors import CosyVoiceError
from . import sampling as S
from .modeling import Qwen2LM, cache_mask, compute_dtype


class GenerationError(CosyVoiceError, ValueError):
    """A generation request is malformed or does not fit the cache."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One synthesis request (token ids). ``min_len``/``max_len`` default to the text ratios."""

    text: Sequence[int]
    prompt_text: Sequence[int] = ()
    prompt_speech: Sequence[int] = ()
    min_len: int | None = None
    max_len: int | None = None


class DecodeState(NamedTuple):
    cache_k: Any            # (layers, B, S, K, H) with scan_layers, else a tuple of (B, S, K, H)
    cache_v: Any
    logp: jax.Array         # (B, V) log-probs for the next step
    last_emb: jax.Array     # (B, D) input of the last forward (fed again after a skipped id)
    pos: jax.Array          # (B,) next cache slot / position
    step: jax.Array         # (B,) official loop index i
    n_out: jax.Array        # (B,) emitted tokens
    hist: jax.Array         # (B, W) last emitted tokens (oldest first)
    hist_valid: jax.Array   # (B, W)
    done: jax.Array         # (B,)
    min_len: jax.Array      # (B,)
    max_len: jax.Array      # (B,)
    keys: jax.Array         # (B, 2) per-row PRNG keys


def new_cache(cfg: LLMConfig, batch: int, num_slots: int, dtype):
    """Zero KV cache ``(k, v)``: stacked ``(L, B, S, K, H)`` with ``scan_layers``, else per-layer tuples."""
    q = cfg.qwen
    shape = (batch, num_slots, q.num_key_value_heads, q.head_dim)
    if cfg.scan_layers:
        z = jnp.zeros((q.num_hidden_layers,) + shape, dtype)
        return z, jnp.zeros_like(z)
    return (tuple(jnp.zeros(shape, dtype) for _ in range(q.num_hidden_layers)),
            tuple(jnp.zeros(shape, dtype) for _ in range(q.num_hidden_layers)))


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-int(n) // multiple) * multiple)


def prompt_layout(text_len_b, speech_len_b, t: int):
    """Source of each prompt position: kind (B,T) in {0 sos, 1 task, 2 text, 3 speech, 4 pad}, index."""
    p = jnp.arange(t)[None]
    tl, sl = text_len_b[:, None], speech_len_b[:, None]
    kind = jnp.select([p == 0, p <= tl, p == tl + 1, p < tl + sl + 2], [0, 2, 1, 3], 4)
    idx = jnp.where(kind == 2, p - 1, jnp.where(kind == 3, p - tl - 2, 0))
    return kind, jnp.maximum(idx, 0)


class LMGenerator:
    """Jitted batched generation; ``generate`` returns token lists, ``stream`` yields new tokens.

    Args:
      cfg: LM config; params: ``Qwen2LM`` params (fp32, or ``quantize_params`` output with
      ``quant=True``); sampling: ``"ras"`` (official) or ``"greedy"``; steps_per_call: decode
      steps per jitted call (the streaming granularity); *_bucket: padding multiples
      (``batch_bucket`` pads the batch with finished dummy rows so batch sizes share compiles);
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis: rows are split over it, params replicated.
    """

    def __init__(self, cfg: LLMConfig, params, *, sampling: str = "ras", quant: bool = False,
                 steps_per_call: int = 8, text_bucket: int = 32, speech_bucket: int = 64,
                 cache_bucket: int = 512, batch_bucket: int = 1, max_trials: int = 100, mesh=None):
        if sampling not in ("ras", "greedy"):
            raise GenerationError(f"sampling={sampling!r}: use 'ras' (official) or 'greedy'")
        # device arrays once: numpy leaves would be copied into every jitted call
        self.cfg, self.params, self.sampling = cfg, jax.device_put(params), sampling
        self.steps_per_call = steps_per_call
        self.text_bucket, self.speech_bucket, self.cache_bucket = text_bucket, speech_bucket, cache_bucket
        # int8 dots only reach XLA:CPU's fast path with > 1 row: pad single-row decode (CPU_PERF.md)
        self.model = Qwen2LM(cfg, quant=quant, pad_rows=quant)
        self.max_trials = max_trials
        self.batch_bucket = batch_bucket
        self.mesh = mesh
        if mesh is not None:  # data parallel: params replicated, rows split over the mesh's batch axes
            n = sharding.batch_size_multiple(mesh)
            self.batch_bucket = batch_bucket * n // np.gcd(batch_bucket, n)
            self.params = sharding.place_replicated(params, mesh)
        self.dtype = compute_dtype(cfg.dtype)
        # everything the traced functions read from self (the program cache's key; aot.py)
        context = (cfg, sampling, quant, str(self.dtype), max_trials, text_bucket, speech_bucket, cache_bucket,
                   self.batch_bucket, mesh is None)
        self.prefill = aot.jit(self._prefill, name="lm_prefill", static_argnums=(0,), context=context)
        self.decode = aot.jit(self._decode, name="lm_decode", static_argnums=(0,), donate_argnums=(2,), context=context)

    def set_params(self, params) -> None:
        """Swap in params of the same shapes (e.g. a fine-tuned LM), placed as ``__init__`` places them,
        so the compiled programs are reused (arrays restored from a training mesh would otherwise carry
        that mesh's sharding and recompile every program)."""
        params = jax.device_get(params)
        self.params = (sharding.place_replicated(params, self.mesh) if self.mesh is not None
                       else jax.device_put(params))

    # ------------------------------------------------------------------ traced functions
    def _apply(self, params, *args, method):
        return self.model.apply({"params": params}, *args, method=method)

    def _logp(self, params, h_bd):
        logits = self._apply(params, h_bd, method=Qwen2LM.speech_logits)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    def _prefill(self, num_slots: int, params, text_bl, text_len_b, speech_bp, speech_len_b,
                 min_len_b, max_len_b, keys_b):
        q = self.cfg.qwen
        b, lb = text_bl.shape
        t = lb + speech_bp.shape[1] + 2
        text_emb = self._apply(params, text_bl, method=Qwen2LM.embed_text)
        speech_emb = self._apply(params, speech_bp, method=Qwen2LM.embed_speech)
        special = self._apply(params, jnp.arange(2), method=Qwen2LM.embed_special)
        kind, idx = prompt_layout(text_len_b, speech_len_b, t)
        table = jnp.concatenate([jnp.broadcast_to(special[None], (b, 2, q.hidden_size)), text_emb,
                                 speech_emb.astype(text_emb.dtype)], axis=1)
        src = jnp.select([kind <= 1, kind == 2, kind == 3], [kind, 2 + idx, 2 + lb + idx], 0)
        x = jnp.take_along_axis(table, src[..., None], axis=1)
        x = jnp.where((kind == 4)[..., None], 0, x)
        positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        cache = new_cache(self.cfg, b, num_slots, self.dtype)
        h, cache = self._apply(params, x, positions, cache_mask(positions, num_slots), cache,
                               method=Qwen2LM.backbone)
        n = text_len_b + speech_len_b + 2
        last = n - 1
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        w = self.cfg.sampling.win_size
        return DecodeState(
            cache_k=cache[0], cache_v=cache[1], logp=self._logp(params, h_last),
            last_emb=jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0],
            pos=n.astype(jnp.int32), step=jnp.zeros((b,), jnp.int32), n_out=jnp.zeros((b,), jnp.int32),
            hist=jnp.zeros((b, w), jnp.int32), hist_valid=jnp.zeros((b, w), bool),
            done=max_len_b <= 0, min_len=min_len_b.astype(jnp.int32), max_len=max_len_b.astype(jnp.int32),
            keys=keys_b)

    def _sample(self, st: DecodeState):
        eos = self.cfg.eos_token
        ignore_eos = st.step < st.min_len
        if self.sampling == "greedy":
            return S.greedy(st.logp, ignore_eos, eos), st.keys
        split = jax.vmap(lambda k: jax.random.split(k, 2))(st.keys)
        tok = S.ras_sample(split[:, 1], st.logp, st.hist, st.hist_valid, ignore_eos, eos,
                           self.cfg.sampling, self.max_trials)
        return tok, split[:, 0]

    def _decode(self, n_steps: int, params, st: DecodeState):
        eos = self.cfg.eos_token
        num_slots = jax.tree.leaves(st.cache_k)[0].shape[-3]

        def step(st: DecodeState, _):
            active = ~st.done
            tok, keys = self._sample(st)
            emit = active & (tok < eos)
            done = st.done | (active & (tok == eos)) | (active & (st.step + 1 >= st.max_len))
            hist = jnp.where(emit[:, None], jnp.concatenate([st.hist[:, 1:], tok[:, None]], 1), st.hist)
            hist_valid = jnp.where(emit[:, None],
                                   jnp.concatenate([st.hist_valid[:, 1:], jnp.ones_like(emit)[:, None]], 1),
                                   st.hist_valid)
            emb = self._apply(params, jnp.where(emit, tok, 0), method=Qwen2LM.embed_speech)
            x = jnp.where(emit[:, None], emb, st.last_emb)
            pos = jnp.minimum(st.pos, num_slots - 1)[:, None]
            h, (ck, cv) = self._apply(params, x[:, None], pos, cache_mask(pos, num_slots),
                                      (st.cache_k, st.cache_v), method=Qwen2LM.backbone)
            logp = self._logp(params, h[:, 0])
            advance = active & ~done
            new = DecodeState(cache_k=ck, cache_v=cv, logp=logp, last_emb=x,
                              pos=st.pos + advance, step=st.step + active, n_out=st.n_out + emit,
                              hist=hist, hist_valid=hist_valid, done=done, min_len=st.min_len,
                              max_len=st.max_len, keys=keys)
            return new, (jnp.where(emit, tok, -1))

        st, toks = jax.lax.scan(step, st, None, length=n_steps)
        return st, toks.T  # (B, n_steps), -1 where nothing was emitted

    # ------------------------------------------------------------------ host side
    def _pack(self, requests: Sequence[Request], key):
        if not requests:
            raise GenerationError("no requests: pass at least one Request")
        c = self.cfg
        texts = [list(r.prompt_text) + list(r.text) for r in requests]
        for i, r in enumerate(requests):
            if len(r.text) == 0:
                raise GenerationError(f"request {i} has empty text: nothing to synthesise")
            bad = [t for t in r.prompt_speech if not 0 <= t < c.speech_token_size]
            if bad:
                raise GenerationError(f"request {i}: prompt speech tokens must be in [0, {c.speech_token_size}), "
                                      f"got {bad[:5]}")
        min_len = [r.min_len if r.min_len is not None else int(len(r.text) * c.min_token_text_ratio) for r in requests]
        max_len = [r.max_len if r.max_len is not None else int(len(r.text) * c.max_token_text_ratio) for r in requests]
        lb = round_up(max(len(t) for t in texts), self.text_bucket)
        pb = round_up(max(len(r.prompt_speech) for r in requests), self.speech_bucket)
        need = max(len(t) + len(r.prompt_speech) + 2 + m for t, r, m in zip(texts, requests, max_len))
        slots = round_up(max(need, lb + pb + 2), self.cache_bucket)
        b = len(requests)
        text = np.zeros((b, lb), np.int32)
        speech = np.zeros((b, pb), np.int32)
        for i, (t, r) in enumerate(zip(texts, requests)):
            text[i, :len(t)] = t
            speech[i, :len(r.prompt_speech)] = r.prompt_speech
        if self.sampling == "ras" and key is None:
            raise GenerationError("sampling='ras' needs a PRNG key: generate(requests, key=jax.random.PRNGKey(0))")
        if key is not None and jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)  # new-style typed keys (jax.random.key) -> raw uint32 keys
        if key is None:
            keys = jnp.zeros((b, 2), jnp.uint32)
        elif jnp.ndim(key) == 2:  # one key per row: a row's result does not depend on the batch
            if key.shape[0] != b:
                raise GenerationError(f"got {key.shape[0]} per-row keys for {b} requests")
            keys = jnp.asarray(key)
        else:
            keys = jax.random.split(key, b)
        args = (jnp.asarray(text), jnp.asarray([len(t) for t in texts], jnp.int32), jnp.asarray(speech),
                jnp.asarray([len(r.prompt_speech) for r in requests], jnp.int32),
                jnp.asarray(min_len, jnp.int32), jnp.asarray(max_len, jnp.int32), keys)
        return slots, args

    def stream(self, requests: Sequence[Request], key=None) -> Iterator[list[list[int]]]:
        """Yield, after every jitted decode call, the new tokens of each row (lists, maybe empty)."""
        n = len(requests)
        pad = round_up(n, self.batch_bucket) - n if n else 0
        if pad:
            requests = list(requests) + [Request(text=[0], min_len=0, max_len=0)] * pad
            if key is not None and jnp.ndim(key) == 2:
                key = jnp.concatenate([jnp.asarray(key), jnp.zeros((pad, 2), jnp.asarray(key).dtype)])
        slots, args = self._pack(requests, key)
        if self.mesh is not None:
            args = tuple(sharding.place_rows(a, self.mesh) for a in args)
        st = self.prefill(slots, self.params, *args)
        while True:
            st, toks = self.decode(self.steps_per_call, self.params, st)
            toks = np.asarray(toks)[:n]
            yield [[int(t) for t in row if t >= 0] for row in toks]
            if bool(np.all(np.asarray(st.done))):
                return

    def generate(self, requests: Sequence[Request], key=None) -> list[list[int]]:
        out = [[] for _ in requests]
        for new in self.stream(requests, key):
            for o, n in zip(out, new):
                o.extend(n)
        return out

    def compile_counts(self) -> dict[str, int]:
        out = {"prefill": self.prefill._cache_size(), "decode": self.decode._cache_size()}
        if hasattr(self, "_slot_insert"):
            out["slot_insert"] = self._slot_insert._cache_size()
        return out

    # ------------------------------------------------------------------ slot API (continuous batching)
    # A fixed number of rows ("slots") decode together in one compiled shape; requests join and leave
    # between decode calls (as JetStream's slots). A free slot is a finished row (``done``), so it
    # emits nothing. Each row keeps its own cache position and PRNG key, so a request's tokens do not
    # depend on which other requests share the batch.
    def slots_init(self, num_rows: int, num_slots: int) -> DecodeState:
        """An all-free slot batch: ``num_rows`` rows, ``num_slots`` cache positions per row."""
        if num_slots % self.cache_bucket:
            raise GenerationError(f"num_slots={num_slots} must be a multiple of cache_bucket={self.cache_bucket}")
        dummy = [Request(text=[0], min_len=0, max_len=0)] * num_rows
        _, args = self._pack(dummy, jnp.zeros((num_rows, 2), jnp.uint32))
        if not hasattr(self, "_slot_insert"):
            self._slot_insert = jax.jit(self._slot_insert_impl, donate_argnums=(0,))
        return self.prefill(num_slots, self.params, *args)

    def slot_fits(self, request: Request) -> int:
        """Cache positions ``request`` needs (prompt + text + max_len speech tokens)."""
        c = self.cfg
        max_len = request.max_len if request.max_len is not None else int(len(request.text) * c.max_token_text_ratio)
        n = len(request.prompt_text) + len(request.text) + len(request.prompt_speech) + 2
        return n + max_len

    def slot_insert(self, state: DecodeState, row: int, request: Request, key=None) -> DecodeState:
        """Prefill ``request`` alone (bucketed shapes) and place it in row ``row`` of ``state``
        (the previous occupant is dropped). ``key``: the request's PRNG key (RAS)."""
        num_slots = jax.tree.leaves(state.cache_k)[0].shape[-3]
        need = self.slot_fits(request)
        if need > num_slots:
            raise GenerationError(f"request needs {need} cache positions but a slot has {num_slots}: "
                                  "shorten the text or prompt (or raise the slot cache size)")
        keys = None if key is None else jnp.asarray(key).reshape(1, 2)
        _, args = self._pack([request], keys)
        one = self.prefill(num_slots, self.params, *args)
        return self._slot_insert(state, one, jnp.int32(row))

    def slot_free(self, state: DecodeState, row: int) -> DecodeState:
        """Mark row ``row`` finished (a cancelled request leaves its slot at the next decode call)."""
        return state._replace(done=state.done.at[row].set(True))

    def slots_step(self, state: DecodeState) -> tuple[DecodeState, np.ndarray, np.ndarray]:
        """One jitted decode call (``steps_per_call`` steps) of every row -> (state, new tokens
        (rows, steps) with -1 where nothing was emitted, done (rows,))."""
        state, toks = self.decode(self.steps_per_call, self.params, state)
        return state, np.asarray(toks), np.asarray(state.done)

    def _slot_insert_impl(self, state: DecodeState, one: DecodeState, row):
        def put(axis):
            return lambda big, small: jax.lax.dynamic_update_index_in_dim(
                big, jax.lax.index_in_dim(small, 0, axis, keepdims=False).astype(big.dtype), row, axis)

        cache_axis = 1 if self.cfg.scan_layers else 0
        fields = {}
        for name in DecodeState._fields:
            big, small = getattr(state, name), getattr(one, name)
            axis = cache_axis if name in ("cache_k", "cache_v") else 0
            fields[name] = jax.tree.map(put(axis), big, small)
        return DecodeState(**fields)


# ----------------------------------------------------------------------------------- bistream
class BistreamSession:
    """Bistream inference (official ``Qwen2LM.inference_bistream``): text arrives in pieces.

    Protocol (paper section 2.3, "bistream"): the sequence starts ``[sos]``; while prompt speech
    tokens remain, each 5 text tokens are followed by 15 prompt speech tokens; then, for every 5
    new text tokens, speech tokens are decoded (EOS ignored) until the model emits the fill token
    6563; after a fill token, the fill token is forced every 16 outputs (15 speech + fill). When
    the text ends, ``[remaining text, task]`` is appended and decoding runs to EOS. Quirks kept
    from the official code: the input pending when a fill token ends a decode round (the
    embedding of the last speech token, already in the cache) is fed again at the final stage,
    and a special id other than the expected one raises :class:`GenerationError`.

    Batch 1, host-driven (one jitted call per decoded token; prompt pieces are fed in bucketed
    blocks). ``sampler(logp (V,) np.ndarray, out_tokens list, ignore_eos) -> int`` replaces RAS
    (e.g. greedy in tests); by default RAS runs on device with ``key``.
    """

    def __init__(self, gen: LMGenerator, *, num_slots: int = 2048, key=None, sampler=None):
        self.gen, self.num_slots, self.sampler = gen, num_slots, sampler
        if sampler is None and key is None:
            raise GenerationError("bistream with RAS needs a PRNG key (or pass sampler=...)")
        self.key = key
        self.cache = new_cache(gen.cfg, 1, num_slots, gen.dtype)
        self.pos = 0
        self._feed = jax.jit(self._feed_impl, donate_argnums=(1,))
        self._ras = jax.jit(self._ras_impl)
        p = gen.params
        # embedding rows are looked up on the host (no compile per piece length)
        self._tables = {"text": np.asarray(p["llm"]["model"]["model"]["embed_tokens"]["embedding"]),
                        "speech": np.asarray(p["speech_embedding"]["embedding"]),
                        "special": np.asarray(p["llm_embedding"]["embedding"])}

    # traced pieces
    def _feed_impl(self, params, cache, x_btd, start, n_valid):
        t = x_btd.shape[1]
        positions = (start + jnp.arange(t))[None]
        h, cache = self.gen._apply(params, x_btd, positions, cache_mask(positions, self.num_slots), cache,
                                   method=Qwen2LM.backbone)
        return self.gen._logp(params, h[:, n_valid - 1])[0], cache

    def _ras_impl(self, key, logp, hist, hist_valid, ignore_eos):
        return S.ras_sample(key[None], logp[None], hist[None], hist_valid[None], ignore_eos[None],
                            self.gen.cfg.eos_token, self.gen.cfg.sampling, self.gen.max_trials)[0]

    # host helpers
    def embed(self, which: str, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int32).reshape(-1)
        if ids.size == 0:
            return np.zeros((0, self.gen.cfg.qwen.hidden_size), np.float32)
        return self._tables[which][ids].astype(np.float32)

    def feed(self, x_td: np.ndarray) -> np.ndarray:
        """Append ``x`` (T, D) to the cache; returns log-probs (V,) after the last position."""
        t = x_td.shape[0]
        tb = 1 if t == 1 else round_up(t, 16)
        if self.pos + tb > self.num_slots:
            raise GenerationError(f"bistream sequence exceeds the cache ({self.num_slots} slots): "
                                  "pass a larger num_slots")
        x = np.zeros((1, tb, x_td.shape[1]), np.float32)
        x[0, :t] = x_td
        logp, self.cache = self._feed(self.gen.params, self.cache, jnp.asarray(x, self.gen.dtype),
                                      jnp.int32(self.pos), jnp.int32(t))
        self.pos += t
        return logp

    def sample(self, logp, out_tokens: list, ignore_eos: bool) -> int:
        if self.sampler is not None:
            return int(self.sampler(np.asarray(logp), list(out_tokens), ignore_eos))
        w = self.gen.cfg.sampling.win_size
        emitted = [t for t in out_tokens][-w:]
        hist = np.zeros(w, np.int32)
        valid = np.zeros(w, bool)
        hist[w - len(emitted):] = emitted
        valid[w - len(emitted):] = True
        self.key, sub = jax.random.split(self.key)
        return int(self._ras(sub, logp, jnp.asarray(hist), jnp.asarray(valid), jnp.asarray(ignore_eos)))

    def run(self, text_pieces, prompt_text=(), prompt_speech=(), max_tokens: int | None = None) -> Iterator[int]:
        """Yield speech tokens while text pieces (iterables of text ids) arrive.

        ``max_tokens`` caps the speech tokens yielded in all (the official has no cap: a model that
        never picks EOS would decode forever); default ``max_token_text_ratio`` x the text tokens,
        checked once the text has ended."""
        c = self.gen.cfg
        a, s = c.mix_ratio
        eos, fill = c.eos_token, c.fill_token
        special = self.embed("special", [0, 1])
        sos, task = special[:1], special[1:2]
        lm_input = sos
        text_cache = self.embed("text", list(prompt_text))
        speech_left = self.embed("speech", list(prompt_speech))
        out_tokens: list[int] = []
        next_fill = -1
        n_text = 0
        n_out = 0
        for piece in text_pieces:
            piece = list(piece)
            n_text += len(piece)
            text_cache = np.concatenate([text_cache, self.embed("text", piece)])
            while speech_left.shape[0] != 0:
                if text_cache.shape[0] < a:
                    break
                lm_input = np.concatenate([lm_input, text_cache[:a], speech_left[:s]])
                text_cache, speech_left = text_cache[a:], speech_left[s:]
            if speech_left.shape[0] != 0:
                continue
            after_fill = bool(out_tokens) and out_tokens[-1] == fill
            if after_fill or (not out_tokens and lm_input.shape[0] == 1):
                if text_cache.shape[0] < a:
                    continue
                lm_input = text_cache[:a] if after_fill else np.concatenate([lm_input, text_cache[:a]])
                text_cache = text_cache[a:]
            while True:
                logp = self.feed(lm_input)
                if next_fill != -1 and len(out_tokens) == next_fill:
                    top = fill
                    next_fill += s + 1
                else:
                    top = self.sample(logp, [t for t in out_tokens], True)
                if top == fill:
                    next_fill = len(out_tokens) + s + 1
                out_tokens.append(top)
                if top >= eos:
                    if top == fill:
                        break
                    raise GenerationError(f"bistream decoding produced token {top} (EOS is ignored here, "
                                          "only the fill token may end a round)")
                yield top
                n_out += 1
                if max_tokens is not None and n_out >= max_tokens:
                    return
                lm_input = self.embed("speech", [top])
        lm_input = np.concatenate([lm_input, text_cache, task])
        cap = max_tokens if max_tokens is not None else int(c.max_token_text_ratio * max(n_text, 1))
        while n_out < cap:
            logp = self.feed(lm_input)
            top = self.sample(logp, out_tokens, False)
            out_tokens.append(top)
            if top >= eos:
                if top == eos:
                    return
                raise GenerationError(f"bistream final decoding produced special token {top}")
            yield top
            n_out += 1
            lm_input = self.embed("speech", [top])
