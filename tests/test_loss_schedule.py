import math

import pytest
import torch

from davae_core import detail_weight, scheduled_flow_loss


def test_detail_weight_follows_the_cosine_ramp():
    assert detail_weight(0, 1000) == 0.0
    assert detail_weight(500, 1000) == pytest.approx(0.5)
    assert detail_weight(250, 1000) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert detail_weight(1000, 1000) == 1.0
    assert detail_weight(5000, 1000) == 1.0
    assert detail_weight(3, 0) == 1.0  # no warm-up: full weight from the start


def test_loss_denominator_counts_base_and_weighted_detail_elements():
    pred = torch.zeros(2, 32, 4, 4)
    target = torch.zeros(2, 32, 4, 4)
    target[:, :16] = 1.0  # base squared error 1 everywhere
    target[:, 16:] = 2.0  # detail squared error 4 everywhere
    n = 2 * 16 * 4 * 4
    for w in (0.0, 0.3, 1.0):
        out = scheduled_flow_loss(pred, target, 16, w)
        expected = (n * 1.0 + w * n * 4.0) / (n + w * n)
        assert out["loss"].item() == pytest.approx(expected)
        assert out["base_mse"].item() == 1.0 and out["detail_mse"].item() == 4.0


def test_zero_weight_gives_no_gradient_to_detail_predictions():
    pred = torch.randn(1, 32, 2, 2, requires_grad=True)
    scheduled_flow_loss(pred, torch.randn(1, 32, 2, 2), 16, 0.0)["loss"].backward()
    assert pred.grad[:, 16:].abs().sum() == 0
    assert pred.grad[:, :16].abs().sum() > 0


def test_sample_weights_scale_each_sample():
    pred = torch.zeros(2, 32, 2, 2)
    target = torch.ones(2, 32, 2, 2)
    out = scheduled_flow_loss(pred, target, 16, 1.0, sample_weight=torch.tensor([1.0, 3.0]))
    assert out["loss"].item() == pytest.approx(2.0)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        scheduled_flow_loss(torch.zeros(1, 32, 2, 2), torch.zeros(1, 16, 2, 2), 16, 1.0)


def test_logged_halves_are_the_plain_mse_whatever_the_sample_weights():
    pred = torch.zeros(2, 32, 2, 2)
    target = torch.ones(2, 32, 2, 2)
    target[:, 16:] = 2.0
    out = scheduled_flow_loss(pred, target, 16, 0.5, sample_weight=torch.tensor([0.5, 3.0]))
    assert out["base_mse"].item() == 1.0 and out["detail_mse"].item() == 4.0
