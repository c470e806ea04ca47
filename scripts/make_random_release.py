"""Write a random-weight release directory in the official ``CosyVoice2-0.5B`` layout.

    python scripts/make_random_release.py OUT_DIR [--size tiny|full] [--seed N] [--overwrite]

Every file is made by the OFFICIAL PyTorch modules (the oracle venv, ``.oracle-venv``, driven
through ``tests/oracle_client.Oracle``), so tests and demos exercise the real loading path:

    cosyvoice2.yaml            the official hyperpyyaml (examples/libritts/cosyvoice2/conf) with the
                               chosen dims; it loads with the official ``load_hyperpyyaml``
    llm.pt flow.pt hift.pt     state dicts of the modules built from that yaml, weights re-drawn
                               (``tests/oracle/common.reinit_``); hift.pt spelled ``weight_g/weight_v``
                               as the published file
    CosyVoice-BlankEN/         a small self-made byte-level BPE tokenizer + ``config.json`` and random
                               ``model.safetensors`` of the Qwen2 sizes (the official ``Qwen2Encoder``
                               loads it before llm.pt replaces the weights)
    campplus.onnx              the official CAM++ exported with ``torch.onnx.export`` (onnxruntime runs it)
    speech_tokenizer_v2.onnx   S3Tokenizer v2 weights in the release's ONNX layout
    spk2info.pt                two built-in speakers ``{name: {'embedding': (1, 192)}}`` (sft mode)

Sizes:

* ``tiny`` (default, ~20 MB, seconds): ``ModelConfig.tiny()`` where the official classes allow it.
  The official flow encoder hard-codes 512 channels (pre-lookahead, upsample, up-embedding) and 4
  up-blocks; so the tiny release is ``tiny_release_config()`` below: ``ModelConfig.tiny()`` with a
  512-wide flow encoder (4 heads, 128 units, 2 + 4 blocks). (CAM++ is built at the tiny depths
  (2, 2, 2) from the official blocks; see ``tests/oracle/speaker.py``.)
* ``full``: the published sizes (``ModelConfig.cosyvoice2()``); llm.pt is ~2 GB, BlankEN ~1 GB
  (bf16, as published); takes minutes.

Prints one JSON line (files, sizes, seconds). Needs the oracle venv (``bash scripts/setup_oracle_env.sh``).
"""
from __future__ import annotations

import argparse
import os
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

RELEASE_ENTRIES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx",
                   "spk2info.pt", "CosyVoice-BlankEN")
SPEAKERS = ("中文女", "英文男")


@dataclasses.dataclass(frozen=True)
class ReleaseDims:
    """Everything the release files encode about the model sizes."""

    qwen: dict                    # CosyVoice-BlankEN/config.json sizes
    flow_heads: int = 8
    flow_units: int = 2048
    flow_blocks: int = 6
    dec_channels: int = 256
    dec_head_dim: int = 64
    dec_heads: int = 8
    dec_blocks: int = 4
    dec_mid: int = 12
    hift_base: int = 512
    hift_cond: int = 512
    tok_state: int = 1280
    tok_heads: int = 20
    tok_layers: int = 6
    cam_growth: int = 32
    cam_init: int = 128
    cam_blocks: tuple = (12, 24, 16)
    blank_dtype: str = "float32"

    @property
    def llm_dim(self) -> int:
        return self.qwen["hidden_size"]


FULL = ReleaseDims(qwen=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2), blank_dtype="bfloat16")
TINY = ReleaseDims(qwen=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2),
                   flow_heads=4, flow_units=128, flow_blocks=2, dec_channels=64, dec_head_dim=16, dec_heads=4,
                   dec_blocks=1, dec_mid=2, hift_base=64, hift_cond=64, tok_state=128, tok_heads=2, tok_layers=2,
                   cam_growth=16, cam_init=32, cam_blocks=(2, 2, 2))
SIZES = {"tiny": TINY, "full": FULL}


def tiny_release_config():
    """The :class:`ModelConfig` a tiny release directory describes (see module docstring)."""
    from cosyvoice2_jax.config import ModelConfig

    t = ModelConfig.tiny()
    enc = dataclasses.replace(t.flow.encoder, input_size=512, output_size=512, num_up_blocks=4)
    return dataclasses.replace(t, flow=dataclasses.replace(t.flow, input_size=512, encoder=enc))


def release_yaml(d: ReleaseDims) -> str:
    """``cosyvoice2.yaml`` as published (examples/libritts/cosyvoice2/conf/cosyvoice2.yaml) with the
    dims of ``d``. Dropped, because they cannot load here: the data pipeline processors
    (``cosyvoice.dataset.processor`` needs pyarrow) and the ``hifigan`` GAN wrapper
    (its discriminators import matplotlib); both are training-only."""
    return f"""# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 24000
llm_input_size: {d.llm_dim}
llm_output_size: {d.llm_dim}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

# stream related params
chunk_size: 25 # streaming inference chunk size, in token
num_decoding_left_chunks: -1 # streaming inference flow decoder left chunk size, <0 means use all left chunks

# model params
llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: {d.flow_heads}
        linear_units: {d.flow_units}
        num_blocks: {d.flow_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{d.dec_channels}]
            dropout: 0.0
            attention_head_dim: {d.dec_head_dim}
            n_blocks: {d.dec_blocks}
            num_mid_blocks: {d.dec_mid}
            num_heads: {d.dec_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {d.hift_base}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {d.hift_cond}

# gan related module
mel_spec_transform1: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: null
    center: False

# processor functions
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False

# llm flow train conf
train_conf:
    optim: adam
    optim_conf:
        lr: 1e-5 # change to 1e-5 during sft
    scheduler: constantlr # change to constantlr during sft
    scheduler_conf:
        warmup_steps: 2500
    max_epoch: 200
    grad_clip: 5
    accum_grad: 2
    log_interval: 100
    save_per_step: -1

# gan train conf
train_conf_gan:
    optim: adam
    optim_conf:
        lr: 0.0002 # use small lr for gan training
    scheduler: constantlr
    optim_d: adam
    optim_conf_d:
        lr: 0.0002 # use small lr for gan training
    scheduler_d: constantlr
    max_epoch: 200
    grad_clip: 5
    accum_grad: 1 # in gan training, accum_grad must be 1
    log_interval: 100
    save_per_step: -1
"""


class ReleaseWriteError(RuntimeError):
    pass


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ReleaseWriteError(f"{out} is a file; OUT_DIR must be a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ReleaseWriteError(f"{out} is not empty; pass --overwrite to replace its release files, "
                                    "or choose an empty/new directory")
        for name in RELEASE_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_release(out_dir: str | Path, size: str = "tiny", seed: int = 0, overwrite: bool = False,
                 oracle=None) -> dict:
    """Write the release directory (see module docstring); returns a summary dict.
    ``oracle``: an open :class:`tests.oracle_client.Oracle` to reuse (tests), else one is started."""
    if size not in SIZES:
        raise ReleaseWriteError(f"--size {size!r}: use one of {', '.join(SIZES)}")
    out = Path(out_dir).resolve()
    _prepare(out, overwrite)
    d = SIZES[size]
    t0 = time.perf_counter()
    own = oracle is None
    if own:
        from oracle_client import Oracle, OracleUnavailable

        try:
            oracle = Oracle()
        except OracleUnavailable as e:
            raise ReleaseWriteError(f"the official PyTorch code is needed to build the release files: {e}") from None
    steps: dict[str, float] = {}

    def step(name, fn, *a, **kw):
        t = time.perf_counter()
        r = fn(*a, **kw)
        steps[name] = round(time.perf_counter() - t, 2)
        return r
    try:
        from toy_tokenizer import write_toy_qwen_tokenizer

        blank = out / "CosyVoice-BlankEN"
        step("tokenizer", write_toy_qwen_tokenizer, blank)
        step("blank_en", oracle, "pipeline:write_qwen_dir", path=str(blank), qwen=json.dumps(d.qwen), seed=seed,
             dtype=d.blank_dtype)
        (out / "cosyvoice2.yaml").write_text(release_yaml(d), encoding="utf-8")
        counts = step("llm_flow_hift", oracle, "pipeline:make_weights", model_dir=str(out), seed=seed)
        step("speech_tokenizer_onnx", oracle, "tokenizer:write_release_onnx",
             path=str(out / "speech_tokenizer_v2.onnx"), seed=seed + 3, n_audio_state=d.tok_state,
             n_audio_head=d.tok_heads, n_audio_layer=d.tok_layers)
        cam = step("campplus_onnx", oracle, "speaker:export_release_onnx", path=str(out / "campplus.onnx"),
                   seed=seed + 4, growth_rate=d.cam_growth, init_channels=d.cam_init, block_layers=list(d.cam_blocks))
        step("spk2info", oracle, "pipeline:write_spk2info", path=str(out / "spk2info.pt"), names=list(SPEAKERS),
             seed=seed + 5)
    finally:
        if own:
            oracle.close()
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return {"out_dir": str(out), "size": size, "seed": seed, "seconds": round(time.perf_counter() - t0, 2), "steps": steps,
            "total_mb": round(sum(files.values()) / 2**20, 2), "files": files,
            "params": {k[len("n_params_"):]: int(v) for k, v in counts.items() if k.startswith("n_params_")},
            "campplus_onnx_vs_torch_max_abs": float(abs(cam["emb_onnx"] - cam["emb_torch"]).max())}



def notebook_release(name: str, model_dir=None, size: str = "tiny") -> tuple[Path, Path]:
    """``(out, model_dir)`` for a notebook: its output folder ``$COSYVOICE2_NOTEBOOK_OUT/<name>``
    (default ``notebooks/out/<name>`` in the repository), created; and ``model_dir``, or when it
    is None a random-weight release of ``size`` built there once (kept for later runs)."""
    root = Path(__file__).resolve().parents[1]
    out = Path(os.environ.get("COSYVOICE2_NOTEBOOK_OUT", root / "notebooks" / "out")).resolve() / name
    out.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = out / f"CosyVoice2-{size}"
        if not (model_dir / "llm.pt").is_file():
            summary = make_release(model_dir, size, seed=0, overwrite=True)
            print(f"built {model_dir} in {summary['seconds']} s ({summary['total_mb']} MB)")
    print("model:", model_dir)
    return out, Path(model_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Write a random-weight CosyVoice2-0.5B-layout release directory with the official "
                    "PyTorch modules (needs .oracle-venv: bash scripts/setup_oracle_env.sh).")
    ap.add_argument("out_dir", help="directory to write (created; must be empty unless --overwrite)")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="tiny: small test model (seconds); full: published sizes (~3 GB, minutes)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace the release files in a non-empty OUT_DIR")
    args = ap.parse_args(argv)
    try:
        summary = make_release(args.out_dir, args.size, args.seed, args.overwrite)
    except ReleaseWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
