"""Frozen dataclass configs for every CosyVoice 2 component, with presets and YAML I/O.

``ModelConfig.cosyvoice2()`` holds the official hyperparameters of the release
(``examples/libritts/cosyvoice2/conf/cosyvoice2.yaml``, see docs/architecture.md);
``ModelConfig.tiny()`` is a small model for fast tests. ``configs/*.yaml`` map 1:1 onto these
dataclasses: unknown keys and wrong types raise :class:`ConfigError` naming the dotted key, and
``apply_overrides(cfg, ["flow.cfm.inference_cfg_rate=0.5"])`` implements the CLI's ``--set``.

One config field per component, named like its package and its params key: ``llm``, ``flow``,
``hift``, ``tokenizer``, ``speaker``. A value that one component produces and another reads (the
mel size, the speaker embedding size, the speech vocabulary, sample rate and hop) is stated in
each sub-config, since each model is built from its own; :class:`ModelConfig` checks that they
agree, and values that follow from others are properties (``HiFTConfig.hop_size``,
``ModelConfig.source_cache_len``, ``LLMConfig.speech_vocab``).
"""
from __future__ import annotations

import dataclasses
import enum
import sys
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from .errors import ConfigError


# ----------------------------------------------------------------------------------- enums
class TScheduler(str, enum.Enum):
    """Time grid of the flow ODE solver (paper section 2.4)."""

    LINEAR = "linear"
    COSINE = "cosine"  # t = 1 - cos(t * pi / 2), the official inference schedule


class Solver(str, enum.Enum):
    EULER = "euler"  # the official solver
    MIDPOINT = "midpoint"
    HEUN = "heun"


class FlowMaskType(str, enum.Enum):
    """Attention masks of the flow (paper section 2.5)."""

    NON_CAUSAL = "non_causal"
    FULL_CAUSAL = "full_causal"
    CHUNK_M = "chunk_m"
    CHUNK_2M = "chunk_2m"


class FlowTrainMasks(str, enum.Enum):
    """How training picks the flow mask per batch/example."""

    OFFICIAL = "official"  # official code: static chunk for 50% of batches, else full attention
    PAPER = "paper"  # paper: one of the four mask types sampled uniformly per example


class FlowLoss(str, enum.Enum):
    MSE = "mse"  # what the official code computes (over all valid frames)
    L1 = "l1"  # what the paper / yaml `reg_loss_type` say


# ----------------------------------------------------------------------------------- LM
@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Qwen2 decoder backbone (Qwen2.5-0.5B for the release)."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Repetition-aware sampling (RAS, paper section 2.3)."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    qwen: QwenConfig = QwenConfig()
    speech_token_size: int = 6561  # + eos (6561) + 2 specials; 6563 is the bistream fill token
    mix_ratio: tuple[int, int] = (5, 15)  # bistream text:speech interleave
    sampling: SamplingConfig = SamplingConfig()
    min_token_text_ratio: float = 2.0
    max_token_text_ratio: float = 20.0
    length_normalized_loss: bool = True
    lsm_weight: float = 0.0
    scan_layers: bool = False  # scan compiles ~9x faster, decodes ~2x slower on CPU
    dtype: str = "float32"  # compute dtype; params are always stored fp32

    @property
    def speech_vocab(self) -> int:
        """Rows of speech_embedding / llm_decoder: tokens + eos + 2 specials (6564)."""
        return self.speech_token_size + 3

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 2


# ----------------------------------------------------------------------------------- flow
@dataclasses.dataclass(frozen=True)
class FlowEncoderConfig:
    """UpsampleConformerEncoder (rel-pos espnet attention, no conv module, no macaron)."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4
    pre_lookahead_len: int = 3
    upsample_stride: int = 2
    static_chunk_size: int = 25  # tokens; doubled after the upsample
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    max_len: int = 5000


@dataclasses.dataclass(frozen=True)
class FlowDecoderConfig:
    """Causal conditional UNet estimator (Matcha-style, diffusers transformer blocks)."""

    in_channels: int = 320  # x, mu, spk, cond = 4 x 80
    out_channels: int = 80
    channels: tuple[int, ...] = (256,)
    attention_head_dim: int = 64
    num_heads: int = 8
    n_blocks: int = 4
    num_mid_blocks: int = 12
    act_fn: str = "gelu"
    static_chunk_size: int = 50  # mel frames
    num_decoding_left_chunks: int = -1
    dropout: float = 0.0
    remat: str = "none"  # training: per-U-Net-stage remat policy (layers/remat.py); offline calls only


@dataclasses.dataclass(frozen=True)
class CFMConfig:
    sigma_min: float = 1e-6
    solver: Solver = Solver.EULER
    t_scheduler: TScheduler = TScheduler.COSINE
    n_timesteps: int = 10
    training_cfg_rate: float = 0.2
    inference_cfg_rate: float = 0.7
    loss: FlowLoss = FlowLoss.MSE
    train_masks: FlowTrainMasks = FlowTrainMasks.OFFICIAL
    prompt_prefix_max: float = 0.3  # cond = random prefix of at most 30% of the target mel
    loss_on_prompt: bool = True  # official: the loss covers the prompt prefix too; False = paper (target frames only)


@dataclasses.dataclass(frozen=True)
class FlowStudentConfig:
    """A distilled few-step student of the flow (``cosyvoice2_jax/flow/distill.py``).

    ``enabled``: the network was distilled from a CFG teacher, so guidance is folded into it and
    inference runs one estimator pass per evaluation (no unconditioned row), with the flow's
    inference sampler (``FlowConfig.sampler``, else ``cfm``'s; ``steps``: the student's, 1 or 2) run
    with guidance ``none``. ``inputs``: extra conditioning added to the time embedding through
    zero-initialised MLPs (so a fresh student equals its teacher): ``"w"`` the guidance rate (fed
    the sampler's ``cfg_rate``), ``"d"`` the
    step size ``r - t`` to the step's end time (MeanFlow average velocity; 0 = instantaneous).
    """

    enabled: bool = False
    inputs: tuple[str, ...] = ()


STUDENT_INPUTS = ("w", "d")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    input_frame_rate: int = 25
    token_mel_ratio: int = 2
    only_mask_loss: bool = True
    encoder: FlowEncoderConfig = FlowEncoderConfig()
    decoder: FlowDecoderConfig = FlowDecoderConfig()
    cfm: CFMConfig = CFMConfig()
    dtype: str = "float32"  # compute dtype (float32 | bfloat16); params stay fp32, norms/softmax/ODE state fp32
    student: FlowStudentConfig = FlowStudentConfig()  # distilled few-step student (default: the official flow)
    # inference sampler (flow/sampling.py SamplerConfig: grid, solver, steps, guidance). None = the
    # official sampler that cfm's n_timesteps/solver/t_scheduler/inference_cfg_rate describe (the
    # official cfm_params); a mapping replaces those inference fields, which must then keep their defaults
    sampler: Optional[SamplerConfig] = None  # noqa: F821 (resolved lazily: _LazyTypes)

    def __post_init__(self):
        if self.sampler is not None:
            d = CFMConfig()
            clash = [f"flow.cfm.{k}" for k in ("n_timesteps", "solver", "inference_cfg_rate")
                     if getattr(self.cfm, k) != getattr(d, k)]
            if clash:
                raise ConfigError(f"flow.sampler is set and so is {', '.join(clash)} (the official sampler fields); "
                                  "give the sampler in one place: move the value into flow.sampler "
                                  "(steps, solver, cfg_rate) and reset the flow.cfm one to its default")

    @property
    def inference_sampler(self) -> "SamplerConfig":
        """The flow's inference sampler: ``sampler``, else the official one of ``cfm``."""
        from .flow.sampling import SamplerConfig

        return self.sampler if self.sampler is not None else SamplerConfig.from_cfm(self.cfm)

    @property
    def pre_lookahead_len(self) -> int:
        """Look-ahead tokens of the encoder (``encoder.pre_lookahead_len``, the one source): with
        ``finalize=False`` the last this many tokens produce no frames yet."""
        return self.encoder.pre_lookahead_len


# ----------------------------------------------------------------------------------- HiFT
@dataclasses.dataclass(frozen=True)
class F0PredictorConfig:
    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512
    num_layers: int = 5


@dataclasses.dataclass(frozen=True)
class HiFTConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor: F0PredictorConfig = F0PredictorConfig()
    dtype: str = "float32"  # compute dtype of the convs; params fp32; NSF source, STFT/iSTFT stay fp32

    @property
    def hop_size(self) -> int:
        """Waveform samples per mel frame (8 * 5 * 3 * 4 = 480)."""
        n = self.istft_hop_len
        for r in self.upsample_rates:
            n *= r
        return n


# ----------------------------------------------------------------------------------- tokenizer / speaker
@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """S3TokenizerV2: Whisper-style encoder + FSQ, 25 tokens/s."""

    n_mels: int = 128
    n_audio_ctx: int = 1500
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 6
    fsmn_kernel_size: int = 31
    fsq_dim: int = 8
    fsq_levels: int = 3
    rope_theta: float = 10000.0
    max_seconds: float = 30.0  # per window; longer audio is windowed (see tokenizer docs)

    @property
    def codebook_size(self) -> int:
        return self.fsq_levels**self.fsq_dim


@dataclasses.dataclass(frozen=True)
class SpeakerConfig:
    """CAM++ speaker encoder (3D-Speaker naming)."""

    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernel_sizes: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    head_channels: int = 32
    bn_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class TokenASRConfig:
    """Token-level ASR (``cosyvoice2_jax.token_asr``): speech tokens -> text, CTC over the text vocabulary.

    Not part of a release: it is trained here (``configs/train/token_asr.yaml``) and read frozen by
    the differentiable ASR reward (paper section 2.7). Tokens enter as their FSQ code vectors
    (``fsq_dim`` values in {-1, 0, 1}), projected up to ``d_model`` (the paper's ``Proj_up``), then
    ``n_layers`` S3-tokenizer encoder blocks (attention with RoPE + FSMN memory) and a CTC head of
    ``text_vocab_size + 1`` classes (blank = ``text_vocab_size``). ``text_vocab_size`` 0 = the LM's
    text vocabulary (``llm.qwen.vocab_size``), filled in by the trainer.
    """

    text_vocab_size: int = 0
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    fsmn_kernel_size: int = 31
    rope_theta: float = 10000.0
    fsq_dim: int = 8
    fsq_levels: int = 3

    @property
    def codebook_size(self) -> int:
        return self.fsq_levels**self.fsq_dim

    @property
    def blank_id(self) -> int:
        return self.text_vocab_size


# ----------------------------------------------------------------------------------- features / streaming
@dataclasses.dataclass(frozen=True)
class MelConfig:
    """The flow's 24 kHz prompt feature (matcha ``mel_spectrogram``)."""

    sample_rate: int = 24000
    n_fft: int = 1920
    hop_size: int = 480
    win_size: int = 1920
    num_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = 8000.0
    center: bool = False


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
    """Streaming token2wav as the official runtime (cli/model.py)."""

    token_hop_len: int = 25
    token_max_hop_len: int = 100
    stream_scale_factor: int = 2  # (the look-ahead is flow.encoder.pre_lookahead_len)
    mel_cache_len: int = 8  # frames
    # the source/audio tail held back per chunk is mel_cache_len frames of samples
    # (ModelConfig.source_cache_len); the Hamming fade window spans twice that
    # cached streaming flow (flow/streaming.py): attention-cache dtype (None: the flow's dtype;
    # "bfloat16" halves the memory) and a per-stream cache budget in MiB past which a stream
    # falls back to the official recompute path (None: no budget)
    flow_cache_dtype: str | None = None
    flow_cache_budget_mb: float | None = None



# ----------------------------------------------------------------------------------- whole model
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    sample_rate: int = 24000
    llm: LLMConfig = LLMConfig()
    flow: FlowConfig = FlowConfig()
    hift: HiFTConfig = HiFTConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    speaker: SpeakerConfig = SpeakerConfig()
    mel: MelConfig = MelConfig()
    streaming: StreamingConfig = StreamingConfig()

    def __post_init__(self):
        problems = [f"{a} = {va!r} but {b} = {vb!r}" for a, va, b, vb in self._shared_values() if va != vb]
        if problems:
            raise ConfigError("inconsistent config (values that one component produces and another reads "
                              "must agree): " + "; ".join(problems))

    def _shared_values(self):
        """Values set in one component's config and read by another, which must agree."""
        return (
            ("mel.sample_rate", self.mel.sample_rate, "sample_rate", self.sample_rate),
            ("hift.sampling_rate", self.hift.sampling_rate, "sample_rate", self.sample_rate),
            ("mel.hop_size", self.mel.hop_size, "hift.hop_size", self.hift.hop_size),
            ("mel.num_mels", self.mel.num_mels, "flow.output_size", self.flow.output_size),
            ("hift.in_channels", self.hift.in_channels, "flow.output_size", self.flow.output_size),
            ("flow.spk_embed_dim", self.flow.spk_embed_dim, "speaker.embedding_size", self.speaker.embedding_size),
            ("flow.vocab_size", self.flow.vocab_size, "llm.speech_token_size", self.llm.speech_token_size),
            ("tokenizer.codebook_size", self.tokenizer.codebook_size, "llm.speech_token_size",
             self.llm.speech_token_size),
        )

    @property
    def source_cache_len(self) -> int:
        """Samples of HiFT source / audio carried between streaming chunks: the waveform of
        ``streaming.mel_cache_len`` mel frames (official ``mel_cache_len * 480``)."""
        return self.streaming.mel_cache_len * self.hift.hop_size

    # ---- presets
    @classmethod
    def cosyvoice2(cls) -> "ModelConfig":
        """The official CosyVoice2-0.5B hyperparameters."""
        return cls()

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A small model with the same structure, for fast tests (seconds, not minutes)."""
        return cls(
            llm=LLMConfig(
                qwen=QwenConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16),
                speech_token_size=6561,
            ),
            flow=FlowConfig(
                input_size=64,
                encoder=FlowEncoderConfig(input_size=64, output_size=64, attention_heads=4,
                                          linear_units=128, num_blocks=2, num_up_blocks=2),
                decoder=FlowDecoderConfig(channels=(64,), attention_head_dim=16, num_heads=4,
                                          n_blocks=1, num_mid_blocks=2),
            ),
            hift=HiFTConfig(base_channels=64,
                            f0_predictor=F0PredictorConfig(cond_channels=64)),
            tokenizer=TokenizerConfig(n_audio_state=128, n_audio_head=2, n_audio_layer=2),
            speaker=SpeakerConfig(block_layers=(2, 2, 2), growth_rate=16, init_channels=32),
        )

    # ---- YAML
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> "ModelConfig":
        return load_yaml(cls, path, overrides)

    def to_yaml(self, path: str | Path | None = None) -> str:
        return dump_yaml(self, path)


PRESETS = {"cosyvoice2": ModelConfig.cosyvoice2, "cosyvoice2-0.5b": ModelConfig.cosyvoice2,
           "tiny": ModelConfig.tiny}


# ----------------------------------------------------------------------------------- generic (de)serialisation
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the dataclass field type ``tp``; errors name ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", object)):
        if value is None and type(None) in args:
            return None
        if len(args) == 2 and type(None) in args:  # Optional[X]: X's own error names the key
            return _convert(value, next(a for a in args if a is not type(None)), key)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} does not fit {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping of {tp.__name__} fields, "
                              f"got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(f"config key '{key}': {value!r} is not one of {allowed}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"config key '{key}' must have {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported field type {_type_name(tp)}")


class _LazyTypes(dict):
    """Field types defined outside this module, imported only when a config value needs them (so
    that loading a config without a ``flow.sampler`` section does not import jax)."""

    def __missing__(self, name: str):
        if name == "SamplerConfig":
            from .flow.sampling import SamplerConfig

            return SamplerConfig
        raise KeyError(name)


def _field_type(cls: type, name: str) -> Any:
    """The resolved type of dataclass field ``name`` (annotations are strings here)."""
    for klass in cls.__mro__:
        ann = klass.__dict__.get("__annotations__", {})
        if name in ann:
            tp = ann[name]
            return eval(tp, vars(sys.modules[klass.__module__]), _LazyTypes()) if isinstance(tp, str) else tp
    raise KeyError(name)


def _from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = {k: _field_type(cls, k) for k in data if k in {f.name for f in dataclasses.fields(cls)}}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f" under '{prefix}'" if prefix else ""
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            + ", ".join(repr(f"{prefix}.{k}" if prefix else k) for k in unknown)
            + f"{where}; valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section's own check ("sampler.steps: ...") gets its full key ("flow.sampler.steps")
        head, _, leaf = prefix.rpartition(".")
        if head and str(e).startswith(leaf + "."):
            raise ConfigError(f"{head}.{e}") from None
        raise


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build dataclass ``cls`` from a nested mapping (missing keys keep their defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"a {cls.__name__} config must be a mapping, got {type(data).__name__}")
    return _from_dict(cls, data)


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list/scalar view of a config (enums as their values)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like 'a.b.c=value' (e.g. "
                          "'flow.cfm.inference_cfg_rate=0.5')")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Return ``cfg`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    data = to_dict(cfg)
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        tp = type(cfg)
        for i, p in enumerate(path[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"override {item!r}: unknown config key "
                                  f"'{'.'.join(path[:i + 1])}'")
            tp = _field_type(tp, p) if dataclasses.is_dataclass(tp) else None
            sub = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            tp = sub[0] if sub else tp
            if node[p] is None and dataclasses.is_dataclass(tp):  # an unset optional section (flow.sampler)
                node[p] = to_dict(tp())
            node = node[p]
        if not isinstance(node, dict) or path[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown config key '{'.'.join(path)}'")
        node[path[-1]] = value
    return from_dict(type(cfg), data)


def load_yaml(cls: type, path: str | Path, overrides: Sequence[str] = ()) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the shipped ones are in configs/")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    cfg = from_dict(cls, rename_legacy_keys(cls, data or {}))
    return apply_overrides(cfg, overrides) if overrides else cfg


# top-level ModelConfig keys of files written before the components had one name each
LEGACY_KEYS = {"lm": "llm", "campplus": "speaker"}


def rename_legacy_keys(cls: type, data: Any) -> Any:
    """Files written by earlier versions (``lm:``, ``campplus:``) load under today's names
    (``llm:``, ``speaker:``); a file holding both spellings of one section is an error."""
    if cls is not ModelConfig or not isinstance(data, Mapping):
        return data
    out = dict(data)
    for old, new in LEGACY_KEYS.items():
        if old in out:
            if new in out:
                raise ConfigError(f"config has both '{old}' (the old name) and '{new}'; keep only '{new}'")
            out[new] = out.pop(old)
    streaming = out.get("streaming")
    if isinstance(streaming, Mapping) and "source_cache_len" in streaming:  # now derived
        streaming = dict(streaming)
        old_len = streaming.pop("source_cache_len")
        mel_cache = streaming.get("mel_cache_len", StreamingConfig.mel_cache_len)
        hop = from_dict(HiFTConfig, out.get("hift") or {}).hop_size
        if old_len != mel_cache * hop:
            raise ConfigError(f"streaming.source_cache_len = {old_len} is no longer a setting: it is "
                              f"streaming.mel_cache_len x the HiFT hop ({mel_cache} x {hop}); remove it")
        out["streaming"] = streaming
    return out


def dump_yaml(cfg: Any, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text

