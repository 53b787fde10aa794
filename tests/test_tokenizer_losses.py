"""The tokenizer objective: alignment, LPIPS backends (real ones cannot load offline), PatchGAN, KL."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from davae_core import alignment_loss
from davae_training.stage1.losses import (
    PatchDiscriminator,
    RandomFeaturePerceptual,
    TokenizerLoss,
    TokenizerLossConfig,
    build_perceptual_loss,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
)


def _outputs(detail, base, rec):
    moments = torch.cat([detail, torch.zeros_like(detail)], dim=1)
    return {"reconstruction": rec, "detail": detail, "base": base, "posterior": DiagonalGaussianDistribution(moments)}


def test_alignment_is_zero_when_projection_matches_and_positive_otherwise():
    torch.manual_seed(0)
    base = torch.randn(2, 16, 4, 4)
    assert alignment_loss(base.clone(), base).item() == 0.0  # D = C: Proj is the identity
    # D = 2C: Proj averages contiguous pairs, so [b - e, b + e] projects exactly onto b
    e = torch.randn(2, 16, 4, 4)
    pairs = torch.stack([base - e, base + e], dim=2).reshape(2, 32, 4, 4)
    assert alignment_loss(pairs, base).item() == pytest.approx(0.0, abs=1e-12)
    off = base + 0.1 * torch.randn_like(base)
    assert alignment_loss(off, base).item() > 0
    # the objective's align term is exactly that, weighted
    cfg = TokenizerLossConfig(l1_weight=0, lpips_weight=0, kl_weight=0, align_weight=0.2)
    rec = torch.zeros(2, 3, 64, 64)
    _, logs = TokenizerLoss(cfg).generator_loss(_outputs(base.clone(), base, rec), rec, 0)
    assert logs["align"].item() == 0.0
    total, logs = TokenizerLoss(cfg).generator_loss(_outputs(off, base, rec), rec, 0)
    assert logs["align"].item() > 0 and total.item() == pytest.approx(0.2 * logs["align"].item(), rel=1e-5)


def test_alignment_gradient_reaches_detail_only():
    base = torch.randn(1, 16, 2, 2, requires_grad=True)
    detail = torch.randn(1, 16, 2, 2, requires_grad=True)
    alignment_loss(detail, base).backward()
    assert detail.grad.abs().sum() > 0 and base.grad is None


def test_lpips_fallback_is_logged_and_carries_gradient(caplog):
    with caplog.at_level(logging.WARNING, logger="davae_training.losses"):
        loss = build_perceptual_loss(TokenizerLossConfig(lpips_backend="auto"))
    if loss.backend in ("lpips", "torchmetrics"):
        pytest.skip(f"real LPIPS ({loss.backend}) is available here; the fallback path is not taken")
    assert loss.backend == "random-feature-fallback"
    assert "stand-in" in caplog.text
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    y = torch.rand(2, 3, 32, 32)
    d = loss(x * 2 - 1, y * 2 - 1)
    assert d.item() > 0
    d.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert loss(y * 2 - 1, y * 2 - 1).item() == pytest.approx(0.0, abs=1e-6)


def test_lpips_refuses_fallback_when_told():
    cfg = TokenizerLossConfig(lpips_backend="lpips", lpips_allow_fallback=False)
    try:
        loss = build_perceptual_loss(cfg)
    except RuntimeError as e:
        assert "lpips_allow_fallback" in str(e)
    else:
        assert loss.backend == "lpips"  # only where the package and its weights are installed


def test_injected_perceptual_net_is_used():
    calls = []

    def net(a, b):
        calls.append(a.shape)
        return (a - b).pow(2).flatten(1).mean(1)

    cfg = TokenizerLossConfig(l1_weight=0, lpips_weight=3.0, kl_weight=0, align_weight=0)
    loss_fn = TokenizerLoss(cfg, build_perceptual_loss(cfg, net))
    assert loss_fn.perceptual.backend == "injected"
    rec, target = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    z = torch.zeros(1, 16, 1, 1)
    total, logs = loss_fn.generator_loss(_outputs(z, z, rec), target, 0)
    assert calls and logs["lpips"].item() == pytest.approx(1.0) and total.item() == pytest.approx(3.0)


def test_random_feature_net_is_fixed():
    a, b = RandomFeaturePerceptual(), RandomFeaturePerceptual()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(p.requires_grad for p in a.parameters())


def test_patch_discriminator_and_hinge():
    d = PatchDiscriminator(3, channels=8, layers=2)
    logits = d(torch.rand(2, 3, 64, 64))
    assert logits.shape[0] == 2 and logits.shape[1] == 1 and logits.shape[-1] > 1  # a map of patch logits
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    assert hinge_g_loss(torch.full((3,), 0.5)).item() == pytest.approx(-0.5)


def test_gan_term_starts_at_its_step():
    cfg = TokenizerLossConfig(l1_weight=1, lpips_weight=0, kl_weight=0, align_weight=0, gan_weight=0.5, gan_start_step=10)
    loss_fn = TokenizerLoss(cfg)
    disc = PatchDiscriminator(3, channels=8, layers=1)
    z = torch.zeros(1, 16, 2, 2)
    rec = torch.rand(1, 3, 32, 32, requires_grad=True)
    _, before = loss_fn.generator_loss(_outputs(z, z, rec), rec.detach(), 9, disc)
    total, after = loss_fn.generator_loss(_outputs(z, z, rec), rec.detach(), 10, disc)
    assert "gan_g" not in before and "gan_g" in after
    assert total.item() == pytest.approx(0.5 * after["gan_g"].item(), abs=1e-6)  # l1 is 0 here
    total.backward()
    assert rec.grad.abs().sum() > 0


def test_adaptive_gan_weight_balances_gradients():
    cfg = TokenizerLossConfig(l1_weight=1, lpips_weight=0, kl_weight=0, align_weight=0, gan_weight=1.0, gan_adaptive_weight=True,
                              gan_start_step=0)
    layer = torch.nn.Conv2d(3, 3, 1)
    disc = PatchDiscriminator(3, channels=8, layers=1)
    x = torch.rand(1, 3, 32, 32)
    rec = layer(x)
    z = torch.zeros(1, 16, 2, 2)
    _, logs = TokenizerLoss(cfg).generator_loss(_outputs(z, z, rec), torch.zeros_like(x), 0, disc, layer.weight)
    assert logs["gan_weight"].item() > 0 and logs["gan_weight"].item() != 1.0


def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    zero = DiagonalGaussianDistribution(torch.zeros(2, 8, 2, 2))
    assert kl_loss(zero).item() == pytest.approx(0.0, abs=1e-6)
    shifted = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)], 1))
    assert kl_loss(shifted).item() == pytest.approx(0.5 * 4 * 2 * 2)


def test_bad_loss_config_is_refused():
    with pytest.raises(ValueError, match="target"):
        TokenizerLossConfig(target="pixels")
    with pytest.raises(ValueError, match="lpips_backend"):
        TokenizerLossConfig(lpips_backend="vgg")


def test_l1_on_zero_one_pixels_is_half_the_minus_one_one_distance_and_gan_waits_by_default():
    torch.manual_seed(0)
    base = torch.randn(2, 16, 4, 4)
    rec, target = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    totals = {}
    for rng in ("minus_one_one", "zero_one"):
        cfg = TokenizerLossConfig(l1_weight=2.0, l1_pixel_range=rng, lpips_weight=0, kl_weight=0, align_weight=0)
        totals[rng], _ = TokenizerLoss(cfg).generator_loss(_outputs(base, base, rec), target, 0)
    direct01 = ((rec + 1) / 2 - (target + 1) / 2).abs().mean()
    assert totals["zero_one"].item() == pytest.approx(2.0 * direct01.item(), rel=1e-5)
    assert totals["minus_one_one"].item() == pytest.approx(2 * totals["zero_one"].item(), rel=1e-5)
    cfg = TokenizerLossConfig(gan_weight=0.1)
    assert cfg.gan_start_step > 0 and not TokenizerLoss(cfg, perceptual=None).gan_active(0)
    assert TokenizerLoss(cfg, perceptual=None).gan_active(cfg.gan_start_step)
    with pytest.raises(ValueError, match="l1_pixel_range"):
        TokenizerLossConfig(l1_pixel_range="0-255")
