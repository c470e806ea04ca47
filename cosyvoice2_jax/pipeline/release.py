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

from ..config import LLMConfig, ModelConfig, from_dict, to_dict
from ..errors import ConfigError, ReleaseDirError

REQUIRED_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx")
TOKENIZER_DIR = "CosyVoice-BlankEN"
OPTIONAL_FILES = ("spk2info.pt",)


@dataclasses.dataclass(frozen=True)
class ReleasePaths:
    root: Path
    yaml: Path
    tokenizer_dir: Path          # the Qwen text tokenizer (CosyVoice-BlankEN)
    spk2info: Path | None

    def file(self, component: str) -> Path:
        """The release file of a component (``llm`` -> ``llm.pt``, ``speaker`` -> ``campplus.onnx``)."""
        from .loading import component as package

        return self.root / package(component).RELEASE_FILE


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
    return ReleasePaths(root, root / "cosyvoice2.yaml", tok, spk if spk.is_file() else None)


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


def _same(yaml_section: str, our_section: str, *names: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{yaml_section}.{n}", f"{our_section}.{n}") for n in names)


# official cosyvoice2.yaml key -> ModelConfig key. Keys the yaml lacks keep the dataclass defaults
# (the official values); the Qwen2 sizes come from CosyVoice-BlankEN/config.json instead.
YAML_TABLE: tuple[tuple[str, str], ...] = (
    ("sample_rate", "sample_rate"),
    *_same("llm", "llm", "speech_token_size", "mix_ratio", "length_normalized_loss", "lsm_weight"),
    *_same("llm.sampling", "llm.sampling", "top_p", "top_k", "win_size", "tau_r"),
    *_same("flow", "flow", "input_size", "output_size", "spk_embed_dim", "vocab_size", "input_frame_rate",
           "token_mel_ratio", "only_mask_loss"),
    # the look-ahead has one home in our config (flow.encoder); the yaml states it in both places
    ("flow.pre_lookahead_len", "flow.encoder.pre_lookahead_len"),
    ("flow.encoder.pre_lookahead_len", "flow.encoder.pre_lookahead_len"),
    *_same("flow.encoder", "flow.encoder", "input_size", "output_size", "attention_heads", "linear_units",
           "num_blocks"),
    *_same("flow.decoder.estimator", "flow.decoder", "in_channels", "out_channels", "channels",
           "attention_head_dim", "n_blocks", "num_mid_blocks", "num_heads", "act_fn", "static_chunk_size",
           "num_decoding_left_chunks"),
    *_same("flow.decoder.cfm_params", "flow.cfm", "sigma_min", "solver", "t_scheduler", "training_cfg_rate",
           "inference_cfg_rate"),
    *_same("hift", "hift", "in_channels", "base_channels", "nb_harmonics", "sampling_rate", "nsf_alpha",
           "nsf_sigma", "nsf_voiced_threshold", "upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
           "resblock_dilation_sizes", "source_resblock_kernel_sizes", "source_resblock_dilation_sizes",
           "lrelu_slope", "audio_limit"),
    ("hift.istft_params.n_fft", "hift.istft_n_fft"),
    ("hift.istft_params.hop_len", "hift.istft_hop_len"),
    *_same("hift.f0_predictor", "hift.f0_predictor", "num_class", "in_channels", "cond_channels"),
)
_MISSING = object()


def _yaml_value(y: dict, dotted: str) -> Any:
    """The value at ``dotted`` in the read yaml; a ``!new:omegaconf.DictConfig`` node's fields are
    under ``content``; an unresolved or empty tagged node counts as missing."""
    node: Any = y
    for part in dotted.split("."):
        if isinstance(node, dict) and part not in node and isinstance(node.get("content"), dict):
            node = node["content"]
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return _MISSING if isinstance(node, (Tagged, _Ref)) and not node else node


def config_from_release_yaml(path: str | Path) -> ModelConfig:
    """Map the release's ``cosyvoice2.yaml`` onto :class:`ModelConfig` through :data:`YAML_TABLE`
    (official defaults for anything the file does not state, e.g. the Qwen2 backbone sizes, which
    come from ``CosyVoice-BlankEN/config.json`` instead: see :func:`qwen_config_from_dir`). Values
    are checked and converted by the config schema; an error names the yaml key."""
    y = read_release_yaml(path)
    for k in ("llm", "flow", "hift"):
        if k not in y:
            raise ReleaseDirError(f"{path} has no '{k}' section; is this a CosyVoice 2 config?")
    data = to_dict(ModelConfig.cosyvoice2())
    for ykey, ours in YAML_TABLE:
        value = _yaml_value(y, ykey)
        if value is _MISSING:
            continue
        node = data
        *parents, leaf = ours.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return from_dict(ModelConfig, data)
    except ConfigError as e:
        raise ReleaseDirError(f"{path}: {e} (config keys map from the yaml by pipeline.release.YAML_TABLE)") from None


def qwen_config_from_dir(tokenizer_dir: str | Path, base: LLMConfig | None = None) -> LLMConfig:
    """Read the Qwen2 backbone sizes from ``CosyVoice-BlankEN/config.json`` (if present)."""
    import json

    base = base or LLMConfig()
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
