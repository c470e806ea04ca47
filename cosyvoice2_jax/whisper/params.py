"""Whisper weights: a local Hugging Face directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``) <-> Flax params, with the project's declarative rule table.

Torch names are those of ``WhisperForConditionalGeneration.state_dict()`` (``model.`` prefix;
a bare ``WhisperModel`` checkpoint without it loads too). ``proj_out.weight`` is tied to
``model.decoder.embed_tokens.weight`` and is dropped on load, as HF does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from ..errors import ConversionError, ReleaseDirError
from ..params_util import CONV1D, Rule, convert, export, linear_rules, load_torch_checkpoint, norm_rules
from .modeling import Whisper, WhisperConfig

RELEASE_FILES = ("model.safetensors", "pytorch_model.bin")


def _attn(t: str, j: str) -> list[Rule]:
    out = []
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out += linear_rules(f"{t}.{n}", f"{j}/{n}", bias=n != "k_proj")
    return out


RULES = [
    *[Rule(f"model.encoder.conv{c}.weight", f"conv{c}/kernel", CONV1D) for c in (1, 2)],
    *[Rule(f"model.encoder.conv{c}.bias", f"conv{c}/bias") for c in (1, 2)],
    Rule("model.encoder.embed_positions.weight", "encoder_positions"),
    *_attn("model.encoder.layers.{i}.self_attn", "encoder_layers_{i}/self_attn"),
    *norm_rules("model.encoder.layers.{i}.self_attn_layer_norm", "encoder_layers_{i}/self_attn_layer_norm"),
    *norm_rules("model.encoder.layers.{i}.final_layer_norm", "encoder_layers_{i}/final_layer_norm"),
    *linear_rules("model.encoder.layers.{i}.fc1", "encoder_layers_{i}/fc1"),
    *linear_rules("model.encoder.layers.{i}.fc2", "encoder_layers_{i}/fc2"),
    *norm_rules("model.encoder.layer_norm", "encoder_norm"),
    Rule("model.decoder.embed_tokens.weight", "embed_tokens/embedding"),
    Rule("model.decoder.embed_positions.weight", "decoder_positions"),
    *_attn("model.decoder.layers.{i}.self_attn", "decoder_layers_{i}/self_attn"),
    *_attn("model.decoder.layers.{i}.encoder_attn", "decoder_layers_{i}/encoder_attn"),
    *[r for ln in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
      for r in norm_rules(f"model.decoder.layers.{{i}}.{ln}", f"decoder_layers_{{i}}/{ln}")],
    *linear_rules("model.decoder.layers.{i}.fc1", "decoder_layers_{i}/fc1"),
    *linear_rules("model.decoder.layers.{i}.fc2", "decoder_layers_{i}/fc2"),
    *norm_rules("model.decoder.layer_norm", "decoder_norm"),
]


def init_params(cfg: WhisperConfig, key) -> dict:
    """Random params of :class:`Whisper` for ``cfg``."""
    import jax.numpy as jnp

    mel = jnp.zeros((1, cfg.n_frames, cfg.num_mel_bins), jnp.float32)
    return jax.jit(lambda k: Whisper(cfg).init(k, mel, jnp.zeros((1, 1), jnp.int32))["params"])(key)


def abstract_params(cfg: WhisperConfig = WhisperConfig()):
    """ShapeDtypeStruct tree of the params (no allocation)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def param_axes(cfg: WhisperConfig) -> dict:
    """Logical axes of every param leaf (:func:`cosyvoice2_jax.sharding.axes_by_rule`)."""
    from ..sharding import axes_by_rule

    return axes_by_rule(abstract_params(cfg))


def from_torch_state_dict(sd: Mapping[str, Any], cfg: WhisperConfig, what: str = "Whisper state dict") -> dict:
    """HF ``WhisperForConditionalGeneration`` (or ``WhisperModel``) state dict -> params, strictly."""
    sd = {(k if k.startswith(("model.", "proj_out.")) else "model." + k): v for k, v in sd.items()}
    return convert(sd, RULES, expected=abstract_params(cfg), ignore=[r"^proj_out\.weight$"], what=what)


def config_from_release(model_dir: str | Path) -> WhisperConfig:
    """``config.json`` of a local HF Whisper directory -> :class:`WhisperConfig`."""
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise ReleaseDirError(f"{model_dir} is not a Hugging Face Whisper directory: {p.name} missing (save one "
                              "with WhisperForConditionalGeneration.save_pretrained(dir) or download it)")
    d = json.loads(p.read_text())
    if d.get("model_type", "whisper") != "whisper":
        raise ReleaseDirError(f"{p} has model_type={d.get('model_type')!r}, not 'whisper'")
    return WhisperConfig.from_hf(d)


def from_release(source, cfg: WhisperConfig | None = None) -> dict:
    """A local HF Whisper directory (``model.safetensors`` or ``pytorch_model.bin``), or a torch
    state dict (a mapping, e.g. :func:`to_release` output) -> params."""
    if isinstance(source, Mapping):
        if cfg is None:
            raise ConversionError("from_release(state_dict) needs the WhisperConfig")
        return from_torch_state_dict(source, cfg)
    d = Path(source)
    cfg = cfg or config_from_release(d)
    if (d / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        try:
            sd = load_file(str(d / "model.safetensors"))
        except Exception as e:
            raise ConversionError(f"could not read {d / 'model.safetensors'}: {e}") from None
        what = "model.safetensors"
    elif (d / "pytorch_model.bin").is_file():
        sd, what = load_torch_checkpoint(d / "pytorch_model.bin"), "pytorch_model.bin"
    else:
        raise ReleaseDirError(f"{d} has no Whisper weights: expected one of {', '.join(RELEASE_FILES)} "
                              "(sharded checkpoints: merge them with save_pretrained(max_shard_size='10GB'))")
    return from_torch_state_dict(sd, cfg, what=f"{d.name}/{what}")


def to_release(params, cfg: WhisperConfig | None = None) -> dict[str, np.ndarray]:
    """Params -> HF ``WhisperForConditionalGeneration`` state dict (numpy; ``proj_out`` tied, omitted)."""
    return export(params, RULES, what="Whisper params")


def save_hf_dir(params, cfg: WhisperConfig, out: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (what :func:`from_release` reads; the tokenizer
    files are not written)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in to_release(params).items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1))
    return out


# a tiny byte-level Whisper for tests and demos: ids 0..255 are the 256 byte characters, then specials
TINY_HF_CONFIG = dict(vocab_size=264, num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                      encoder_ffn_dim=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                      max_source_positions=100, max_target_positions=40, eos_token_id=256,
                      decoder_start_token_id=257, pad_token_id=256, bos_token_id=256)
TINY_GENERATION = {"decoder_start_token_id": 257, "eos_token_id": 256, "is_multilingual": True,
                   "lang_to_id": {"<|en|>": 258, "<|zh|>": 259}, "task_to_id": {"transcribe": 260, "translate": 261},
                   "no_timestamps_token_id": 262, "suppress_tokens": [263], "begin_suppress_tokens": [32]}


def write_byte_tokenizer(out: str | Path, generation: dict = TINY_GENERATION) -> None:
    """``vocab.json`` of the 256 byte characters (ids 0..255) + ``generation_config.json``."""
    from .runtime import _byte_decoder

    out = Path(out)
    (out / "vocab.json").write_text(json.dumps(dict(_byte_decoder())))
    (out / "generation_config.json").write_text(json.dumps(generation))


def save_random_hf_dir(out: str | Path, seed: int = 0, hf_config: dict = TINY_HF_CONFIG) -> Path:
    """A random-weight Whisper HF directory (config, safetensors, byte tokenizer): the harness's code
    path on a tiny model (2 s window); its transcripts are meaningless. Weights:
    :func:`~cosyvoice2_jax.params_util.redraw` (variance-preserving, numpy, deterministic in ``seed``)."""
    import jax.numpy as jnp

    from ..params_util import redraw

    cfg = WhisperConfig.from_hf(hf_config)
    mel = jnp.zeros((1, cfg.n_frames, cfg.num_mel_bins), jnp.float32)
    shapes = jax.eval_shape(lambda: Whisper(cfg).init(jax.random.PRNGKey(0), mel, jnp.zeros((1, 1), jnp.int32))["params"])
    save_hf_dir(redraw(shapes, seed), cfg, out)  # numpy draws: no XLA compile of the init
    (Path(out) / "config.json").write_text(json.dumps({**cfg.to_hf(), **hf_config}, indent=1))
    write_byte_tokenizer(out)
    return Path(out)
