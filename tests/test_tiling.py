import pytest
import torch

from davae_core.tiling import tile_starts, tiled_apply
from fractions import Fraction


@pytest.mark.parametrize("length,tile,overlap", [(64, 16, 4), (100, 32, 8), (17, 8, 3), (8, 16, 2)])
def test_tiles_cover_everything_with_the_requested_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap


def test_overlap_must_be_smaller_than_tile():
    with pytest.raises(ValueError, match="smaller than the tile"):
        tile_starts(64, 8, 8)


def test_blending_is_exact_for_a_pointwise_map():
    x = torch.randn(1, 3, 40, 56)
    out = tiled_apply(lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2) * 3, x, 16, 4, Fraction(2))
    assert torch.allclose(out, x.repeat_interleave(2, -1).repeat_interleave(2, -2) * 3, atol=1e-6)


def test_tiled_decode_stays_close_to_the_untiled_decode(flat_davae):
    torch.manual_seed(0)
    latent = torch.randn(1, 32, 32, 32)
    with torch.no_grad():
        full = flat_davae.decode(latent)
        blended = flat_davae.decode_tiled(latent, tile=16, overlap=8)
        butted = flat_davae.decode_tiled(latent, tile=16, overlap=0)
    assert blended.shape == full.shape == (1, 3, 512, 512)
    err, seam = (blended - full).abs(), (butted - full).abs()
    # GroupNorm statistics differ per tile, so tiles are never bit-exact; blending hides the seams
    assert err.mean().item() < 0.02, err.mean().item()
    assert err.max().item() < 0.25, err.max().item()
    assert err.max().item() < 0.5 * seam.max().item()


def _smooth_image(size: int) -> torch.Tensor:
    torch.manual_seed(0)
    low = torch.rand(1, 3, size // 16, size // 16)
    return torch.nn.functional.interpolate(low, size=size, mode="bicubic").clamp(0, 1)


def test_tiled_encode_stays_close_to_the_untiled_encode(flat_davae):
    image = _smooth_image(512)
    with torch.no_grad():
        full = flat_davae.encode(image)
        blended = flat_davae.encode_tiled(image, tile=384, overlap=128)
        butted = flat_davae.encode_tiled(image, tile=256, overlap=0)
    assert blended.shape == full.shape == (1, 32, 32, 32)
    rel = ((blended - full).norm() / full.norm()).item()
    rel_butted = ((butted - full).norm() / full.norm()).item()
    # the encoder's receptive field is wide, so tiles see less context than the whole image
    assert rel < 0.15, rel
    assert rel < 0.5 * rel_butted
