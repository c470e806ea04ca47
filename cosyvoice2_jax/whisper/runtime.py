"""Whisper speech recognition at inference: batched greedy decoding with a KV cache, bucketed shapes.

``WhisperASR.from_dir(hf_dir).transcribe(wavs_16k, language="en")`` -> list of strings. Inputs are
padded (or cut) to the model's window (30 s for the released models, ``2 * max_source_positions``
frames of 10 ms) and featurised as HF ``WhisperFeatureExtractor`` does (the project's
:func:`~cosyvoice2_jax.frontend.audio.whisper_log_mel` of the padded wave). The decoder prompt is
``<|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>`` from the directory's
``generation_config.json`` (English-only models: without the language and task tokens);
``suppress_tokens`` are never chosen and ``begin_suppress_tokens`` not as the first token, as HF
``generate`` does; greedy until ``<|endoftext|>`` or ``max_new_tokens``.

Compiled shapes: the batch is cut into power-of-two sizes up to ``max_batch`` (no padded rows), the
feature length is fixed by the model and the token loop is a ``lax.while_loop`` over a fixed cache,
so one program per batch size. Text: ``vocab.json`` (or ``tokenizer.json``) byte-level BPE tokens;
ids at or above ``<|endoftext|>`` are Whisper's special tokens and are dropped.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..buckets import split_pow2
from ..errors import AudioError, ConfigError, ReleaseDirError
from .modeling import Whisper, WhisperConfig, new_cache


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE alphabet: printable character -> byte (Whisper's tokenizer uses it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class WhisperText:
    """Token ids <-> text for a Whisper directory (decode only: the harness never encodes)."""

    def __init__(self, vocab: dict[str, int], eot: int):
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.eot = eot

    @classmethod
    def from_dir(cls, d: Path, eot: int) -> "WhisperText":
        if (d / "vocab.json").is_file():
            vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        elif (d / "tokenizer.json").is_file():
            vocab = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        else:
            raise ReleaseDirError(f"{d} has no Whisper tokenizer files (vocab.json or tokenizer.json); save them "
                                  "with WhisperProcessor.save_pretrained(dir)")
        return cls(vocab, eot)

    def decode(self, ids: Sequence[int]) -> str:
        bd = _byte_decoder()
        chars = "".join(self.id_to_token.get(int(i), "") for i in ids if 0 <= int(i) < self.eot)
        return bytes(bd[c] for c in chars if c in bd).decode("utf-8", errors="replace").strip()


class WhisperASR:
    """Batched greedy Whisper transcription (module docstring).

    Args:
      params, config: the model (:func:`cosyvoice2_jax.whisper.from_release`).
      text: :class:`WhisperText`; generation: the ``generation_config.json`` dict (may be empty).
      max_batch: largest batch per compiled call; max_new_tokens: cap on generated tokens
        (default: what the decoder's position table leaves after the prompt).
    """

    def __init__(self, params, config: WhisperConfig, text: WhisperText, generation: dict | None = None, *,
                 max_batch: int = 8, max_new_tokens: int | None = None):
        self.params, self.config, self.text = jax.device_put(params), config, text
        self.generation = dict(generation or {})
        self.max_batch = max_batch
        self.model = Whisper(config)
        self.max_new_tokens = max_new_tokens
        v = config.vocab_size
        self.suppress = np.zeros((v,), bool)
        self.suppress[[t for t in self.generation.get("suppress_tokens") or [] if 0 <= t < v]] = True
        self.begin_suppress = np.zeros((v,), bool)
        self.begin_suppress[[t for t in self.generation.get("begin_suppress_tokens") or [] if 0 <= t < v]] = True
        self._fn = jax.jit(self._transcribe, static_argnums=(0,))

    @classmethod
    def from_dir(cls, model_dir: str | Path, **kwargs) -> "WhisperASR":
        """A local HF Whisper directory: ``config.json``, ``model.safetensors`` or ``pytorch_model.bin``,
        ``vocab.json`` or ``tokenizer.json``, optional ``generation_config.json``."""
        from .params import config_from_release, from_release

        d = Path(model_dir)
        cfg = config_from_release(d)
        gen_path = d / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        eot = int(gen.get("eos_token_id", cfg.eos_token_id) if not isinstance(gen.get("eos_token_id"), list)
                  else gen["eos_token_id"][0])
        return cls(from_release(d, cfg), cfg, WhisperText.from_dir(d, eot), gen, **kwargs)

    # -------------------------------------------------------------------------------- prompt
    def prompt_ids(self, language: str | None = "en") -> list[int]:
        """Decoder prompt for ``language`` (a code such as ``en``/``zh``; ``None``: let the model pick)."""
        g = self.generation
        ids = [int(g.get("decoder_start_token_id", self.config.decoder_start_token_id))]
        lang_to_id, task_to_id = g.get("lang_to_id") or {}, g.get("task_to_id") or {}
        if g.get("is_multilingual", bool(lang_to_id)):
            if language is not None:
                tok = f"<|{language}|>"
                if tok not in lang_to_id:
                    have = ", ".join(sorted(k.strip("<|>") for k in lang_to_id)) or "none"
                    raise ConfigError(f"this Whisper model has no language {language!r}; it knows: {have}")
                ids.append(int(lang_to_id[tok]))
            if "transcribe" in task_to_id:
                ids.append(int(task_to_id["transcribe"]))
        if g.get("no_timestamps_token_id") is not None:
            ids.append(int(g["no_timestamps_token_id"]))
        return ids

    # -------------------------------------------------------------------------------- traced
    def _transcribe(self, max_new: int, params, mel, prompt, suppress, begin_suppress):
        c, b, p = self.config, mel.shape[0], prompt.shape[0]
        apply = functools.partial(self.model.apply, {"params": params})
        cross = apply(apply(mel, method="encode"), method="cross_kv")
        logits, cache = apply(jnp.broadcast_to(prompt, (b, p)), cross, 0, new_cache(c, b), method="decode")
        eot = self.text.eot

        def cond(st):
            i, _, _, _, done = st
            return (i < max_new) & ~jnp.all(done)

        def body(st):
            i, last, cache, out, done = st
            banned = suppress | (begin_suppress & (i == 0))
            tok = jnp.argmax(jnp.where(banned[None], -jnp.inf, last), axis=-1).astype(jnp.int32)
            tok = jnp.where(done, eot, tok)
            out = out.at[:, i].set(tok)
            done = done | (tok == eot)
            logits, cache = apply(tok[:, None], cross, p + i, cache, method="decode")
            return i + 1, logits[:, 0], cache, out, done

        st = (jnp.int32(0), logits[:, -1], cache, jnp.full((b, max_new), eot, jnp.int32), jnp.zeros((b,), bool))
        return jax.lax.while_loop(cond, body, st)[3]

    # -------------------------------------------------------------------------------- host
    def features(self, wav_16k: np.ndarray) -> np.ndarray:
        """One 16 kHz wave -> ``(n_frames, n_mels)`` log-mel of the wave padded/cut to the window."""
        from ..frontend.audio import whisper_log_mel

        n = self.config.n_frames * 160
        w = np.asarray(wav_16k, np.float32).reshape(-1)
        if w.ndim != 1 or not np.all(np.isfinite(w)):
            raise AudioError("Whisper input must be a finite mono 16 kHz waveform")
        w = np.pad(w[:n], (0, max(0, n - w.shape[0])))
        return whisper_log_mel(w, self.config.num_mel_bins)

    def generate(self, wavs_16k: Sequence[np.ndarray], language: str | None = "en") -> list[list[int]]:
        """Greedy token ids per wave (prompt excluded, stopped before ``<|endoftext|>``)."""
        prompt = np.asarray(self.prompt_ids(language), np.int32)
        cap = self.config.max_target_positions - len(prompt)
        max_new = min(self.max_new_tokens or cap, cap)
        if max_new < 1:
            raise ConfigError(f"the decoder prompt ({len(prompt)} tokens) fills the position table "
                              f"({self.config.max_target_positions})")
        feats = [self.features(w) for w in wavs_16k]
        out: list[list[int]] = []
        start = 0
        for size in split_pow2(len(feats), self.max_batch):
            mel = np.stack(feats[start:start + size])
            start += size
            toks = np.asarray(self._fn(max_new, self.params, mel, prompt, self.suppress, self.begin_suppress))
            for row in toks:
                stop = np.flatnonzero(row == self.text.eot)
                out.append([int(t) for t in row[: stop[0] if stop.size else len(row)]])
        return out

    def transcribe(self, wavs_16k: Sequence[np.ndarray], language: str | None = "en") -> list[str]:
        """16 kHz mono waves -> transcripts (special tokens dropped)."""
        return [self.text.decode(t) for t in self.generate(wavs_16k, language)]

    def compiled_programs(self) -> int:
        return self._fn._cache_size()
