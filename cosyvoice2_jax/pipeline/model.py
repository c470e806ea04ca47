"""``CosyVoice2``: the text-to-speech pipeline with the official method names.

    from cosyvoice2_jax.pipeline import CosyVoice2
    tts = CosyVoice2.from_pretrained("pretrained_models/CosyVoice2-0.5B")
    for out in tts.inference_zero_shot("Hello there.", "prompt transcript", "prompt.wav", stream=True):
        play(out["tts_speech"])          # (1, samples) float32 numpy at tts.sample_rate (24 kHz)

Modes (official ``cosyvoice/cli/cosyvoice.py``): ``inference_sft`` (built-in speaker of
``spk2info.pt``), ``inference_zero_shot`` (prompt audio + its transcript), ``inference_cross_lingual``
(prompt audio only), ``inference_instruct2`` (prompt audio + an instruction), ``inference_vc``
(voice conversion of a source utterance). Each returns a generator of ``{'tts_speech': (1, N)}``
(one per text segment, or per streaming chunk). ``tts_text`` may be a generator of text pieces
(bistream: the LM starts before the text is complete).

Prompt audio (``prompt_speech_16k``, ``source_speech_16k``; the official git HEAD calls them
``prompt_wav``/``source_wav``) may be given as:

* a file path (any rate >= 16 kHz, any channels): resampled from the file's own rate separately to
  16 kHz (tokens, CAM++) and to 24 kHz (flow prompt mel), as the official git HEAD front end;
* ``(array, sample_rate)``: the same, from the array's rate;
* a bare array ``(samples,)`` / ``(1, samples)``: the old convention, taken as 16 kHz, the 24 kHz
  waveform resampled from it (as the official 2025 API that took ``prompt_speech_16k``).

See :mod:`cosyvoice2_jax.pipeline.frontend`. Prompts over 30 s are refused, over 15 s warn.

Differences from the official class: outputs are numpy arrays; every call takes an optional PRNG
``key`` (default: derived from ``seed`` and a call counter, so runs are reproducible);
``save_spkinfo`` writes our ``spk2info.npz`` (the release's ``spk2info.pt`` is never overwritten);
``synthesize_batch`` runs many requests at once; bad input raises a typed
:class:`~cosyvoice2_jax.errors.CosyVoiceError` before any model runs.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np

from ..config import ModelConfig, StreamingConfig
from ..errors import ConfigError, CosyVoiceError, InputWarning, TextError
from ..frontend.text import TextFrontend, is_blank, speaker_prompt
from ..llm.generate import BistreamSession, GenerationError, LMGenerator, Request
from ..flow.runtime import FlowPrompt
from ..flow.sampling import SamplerConfig
from ..hift.runtime import NoiseFn
from ..speaker.runtime import SpeakerEncoder
from ..tokenizer.runtime import SpeechTokenizer
from .frontend import extract_prompt, prompt_audio, source_tokens
from .loading import Loaded, load_release
from .token2wav import Token2Wav

log = logging.getLogger(__name__)
ENDOFPROMPT = "<|endofprompt|>"
MODES = ("sft", "zero_shot", "cross_lingual", "instruct2", "vc")


class ModeError(CosyVoiceError, ValueError):
    """A synthesis call is missing an input its mode needs, or names an unknown speaker."""


def check_speed(speed) -> float:
    """``speed`` must be a finite number > 0 (NaN/inf would only fail after the LM ran)."""
    try:
        v = float(speed)
    except (TypeError, ValueError):
        raise ConfigError(f"speed must be a number > 0, got {speed!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"speed must be a finite number > 0 (1.0 = normal rate), got {speed!r}")
    return v


@dataclasses.dataclass
class ModelInput:
    """One segment's model inputs (official ``model_input`` dict, numpy)."""

    text: Any                                  # list of ids, or an iterator of id lists (bistream)
    prompt_text: list[int]
    llm_prompt_speech: np.ndarray              # (S,) int32, may be empty
    flow: FlowPrompt
    source_speech: Optional[np.ndarray] = None  # vc: tokens to vocode


@dataclasses.dataclass
class SynthesisRequest:
    """One request for :meth:`CosyVoice2.synthesize_batch` (non-streaming modes, text as a string)."""

    mode: str                      # sft | zero_shot | cross_lingual | instruct2 | vc
    text: str = ""
    prompt_wav: Any = None         # path, (array, sr), or a bare 16 kHz array (module docstring)
    prompt_text: str = ""
    instruct_text: str = ""
    spk_id: str = ""
    source_wav: Any = None         # vc; same forms as prompt_wav
    speed: float = 1.0
    text_frontend: bool = True
    key: Any = None
    speaker_tag: Optional[str] = None  # sft / zero_shot: mSFT prefix "Speaker <tag><|endofprompt|>" ("" -> unknown)


def _greedy_host(eos: int):
    def pick(logp: np.ndarray, out_tokens: list, ignore_eos: bool) -> int:
        lp = np.array(logp, copy=True)
        if ignore_eos:
            lp[eos] = -np.inf
        return int(np.argmax(lp))
    return pick


# per-call PRNG keys as three small programs (eager jax.random ops are one program each, and every
# program is a compile or a cache read in a new process); same keys as the eager ops
_call_key = jax.jit(lambda seed, n: jax.random.fold_in(jax.random.PRNGKey(seed), n), static_argnums=0)
_fold_in = jax.jit(jax.random.fold_in)
_split2 = jax.jit(lambda key: tuple(jax.random.split(key)))


def _to_device_in_place(tree: dict) -> None:
    """Replace every numpy leaf of a nested dict by a device array, dropping each host array as it
    is placed (the caller owns ``tree``)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _to_device_in_place(v)
        elif isinstance(v, np.ndarray):
            tree[k] = jax.device_put(v)
            del v


class CosyVoice2:
    """The pipeline. Build it with :meth:`from_pretrained` (release or converted directory).

    Args:
      loaded: the converted model (:func:`cosyvoice2_jax.pipeline.loading.load_release`).
      sampling: ``"ras"`` (official repetition-aware sampling) or ``"greedy"`` (deterministic).
      seed: seeds the default per-call keys.
      flow_cache: streaming chunks reuse the flow's cached state (constant cost) instead of
        recomputing from token 0 as the official; same output.
      streaming: chunk schedule (``token_hop_len``, growth ``stream_scale_factor``, cap
        ``token_max_hop_len``; the official 2025 snapshot uses a fixed 25: ``stream_scale_factor=1``).
      hift_noise: ``(batch, samples) -> (batch, samples, 9)`` source noise override (tests).
      quant: int8 W8A8 LM decode (faster on CPU, small numerical change).
      bistream_max_tokens: cap on the speech tokens of a bistream (generator) text (default:
        ``max_token_text_ratio`` x its text tokens; the official has none).
      flow_sampler: the flow's ODE sampler (:class:`~cosyvoice2_jax.flow.sampling.SamplerConfig`:
        grid, solver, steps, guidance); default: the config's ``flow.sampler``, else the official
        10 Euler steps on the cosine grid with CFG 0.7. Used by every mode, streaming included.
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis: :meth:`synthesize_batch` splits its rows
        over it (params replicated); e.g. ``jax.make_mesh((jax.device_count(),), ("data",),
        axis_types=(jax.sharding.AxisType.Auto,))``.
    """

    def __init__(self, loaded: Loaded, *, sampling: str = "ras", seed: int = 0, flow_cache: bool = True,
                 streaming: StreamingConfig | None = None, hift_noise: Optional[NoiseFn] = None,
                 quant: bool = False, use_wetext: bool | None = None, lm_steps_per_call: int = 8, mesh=None,
                 bistream_max_tokens: int | None = None, flow_sampler: SamplerConfig | None = None):
        self.config: ModelConfig = loaded.config
        self.sample_rate = self.config.sample_rate
        self.model_dir = loaded.source_dir
        p = loaded.params
        self.text_tokenizer = loaded.text_tokenizer()
        self.text = TextFrontend(self.text_tokenizer, use_wetext=use_wetext)
        self.speech_tokenizer = SpeechTokenizer(p["tokenizer"], self.config.tokenizer)
        self.speaker_encoder = SpeakerEncoder(p["speaker"], self.config.speaker)
        lm_params = p["llm"]
        if quant:
            from ..llm.modeling import quantize_params

            lm_params = quantize_params(lm_params)
        self.lm = LMGenerator(self.config.llm, lm_params, sampling=sampling, quant=quant, steps_per_call=lm_steps_per_call,
                              mesh=mesh)
        self.sampling = sampling
        self.token2wav = Token2Wav(self.config, p["flow"], p["hift"], flow_cache=flow_cache,
                                   streaming=streaming, noise_fn=hift_noise, mesh=mesh, sampler=flow_sampler)
        # the components hold device copies: keep no host copy of the weights (halves memory at full size)
        self.loaded = dataclasses.replace(loaded, params={})
        self.bistream_max_tokens = bistream_max_tokens
        self.spk2info: dict[str, dict[str, np.ndarray]] = {k: dict(v) for k, v in loaded.spk2info.items()}
        self._seed, self._calls = seed, itertools.count()

    @property
    def flow_sampler(self) -> SamplerConfig:
        """The flow's ODE sampler (every mode and path); assign a ``SamplerConfig`` to change it."""
        return self.token2wav.flow.sampler

    @flow_sampler.setter
    def flow_sampler(self, sampler: SamplerConfig | None) -> None:
        self.token2wav.flow.set_sampler(sampler)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, cache: bool = True, cache_dir: str | Path | None = None,
                        **kwargs) -> "CosyVoice2":
        """Load the official ``CosyVoice2-0.5B`` directory (converted once, then cached as an Orbax
        checkpoint) or a directory written by ``cosyvoice2-jax convert``. ``kwargs`` go to ``__init__``.

        Memory: the restored host weights move to the device one array at a time, each host copy
        dropped as soon as it is placed (the load holds one copy of the model plus one array, not
        two copies), and freed host memory goes back to the OS at the end."""
        from ..flow.streaming import trim_host_memory

        loaded = load_release(model_dir, cache=cache, cache_dir=cache_dir)
        if kwargs.get("mesh") is None:  # a mesh places (replicates) the weights itself
            _to_device_in_place(loaded.params)
        tts = cls(loaded, **kwargs)
        del loaded
        trim_host_memory()
        return tts

    # ------------------------------------------------------------------------------- speakers
    def list_available_spks(self) -> list[str]:
        return list(self.spk2info)

    def add_zero_shot_spk(self, prompt_text: str, prompt_speech_16k, zero_shot_spk_id: str) -> bool:
        """Extract a prompt once and keep it under ``zero_shot_spk_id`` (reuse with ``zero_shot_spk_id=``).
        ``prompt_speech_16k``: a path, ``(array, sr)`` or a bare 16 kHz array (module docstring)."""
        if not zero_shot_spk_id:
            raise ModeError("zero_shot_spk_id must be a non-empty name")
        pf = extract_prompt(prompt_audio(prompt_speech_16k), self.speech_tokenizer, self.speaker_encoder)
        text = self.text.normalize(prompt_text, split=False)
        self.spk2info[zero_shot_spk_id] = {
            "prompt_text": np.asarray(self.text_tokenizer.encode(text), np.int32), **pf.to_dict()}
        return True

    def save_spkinfo(self, path: str | Path | None = None, *, overwrite: bool = True) -> Path:
        """Write the speakers to ``path`` (default ``spk2info.npz`` next to the release). The release's
        ``spk2info.pt`` is not touched; ``from_pretrained`` reads the ``.npz`` back when present."""
        from .loading import save_spk2info

        if path is None:
            if self.model_dir is None:
                raise ModeError("save_spkinfo: no model directory known; pass a path")
            path = Path(self.model_dir) / "spk2info.npz"
        path = Path(path)
        if path.exists() and not overwrite:
            raise ModeError(f"{path} exists; pass overwrite=True to replace it")
        save_spk2info(path, self.spk2info)
        return path

    def load_spkinfo(self, path: str | Path) -> None:
        from .loading import load_spk2info

        self.spk2info.update(load_spk2info(Path(path)))

    # ------------------------------------------------------------------------------- inputs
    def _key(self, key):
        if key is not None:
            return key
        return _call_key(self._seed, next(self._calls))

    def _speaker(self, spk_id: str) -> dict[str, np.ndarray]:
        if spk_id not in self.spk2info:
            have = ", ".join(sorted(self.spk2info)) or "none (this release has no spk2info.pt)"
            raise ModeError(f"unknown speaker {spk_id!r}; available: {have}. Add one with add_zero_shot_spk()")
        return self.spk2info[spk_id]

    def _flow_from_info(self, info: dict) -> FlowPrompt:
        # our keys, or the official add_zero_shot_spk keys of a release spk2info.pt
        mels = self.config.flow.output_size
        tok = info.get("speech_token", info.get("flow_prompt_speech_token", np.zeros((0,), np.int32)))
        feat = info.get("speech_feat", info.get("prompt_speech_feat", np.zeros((0, mels), np.float32)))
        emb = info.get("embedding", info.get("flow_embedding"))
        return FlowPrompt(np.asarray(tok, np.int32).reshape(-1), np.asarray(feat, np.float32).reshape(-1, mels),
                          np.asarray(emb, np.float32).reshape(-1))

    def _prompt(self, prompt_speech_16k, zero_shot_spk_id: str) -> tuple[dict, FlowPrompt]:
        if zero_shot_spk_id:
            info = self._speaker(zero_shot_spk_id)
            return info, self._flow_from_info(info)
        if prompt_speech_16k is None:
            raise ModeError("this mode needs prompt audio (prompt_speech_16k / --prompt-wav) or a zero_shot_spk_id")
        pf = extract_prompt(prompt_audio(prompt_speech_16k), self.speech_tokenizer, self.speaker_encoder)
        return pf.to_dict(), FlowPrompt(pf.speech_token, pf.speech_feat, pf.embedding)

    def _encode(self, text) -> Any:
        if isinstance(text, str):
            ids = self.text_tokenizer.encode(text)
            if not ids:
                raise TextError(f"text {text!r} has no tokens to synthesise")
            return ids
        return ([i] for i in self.text.encode_stream(text))  # bistream: one id per piece, as the official

    def _segments(self, tts_text, text_frontend: bool) -> list:
        if isinstance(tts_text, str) and is_blank(tts_text):
            raise TextError("tts_text is empty (or only whitespace / zero-width characters); give the text to "
                            "synthesise")
        if isinstance(tts_text, str):
            self.warn_byte_fallback(tts_text)
        if not isinstance(tts_text, (str, Iterator)):
            if isinstance(tts_text, Iterable):
                tts_text = iter(tts_text)
            else:
                raise TextError(f"tts_text must be a string or a generator of strings, got {type(tts_text).__name__}")
        segs = self.text.normalize(tts_text, split=True, text_frontend=text_frontend)
        if not segs:
            raise TextError(f"tts_text {tts_text!r} has nothing to speak after normalisation (only punctuation?)")
        return segs

    def warn_byte_fallback(self, text: str) -> list[str]:
        """Warn (:class:`InputWarning`) about characters the tokenizer can only spell as raw bytes:
        scripts the model was not trained on, private-use or zero-width characters. Returns them."""
        chars = self.text_tokenizer.byte_fallback_chars(text)
        if chars:
            names = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:10]) + (" ..." if len(chars) > 10 else "")
            warnings.warn(f"the text tokenizer knows {len(chars)} character(s) only as raw bytes: {names}; "
                          "the model has hardly seen them and may mispronounce or skip them", InputWarning,
                          stacklevel=4)
        return chars

    # ------------------------------------------------------------------------------- core
    def _token_source(self, mi: ModelInput, key) -> Iterator[list[int]]:
        if mi.source_speech is not None:
            yield [int(t) for t in mi.source_speech]
            return
        if isinstance(mi.text, Iterator):
            sampler = _greedy_host(self.config.llm.eos_token) if self.sampling == "greedy" else None
            sess = BistreamSession(self.lm, key=None if sampler else key, sampler=sampler)
            pending: list[int] = []
            for tok in sess.run(mi.text, mi.prompt_text, [int(t) for t in mi.llm_prompt_speech],
                                max_tokens=self.bistream_max_tokens):
                pending.append(tok)
                if len(pending) >= self.lm.steps_per_call:
                    yield pending
                    pending = []
            if pending:
                yield pending
            return
        req = Request(text=list(mi.text), prompt_text=list(mi.prompt_text),
                      prompt_speech=[int(t) for t in mi.llm_prompt_speech])
        for new in self.lm.stream([req], key=key[None] if self.sampling == "ras" else None):
            yield new[0]

    def tts(self, mi: ModelInput, *, stream: bool = False, speed: float = 1.0, key=None) -> Iterator[dict]:
        """One segment: LM (or the vc source tokens) -> flow -> HiFT; yields ``{'tts_speech': (1, N)}``."""
        key = self._key(key)
        k_lm, k_voc = _split2(key)
        check_speed(speed)
        if stream and speed != 1.0:
            raise ConfigError("speed change only works with stream=False (as the official); drop --speed or --stream")
        if stream:
            for audio in self.token2wav.stream(self._token_source(mi, k_lm), mi.flow, k_voc):
                yield {"tts_speech": audio[None].astype(np.float32)}
            return
        tokens = [t for new in self._token_source(mi, k_lm) for t in new]
        if not tokens:
            raise GenerationError("the LM produced no speech tokens for this text")
        audio = self.token2wav.full(np.asarray(tokens, np.int32), mi.flow, k_voc, speed=speed)
        yield {"tts_speech": audio[None].astype(np.float32)}

    # ------------------------------------------------------------------------------- modes
    def _inputs(self, r: SynthesisRequest) -> list[ModelInput]:
        """The official ``frontend_<mode>`` for every text segment of one request."""
        m = r.mode
        if m not in MODES:
            raise ModeError(f"unknown mode {m!r}; choose {', '.join(MODES)}")
        check_speed(r.speed)
        if r.speaker_tag is not None and m not in ("sft", "zero_shot"):
            raise ModeError(f"speaker_tag (the multi-speaker fine-tuning prefix) applies to sft and zero_shot, not {m}")
        none = np.zeros((0,), np.int32)
        if m == "vc":
            if r.source_wav is None or r.prompt_wav is None:
                raise ModeError("vc needs both source_speech_16k (--source-wav) and prompt_speech_16k (--prompt-wav)")
            pa = prompt_audio(r.prompt_wav)  # prompt checks first: the source is the slow part
            src = source_tokens(r.source_wav, self.speech_tokenizer)
            pf = extract_prompt(pa, self.speech_tokenizer, self.speaker_encoder, trim=False)
            flow = FlowPrompt(pf.speech_token, pf.speech_feat, pf.embedding)
            return [ModelInput([], [], none, flow, source_speech=src)]
        if m == "instruct2" and (not isinstance(r.instruct_text, str) or not r.instruct_text.strip()):
            raise ModeError("instruct2 needs instruct_text, e.g. 'Speak happily.'")
        segs = self._segments(r.text, r.text_frontend)
        if m == "sft":
            info = self._speaker(r.spk_id)
            emb = np.asarray(info.get("embedding", info.get("flow_embedding")), np.float32).reshape(-1)
            flow = FlowPrompt(none, np.zeros((0, self.config.flow.output_size), np.float32), emb)
            ptext, speech = [], none
        else:
            info, flow = self._prompt(r.prompt_wav, r.spk_id)
            ptext, speech = [], none
            if m == "zero_shot":
                if r.spk_id:
                    ptext = [int(t) for t in np.asarray(info.get("prompt_text", []), np.int64).reshape(-1)]
                else:
                    if not isinstance(r.prompt_text, str) or not r.prompt_text.strip():
                        raise ModeError("zero_shot needs prompt_text, the transcript of the prompt audio "
                                        "(or use inference_cross_lingual without a transcript)")
                    ptext = self.text_tokenizer.encode(self.text.normalize(r.prompt_text, split=False,
                                                                           text_frontend=r.text_frontend))
                    for seg in segs:
                        if isinstance(seg, str) and len(seg) < 0.5 * len(r.prompt_text):
                            log.warning("synthesis text %r is much shorter than the prompt text; quality may suffer",
                                        seg)
                speech = np.asarray(info.get("speech_token", info.get("llm_prompt_speech_token", flow.token)),
                                    np.int32).reshape(-1)
            elif m == "instruct2":
                instr = r.instruct_text if ENDOFPROMPT in r.instruct_text else r.instruct_text + ENDOFPROMPT
                ptext = self.text_tokenizer.encode(instr)
        if r.speaker_tag is not None:  # mSFT: the speaker prefix before the (prompt) text, as in training
            ptext = self.text_tokenizer.encode(speaker_prompt(r.speaker_tag)) + list(ptext)
        return [ModelInput(self._encode(seg), ptext, speech, flow) for seg in segs]

    def _run(self, r: SynthesisRequest, stream: bool) -> Iterator[dict]:
        key = self._key(r.key)
        for i, mi in enumerate(self._inputs(r)):
            yield from self.tts(mi, stream=stream, speed=r.speed, key=_fold_in(key, i))

    def inference_sft(self, tts_text, spk_id: str, stream: bool = False, speed: float = 1.0,
                      text_frontend: bool = True, key=None, speaker_tag: Optional[str] = None) -> Iterator[dict]:
        """A built-in speaker (``spk2info.pt``) reads ``tts_text``. ``speaker_tag``: a model fine-tuned with
        multi-speaker SFT (configs/train/msft.yaml) gets the prefix ``"Speaker <tag><|endofprompt|>"``."""
        return self._run(SynthesisRequest("sft", tts_text, spk_id=spk_id, speed=speed, text_frontend=text_frontend,
                                          key=key, speaker_tag=speaker_tag), stream)

    def inference_zero_shot(self, tts_text, prompt_text: str, prompt_speech_16k=None, zero_shot_spk_id: str = "",
                            stream: bool = False, speed: float = 1.0, text_frontend: bool = True,
                            key=None, speaker_tag: Optional[str] = None) -> Iterator[dict]:
        """Clone the prompt speaker: ``prompt_text`` is the transcript of ``prompt_speech_16k``.
        ``speaker_tag``: the mSFT prefix before the prompt text (see :meth:`inference_sft`)."""
        return self._run(SynthesisRequest("zero_shot", tts_text, prompt_speech_16k, prompt_text,
                                          spk_id=zero_shot_spk_id, speed=speed, text_frontend=text_frontend,
                                          key=key, speaker_tag=speaker_tag), stream)

    def inference_cross_lingual(self, tts_text, prompt_speech_16k=None, zero_shot_spk_id: str = "",
                                stream: bool = False, speed: float = 1.0, text_frontend: bool = True,
                                key=None) -> Iterator[dict]:
        """The prompt's voice speaks ``tts_text`` (any language); the LM gets no prompt."""
        return self._run(SynthesisRequest("cross_lingual", tts_text, prompt_speech_16k, spk_id=zero_shot_spk_id,
                                          speed=speed, text_frontend=text_frontend, key=key), stream)

    def inference_instruct2(self, tts_text, instruct_text: str, prompt_speech_16k=None, zero_shot_spk_id: str = "",
                            stream: bool = False, speed: float = 1.0, text_frontend: bool = True,
                            key=None) -> Iterator[dict]:
        """The prompt's voice speaks ``tts_text`` following ``instruct_text`` (e.g. a dialect or an emotion).
        ``<|endofprompt|>`` is appended to the instruction unless it already contains it."""
        return self._run(SynthesisRequest("instruct2", tts_text, prompt_speech_16k, instruct_text=instruct_text,
                                          spk_id=zero_shot_spk_id, speed=speed, text_frontend=text_frontend,
                                          key=key), stream)

    def inference_vc(self, source_speech_16k, prompt_speech_16k, stream: bool = False, speed: float = 1.0,
                     key=None) -> Iterator[dict]:
        """Voice conversion: the source utterance's tokens, the prompt's voice."""
        return self._run(SynthesisRequest("vc", prompt_wav=prompt_speech_16k, source_wav=source_speech_16k,
                                          speed=speed, key=key), stream)

    # ------------------------------------------------------------------------------- batch
    def synthesize_batch(self, requests: Sequence[SynthesisRequest]) -> list[np.ndarray]:
        """Many non-streaming requests at once: one batched LM run, one batched flow run, one batched
        vocoder run. Returns one (samples,) array per request (its segments concatenated); each equals
        the corresponding single call with the same ``key`` (segment ``i`` uses ``fold_in(key, i)``)."""
        if not requests:
            raise ModeError("synthesize_batch needs at least one request")
        rows: list[tuple[int, ModelInput, Any, float]] = []
        for ri, r in enumerate(requests):
            key = self._key(r.key)
            for si, mi in enumerate(self._inputs(r)):
                k_lm, k_voc = _split2(_fold_in(key, si))
                rows.append((ri, mi, (k_lm, k_voc), r.speed))
        lm_rows = [i for i, (_, mi, _, _) in enumerate(rows) if mi.source_speech is None]
        tokens: dict[int, list[int]] = {}
        for i, (_, mi, _, _) in enumerate(rows):
            if mi.source_speech is not None:
                tokens[i] = [int(t) for t in mi.source_speech]
        if lm_rows:
            reqs = [Request(text=list(rows[i][1].text), prompt_text=list(rows[i][1].prompt_text),
                            prompt_speech=[int(t) for t in rows[i][1].llm_prompt_speech]) for i in lm_rows]
            keys = jax.numpy.stack([rows[i][2][0] for i in lm_rows]) if self.sampling == "ras" else None
            for i, toks in zip(lm_rows, self.lm.generate(reqs, key=keys)):
                if not toks:
                    raise GenerationError(f"request {rows[i][0]}: the LM produced no speech tokens")
                tokens[i] = toks
        audio = self.token2wav.full_batch([np.asarray(tokens[i], np.int32) for i in range(len(rows))],
                                          [mi.flow for _, mi, _, _ in rows],
                                          [k[1] for _, _, k, _ in rows], [s for _, _, _, s in rows])
        out: list[list[np.ndarray]] = [[] for _ in requests]
        for (ri, _, _, _), a in zip(rows, audio):
            out[ri].append(a)
        return [np.concatenate(a) for a in out]
