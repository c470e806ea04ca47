"""Oracle tasks for the HiFT vocoder (official cosyvoice.hifigan modules, re-drawn weights).

Arrays cross the boundary channel-last like the JAX side: mel ``(B, F, 80)``, waveforms
``(B, W)``, source noise ``(B, W, 9)``. The official sine source draws ``torch.rand`` (initial
phases) and ``torch.randn_like`` (noise); the tasks inject them by patching those two functions
during the call, so runs are deterministic and the JAX side can use the same draws.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from common import reinit_, scale_hift_, state_dict_np, to_np, to_torch

_MODELS: dict = {}


def _build(base_channels: int, cond_channels: int):
    from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor
    from cosyvoice.hifigan.generator import HiFTGenerator

    return HiFTGenerator(
        in_channels=80, base_channels=base_channels, nb_harmonics=8, sampling_rate=24000, nsf_alpha=0.1,
        nsf_sigma=0.003, nsf_voiced_threshold=10, upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7], istft_params={"n_fft": 16, "hop_len": 4},
        resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
        source_resblock_kernel_sizes=[7, 7, 11], source_resblock_dilation_sizes=[[1, 3, 5]] * 3,
        lrelu_slope=0.1, audio_limit=0.99,
        f0_predictor=ConvRNNF0Predictor(num_class=1, in_channels=80, cond_channels=cond_channels),
    )


def model(seed: int = 0, base_channels: int = 512, cond_channels: int = 512, f0_scale: float = 1.0,
          post_scale: float = 1.0):
    """Official HiFTGenerator with ``reinit_(seed)`` weights, cached per arguments.

    ``f0_scale`` multiplies the F0 classifier (re-drawn weights give f0 ~ 1 Hz, all unvoiced;
    ~100 gives a voiced/unvoiced mix); ``post_scale`` multiplies conv_post's gain and bias
    (re-drawn weights give log-magnitudes ~ 18, i.e. a clipped waveform; ~0.15 gives speech-like
    levels). Both keep the tests in the regime a trained model works in.
    """
    key = (seed, base_channels, cond_channels, f0_scale, post_scale)
    if key not in _MODELS:
        m = _build(base_channels, cond_channels)
        reinit_(m, seed)
        scale_hift_(m, f0_scale, post_scale)
        m.eval()
        _MODELS[key] = m
    return _MODELS[key]


def _old_spelling(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        out[k] = v
    return out


def state_dict(inputs, seed: int = 0, base_channels: int = 512, cond_channels: int = 512,
               spelling: str = "new", **scales):
    sd = state_dict_np(model(seed, base_channels, cond_channels, **scales))
    if spelling == "old":
        sd = _old_spelling(sd)
    return {f"sd/{k}": v for k, v in sd.items()}


def load_and_export(inputs, seed: int = 0, base_channels: int = 512, cond_channels: int = 512, **scales):
    """Load a state dict produced by the JAX exporter into a fresh official module (strict), run
    the F0 predictor on ``mel``: proves the export is loadable and equal."""
    from common import load_state_dict_np

    m = _build(base_channels, cond_channels)
    sd = {k[3:]: v for k, v in inputs.items() if k.startswith("sd/")}
    load_state_dict_np(m, sd)
    m.eval()
    with torch.no_grad():
        f0 = m.f0_predictor(to_torch(inputs["mel"]).transpose(1, 2))
    return {"f0": to_np(f0)}


@contextlib.contextmanager
def _injected(noise: np.ndarray, phase: np.ndarray):
    """Patch torch.rand -> ``phase`` and randn_like -> ``noise`` (or zeros for other shapes)."""
    rand, randn_like = torch.rand, torch.randn_like
    noise_t, phase_t = to_torch(noise).float(), to_torch(phase).float()

    def fake_rand(*shape, **kw):
        return phase_t.clone()

    def fake_randn_like(x, **kw):
        if tuple(x.shape) == tuple(noise_t.shape):
            return noise_t.clone()
        return torch.zeros_like(x)

    torch.rand, torch.randn_like = fake_rand, fake_randn_like
    try:
        yield
    finally:
        torch.rand, torch.randn_like = rand, randn_like


def _phase(b: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(b, 9)).astype(np.float32)


def source(inputs, seed: int = 0, base_channels: int = 512, cond_channels: int = 512,
           phase_seed: int = 0, **scales):
    """m_source(f0 upsampled x480) with injected noise; ``f0 (B, F)`` -> ``source (B, W)``."""
    m = model(seed, base_channels, cond_channels, **scales)
    f0 = to_torch(inputs["f0"]).float()
    with torch.no_grad(), _injected(inputs["noise"], _phase(f0.shape[0], phase_seed)):
        s = m.f0_upsamp(f0[:, None]).transpose(1, 2)
        s, _, _ = m.m_source(s)
    return {"source": to_np(s[..., 0])}


def inference(inputs, seed: int = 0, base_channels: int = 512, cond_channels: int = 512,
           phase_seed: int = 0, **scales):
    """Official ``inference(mel, cache_source)`` with injected noise.

    inputs: mel (B, F, 80), noise (B, W, 9), optional cache_source (B, Wc), optional
    source (B, W) -> also ``decode(mel, source)`` as ``audio_given``.
    Returns f0 (B, F), source (B, W), audio (B, W) [, audio_given].
    """
    m = model(seed, base_channels, cond_channels, **scales)
    mel = to_torch(inputs["mel"]).float().transpose(1, 2)
    out = {}
    f0s = []
    h = m.f0_predictor.register_forward_hook(lambda mod, i, o: f0s.append(o.detach().clone()))
    try:
        args = [mel]
        if "cache_source" in inputs:
            args.append(to_torch(inputs["cache_source"]).float()[:, None])
        with _injected(inputs["noise"], _phase(mel.shape[0], phase_seed)):
            audio, s = m.inference(*args)
    finally:
        h.remove()
    out.update(f0=to_np(f0s[0]), source=to_np(s[:, 0]), audio=to_np(audio))
    if "source" in inputs:
        with torch.no_grad():
            out["audio_given"] = to_np(m.decode(mel, to_torch(inputs["source"]).float()[:, None]))
    return out


def debug_decode(inputs, seed: int = 0, base_channels: int = 512, cond_channels: int = 512, **scales):
    """Intermediate tensors of decode(mel, source): conv_pre, each stage, conv_post (channel-last)."""
    import torch.nn.functional as F

    m = model(seed, base_channels, cond_channels, **scales)
    x = to_torch(inputs["mel"]).float().transpose(1, 2)
    s = to_torch(inputs["source"]).float()[:, None]
    out = {}
    with torch.no_grad():
        re, im = m._stft(s.squeeze(1))
        s_stft = torch.cat([re, im], dim=1)
        out["s_stft"] = to_np(s_stft.transpose(1, 2))
        x = m.conv_pre(x)
        out["pre"] = to_np(x.transpose(1, 2))
        for i in range(m.num_upsamples):
            x = F.leaky_relu(x, m.lrelu_slope)
            x = m.ups[i](x)
            if i == m.num_upsamples - 1:
                x = m.reflection_pad(x)
            out[f"up{i}"] = to_np(x.transpose(1, 2))
            si = m.source_resblocks[i](m.source_downs[i](s_stft))
            out[f"si{i}"] = to_np(si.transpose(1, 2))
            x = x + si
            xs = sum(m.resblocks[i * m.num_kernels + j](x) for j in range(m.num_kernels))
            x = xs / m.num_kernels
            out[f"stage{i}"] = to_np(x.transpose(1, 2))
        x = F.leaky_relu(x)
        x = m.conv_post(x)
        out["post"] = to_np(x.transpose(1, 2))
    return out


def conv_ref(inputs, kind: str = "conv", stride: int = 1, padding: int = 0, dilation: int = 1,
             output_padding: int = 0, pad_left: int = 0, pad_right: int = 0):
    """torch conv1d / conv_transpose1d on channel-last ``x (B, T, I)`` with kernel ``w (K, I, O)``.

    For weight norm, inputs ``g`` (torch layout, (d0, 1, 1)) and ``v`` (torch layout) build the
    kernel through ``torch.nn.utils.parametrizations.weight_norm`` on a real module.
    """
    import torch.nn.functional as F

    x = to_torch(inputs["x"]).float().transpose(1, 2)
    b = to_torch(inputs["b"]).float() if "b" in inputs else None
    if "v" in inputs:
        v = to_torch(inputs["v"]).float()
        if kind == "conv":
            mod = torch.nn.Conv1d(v.shape[1], v.shape[0], v.shape[2], bias=False)
        else:
            mod = torch.nn.ConvTranspose1d(v.shape[0], v.shape[1], v.shape[2], bias=False)
        mod = torch.nn.utils.parametrizations.weight_norm(mod)
        with torch.no_grad():
            mod.parametrizations.weight.original0.copy_(to_torch(inputs["g"]).float())
            mod.parametrizations.weight.original1.copy_(v)
            w = mod.weight.detach().clone()
    else:
        wk = to_torch(inputs["w"]).float()          # (K, I, O)
        w = wk.permute(2, 1, 0) if kind == "conv" else wk.permute(1, 2, 0)
    with torch.no_grad():
        if kind == "conv":
            x = F.pad(x, (pad_left, pad_right))
            y = F.conv1d(x, w, b, stride=stride, padding=padding, dilation=dilation)
        else:
            y = F.conv_transpose1d(x, w, b, stride=stride, padding=padding, output_padding=output_padding,
                                   dilation=dilation)
    return {"y": to_np(y.transpose(1, 2)), "w": to_np(w)}


# --------------------------------------------------------------------------- GAN
_DISC: dict = {}


def _matplotlib_stub() -> None:
    """matcha.hifigan.xutils imports matplotlib for plotting only; the oracle venv lacks it."""
    import importlib.util
    import sys
    import types

    if "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib") is not None:
        return
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda *a, **k: None
    mpl.pylab = types.ModuleType("matplotlib.pylab")
    sys.modules["matplotlib"] = mpl
    sys.modules["matplotlib.pylab"] = mpl.pylab


def _restore_windows(module) -> None:
    """reinit_ re-draws every float buffer, including torchaudio Spectrogram's hann window: put it back."""
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "spec_fn"):
                m.spec_fn.window.copy_(torch.hann_window(m.window_length))


def _disc(seed: int, mrd: str = "spec"):
    _matplotlib_stub()
    if (seed, mrd) not in _DISC:
        from cosyvoice.hifigan.discriminator import (MultipleDiscriminator, MultiResolutionDiscriminator,
                                                     MultiResSpecDiscriminator)
        from matcha.hifigan.models import MultiPeriodDiscriminator

        mrd_mod = MultiResSpecDiscriminator() if mrd == "spec" else MultiResolutionDiscriminator()
        d = MultipleDiscriminator(mpd=MultiPeriodDiscriminator(), mrd=mrd_mod)
        reinit_(d, seed)
        _restore_windows(d)
        d.eval()
        _DISC[(seed, mrd)] = d
    return _DISC[(seed, mrd)]


def mrd_resolution(inputs, seed: int = 0):
    """Official MultiResolutionDiscriminator (earlier cosyvoice2.yaml) alone on y (B, T):
    sd/..., y_d/k (B, T', F', 1), fmap/k/l (NHWC)."""
    from cosyvoice.hifigan.discriminator import MultiResolutionDiscriminator

    key = ("mrd_resolution", seed)
    if key not in _DISC:
        d = MultiResolutionDiscriminator()
        reinit_(d, seed)
        _restore_windows(d)
        d.eval()
        _DISC[key] = d
    d = _DISC[key]
    y = to_torch(inputs["y"]).float()
    out = {f"sd/mrd.{k}": v for k, v in state_dict_np(d).items()}
    with torch.no_grad():
        y_d, _, fmaps, _ = d(y, y)
    for k, (s, fl) in enumerate(zip(y_d, fmaps)):
        out[f"y_d/{k}"] = to_np(s.permute(0, 2, 3, 1))
        for l_, f in enumerate(fl):
            out[f"fmap/{k}/{l_}"] = to_np(f.permute(0, 2, 3, 1))
    return out


def discriminator(inputs, seed: int = 0, with_state_dict: bool = True):
    """Official MultipleDiscriminator(mpd, MultiResSpecDiscriminator) on y, y_hat (B, T), plus the
    official GAN losses (HiFiGan.forward_generator / forward_discriminator formulas).

    Returns sd/..., y_d_rs/k, y_d_gs/k (B, N), fmap_rs/k/l, fmap_gs/k/l (NHWC), loss_* and
    mel_r (B, frames, 80) (the GAN mel, fmax None)."""
    from functools import partial

    import torch.nn.functional as F

    _matplotlib_stub()
    from matcha.hifigan.models import discriminator_loss, feature_loss, generator_loss
    from matcha.utils.audio import mel_spectrogram

    from cosyvoice.utils.losses import mel_loss, tpr_loss

    d = _disc(seed)
    y, y_hat = to_torch(inputs["y"]).float(), to_torch(inputs["y_hat"]).float()
    mel_t = partial(mel_spectrogram, n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480, win_size=1920,
                    fmin=0, fmax=None, center=False)
    out = {}
    with torch.no_grad():
        y_d_rs, y_d_gs, fmap_rs, fmap_gs = d(y, y_hat)
        for k in range(len(y_d_rs)):
            out[f"y_d_rs/{k}"] = to_np(y_d_rs[k])
            out[f"y_d_gs/{k}"] = to_np(y_d_gs[k])
            for l_, (fr, fg) in enumerate(zip(fmap_rs[k], fmap_gs[k])):
                out[f"fmap_rs/{k}/{l_}"] = to_np(fr.permute(0, 2, 3, 1))
                out[f"fmap_gs/{k}/{l_}"] = to_np(fg.permute(0, 2, 3, 1))
        out["loss_gen"] = to_np(generator_loss(y_d_gs)[0])
        out["loss_fm"] = to_np(feature_loss(fmap_rs, fmap_gs))
        out["loss_mel"] = to_np(mel_loss(y, y_hat, [mel_t]))
        out["loss_tpr_g"] = to_np(tpr_loss(y_d_gs, y_d_rs, 0.04))
        out["loss_tpr_d"] = to_np(tpr_loss(y_d_rs, y_d_gs, 0.04))
        out["loss_disc"] = to_np(discriminator_loss(y_d_rs, y_d_gs)[0])
        out["loss_f0"] = to_np(F.l1_loss(to_torch(inputs["f0_g"]), to_torch(inputs["f0_r"])))
        out["mel_r"] = to_np(mel_t(y).transpose(1, 2))
    if with_state_dict:
        out.update({f"sd/{k}": v for k, v in state_dict_np(d).items()})
    return out
