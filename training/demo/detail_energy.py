"""How much one-pixel detail a set of images carries, relative to real images.

The finest Laplacian-pyramid band (an image minus its blurred 2x down-up copy) holds what a
half-resolution model cannot represent: textures, outlines, sharp edges.  Its mean energy
over a sample set, divided by that of real images at the same size, is 1.0 at the real level;
blurry samples score below 1, noisy ones above.
"""

from __future__ import annotations

import torch

from .swd import laplacian_pyramid


@torch.no_grad()
def detail_energy(images: torch.Tensor) -> float:
    """Mean squared finest-band value of ``images`` (N, 3, H, W) in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
    return float(laplacian_pyramid(images.float(), 2)[0].pow(2).mean())


def detail_energy_ratio(samples: torch.Tensor, real: torch.Tensor) -> float:
    if samples.shape[-2:] != real.shape[-2:]:
        raise ValueError(f"compare at one size: samples {tuple(samples.shape)} vs real {tuple(real.shape)}")
    return detail_energy(samples) / detail_energy(real)
