"""HiFT GAN parts vs the official code: MultipleDiscriminator(MPD, MultiResSpecDiscriminator) outputs
and feature maps, and every loss of the official HiFiGan wrapper (reinit_ weights, full size)."""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.errors import ConversionError
from cosyvoice2_jax.hift import discriminator as D
from cosyvoice2_jax.hift.params import discriminator_from_torch, discriminator_to_torch
from cosyvoice2_jax.params_util import canonical_weight_norm_keys
from oracle_client import unflatten_state_dict

T = 4800 + 37  # not a multiple of any period: exercises the reflect padding


@pytest.fixture(scope="module")
def gan(oracle):
    rng = np.random.default_rng(0)
    t = np.arange(T) / 24000.0
    y = (0.3 * np.sin(2 * np.pi * 180 * t)[None] * np.array([[1.0], [0.5]])
         + 0.05 * rng.standard_normal((2, T))).astype(np.float32)
    y_hat = (y + 0.05 * rng.standard_normal((2, T))).astype(np.float32)
    f0_r = rng.uniform(80, 300, (2, 10)).astype(np.float32)
    f0_g = (f0_r + rng.normal(0, 5, (2, 10))).astype(np.float32)
    ref = oracle("hift:discriminator", {"y": y, "y_hat": y_hat, "f0_r": f0_r, "f0_g": f0_g}, seed=0)
    sd = unflatten_state_dict(ref)
    params = discriminator_from_torch(sd)
    disc = jax.jit(lambda p, a, b: D.MultipleDiscriminator().apply({"params": p}, a, b))
    outs = disc(params, y, y_hat)
    return SimpleNamespace(y=y, y_hat=y_hat, f0_r=f0_r, f0_g=f0_g, ref=ref, sd=sd, params=params, outs=outs)


def test_discriminator_outputs_and_feature_maps(gan):
    y_d_rs, y_d_gs, fmap_rs, fmap_gs = gan.outs
    assert len(y_d_rs) == 8 and len(fmap_rs) == 8
    for k in range(8):
        for mine, name in ((y_d_rs[k], f"y_d_rs/{k}"), (y_d_gs[k], f"y_d_gs/{k}")):
            ref = gan.ref[name]
            assert mine.shape == ref.shape, name
            np.testing.assert_allclose(np.asarray(mine), ref, atol=2e-4 * max(1.0, np.abs(ref).max()), err_msg=name)
        assert len(fmap_rs[k]) == 6
        for l_ in range(6):
            for mine, name in ((fmap_rs[k][l_], f"fmap_rs/{k}/{l_}"), (fmap_gs[k][l_], f"fmap_gs/{k}/{l_}")):
                ref = gan.ref[name]
                assert mine.shape == ref.shape, name
                np.testing.assert_allclose(np.asarray(mine), ref, atol=2e-4 * max(1.0, np.abs(ref).max()),
                                           err_msg=name)
    # the scores must depend on the input (re-drawn weights)
    assert np.abs(gan.ref["y_d_rs/0"] - gan.ref["y_d_gs/0"]).max() > 1e-2


def test_gan_losses(gan):
    y_d_rs, y_d_gs, fmap_rs, fmap_gs = gan.outs
    g = jax.jit(D.generator_losses)(y_d_rs, y_d_gs, fmap_rs, fmap_gs, gan.y, gan.y_hat, gan.f0_g, gan.f0_r)
    d = jax.jit(D.discriminator_losses)(y_d_rs, y_d_gs)
    r = gan.ref
    for mine, name in ((g["loss_gen"], "loss_gen"), (g["loss_fm"], "loss_fm"), (g["loss_mel"], "loss_mel"),
                       (g["loss_tpr"], "loss_tpr_g"), (g["loss_f0"], "loss_f0"), (d["loss_disc"], "loss_disc"),
                       (d["loss_tpr"], "loss_tpr_d")):
        np.testing.assert_allclose(float(mine), float(r[name]), rtol=1e-4, atol=1e-6, err_msg=name)
    total = (r["loss_gen"] + 2 * r["loss_fm"] + 45 * r["loss_mel"] + r["loss_tpr_g"] + r["loss_f0"])
    np.testing.assert_allclose(float(g["loss"]), float(total), rtol=1e-4)
    np.testing.assert_allclose(float(d["loss"]), float(r["loss_disc"] + r["loss_tpr_d"]), rtol=1e-4)


def test_gan_mel_fmax_none(gan):
    mel = np.asarray(D.gan_mel(jnp.asarray(gan.y)))
    assert mel.shape == gan.ref["mel_r"].shape
    np.testing.assert_allclose(mel, gan.ref["mel_r"], atol=2e-4)


def test_tpr_loss_hand_computed():
    dr = jnp.array([[0.0, 1.0, 2.0, 3.0]])
    dg = jnp.array([[1.0, 1.0, 1.0, 1.0]])
    # d = dr - dg = [-1, 0, 1, 2]; lower median 0; selected where dr < dg + 0: d < 0 -> [-1]; L = 1
    np.testing.assert_allclose(float(D.tpr_loss([dr], [dg], tau=0.04)), 0.04)
    np.testing.assert_allclose(float(D.tpr_loss([dr], [dg], tau=2.0)), 1.0)


def test_discriminator_converter_round_trip_and_strict(gan):
    # matcha's period discriminators use the old weight_g/weight_v spelling, the spectrogram ones
    # the parametrizations spelling: the official state dict mixes both
    assert any(k.endswith(".weight_g") for k in gan.sd) and any("parametrizations" in k for k in gan.sd)
    canonical = canonical_weight_norm_keys(gan.sd)
    back = discriminator_to_torch(gan.params)
    assert set(back) == set(canonical)
    for k, v in canonical.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    old = {k.replace(".parametrizations.weight.original0", ".weight_g")
           .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in gan.sd.items()}
    jax.tree.map(np.testing.assert_array_equal, discriminator_from_torch(old), gan.params)
    jax.tree.map(np.testing.assert_array_equal, discriminator_from_torch(canonical), gan.params)
    wrapped = {f"discriminator.{k}": v for k, v in gan.sd.items()}
    jax.tree.map(np.testing.assert_array_equal, discriminator_from_torch(wrapped), gan.params)
    with pytest.raises(ConversionError, match="missing parameter"):
        discriminator_from_torch({k: v for k, v in gan.sd.items() if not k.startswith("mrd.discriminators.2.out")})


@pytest.mark.slow
def test_multi_resolution_discriminator_variant(oracle, gan):
    """The earlier cosyvoice2.yaml's mrd (DiscriminatorR: band-split complex spectrogram, peak
    normalised input), converted through the same rule table. Slow (~40 s of compiles):
    ``pytest -m slow tests/test_hift_gan.py``."""
    from cosyvoice2_jax.hift.params import DISCRIMINATOR_IGNORE, discriminator_rules
    from cosyvoice2_jax.params_util import convert

    ref = oracle("hift:mrd_resolution", {"y": gan.y}, seed=1)
    sd = unflatten_state_dict(ref)
    mod = D.MultiResolutionDiscriminator()
    y = jnp.asarray(gan.y)
    expected = {"mrd": jax.eval_shape(lambda: mod.init(jax.random.PRNGKey(0), y)["params"])}
    params = convert(sd, discriminator_rules(), expected=expected, ignore=DISCRIMINATOR_IGNORE)["mrd"]
    scores, fmaps = jax.jit(lambda p, a: mod.apply({"params": p}, a))(params, y)
    for k in range(3):
        r = ref[f"y_d/{k}"]
        assert scores[k].shape == r.shape
        np.testing.assert_allclose(np.asarray(scores[k]), r, atol=2e-4 * max(1.0, np.abs(r).max()))
        assert len(fmaps[k]) == 21
        for l_ in (0, 7, 20):
            r = ref[f"fmap/{k}/{l_}"]
            np.testing.assert_allclose(np.asarray(fmaps[k][l_]), r, atol=2e-4 * max(1.0, np.abs(r).max()))
