"""Oracle tasks for training tests: load *our exported* state dicts into the official modules;
the official HiFiGan wrapper's two turns and the official F0 feature (``compute_f0``)."""
from __future__ import annotations

import numpy as np
import torch

from common import reinit_, scale_hift_, state_dict_np, to_np, to_torch


def _sd(inputs):
    return {k[3:]: torch.from_numpy(v.copy()) for k, v in inputs.items() if k.startswith("sd/")}


@torch.no_grad()
def lm_forward_from_sd(inputs, cfg: str):
    """Build the official Qwen2LM (config JSON), load ``sd/*`` strictly, run ``forward`` on the batch
    with ``random.random()`` replayed from ``uniforms``."""
    import llm as L

    lm = L._model(cfg, seed=0, reinit=False)
    missing, unexpected = lm.load_state_dict(_sd(inputs), strict=True)
    assert not missing and not unexpected
    batch = L._batch(inputs)
    with L._with_uniforms(inputs["uniforms"].tolist()):
        out = lm.forward(batch, torch.device("cpu"))
    return {"loss": to_np(out["loss"]), "acc": to_np(out["acc"])}


@torch.no_grad()
def flow_load_strict(inputs, dims=None):
    """The official flow of size ``dims`` loads ``sd/*`` with strict=True; returns its param count."""
    import flow as F

    model = F._build(dims, seed=0)
    model.load_state_dict(_sd(inputs), strict=True)
    return {"n": torch.tensor(sum(p.numel() for p in model.parameters())).numpy()}


# ----------------------------------------------------------------------------------- HiFT GAN
def _stub_pyarrow() -> None:
    """cosyvoice.dataset.processor imports pyarrow.parquet (for its parquet opener only); the
    oracle venv has no pyarrow."""
    import sys
    import types

    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        pa = types.ModuleType("pyarrow")
        pa.parquet = types.ModuleType("pyarrow.parquet")
        sys.modules.setdefault("pyarrow", pa)
        sys.modules.setdefault("pyarrow.parquet", pa.parquet)


def compute_f0(inputs, sample_rate: int = 24000, hop_size: int = 480):
    """Official ``processor.compute_f0`` on ``wav (W,)``: ``pitch_feat (n_frames,)`` at the length of
    a ``speech_feat`` of ``n_frames`` frames (inputs["n_frames"], a scalar)."""
    _stub_pyarrow()
    from cosyvoice.dataset.processor import compute_f0 as official

    n = int(inputs["n_frames"])
    sample = {"sample_rate": sample_rate, "speech": torch.from_numpy(inputs["wav"].astype(np.float32))[None],
              "utt": "u", "text_token": [0], "speech_feat": torch.zeros(n, 80)}
    out = next(iter(official([sample], sample_rate, hop_size)))
    return {"pitch_feat": to_np(out["pitch_feat"])}


_SMALL_DISC: dict = {}
_GENS: dict = {}


def _build_gen(base_channels: int, cond_channels: int, resblock_kernel_sizes, resblock_dilation_sizes):
    from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor
    from cosyvoice.hifigan.generator import HiFTGenerator

    return HiFTGenerator(
        in_channels=80, base_channels=base_channels, nb_harmonics=8, sampling_rate=24000, nsf_alpha=0.1,
        nsf_sigma=0.003, nsf_voiced_threshold=10, upsample_rates=[8, 5, 3], upsample_kernel_sizes=[16, 11, 7],
        istft_params={"n_fft": 16, "hop_len": 4}, resblock_kernel_sizes=list(resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in resblock_dilation_sizes],
        source_resblock_kernel_sizes=[7, 7, 11], source_resblock_dilation_sizes=[[1, 3, 5]] * 3,
        lrelu_slope=0.1, audio_limit=0.99,
        f0_predictor=ConvRNNF0Predictor(num_class=1, in_channels=80, cond_channels=cond_channels))


def _gen(seed, base_channels, cond_channels, rk, rd, f0_scale, post_scale):
    """A HiFTGenerator with ``reinit_(seed)`` weights and the ``hift.model`` scalings, cached."""
    key = (seed, base_channels, cond_channels, tuple(rk), tuple(map(tuple, rd)), f0_scale, post_scale)
    if key not in _GENS:
        m = _build_gen(base_channels, cond_channels, rk, rd)
        reinit_(m, seed)
        scale_hift_(m, f0_scale, post_scale)
        m.eval()
        _GENS[key] = m
    return _GENS[key]


def _build_disc_subset(mpd_idx, mrd_idx):
    """The official ``MultipleDiscriminator(MultiPeriodDiscriminator, MultiResSpecDiscriminator)``
    keeping only the sub-discriminators ``mpd_idx`` / ``mrd_idx`` (all: None)."""
    import hift as H

    H._matplotlib_stub()
    from cosyvoice.hifigan.discriminator import MultipleDiscriminator, MultiResSpecDiscriminator
    from matcha.hifigan.models import MultiPeriodDiscriminator

    d = MultipleDiscriminator(mpd=MultiPeriodDiscriminator(), mrd=MultiResSpecDiscriminator())
    if mpd_idx is not None:
        d.mpd.discriminators = torch.nn.ModuleList([d.mpd.discriminators[i] for i in mpd_idx])
    if mrd_idx is not None:
        d.mrd.discriminators = torch.nn.ModuleList([d.mrd.discriminators[i] for i in mrd_idx])
    return d


def _disc_subset(seed: int, mpd_idx, mrd_idx):
    """:func:`_build_disc_subset` with ``reinit_(seed)`` weights, cached."""
    import hift as H

    key = (seed, tuple(mpd_idx or ()), tuple(mrd_idx or ()))
    if key not in _SMALL_DISC:
        d = _build_disc_subset(mpd_idx, mrd_idx)
        reinit_(d, seed)
        H._restore_windows(d)
        d.eval()
        _SMALL_DISC[key] = d
    return _SMALL_DISC[key]


def hifigan_train_step(inputs, seed: int = 0, base_channels: int = 64, cond_channels: int = 64, disc_seed: int = 0,
                       f0_scale: float = 100.0, post_scale: float = 0.15, mpd_idx=None, mrd_idx=None,
                       lr_g: float = 2e-4, lr_d: float = 2e-4, grad_clip: float = 5.0,
                       resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5),) * 3):
    """One official GAN training step on one batch, as ``train_one_epoc_gan`` +
    ``update_parameter_and_lr`` run it: discriminator turn (forward, backward,
    ``clip_grad_norm_(model.parameters())``, Adam step of the discriminator), then the generator
    turn against the updated discriminator (same, Adam step of the generator).

    The model is the official ``HiFiGan`` (HiFT generator of the given resblock sizes, weights as
    ``hift.model`` makes them, + the official
    ``MultipleDiscriminator``, optionally only the sub-discriminators ``mpd_idx`` / ``mrd_idx``; the
    cosyvoice2.yaml loss weights and GAN mel); copies are trained, the cached modules stay as built.
    inputs: speech (B, W), speech_feat (B, F, 80), pitch_feat (B, F), noise_d / noise_g (B, W, 9)
    (the generator's source noise in the discriminator / generator turn).
    Returns d/<loss>, g/<loss>, d/grad_norm, g/grad_norm (the clip norms), the wrapper's state dict
    before (sd/generator.*, sd/discriminator.*) and after the step (after/...), and each Adam's
    ``exp_avg`` (mu/<param name>: 0.1 x the clipped gradient).
    """
    from functools import partial

    import hift as H

    H._matplotlib_stub()
    from matcha.utils.audio import mel_spectrogram

    from cosyvoice.hifigan.hifigan import HiFiGan

    rk, rd = resblock_kernel_sizes, resblock_dilation_sizes
    gen = _build_gen(base_channels, cond_channels, rk, rd)  # fresh copies (weight-normed modules do not deepcopy)
    gen.load_state_dict(_gen(seed, base_channels, cond_channels, rk, rd, f0_scale, post_scale).state_dict())
    disc = _build_disc_subset(mpd_idx, mrd_idx)
    disc.load_state_dict(_disc_subset(disc_seed, mpd_idx, mrd_idx).state_dict())
    gen.eval()
    disc.eval()
    mel_t = partial(mel_spectrogram, n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480, win_size=1920,
                    fmin=0, fmax=None, center=False)
    gan = HiFiGan(gen, disc, [mel_t], multi_mel_spectral_recon_loss_weight=45, feat_match_loss_weight=2.0,
                  tpr_loss_weight=1.0, tpr_loss_tau=0.04)
    out = {f"sd/{k}": v.copy() for k, v in state_dict_np(gan).items()}  # copies: the step updates in place
    opts = {"discriminator": torch.optim.Adam(disc.parameters(), lr=lr_d),
            "generator": torch.optim.Adam(gen.parameters(), lr=lr_g)}
    batch = {"speech": to_torch(inputs["speech"]).float(), "speech_feat": to_torch(inputs["speech_feat"]).float(),
             "pitch_feat": to_torch(inputs["pitch_feat"]).float()}
    B = batch["speech"].shape[0]
    for turn, noise in (("discriminator", inputs["noise_d"]), ("generator", inputs["noise_g"])):
        gan.zero_grad(set_to_none=True)
        with H._injected(noise, H._phase(B, 0)):
            losses = gan({**batch, "turn": turn}, torch.device("cpu"))
        losses["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(gan.parameters(), grad_clip)
        if torch.isfinite(norm):
            opts[turn].step()
        t = turn[0]
        out.update({f"{t}/{k}": to_np(v.detach()) for k, v in losses.items()})
        out[f"{t}/grad_norm"] = to_np(norm)
    out.update({f"after/{k}": v for k, v in state_dict_np(gan).items()})
    for prefix, mod in (("generator.", gen), ("discriminator.", disc)):  # Adam's first moments: 0.1 x clipped grad
        turn = "generator" if mod is gen else "discriminator"
        for name, prm in mod.named_parameters():
            if prm in opts[turn].state:
                out[f"mu/{prefix}{name}"] = to_np(opts[turn].state[prm]["exp_avg"])
    return out

