"""hift.pt (official ``HiFTGenerator.state_dict()``) <-> Flax params of :class:`HiFTGenerator`.

Both weight-norm spellings load (``X.weight_g/X.weight_v`` and
``X.parametrizations.weight.original0/1``), and so do checkpoints whose weight norm was removed
(``X.weight``). Layouts: conv ``(O, I, K)`` -> ``(K, I, O)``; transposed conv ``(I, O, K)`` ->
``(K, I, O)``; weight-norm gain ``(O, 1, 1)`` -> ``(1, 1, O)`` for convs and ``(I, 1, 1)`` ->
``(1, I, 1)`` for transposed convs (torch norms those over all dims but dim 0 = input channels).
Release checkpoints of the HiFiGan training wrapper prefix keys with ``generator.``; the official
loader strips it and so do we.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..config import HiFTConfig
from ..layers.conv import fold_weight_norm
from ..params_util import (CONV1D, CONV2D, CONV_TRANSPOSE1D, Rule, Transform, conv1d_rules, convert, export,
                           linear_rules, load_torch_checkpoint)
from .modeling import HiFTGenerator

G_CONV = Transform("wn_gain_conv", lambda w: w.reshape(1, 1, -1), lambda w: w.reshape(-1, 1, 1))
G_CONVT = Transform("wn_gain_convT", lambda w: w.reshape(1, -1, 1), lambda w: w.reshape(-1, 1, 1))


def _wn(torch_prefix: str, jax_prefix: str, transposed: bool = False) -> list[Rule]:
    kernel = CONV_TRANSPOSE1D if transposed else CONV1D
    return [
        Rule(f"{torch_prefix}.parametrizations.weight.original0", f"{jax_prefix}/weight_g",
             G_CONVT if transposed else G_CONV),
        Rule(f"{torch_prefix}.parametrizations.weight.original1", f"{jax_prefix}/weight_v", kernel),
        Rule(f"{torch_prefix}.weight", f"{jax_prefix}/kernel", kernel),   # weight norm removed / folded
        Rule(f"{torch_prefix}.bias", f"{jax_prefix}/bias"),
    ]


def _resblocks(t: str, j: str) -> list[Rule]:
    rules = []
    for n in (1, 2):
        rules += _wn(f"{t}.{{i}}.convs{n}.{{j}}", f"{j}_{{i}}/convs{n}_{{j}}")
        rules.append(Rule(f"{t}.{{i}}.activations{n}.{{j}}.alpha", f"{j}_{{i}}/activations{n}_{{j}}/alpha"))
    return rules


def hift_rules() -> list[Rule]:
    """The conversion table (torch key template -> JAX param path template)."""
    return [
        *_wn("conv_pre", "conv_pre"),
        *_wn("conv_post", "conv_post"),
        *_wn("ups.{i}", "ups_{i}", transposed=True),
        *_wn("f0_predictor.condnet.{i}", "f0_predictor/condnet_{i}"),
        *linear_rules("f0_predictor.classifier", "f0_predictor/classifier"),
        *linear_rules("m_source.l_linear", "m_source/l_linear"),
        *conv1d_rules("source_downs.{i}", "source_downs_{i}"),
        *_resblocks("resblocks", "resblocks"),
        *_resblocks("source_resblocks", "source_resblocks"),
    ]


@functools.lru_cache(maxsize=8)
def abstract_params(cfg: HiFTConfig, *, folded: bool = False) -> dict[str, Any]:
    """Shapes of the param tree (``jax.ShapeDtypeStruct`` leaves), weight-normed or folded."""
    def init():
        p = init_params(cfg, jax.random.PRNGKey(0))
        return fold_weight_norm(p) if folded else p

    return jax.eval_shape(init)


def init_params(cfg: HiFTConfig, key) -> dict[str, Any]:
    """Random params of :class:`HiFTGenerator` (weight norm kept: ``weight_g`` / ``weight_v``)."""
    F = 4
    mel = jnp.zeros((1, F, cfg.in_channels))
    noise = jnp.zeros((1, F * cfg.hop_size, cfg.nb_harmonics + 1))
    return HiFTGenerator(cfg).init(key, mel, noise)["params"]


def _strip_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    if sd and all(k.startswith("generator.") for k in sd):
        return {k[len("generator."):]: v for k, v in sd.items()}
    return dict(sd)


def from_torch(state_dict: Mapping[str, Any], cfg: HiFTConfig, *, fold: bool = False,
               what: str = "hift.pt") -> dict[str, Any]:
    """Official HiFT state dict -> params (strict: missing/unexpected/mis-shaped keys raise
    :class:`~cosyvoice2_jax.errors.ConversionError`).

    ``fold=True`` returns folded kernels (inference); otherwise g/v are kept (training). A state
    dict without weight norm (``X.weight``) always gives folded params.
    """
    sd = _strip_prefix(state_dict)
    wn_removed = "conv_pre.weight" in sd
    params = convert(sd, hift_rules(), expected=abstract_params(cfg, folded=wn_removed), what=what)
    params = jax.tree.map(np.asarray, params)
    if fold and not wn_removed:
        params = jax.tree.map(np.asarray, fold_weight_norm(params))
    return params


def to_torch(params: Mapping[str, Any], *, spelling: str = "parametrizations") -> dict[str, np.ndarray]:
    """Params -> official state dict (numpy). ``spelling``: ``"parametrizations"`` (torch >= 2.1,
    ``X.parametrizations.weight.original0/1``) or ``"weight_g"`` (``X.weight_g/X.weight_v``).
    Folded params export as ``X.weight`` (a weight-norm-removed checkpoint)."""
    if spelling not in ("parametrizations", "weight_g"):
        raise ValueError(f"spelling must be 'parametrizations' or 'weight_g', got {spelling!r}")
    sd = export(params, hift_rules(), what="HiFT params")
    if spelling == "weight_g":
        sd = {k.replace(".parametrizations.weight.original0", ".weight_g")
               .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in sd.items()}
    return sd


def from_release(source: str | Path | Mapping[str, Any], cfg: HiFTConfig, *, fold: bool = False) -> dict[str, Any]:
    """A release ``hift.pt`` (read weights-only) or a state dict -> params (see :func:`from_torch`;
    the default keeps weight norm, as training and export need; :class:`~.runtime.Vocoder` folds)."""
    if isinstance(source, Mapping):
        return from_torch(source, cfg, fold=fold)
    return from_torch(load_torch_checkpoint(source), cfg, fold=fold, what=Path(source).name)


def to_release(params: Mapping[str, Any], cfg: HiFTConfig | None = None, *,
               spelling: str = "parametrizations") -> dict[str, np.ndarray]:
    """Params -> the official ``hift.pt`` state dict (numpy; see :func:`to_torch`)."""
    return to_torch(params, spelling=spelling)


# ----------------------------------------------------------------------------------- discriminators
G_CONV2D = Transform("wn_gain_conv2d", lambda w: w.reshape(1, 1, 1, -1), lambda w: w.reshape(-1, 1, 1, 1))


def _wn2d(torch_prefix: str, jax_prefix: str) -> list[Rule]:
    return [
        Rule(f"{torch_prefix}.parametrizations.weight.original0", f"{jax_prefix}/weight_g", G_CONV2D),
        Rule(f"{torch_prefix}.parametrizations.weight.original1", f"{jax_prefix}/weight_v", CONV2D),
        Rule(f"{torch_prefix}.weight", f"{jax_prefix}/kernel", CONV2D),
        Rule(f"{torch_prefix}.bias", f"{jax_prefix}/bias"),
    ]


# torchaudio Spectrogram's hann window buffer (DiscriminatorR): a constant, recomputed here
DISCRIMINATOR_IGNORE = (r".*\.spec_fn\.window$",)


def discriminator_rules() -> list[Rule]:
    """Official ``MultipleDiscriminator(mpd, MultiResSpecDiscriminator)`` state dict table
    (the ``discriminator.`` prefix of the HiFiGan wrapper is stripped by :func:`discriminator_from_torch`)."""
    return [
        *_wn2d("mpd.discriminators.{i}.convs.{j}", "mpd/discriminators_{i}/convs_{j}"),
        *_wn2d("mpd.discriminators.{i}.conv_post", "mpd/discriminators_{i}/conv_post"),
        *_wn2d("mrd.discriminators.{i}.discriminators.{j}", "mrd/discriminators_{i}/discriminators_{j}"),
        *_wn2d("mrd.discriminators.{i}.out", "mrd/discriminators_{i}/out"),
        # MultiResolutionDiscriminator variant (earlier cosyvoice2.yaml)
        *_wn2d("mrd.discriminators.{i}.band_convs.{b}.{j}", "mrd/discriminators_{i}/band_convs_{b}_{j}"),
        *_wn2d("mrd.discriminators.{i}.conv_post", "mrd/discriminators_{i}/conv_post"),
    ]


def discriminator_from_torch(state_dict: Mapping[str, Any], module=None, *, what: str = "discriminator"
                             ) -> dict[str, Any]:
    """Official discriminator state dict (``discriminator.`` prefix optional) -> params of ``module``
    (a :class:`~cosyvoice2_jax.hift.discriminator.MultipleDiscriminator`; default: the official one,
    its ``mrd`` variant detected from the keys: ``band_convs`` means ``MultiResolutionDiscriminator``).
    Strict: missing, unexpected and mis-shaped keys raise."""
    from .discriminator import MultipleDiscriminator, abstract_discriminator_params

    sd = dict(state_dict)
    if sd and all(k.startswith("discriminator.") for k in sd):
        sd = {k[len("discriminator."):]: v for k, v in sd.items()}
    if module is None:
        module = MultipleDiscriminator("resolution" if any(".band_convs." in k for k in sd) else "spec")
    params = convert(sd, discriminator_rules(), expected=abstract_discriminator_params(module), what=what,
                     ignore=DISCRIMINATOR_IGNORE)
    return jax.tree.map(np.asarray, params)


def discriminator_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Params -> official state dict (parametrizations spelling). For the ``resolution`` variant the
    official module also holds ``mrd.discriminators.{i}.spec_fn.window`` buffers (hann windows),
    which are not exported: load with ``strict=False`` or add them."""
    return export(params, discriminator_rules(), what="discriminator params")


def param_axes(cfg: HiFTConfig, *, folded: bool = False) -> dict:
    """Logical axes of every param leaf (:func:`cosyvoice2_jax.sharding.axes_by_rule`)."""
    from ..sharding import axes_by_rule

    return axes_by_rule(abstract_params(cfg, folded=folded))


__all__ = ["hift_rules", "abstract_params", "init_params", "param_axes", "from_release", "to_release", "from_torch", "to_torch", "discriminator_rules",
           "discriminator_from_torch", "discriminator_to_torch"]
