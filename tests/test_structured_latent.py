import pytest
import torch

from davae_core import (
    SD3_SCALE,
    SD3_SHIFT,
    LatentLayout,
    LatentNormalizer,
    alignment_loss,
    grouped_mean_proj,
    merge,
    split,
)


def test_split_merge_round_trip_keeps_base_first():
    latent = torch.randn(2, 32, 4, 5)
    z, z_d = split(latent, 16)
    assert z.shape == (2, 16, 4, 5) and z_d.shape == (2, 16, 4, 5)
    assert torch.equal(z, latent[:, :16])
    assert torch.equal(merge(z, z_d), latent)


def test_merge_refuses_mismatched_grids():
    with pytest.raises(ValueError, match="share batch and grid"):
        merge(torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 4, 5))


def test_grouped_mean_proj_averages_contiguous_groups():
    # D = 4, C = 2: Proj[0] = mean(d0, d1), Proj[1] = mean(d2, d3)
    detail = torch.tensor([1.0, 3.0, 10.0, 20.0]).view(1, 4, 1, 1)
    out = grouped_mean_proj(detail, 2)
    assert out.flatten().tolist() == [2.0, 15.0]


def test_grouped_mean_proj_is_identity_when_d_equals_c():
    detail = torch.randn(2, 16, 3, 3)
    assert torch.equal(grouped_mean_proj(detail, 16), detail)


def test_grouped_mean_proj_refuses_non_multiple():
    with pytest.raises(ValueError, match="not a multiple"):
        grouped_mean_proj(torch.zeros(1, 5, 2, 2), 2)


def test_alignment_loss_zero_when_projection_matches_and_positive_otherwise():
    base = torch.randn(2, 16, 4, 4)
    detail = base.repeat_interleave(2, dim=1)  # D = 32: each pair averages back to the base channel
    assert alignment_loss(detail, base).item() == 0.0
    shifted = detail + 0.5
    assert alignment_loss(shifted, base).item() == pytest.approx(0.25, rel=1e-6)


def test_alignment_loss_does_not_push_gradient_into_base():
    base = torch.randn(1, 16, 2, 2, requires_grad=True)
    detail = torch.randn(1, 16, 2, 2, requires_grad=True)
    alignment_loss(detail, base).backward()
    assert base.grad is None
    assert detail.grad is not None and detail.grad.abs().sum() > 0


def test_normalizer_uses_sd3_constants_and_round_trips():
    layout = LatentLayout()
    norm = LatentNormalizer(layout)
    raw = torch.randn(2, 32, 3, 3)
    normed = norm.normalize(raw)
    assert torch.allclose(normed[:, :16], (raw[:, :16] - SD3_SHIFT) * SD3_SCALE)
    assert torch.equal(normed[:, 16:], raw[:, 16:])  # identity detail affine by default
    assert norm.detail_is_identity
    norm.set_detail_statistics(torch.full((16,), 0.5), torch.full((16,), 2.0))
    assert not norm.detail_is_identity
    normed = norm.normalize(raw)
    assert torch.allclose(normed[:, 16:], (raw[:, 16:] - 0.5) / 2.0)
    assert torch.allclose(norm.denormalize(normed), raw, atol=1e-6)


def test_normalizer_statistics_shape_is_checked():
    norm = LatentNormalizer(LatentLayout())
    with pytest.raises(ValueError, match=r"\(16,\)"):
        norm.set_detail_statistics(torch.zeros(8), torch.ones(8))


def test_layout_check_names_the_plain_sd3_latent():
    with pytest.raises(ValueError, match="plain base-VAE latent"):
        LatentLayout().check(torch.zeros(1, 16, 8, 8))


def test_latent_size_refuses_off_grid_sizes_with_nearest_valid_ones():
    layout = LatentLayout()
    assert layout.latent_size(1024, 2048) == (64, 128)
    with pytest.raises(ValueError, match="use width 1008 or 1024 and height 1024 or 1040"):
        layout.latent_size(1030, 1020)
