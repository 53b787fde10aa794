"""The stage-1 loss pieces of the ImageNet recipe: group-mean alignment with the adaptive weight
(gradient-norm ratio at the detail down conv, times 0.5) and the element-mean KL."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from davae_training.stage1.losses import TokenizerLoss, TokenizerLossConfig, adaptive_alignment_weight, kl_loss


def _recipe(**changes) -> TokenizerLossConfig:
    return TokenizerLossConfig(**{"l1_weight": 1.0, "lpips_weight": 0.0, "kl_weight": 0.0, "align_weight": 0.5,
                                  "align_adaptive": True, **changes})


def test_adaptive_alignment_weight_is_half_the_gradient_norm_ratio_at_the_detail_conv(vavae_batch):
    model, image = vavae_batch
    out = model(image, generator=torch.Generator().manual_seed(0))
    layer = model.detail_down.conv.weight
    nll = (out["reconstruction"] - (image * 2 - 1)).abs().mean()
    align = ((out["detail"].unflatten(1, (4, 3)).mean(2) - out["base"]) ** 2).mean()
    g_nll = torch.autograd.grad(nll, layer, retain_graph=True)[0].norm()
    g_align = torch.autograd.grad(align, layer, retain_graph=True)[0].norm()
    weight = adaptive_alignment_weight(nll, align, layer)
    assert weight.item() == pytest.approx(0.5 * (g_nll / (g_align + 1e-4)).item(), rel=1e-5)
    assert not weight.requires_grad


def test_tokenizer_loss_uses_the_adaptive_alignment_weight(vavae_batch):
    model, image = vavae_batch
    out = model(image, generator=torch.Generator().manual_seed(0), detail_dropout=0.1)
    layer = model.detail_down.conv.weight
    total, logs = TokenizerLoss(_recipe()).generator_loss(out, image * 2 - 1, 0, detail_layer=layer)
    assert logs["align_weight"].item() != 0.5 and logs["align_weight"].item() > 0
    assert total.item() == pytest.approx((logs["l1"] + logs["align_weight"] * logs["align"]).item(), rel=1e-5)
    total.backward()
    assert layer.grad.abs().sum() > 0
    model.zero_grad()
    _, fixed = TokenizerLoss(_recipe(align_adaptive=False)).generator_loss(out, image * 2 - 1, 0)
    assert fixed["align_weight"].item() == 0.5
    with pytest.raises(ValueError, match="detail_layer"):
        TokenizerLoss(_recipe()).generator_loss(out, image * 2 - 1, 0)


def test_kl_mean_reduction_averages_over_latent_elements():
    shifted = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)], 1))
    assert kl_loss(shifted, "mean").item() == pytest.approx(0.5)
    assert kl_loss(shifted, "sum").item() == pytest.approx(0.5 * 4 * 2 * 2)
    with pytest.raises(ValueError, match="kl_reduction"):
        TokenizerLossConfig(kl_reduction="max")


@pytest.fixture()
def vavae_batch():
    from davae_training.imagenet.fixtures import tiny_vavae_davae

    model = tiny_vavae_davae(seed=0).train()
    return model, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
