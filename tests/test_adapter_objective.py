"""The stage-2 objective: SD3 rectified flow, the w(n) ramp on the detail channels, Eq. 13's denominator."""

from __future__ import annotations

import math

import pytest
import torch

from davae_training.stage2.objective import (
    FlowObjectiveConfig,
    drop_prompts,
    flow_matching_loss,
    min_snr_weight,
    noisy_latents,
    sample_sigmas,
    shift_sigmas,
)


def _oracle(x0: torch.Tensor, base_err: float, detail_err: float, base_channels: int = 16):
    """A model that recovers the true velocity from (x_t, t) and adds a known error per channel group."""
    offset = torch.full_like(x0, base_err)
    offset[:, base_channels:] = detail_err

    def model_fn(x_t, t):
        s = (t / 1000.0).view(-1, 1, 1, 1)
        noise = (x_t - (1 - s) * x0) / s
        return noise - x0 + offset

    return model_fn


@pytest.mark.parametrize("step,expected", [
    (0, 0.0), (25, (1 - math.cos(math.pi / 4)) / 2), (50, 0.5), (100, 1.0), (250, 1.0),
])
def test_detail_weight_at_zero_half_end_and_beyond(step, expected):
    cfg = FlowObjectiveConfig(detail_warmup_steps=100)
    x0 = torch.randn(2, 32, 4, 4)
    out = flow_matching_loss(_oracle(x0, 1.0, 2.0), x0, step, cfg, torch.Generator().manual_seed(0))
    assert out["detail_weight"].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step", [0, 25, 50, 100])
def test_loss_denominator_counts_base_and_weighted_detail_elements(step):
    # 16 base and 8 detail channels: |R| = |B| / 2, so a wrong denominator cannot hide
    cfg = FlowObjectiveConfig(detail_warmup_steps=100, base_channels=16)
    x0 = torch.randn(3, 24, 4, 4, dtype=torch.float64)
    out = flow_matching_loss(_oracle(x0, 1.0, 2.0), x0, step, cfg, torch.Generator().manual_seed(1))
    w = out["detail_weight"].item()
    n_base, n_detail = 3 * 16 * 16, 3 * 8 * 16
    expected = (n_base * 1.0 + w * n_detail * 4.0) / (n_base + w * n_detail)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["base_mse"].item() == pytest.approx(1.0, rel=1e-6)
    assert out["detail_mse"].item() == pytest.approx(4.0, rel=1e-6)


def test_velocity_target_is_noise_minus_data():
    x0 = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    out = flow_matching_loss(_oracle(x0, 0.0, 0.0), x0, 10, FlowObjectiveConfig(), torch.Generator().manual_seed(2))
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-10)


def test_x0_prediction_with_min_snr_weight():
    cfg = FlowObjectiveConfig(prediction="x0", min_snr_gamma=5.0, detail_warmup_steps=0)
    x0 = torch.randn(4, 32, 4, 4, dtype=torch.float64)
    seen = {}

    def model_fn(x_t, t):
        seen["s"] = t / 1000.0
        return _oracle(x0, 0.5, 0.5)(x_t, t)

    out = flow_matching_loss(model_fn, x0, 0, cfg, torch.Generator().manual_seed(3))
    s = seen["s"].double()
    # x0_hat = x_t - s * v_hat = x0 - s * 0.5, each sample weighted by min((1 - s)/s, 5)
    weight = ((1 - s) / s).clamp(max=5.0)
    expected = (weight * (0.5 * s) ** 2).mean().item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert min_snr_weight(torch.tensor([0.5, 0.1, 0.01]), 5.0).tolist() == pytest.approx([1.0, 5.0, 5.0])


def test_timesteps_are_logit_normal_and_shifted():
    assert shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])
    plain = sample_sigmas(20000, FlowObjectiveConfig(shift=1.0), torch.Generator().manual_seed(0))
    shifted = sample_sigmas(20000, FlowObjectiveConfig(shift=3.0), torch.Generator().manual_seed(0))
    assert 0.0 < plain.min() and plain.max() < 1.0
    assert plain.median().item() == pytest.approx(0.5, abs=0.02)  # logit-normal(0, 1) is centred at 1/2
    assert shifted.median().item() == pytest.approx(0.75, abs=0.02)  # the shift moves it to 3/4
    assert torch.all(shifted >= plain)


def test_noisy_latents_interpolate_data_and_noise():
    x0, eps = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    s = torch.tensor([0.0, 1.0])
    xt = noisy_latents(x0, eps, s)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])


def test_prompt_dropout_swaps_in_the_empty_prompt():
    embeds, pooled = torch.randn(64, 5, 8), torch.randn(64, 3)
    null_e, null_p = torch.zeros(5, 8), torch.zeros(3)
    e, p, drop = drop_prompts(embeds, pooled, null_e, null_p, 0.5, torch.Generator().manual_seed(0))
    assert 10 < int(drop.sum()) < 54
    assert torch.equal(e[drop], torch.zeros_like(e[drop])) and torch.equal(p[drop], torch.zeros_like(p[drop]))
    assert torch.equal(e[~drop], embeds[~drop]) and torch.equal(p[~drop], pooled[~drop])
    e2, _, drop2 = drop_prompts(embeds, pooled, null_e, null_p, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(drop, drop2) and torch.equal(e, e2)
    e0, _, none = drop_prompts(embeds, pooled, null_e, null_p, 0.0, torch.Generator().manual_seed(0))
    assert not none.any() and torch.equal(e0, embeds)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        FlowObjectiveConfig(prediction="epsilon")


def test_logged_mse_is_unweighted_by_min_snr_and_ramp():
    """Fig. S3 plots the unweighted diffusion loss of each half: no min-SNR weight, no w(n).
    ``loss`` (what is optimised) keeps both weights."""
    cfg = FlowObjectiveConfig(prediction="x0", min_snr_gamma=5.0, detail_warmup_steps=100, base_channels=16)
    x0 = torch.randn(4, 32, 4, 4, dtype=torch.float64)
    seen = {}

    def model_fn(x_t, t):
        seen["s"] = (t / 1000.0).double()
        return _oracle(x0, 0.5, 1.0)(x_t, t)

    out = flow_matching_loss(model_fn, x0, 25, cfg, torch.Generator().manual_seed(4))
    s = seen["s"]
    # x0_hat = x0 - s * offset: per-sample squared errors (0.5 s)^2 on base, (1.0 s)^2 on detail
    assert out["base_mse"].item() == pytest.approx(((0.5 * s) ** 2).mean().item(), rel=1e-6)
    assert out["detail_mse"].item() == pytest.approx(((1.0 * s) ** 2).mean().item(), rel=1e-6)
    weight = ((1 - s) / s).clamp(max=5.0)
    w = out["detail_weight"].item()
    assert 0 < w < 1
    expected = (((weight * (0.5 * s) ** 2).sum() + w * (weight * (1.0 * s) ** 2).sum()) / (4 * (1 + w))).item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
