"""The official release directory (``CosyVoice2-0.5B``): layout checks and its YAML config.

Layout (as published)::

    CosyVoice2-0.5B/
      cosyvoice2.yaml            hyperpyyaml: model classes and hyperparameters
      llm.pt  flow.pt  hift.pt   plain state dicts of Qwen2LM / CausalMaskedDiffWithXvec / HiFTGenerator
      campplus.onnx              CAM++ speaker encoder
      speech_tokenizer_v2.onnx   S3Tokenizer v2
      CosyVoice-BlankEN/         Qwen2.5-0.5B tokenizer (vocab.json, merges.txt, ...) and config
      spk2info.pt                optional: built-in speakers (sft mode)

``cosyvoice2.yaml`` uses hyperpyyaml tags (``!new:``, ``!name:``, ``!ref``, ``!apply:``) that
construct PyTorch objects. :func:`read_release_yaml` reads it as *data* (no code runs) and
:func:`config_from_release_yaml` maps its hyperparameters onto :class:`ModelConfig`, so a
modified release (e.g. another ``num_decoding_left_chunks``) loads with its own values.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from ..config import (CFMConfig, FlowConfig, FlowDecoderConfig, FlowEncoderConfig, HiFTConfig, F0PredictorConfig,
                      LMConfig, ModelConfig, SamplingConfig)
from ..errors import ReleaseDirError

REQUIRED_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx")
TOKENIZER_DIR = "CosyVoice-BlankEN"
OPTIONAL_FILES = ("spk2info.pt",)


@dataclasses.dataclass(frozen=True)
class ReleasePaths:
    root: Path
    yaml: Path
    llm: Path
    flow: Path
    hift: Path
    campplus: Path
    speech_tokenizer: Path
    tokenizer_dir: Path
    spk2info: Path | None


def check_release_dir(model_dir: str | Path) -> ReleasePaths:
    """Validate the official layout; the error lists everything missing or malformed at once."""
    root = Path(model_dir)
    if not root.exists():
        raise ReleaseDirError(f"model directory {root} does not exist; download CosyVoice2-0.5B (see README) "
                              "or build a test one with scripts/make_random_release.py")
    if not root.is_dir():
        raise ReleaseDirError(f"{root} is a file; --model-dir must be the CosyVoice2-0.5B folder")
    problems = []
    for f in REQUIRED_FILES:
        p = root / f
        if not p.is_file():
            problems.append(f"{f} missing")
        elif p.stat().st_size == 0:
            problems.append(f"{f} is empty (interrupted download?)")
    tok = root / TOKENIZER_DIR
    if not tok.is_dir():
        problems.append(f"{TOKENIZER_DIR}/ missing")
    elif not ((tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        problems.append(f"{TOKENIZER_DIR}/ lacks vocab.json + merges.txt")
    if problems:
        present = ", ".join(sorted(p.name for p in root.iterdir())) or "nothing"
        raise ReleaseDirError(
            f"{root} is not a CosyVoice2-0.5B release directory: " + "; ".join(problems)
            + f". Expected {', '.join(REQUIRED_FILES)}, {TOKENIZER_DIR}/ (and optionally spk2info.pt); "
            f"found: {present}")
    spk = root / "spk2info.pt"
    return ReleasePaths(root, root / "cosyvoice2.yaml", root / "llm.pt", root / "flow.pt", root / "hift.pt",
                        root / "campplus.onnx", root / "speech_tokenizer_v2.onnx", tok,
                        spk if spk.is_file() else None)


# ----------------------------------------------------------------------------------- hyperpyyaml as data
class Tagged(dict):
    """A ``!new:``/``!name:``/``!apply:`` node read as data: its target in ``.target``."""

    def __init__(self, kind: str, target: str, value: Any):
        super().__init__(value if isinstance(value, dict) else {})
        self.kind, self.target = kind, target
        self.args = value if not isinstance(value, dict) else None


class _Ref(str):
    """An unresolved ``!ref <a> * <b>`` expression."""


class _Loader(yaml.SafeLoader):
    pass


def _multi(kind):
    def construct(loader, suffix, node):
        if isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return Tagged(kind, suffix, value)
    return construct


for _k in ("new", "name", "apply"):
    _Loader.add_multi_constructor(f"!{_k}:", _multi(_k))
_Loader.add_constructor("!ref", lambda loader, node: _Ref(loader.construct_scalar(node)))
# hyperpyyaml writes floats like 1e-06 / 1e-5, which YAML 1.1 reads as strings
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _resolve(value: Any, top: dict) -> Any:
    if isinstance(value, _Ref):
        expr = re.sub(r"<([\w.]+)>", lambda m: repr(_lookup(top, m.group(1))), str(value))
        try:
            return eval(expr, {"__builtins__": {}}, {})  # only literals and arithmetic remain
        except Exception:
            return expr
    if isinstance(value, Tagged):
        out = Tagged(value.kind, value.target, {k: _resolve(v, top) for k, v in value.items()})
        out.args = value.args
        return out
    if isinstance(value, dict):
        return {k: _resolve(v, top) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top) for v in value]
    return value


def _lookup(top: dict, dotted: str) -> Any:
    node: Any = top
    for part in dotted.split("."):
        node = node[part]
    return _resolve(node, top)


def read_release_yaml(path: str | Path) -> dict:
    """Parse a hyperpyyaml file as plain data (tags kept as :class:`Tagged`, refs resolved)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ReleaseDirError(f"{path} is not a readable hyperpyyaml file: {e}") from None
    if not isinstance(raw, dict):
        raise ReleaseDirError(f"{path} does not hold a mapping of model definitions")
    return {k: _resolve(v, raw) for k, v in raw.items()}


def _pick(d: dict, key: str, default):
    v = d.get(key, default)
    return default if isinstance(v, Tagged) and not v else v


def config_from_release_yaml(path: str | Path) -> ModelConfig:
    """Map the release's ``cosyvoice2.yaml`` onto :class:`ModelConfig` (official defaults for
    anything the file does not state, e.g. the Qwen2 backbone sizes, which come from
    ``CosyVoice-BlankEN/config.json`` instead: see :func:`qwen_config_from_dir`)."""
    y = read_release_yaml(path)
    for k in ("llm", "flow", "hift"):
        if k not in y:
            raise ReleaseDirError(f"{path} has no '{k}' section; is this a CosyVoice 2 config?")
    base = ModelConfig.cosyvoice2()
    llm, flow, hift = y["llm"], y["flow"], y["hift"]
    samp = llm.get("sampling") or {}
    lm = dataclasses.replace(
        base.lm, speech_token_size=int(_pick(llm, "speech_token_size", 6561)),
        mix_ratio=tuple(_pick(llm, "mix_ratio", [5, 15])),
        length_normalized_loss=bool(_pick(llm, "length_normalized_loss", True)),
        lsm_weight=float(_pick(llm, "lsm_weight", 0.0)),
        sampling=SamplingConfig(top_p=float(samp.get("top_p", 0.8)), top_k=int(samp.get("top_k", 25)),
                                win_size=int(samp.get("win_size", 10)), tau_r=float(samp.get("tau_r", 0.1))))
    enc, dec = flow.get("encoder") or {}, flow.get("decoder") or {}
    est = dec.get("estimator") or {}
    cfm = dec.get("cfm_params") or {}
    cfm = cfm.get("content", cfm) if isinstance(cfm, dict) else {}
    ratio = int(_pick(flow, "token_mel_ratio", 2))
    fenc = dataclasses.replace(
        base.flow.encoder, input_size=int(_pick(enc, "input_size", 512)), output_size=int(_pick(enc, "output_size", 512)),
        attention_heads=int(_pick(enc, "attention_heads", 8)), linear_units=int(_pick(enc, "linear_units", 2048)),
        num_blocks=int(_pick(enc, "num_blocks", 6)),
        pre_lookahead_len=int(_pick(enc, "pre_lookahead_len", _pick(flow, "pre_lookahead_len", 3))))
    fdec = dataclasses.replace(
        base.flow.decoder, in_channels=int(_pick(est, "in_channels", 320)), out_channels=int(_pick(est, "out_channels", 80)),
        channels=tuple(_pick(est, "channels", [256])), attention_head_dim=int(_pick(est, "attention_head_dim", 64)),
        n_blocks=int(_pick(est, "n_blocks", 4)), num_mid_blocks=int(_pick(est, "num_mid_blocks", 12)),
        num_heads=int(_pick(est, "num_heads", 8)), act_fn=str(_pick(est, "act_fn", "gelu")),
        static_chunk_size=int(_pick(est, "static_chunk_size", 50)),
        num_decoding_left_chunks=int(_pick(est, "num_decoding_left_chunks", -1)))
    fcfm = dataclasses.replace(
        base.flow.cfm, sigma_min=float(cfm.get("sigma_min", 1e-6)), solver=cfm.get("solver", "euler"),
        t_scheduler=cfm.get("t_scheduler", "cosine"), training_cfg_rate=float(cfm.get("training_cfg_rate", 0.2)),
        inference_cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)))
    fcfm = dataclasses.replace(fcfm, solver=type(base.flow.cfm.solver)(fcfm.solver),
                               t_scheduler=type(base.flow.cfm.t_scheduler)(fcfm.t_scheduler))
    fl = FlowConfig(input_size=int(_pick(flow, "input_size", 512)), output_size=int(_pick(flow, "output_size", 80)),
                    spk_embed_dim=int(_pick(flow, "spk_embed_dim", 192)), vocab_size=int(_pick(flow, "vocab_size", 6561)),
                    input_frame_rate=int(_pick(flow, "input_frame_rate", 25)), token_mel_ratio=ratio,
                    only_mask_loss=bool(_pick(flow, "only_mask_loss", True)), encoder=fenc, decoder=fdec, cfm=fcfm)
    ist = hift.get("istft_params") or {}
    f0 = hift.get("f0_predictor") or {}
    hf = HiFTConfig(
        in_channels=int(_pick(hift, "in_channels", 80)), base_channels=int(_pick(hift, "base_channels", 512)),
        nb_harmonics=int(_pick(hift, "nb_harmonics", 8)), sampling_rate=int(_pick(hift, "sampling_rate", 24000)),
        nsf_alpha=float(_pick(hift, "nsf_alpha", 0.1)), nsf_sigma=float(_pick(hift, "nsf_sigma", 0.003)),
        nsf_voiced_threshold=float(_pick(hift, "nsf_voiced_threshold", 10)),
        upsample_rates=tuple(_pick(hift, "upsample_rates", [8, 5, 3])),
        upsample_kernel_sizes=tuple(_pick(hift, "upsample_kernel_sizes", [16, 11, 7])),
        istft_n_fft=int(ist.get("n_fft", 16)), istft_hop_len=int(ist.get("hop_len", 4)),
        resblock_kernel_sizes=tuple(_pick(hift, "resblock_kernel_sizes", [3, 7, 11])),
        resblock_dilation_sizes=tuple(tuple(x) for x in _pick(hift, "resblock_dilation_sizes", [[1, 3, 5]] * 3)),
        source_resblock_kernel_sizes=tuple(_pick(hift, "source_resblock_kernel_sizes", [7, 7, 11])),
        source_resblock_dilation_sizes=tuple(tuple(x) for x in _pick(hift, "source_resblock_dilation_sizes", [[1, 3, 5]] * 3)),
        lrelu_slope=float(_pick(hift, "lrelu_slope", 0.1)), audio_limit=float(_pick(hift, "audio_limit", 0.99)),
        f0_predictor=F0PredictorConfig(num_class=int(f0.get("num_class", 1)), in_channels=int(f0.get("in_channels", 80)),
                                       cond_channels=int(f0.get("cond_channels", 512))))
    return dataclasses.replace(base, sample_rate=int(y.get("sample_rate", 24000)), lm=lm, flow=fl, hift=hf)


def qwen_config_from_dir(tokenizer_dir: str | Path, base: LMConfig | None = None) -> LMConfig:
    """Read the Qwen2 backbone sizes from ``CosyVoice-BlankEN/config.json`` (if present)."""
    import json

    base = base or LMConfig()
    p = Path(tokenizer_dir) / "config.json"
    if not p.is_file():
        return base
    c = json.loads(p.read_text(encoding="utf-8"))
    q = base.qwen
    heads = int(c.get("num_attention_heads", q.num_attention_heads))
    hidden = int(c.get("hidden_size", q.hidden_size))
    qwen = dataclasses.replace(
        q, vocab_size=int(c.get("vocab_size", q.vocab_size)), hidden_size=hidden,
        intermediate_size=int(c.get("intermediate_size", q.intermediate_size)),
        num_hidden_layers=int(c.get("num_hidden_layers", q.num_hidden_layers)), num_attention_heads=heads,
        num_key_value_heads=int(c.get("num_key_value_heads", q.num_key_value_heads)),
        head_dim=int(c.get("head_dim", hidden // heads)), rope_theta=float(c.get("rope_theta", q.rope_theta)),
        rms_norm_eps=float(c.get("rms_norm_eps", q.rms_norm_eps)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", q.tie_word_embeddings)))
    return dataclasses.replace(base, qwen=qwen)
