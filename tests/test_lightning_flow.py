"""LightningDiT's flow objective under the Eq. 12-13 channel schedule, and its Euler sampler with CFG."""

from __future__ import annotations

import pytest
import torch

from davae_training.imagenet.fixtures import tiny_dit
from davae_training.imagenet.flow import LightningFlowConfig, drop_labels, interpolate, lightning_flow_loss
from davae_training.imagenet.sampler import guided_velocity, sample_euler, time_grid


class Recorder:
    """A model that records its inputs and answers ``answer(x, t, y)``."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return self.answer(x, t, y)


# ------------------------------------------------------------------ the objective
def test_path_goes_from_noise_at_t0_to_data_at_t1():
    x, noise = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    assert torch.equal(interpolate(x, noise, torch.tensor([1.0, 0.0]))[0], x[0])
    assert torch.equal(interpolate(x, noise, torch.tensor([1.0, 0.0]))[1], noise[1])


def test_loss_is_velocity_mse_plus_cosine_and_follows_the_detail_schedule():
    cfg = LightningFlowConfig(base_channels=4, detail_warmup_steps=100, label_dropout=0.0)
    x = torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3, 4])
    model = Recorder(lambda xt, t, y: torch.zeros_like(xt))
    full = lightning_flow_loss(model, x, labels, step=100, cfg=cfg, generator=torch.Generator().manual_seed(1))
    xt, t, y = model.calls[-1]
    assert torch.equal(y, labels) and ((t > 0) & (t < 1)).all()
    noise = (xt - t.view(-1, 1, 1, 1) * x) / (1 - t.view(-1, 1, 1, 1))
    target = x - noise
    assert full["mse"].item() == pytest.approx(target.square().mean().item(), rel=1e-4)  # w = 1: the plain mean
    assert full["cosine"].item() == pytest.approx(1.0)  # a zero prediction has cosine 0 everywhere
    assert full["loss"].item() == pytest.approx(full["mse"].item() + 1.0, rel=1e-5)

    start = lightning_flow_loss(model, x, labels, step=0, cfg=cfg, generator=torch.Generator().manual_seed(1))
    assert start["detail_weight"].item() == 0.0
    assert start["mse"].item() == pytest.approx(target[:, :4].square().mean().item(), rel=1e-4)  # detail not counted
    half = lightning_flow_loss(model, x, labels, step=50, cfg=cfg, generator=torch.Generator().manual_seed(1))
    assert half["detail_weight"].item() == pytest.approx(0.5)


def test_label_dropout_swaps_in_the_null_class():
    labels = torch.arange(4000) % 1000
    dropped = drop_labels(labels, 0.1, 1000, torch.Generator().manual_seed(0))
    null = dropped == 1000
    assert 0.08 < null.float().mean() < 0.12 and torch.equal(dropped[~null], labels[~null])


def test_objective_trains_a_lightningdit_with_da_heads_deterministically():
    from davae_core.heads import DAHeads
    from davae_training.imagenet.da_heads import attach_da_heads, heads_config_for_lightningdit

    dit = tiny_dit()
    heads = DAHeads(heads_config_for_lightningdit(dit, 12))
    attach_da_heads(dit, heads)
    cfg = LightningFlowConfig(base_channels=4, detail_warmup_steps=10)
    x, labels = torch.randn(2, 16, 4, 4), torch.tensor([5, 6])
    a = lightning_flow_loss(dit, x, labels, 3, cfg, torch.Generator().manual_seed(7))
    b = lightning_flow_loss(dit, x, labels, 3, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a["loss"], b["loss"])
    a["loss"].backward()
    assert heads.detail_out.weight.grad.abs().sum() > 0 and dit.blocks[0].attn.qkv.weight.grad is not None


# ------------------------------------------------------------------ the sampler
def test_time_grid_runs_from_noise_to_data_with_the_shift():
    grid = time_grid(250, 0.3)
    assert len(grid) == 250 and grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
    assert time_grid(3, 0.3)[1].item() == pytest.approx(0.3 * 0.5 / (1 - 0.7 * 0.5))
    assert torch.allclose(time_grid(5, 0.0), torch.linspace(0, 1, 5, dtype=torch.float64))


@pytest.mark.parametrize("shift", [0.3, 1.0])
def test_euler_lands_on_the_data_point_of_an_exact_velocity_field(shift):
    target = torch.randn(1, 2, 3, 3)
    model = Recorder(lambda x, t, y: (target - x) / (1 - t).view(-1, 1, 1, 1))
    out = sample_euler(model, torch.tensor([3]), (2, 3, 3), torch.Generator().manual_seed(0), steps=10, shift=shift, cfg_scale=1.0)
    assert torch.allclose(out, target, atol=1e-5) and len(model.calls) == 9


def test_guidance_applies_only_inside_the_interval():
    cond, uncond = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), 1.0)
    model = Recorder(lambda x, t, y: torch.where((y == 1000).view(-1, 1, 1, 1), uncond.expand_as(x), cond.expand_as(x)))
    x, y = torch.zeros(1, 4, 2, 2), torch.tensor([7])
    assert torch.allclose(guided_velocity(model, x, 0.5, y, 1000, 4.0, 0.2), torch.full_like(x, 1 + 4 * (2 - 1)))
    assert torch.equal(model.calls[-1][2], torch.tensor([7, 1000]))
    assert torch.allclose(guided_velocity(model, x, 0.1, y, 1000, 4.0, 0.2), cond)  # below the interval: conditional only
    assert torch.equal(model.calls[-1][2], y)
    three = guided_velocity(model, x, 0.5, y, 1000, 4.0, 0.2, guided_channels=3)  # the public LightningDiT's quirk
    assert torch.allclose(three[:, :3], torch.full_like(three[:, :3], 5.0)) and torch.allclose(three[:, 3:], cond[:, 3:])


def test_sampling_a_patched_lightningdit_gives_latents_of_its_shape():
    from davae_core.heads import DAHeads
    from davae_training.imagenet.da_heads import attach_da_heads, heads_config_for_lightningdit

    dit = attach_da_heads(tiny_dit(), DAHeads(heads_config_for_lightningdit(tiny_dit(), 12)))
    out = sample_euler(dit, torch.tensor([1, 2]), (16, 4, 4), torch.Generator().manual_seed(0), steps=4)
    again = sample_euler(dit, torch.tensor([1, 2]), (16, 4, 4), torch.Generator().manual_seed(0), steps=4)
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all() and torch.equal(out, again)
