"""The demo's built-in data and its weight-free generation distance."""

import torch
import torch.nn.functional as F

from davae_training.demo.procedural_images import make_batch, make_sample, write_folder
from davae_training.demo.swd import laplacian_pyramid, multiscale_swd


def test_procedural_images_are_deterministic_and_captioned():
    a, b = make_sample(7, 64, seed=3), make_sample(7, 64, seed=3)
    assert torch.equal(a.image, b.image) and a.caption == b.caption
    assert a.image.shape == (3, 64, 64) and a.image.dtype == torch.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    assert not torch.equal(make_sample(8, 64, seed=3).image, a.image)
    assert " with " in a.caption and a.caption.endswith("background")


def test_procedural_images_carry_detail_that_a_2x_downsample_loses():
    images, _ = make_batch(0, 8, 128)
    low = F.interpolate(images, scale_factor=0.5, mode="bicubic", align_corners=False)
    back = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    err = (back - images).abs().mean().item()
    smooth = F.avg_pool2d(images, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)  # same scenes without fine detail
    low_s = F.interpolate(smooth, scale_factor=0.5, mode="bicubic", align_corners=False)
    err_smooth = (F.interpolate(low_s, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1) - smooth).abs().mean().item()
    assert err > 2 * err_smooth, (err, err_smooth)  # one-pixel textures and strokes do not survive


def test_write_folder_pairs_images_with_captions(tmp_path):
    out = write_folder(tmp_path / "data", 3, size=32)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00000.txt", "00001.png", "00001.txt", "00002.png", "00002.txt"]
    assert (out / "00001.txt").read_text() == make_sample(1, 32).caption


def test_laplacian_pyramid_reconstructs_its_input():
    x = torch.rand(2, 3, 32, 32)
    pyr = laplacian_pyramid(x, 3)
    assert [p.shape[-1] for p in pyr] == [32, 16, 8]
    rec = pyr[-1]
    for band in reversed(pyr[:-1]):
        rec = F.interpolate(rec, size=band.shape[-2:], mode="bilinear", align_corners=False) + band
    assert torch.allclose(rec, x, atol=1e-5)


def test_swd_ranks_blur_and_noise_behind_real_samples():
    real, _ = make_batch(0, 16, 64)
    other, _ = make_batch(100, 16, 64)
    blurred = F.interpolate(F.interpolate(other, scale_factor=0.5, mode="bicubic"), scale_factor=2, mode="bicubic").clamp(0, 1)
    same = multiscale_swd(real, other)
    blur = multiscale_swd(real, blurred)
    noise = multiscale_swd(real, torch.rand_like(real))
    assert same["level0"] < blur["level0"]  # lost detail shows at the finest level
    assert same["mean"] < noise["mean"] and blur["mean"] < noise["mean"]
