"""How much one-pixel detail a set of images carries, relative to real images.

The finest Laplacian-pyramid band (an image minus its blurred 2x down-up copy) holds what a
half-resolution model cannot represent: textures, outlines, sharp edges.  Its mean energy
over a sample set, divided by that of real images at the same size, is 1.0 at the real level;
blurry samples score below 1, noisy ones above.  Restricted to a region (the background frame
of ``procedural_images.background_frame``), it shows detail where there should be none.
"""

from __future__ import annotations

import torch

from .swd import laplacian_pyramid


@torch.no_grad()
def detail_energy(images: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """Mean squared finest-band value of ``images`` (N, 3, H, W) in [0, 1], over the pixels where
    the (H, W) bool mask ``region`` is true (all pixels without one)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
    band = laplacian_pyramid(images.float(), 2)[0].pow(2)
    if region is None:
        return float(band.mean())
    if region.shape != images.shape[-2:] or not region.any():
        raise ValueError(f"region must be a non-empty {tuple(images.shape[-2:])} mask, got {tuple(region.shape)}")
    return float(band[..., region].mean())


def detail_energy_ratio(samples: torch.Tensor, real: torch.Tensor, region: torch.Tensor | None = None) -> float:
    if samples.shape[-2:] != real.shape[-2:]:
        raise ValueError(f"compare at one size: samples {tuple(samples.shape)} vs real {tuple(real.shape)}")
    return detail_energy(samples, region) / detail_energy(real, region)
