"""Oracle tasks for a whole release directory (``CosyVoice2-0.5B`` layout): writing one with random
weights (used by ``scripts/make_random_release.py``) and the official end-to-end reference.

The reference is assembled from official pieces, driven by the official methods:

* ``cosyvoice2.yaml`` loaded with the official ``load_hyperpyyaml`` (``qwen_pretrain_path``
  overridden to ``<dir>/CosyVoice-BlankEN`` as ``cosyvoice.cli.cosyvoice.CosyVoice2`` does);
* ``CosyVoiceFrontEnd`` built by its own ``__init__`` (Qwen tokenizer, CAM++ through onnxruntime);
* ``CosyVoice2Model`` with ``.load`` (flow, HiFT); the packaged ``CosyVoice2Model`` does not keep an
  LLM, so ``llm.pt`` is loaded into the yaml's ``Qwen2LM`` and set as ``model.llm``;
* a ``CosyVoice2`` object made without its ``__init__`` (that one needs ``modelscope`` and does
  not build the LLM), attributes filled in; its ``inference_*`` methods run unchanged.

Departures, each forced by this environment or by determinism:

* ``speech_tokenizer_v2.onnx`` of a random release holds the weights in the release layout but is
  not the runnable token graph, so ``frontend._extract_speech_token`` is replaced: the official
  whisper log-mel (as the frontend computes it) into the official ``s3tokenizer`` torch model
  loaded from that ONNX with ``s3tokenizer.utils.onnx2torch``.
* Text normalization: the packaged frontend has the WeTextProcessing / ttsfrd normalizers commented
  out; ``use_ttsfrd=False`` with identity ``zh_tn_model``/``en_tn_model`` runs the rest of the
  official ``text_normalize`` chain (the same as ``frontend:text_normalize``).
* LLM sampling: greedy (``Qwen2LM.sampling`` replaced; a retry of the same scores, which the
  official ``sampling_ids`` makes while EOS is not allowed, returns the next best id, so the
  result is the argmax with EOS excluded before ``min_len``).
* HiFT source noise: ``SineGen2``'s ``randn_like`` draw for a call producing W samples is
  ``inputs["hift_noise"][:W]``; its initial phase draw ``rand`` gives zeros (the phase of
  sample 0 is dropped by the 1/480 linear downsampling, so it has no effect).
* The flow keeps the official fixed noise (``CausalConditionalCFM.rand_noise``, seed 0).
* ``cosyvoice.cli.model``'s 0.1 s polling sleep is shortened (the chunk schedule does not depend
  on timing: chunk boundaries move by fixed hops, and the remaining chunks are emitted once the
  LLM ends).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import types

import numpy as np
import torch

from common import reinit_, scale_hift_, to_np, to_torch

_PIPES: dict = {}


# --------------------------------------------------------------------------- environment shims
def _shims() -> None:
    """``cosyvoice.cli.cosyvoice`` imports ``modelscope`` (downloads only): give it a stub.
    hyperpyyaml resolves ``!name:matcha.utils.audio.mel_spectrogram`` by attribute lookup from
    ``matcha``: attach ``common``'s bare ``matcha.utils`` package to it."""
    import matcha

    if not hasattr(matcha, "utils"):
        matcha.utils = sys.modules["matcha.utils"]
    if "modelscope" not in sys.modules:
        try:
            import modelscope  # noqa: F401  (real package if installed)
        except ImportError:
            ms = types.ModuleType("modelscope")

            def snapshot_download(model_dir, *a, **k):
                raise FileNotFoundError(f"{model_dir} does not exist (no downloads in the oracle)")
            ms.snapshot_download = snapshot_download
            sys.modules["modelscope"] = ms


def _load_yaml(model_dir: str) -> dict:
    from hyperpyyaml import load_hyperpyyaml

    with open(os.path.join(model_dir, "cosyvoice2.yaml"), "r", encoding="utf-8") as f:
        return load_hyperpyyaml(f, overrides={"qwen_pretrain_path": os.path.join(model_dir, "CosyVoice-BlankEN")})


# --------------------------------------------------------------------------- writing a release
def write_qwen_dir(inputs, path: str, qwen: str, seed: int = 0, dtype: str = "float32"):
    """``config.json`` + random ``model.safetensors`` of a Qwen2ForCausalLM with the sizes in
    ``qwen`` (JSON), so the official ``Qwen2Encoder`` (``from_pretrained``) can load the folder.
    ``llm.pt`` replaces these weights afterwards, as with the real release."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
               tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768, max_window_layers=21,
               attention_dropout=0.0, initializer_range=0.02, bos_token_id=151643, eos_token_id=151643,
               architectures=["Qwen2ForCausalLM"], torch_dtype=dtype, use_cache=True)
    cfg.update(json.loads(qwen))
    torch.manual_seed(seed)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    finally:
        torch.set_default_dtype(saved)
    model.save_pretrained(path, safe_serialization=True)
    return {"n_params": np.array(sum(p.numel() for p in model.parameters()))}


def make_weights(inputs, model_dir: str, seed: int = 0, f0_scale: float = 100.0, post_scale: float = 0.15,
                 hift_spelling: str = "weight_g"):
    """Build llm/flow/hift from ``<model_dir>/cosyvoice2.yaml`` with the official hyperpyyaml,
    re-draw every weight (``common.reinit_``; RoPE frequencies restored), save ``llm.pt``,
    ``flow.pt``, ``hift.pt`` (HiFT weight norm in ``hift_spelling``: ``weight_g`` =
    ``X.weight_g/X.weight_v`` as the published hift.pt, or ``parametrizations``).
    Returns the parameter counts and the key counts written."""
    from llm import _restore_rope

    _shims()
    configs = _load_yaml(model_dir)
    out = {}
    for i, name in enumerate(("llm", "flow", "hift")):
        m = configs[name]
        reinit_(m, seed + i)
        if name == "llm":
            _restore_rope(m.llm.model)
        if name == "hift":
            scale_hift_(m, f0_scale, post_scale)
        m.eval()
        sd = m.state_dict()
        if name == "hift" and hift_spelling == "weight_g":
            sd = {k.replace(".parametrizations.weight.original0", ".weight_g")
                  .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in sd.items()}
        # the state dict's own tensors: the tied Qwen lm_head shares embed_tokens' storage (saved once)
        torch.save(sd, os.path.join(model_dir, f"{name}.pt"))
        out[f"n_params_{name}"] = np.array(sum(p.numel() for p in m.parameters()))
        out[f"n_keys_{name}"] = np.array(len(sd))
    return out


def write_spk2info(inputs, path: str, names: list, seed: int = 0, dim: int = 192):
    """``spk2info.pt``: ``{name: {'embedding': tensor (1, dim)}}``, what ``frontend_sft`` reads."""
    g = torch.Generator().manual_seed(seed)
    info = {n: {"embedding": torch.randn(1, dim, generator=g)} for n in names}
    torch.save(info, path)
    return {"embedding": np.stack([to_np(info[n]["embedding"][0]) for n in names])}


def load_official(inputs, model_dir: str):
    """Load the directory the way the official ``CosyVoice2`` does (proves the layout): counts of
    the loaded modules' parameters, the speakers, the sample rate."""
    cv = _pipeline(model_dir)
    return {"n_params_llm": np.array(sum(p.numel() for p in cv.model.llm.parameters())),
            "n_params_flow": np.array(sum(p.numel() for p in cv.model.flow.parameters())),
            "n_params_hift": np.array(sum(p.numel() for p in cv.model.hift.parameters())),
            "spks": np.array(cv.list_available_spks(), dtype=str), "sample_rate": np.array(cv.sample_rate)}


# --------------------------------------------------------------------------- the official pipeline
class _Greedy:
    """``Qwen2LM.sampling`` replacement: argmax; the k-th call in a row with the same score tensor
    (``sampling_ids`` retrying because EOS is not allowed yet) returns the k-th best id."""

    def __init__(self):
        self._last, self._rank = None, 0

    def __call__(self, weighted_scores, decoded_tokens, sampling):
        if weighted_scores is self._last:
            self._rank += 1
        else:
            self._last, self._rank = weighted_scores, 0
        order = torch.argsort(weighted_scores, descending=True, stable=True)
        return order[self._rank].reshape(1)


class _NoWaitTime:
    """Stands in for the ``time`` module inside ``cosyvoice.cli.model``: short polling sleeps."""

    def __init__(self, real):
        self._real = real

    def sleep(self, s):
        self._real.sleep(min(s, 0.005))

    def __getattr__(self, name):
        return getattr(self._real, name)


def _speech_tokenizer(path: str):
    """The official s3tokenizer v2 torch model with the weights read from the release ONNX by
    ``s3tokenizer.utils.onnx2torch``; heads from the ONNX metadata, else D/64 (as the release)."""
    import onnx
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2
    from s3tokenizer.utils import onnx2torch

    sd = onnx2torch(path, None, False)
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    d = sd["encoder.conv1.weight"].shape[0]
    n_layer = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    cfg = ModelConfig(n_audio_state=d, n_audio_head=int(meta.get("n_audio_head", d // 64)), n_audio_layer=n_layer,
                      n_mels=sd["encoder.conv1.weight"].shape[1])
    m = S3TokenizerV2("speech_tokenizer_v2_25hz", cfg)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def _pipeline(model_dir: str):
    stamp = tuple(os.path.getmtime(os.path.join(model_dir, f)) for f in
                  ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx"))
    key = (os.path.realpath(model_dir), stamp)
    if key in _PIPES:
        return _PIPES[key]
    _shims()
    import inflect
    import whisper
    import cosyvoice.cli.model as cli_model
    from cosyvoice.cli.cosyvoice import CosyVoice2
    from cosyvoice.cli.frontend import CosyVoiceFrontEnd
    from cosyvoice.cli.model import CosyVoice2Model

    configs = _load_yaml(model_dir)
    cv = CosyVoice2.__new__(CosyVoice2)
    cv.instruct, cv.model_dir, cv.fp16 = False, model_dir, False
    fe = CosyVoiceFrontEnd(configs["get_tokenizer"], configs["feat_extractor"],
                           os.path.join(model_dir, "campplus.onnx"),
                           os.path.join(model_dir, "speech_tokenizer_v2.onnx"),
                           os.path.join(model_dir, "spk2info.pt"), configs["allowed_special"])
    identity = types.SimpleNamespace(normalize=lambda text: text)
    fe.use_ttsfrd, fe.zh_tn_model, fe.en_tn_model, fe.inflect_parser = False, identity, identity, inflect.engine()
    s3 = _speech_tokenizer(os.path.join(model_dir, "speech_tokenizer_v2.onnx"))

    def extract_speech_token(speech):
        assert speech.shape[1] / 16000 <= 30, 'do not support extract speech token for audio longer than 30s'
        feat = whisper.log_mel_spectrogram(speech, n_mels=128)
        with torch.inference_mode():
            ids, lens = s3.quantize(feat, torch.tensor([feat.shape[2]]))
        tok = ids[:, :int(lens[0])].to(torch.int32)
        return tok, torch.tensor([tok.shape[1]], dtype=torch.int32)
    fe._extract_speech_token = extract_speech_token
    cv.frontend = fe
    cv.sample_rate = configs["sample_rate"]
    model = CosyVoice2Model(configs["llm"], configs["flow"], configs["hift"], False)
    model.load(*(os.path.join(model_dir, f"{n}.pt") for n in ("llm", "flow", "hift")))
    llm = configs["llm"]
    llm.load_state_dict(torch.load(os.path.join(model_dir, "llm.pt"), map_location="cpu", weights_only=True),
                        strict=True)
    llm.eval()
    llm.sampling = _Greedy()
    model.llm = llm
    cv.model = model
    if not isinstance(cli_model.time, _NoWaitTime):
        cli_model.time = _NoWaitTime(cli_model.time)
    _PIPES.clear()
    _PIPES[key] = cv
    return cv


@contextlib.contextmanager
def _hift_noise(hift, noise: np.ndarray):
    """During the call: SineGen2 draws ``noise[:W]`` (randn_like) and zero initial phases (rand)."""
    sine = hift.m_source.l_sin_gen
    forward = sine.forward
    noise_t = to_torch(np.asarray(noise, np.float32))
    calls = []

    def patched(f0):
        w = f0.shape[1]
        if w > noise_t.shape[0]:
            raise ValueError(f"hift_noise has {noise_t.shape[0]} rows, a HiFT call needs {w}: pass a longer "
                             "inputs['hift_noise'] (W_max, 9)")
        draw = noise_t[:w][None]
        rand, randn_like = torch.rand, torch.randn_like
        torch.rand = lambda *shape, **kw: torch.zeros(*shape)
        torch.randn_like = lambda x, **kw: draw.clone() if tuple(x.shape) == tuple(draw.shape) else torch.zeros_like(x)
        try:
            calls.append(w)
            return forward(f0)
        finally:
            torch.rand, torch.randn_like = rand, randn_like
    sine.forward = patched
    try:
        yield calls
    finally:
        del sine.forward


class _Recorder:
    """Records what the official methods pass around: the frontend's ``model_input`` per text
    segment (``CosyVoice2Model.tts`` kwargs), the LLM tokens, the ``token2wav`` calls."""

    def __init__(self, cv, bistream_max_tokens: int = 0):
        self.cv, self.inputs, self.tokens, self.calls = cv, [], [], []
        self.bistream_max_tokens, self.bistream_capped = bistream_max_tokens, False

    def __enter__(self):
        model, llm, rec = self.cv.model, self.cv.model.llm, self
        tts, token2wav, inference, bistream = model.tts, model.token2wav, llm.inference, llm.inference_bistream

        def tts_rec(**kw):
            rec.inputs.append({k: v for k, v in kw.items() if isinstance(v, torch.Tensor)})
            rec.tokens.append([])
            if kw.get("source_speech_token", torch.zeros(1, 0)).shape[1] != 0:
                rec.tokens[-1].extend(kw["source_speech_token"].flatten().tolist())
            return tts(**kw)

        def inference_rec(*a, **kw):
            for t in inference(*a, **kw):
                rec.tokens[-1].append(int(t))
                yield t

        def bistream_rec(*a, **kw):
            gen = bistream(*a, **kw)
            for t in gen:
                rec.tokens[-1].append(int(t))
                yield t
                if rec.bistream_max_tokens and len(rec.tokens[-1]) >= rec.bistream_max_tokens:
                    rec.bistream_capped = True
                    gen.close()
                    return

        def token2wav_rec(token, prompt_token, prompt_feat, embedding, token_offset, uuid, stream=False,
                          finalize=False, speed=1.0):
            rec.calls.append((len(rec.inputs) - 1, token.shape[1], token_offset, int(finalize)))
            return token2wav(token=token, prompt_token=prompt_token, prompt_feat=prompt_feat, embedding=embedding,
                             token_offset=token_offset, uuid=uuid, stream=stream, finalize=finalize, speed=speed)
        model.tts, model.token2wav = tts_rec, token2wav_rec
        llm.inference, llm.inference_bistream = inference_rec, bistream_rec
        return self

    def __exit__(self, *a):
        for obj, name in ((self.cv.model, "tts"), (self.cv.model, "token2wav"), (self.cv.model.llm, "inference"),
                          (self.cv.model.llm, "inference_bistream")):
            obj.__dict__.pop(name, None)


_FRONTEND_NAMES = {"text": "text_token", "prompt_text": "prompt_text_token",
                   "flow_prompt_speech_token": "prompt_speech_token", "prompt_speech_feat": "prompt_speech_feat",
                   "flow_embedding": "embedding", "llm_prompt_speech_token": "llm_prompt_speech_token",
                   "llm_embedding": "llm_embedding", "source_speech_token": "source_speech_token"}


def _frontend_arrays(model_inputs: list[dict]) -> dict:
    """Named frontend intermediates: those of the first segment (batch axis dropped; the prompt
    ones empty where the mode has none), text tokens of all segments concatenated
    (``text_token_lens`` per segment), and ``seg{i}/<official key>``."""
    out = {}
    for i, mi in enumerate(model_inputs):
        for k, v in mi.items():
            out[f"seg{i}/{k}"] = to_np(v)
    if model_inputs:
        first = model_inputs[0]
        for k, name in _FRONTEND_NAMES.items():
            if k in first and first[k].ndim >= 2:
                out[name] = to_np(first[k][0])
        empty = {"prompt_text_token": np.zeros((0,), np.int32), "prompt_speech_token": np.zeros((0,), np.int32),
                 "prompt_speech_feat": np.zeros((0, 80), np.float32)}
        for name, value in empty.items():  # absent in a mode (e.g. sft has no prompt): empty
            out.setdefault(name, value)
        texts = [to_np(mi["text"][0]) for mi in model_inputs if "text" in mi and mi["text"].ndim == 2]
        out["text_token"] = np.concatenate(texts).astype(np.int32) if texts else np.zeros((0,), np.int32)
        out["text_token_lens"] = np.array([len(t) for t in texts], np.int32)
    return out


_MODES = ("sft", "zero_shot", "cross_lingual", "instruct2", "vc")


def _run_mode(cv, inputs, mode, tts_text, prompt_text, instruct_text, spk_id, stream, text_frontend, speed,
              zero_shot_spk_id):
    if mode not in _MODES:
        raise ValueError(f"mode {mode!r}: one of {_MODES}")
    prompt = to_torch(inputs["prompt_wav_16k"]).float()[None] if "prompt_wav_16k" in inputs else None
    if mode in ("zero_shot", "cross_lingual", "instruct2", "vc") and prompt is None and not zero_shot_spk_id:
        raise ValueError(f"mode {mode} needs inputs['prompt_wav_16k'] (float32, 16 kHz, 1-D)")
    kw = dict(stream=stream, speed=speed)
    if mode == "sft":
        return cv.inference_sft(tts_text, spk_id, text_frontend=text_frontend, **kw)
    if mode == "zero_shot":
        return cv.inference_zero_shot(tts_text, prompt_text, prompt, zero_shot_spk_id, text_frontend=text_frontend, **kw)
    if mode == "cross_lingual":
        return cv.inference_cross_lingual(tts_text, prompt, zero_shot_spk_id, text_frontend=text_frontend, **kw)
    if mode == "instruct2":
        return cv.inference_instruct2(tts_text, instruct_text, prompt, zero_shot_spk_id, text_frontend=text_frontend,
                                      **kw)
    source = to_torch(inputs["source_wav_16k"]).float()[None]
    return cv.inference_vc(source, prompt, **kw)


def tts(inputs, model_dir: str, mode: str, tts_text: str = "", prompt_text: str = "", instruct_text: str = "",
        spk_id: str = "", stream: bool = False, text_frontend: bool = True, speed: float = 1.0,
        zero_shot_spk_id: str = "", add_zero_shot_spk: bool = False, tts_text_pieces: list | None = None,
        bistream_max_tokens: int = 200):
    """The official ``CosyVoice2.inference_<mode>`` on a release directory, deterministic.

    inputs: ``prompt_wav_16k`` (float32 (W,)) for zero_shot / cross_lingual / instruct2 / vc,
    ``source_wav_16k`` for vc, ``hift_noise`` float32 (W_max, 9) (HiFT source noise; the first W
    rows are used by a call producing W samples).
    ``add_zero_shot_spk``: first register the prompt as ``zero_shot_spk_id`` (official
    ``add_zero_shot_spk``), then synthesize from the stored speaker.
    ``tts_text_pieces``: bistream input: ``tts_text`` becomes a generator of these pieces (the
    official path: no normalization, ``Qwen2LM.inference_bistream``; ``text_token`` is then empty).
    The official bistream decode has no length limit after the text ends (it runs until EOS,
    which random weights under greedy decoding may never pick): the oracle stops it after
    ``bistream_max_tokens`` speech tokens (0: no cap) and reports ``bistream_capped``.

    Returns ``tokens`` (int64, the speech tokens of all segments; for vc the source tokens),
    ``segment_token_lens``, ``chunk_0 .. chunk_{n-1}`` (float32 (W_i,), each yielded
    ``tts_speech``), ``n_chunks``, ``audio`` (the chunks concatenated), ``schedule`` (int32
    (calls, 4): segment, tokens passed to token2wav, token_offset, finalize), ``hift_calls``
    (samples per HiFT call), ``token_hop_len``, and the frontend intermediates (see
    ``_frontend_arrays``: ``text_token``, ``prompt_text_token``, ``prompt_speech_token``,
    ``prompt_speech_feat`` (F, 80), ``embedding`` (192,), ``seg{i}/<key>``).
    """
    cv = _pipeline(model_dir)
    if add_zero_shot_spk:
        if not zero_shot_spk_id:
            raise ValueError("add_zero_shot_spk needs zero_shot_spk_id")
        cv.add_zero_shot_spk(prompt_text, to_torch(inputs["prompt_wav_16k"]).float()[None], zero_shot_spk_id)
    if tts_text_pieces is not None:
        tts_text = (p for p in list(tts_text_pieces))
    chunks = []
    with _Recorder(cv, bistream_max_tokens if tts_text_pieces is not None else 0) as rec, _hift_noise(cv.model.hift, inputs["hift_noise"]) as hift_calls:
        for out in _run_mode(cv, inputs, mode, tts_text, prompt_text, instruct_text, spk_id, stream,
                             text_frontend, speed, zero_shot_spk_id):
            chunks.append(to_np(out["tts_speech"][0]).astype(np.float32))
    res = {f"chunk_{i}": c for i, c in enumerate(chunks)}
    res.update(n_chunks=np.array(len(chunks)),
               audio=np.concatenate(chunks) if chunks else np.zeros((0,), np.float32),
               tokens=np.array([t for seg in rec.tokens for t in seg], np.int64),
               segment_token_lens=np.array([len(seg) for seg in rec.tokens], np.int64),
               schedule=np.array(rec.calls, np.int32).reshape(-1, 4), hift_calls=np.array(hift_calls, np.int64),
               token_hop_len=np.array(cv.model.token_hop_len), bistream_capped=np.array(rec.bistream_capped))
    res.update(_frontend_arrays(rec.inputs))
    return res


def head_prompt(inputs, model_dir: str, paths: list, trim: bool = True):
    """The official git-HEAD front end's prompt part for prompt *files*, on a release directory.

    HEAD (github FunAudioLLM/CosyVoice, cosyvoice/cli/frontend.py, ``frontend_zero_shot`` and
    ``frontend_vc``) takes ``prompt_wav`` paths and calls ``_extract_speech_feat(prompt_wav)``,
    ``_extract_speech_token(prompt_wav)`` and ``_extract_spk_embedding(prompt_wav)``, each of which
    starts with ``load_wav(prompt_wav, 24000 / 16000 / 16000)`` (resampling from the file's own rate)
    and then runs exactly the body the snapshot's ``_extract_*`` methods run on a loaded tensor. So:
    HEAD's loader (``frontend.load_wav_head``) + the snapshot's ``_extract_*`` methods, then HEAD's
    24 kHz trim ``n = min(frames // 2, tokens)`` when ``trim`` (zero_shot; vc does not trim).
    Returns ``token{i}``, ``feat{i}`` (F, 80), ``embedding{i}`` (192,) per path."""
    from frontend import load_wav_head

    fe = _pipeline(model_dir).frontend
    out = {}
    for i, path in enumerate(paths):
        speech_feat, _ = fe._extract_speech_feat(load_wav_head(path, 24000))
        speech_token, _ = fe._extract_speech_token(load_wav_head(path, 16000))
        if trim:
            n = min(int(speech_feat.shape[1] / 2), speech_token.shape[1])
            speech_feat, speech_token = speech_feat[:, :2 * n], speech_token[:, :n]
        embedding = fe._extract_spk_embedding(load_wav_head(path, 16000))
        out.update({f"token{i}": to_np(speech_token[0]).astype(np.int32), f"feat{i}": to_np(speech_feat[0]),
                    f"embedding{i}": to_np(embedding[0])})
    return out


def frontend(inputs, model_dir: str, mode: str, tts_text: str = "", prompt_text: str = "", instruct_text: str = "",
             spk_id: str = "", text_frontend: bool = True):
    """The official frontend alone, as ``inference_<mode>`` calls it: ``pieces`` (normalized text
    segments), ``prompt_text_normalized``, and per segment the ``model_input`` the frontend builds
    (``seg{i}/<official key>``, plus the named arrays of ``_frontend_arrays``)."""
    cv = _pipeline(model_dir)
    fe, sr = cv.frontend, cv.sample_rate
    prompt = to_torch(inputs["prompt_wav_16k"]).float()[None] if "prompt_wav_16k" in inputs else None
    out = {}
    if mode == "vc":
        source = to_torch(inputs["source_wav_16k"]).float()[None]
        mis = [fe.frontend_vc(source, prompt, sr)]
        pieces = []
    else:
        pieces = fe.text_normalize(tts_text, split=True, text_frontend=text_frontend)
        if mode == "zero_shot":
            prompt_text = fe.text_normalize(prompt_text, split=False, text_frontend=text_frontend)
            out["prompt_text_normalized"] = np.array(prompt_text)
        mis = []
        for p in pieces:
            if mode == "sft":
                mis.append(fe.frontend_sft(p, spk_id))
            elif mode == "zero_shot":
                mis.append(fe.frontend_zero_shot(p, prompt_text, prompt, sr, ""))
            elif mode == "cross_lingual":
                mis.append(fe.frontend_cross_lingual(p, prompt, sr, ""))
            elif mode == "instruct2":
                mis.append(fe.frontend_instruct2(p, instruct_text, prompt, sr, ""))
            else:
                raise ValueError(f"mode {mode!r}: one of {_MODES}")
    out["pieces"] = np.array(pieces, dtype=str) if pieces else np.zeros((0,), "<U1")
    out.update(_frontend_arrays([{k: v for k, v in mi.items() if isinstance(v, torch.Tensor)} for mi in mis]))
    return out
