"""The two DA-specific blocks around the autoencoder trunks, in plain PyTorch.

``conv_cls`` lets a host build them from its own layer classes (ComfyUI's ``comfy.ops``);
the parameter names stay ``conv.weight`` / ``conv.bias`` either way.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import reduce, repeat
from torch import nn


def half_resolution(image_pm: torch.Tensor) -> torch.Tensor:
    """The base encoder's input: plain bicubic 2x downsample, clamped, as the authors trained."""
    low = F.interpolate(image_pm, scale_factor=0.5, mode="bicubic", align_corners=False)
    return low.clamp(-1.0, 1.0)


class DetailDownsample(nn.Module):
    """Trunk features (Cf, H/8) -> detail moments (2D, H/16).

    A 3x3 conv to 2D/4 channels then pixel-unshuffle, plus a shortcut from the pixel-unshuffled
    features: parameter-free, their mean over contiguous channel groups down to 2D, where 2D
    divides 4*Cf (SD3: 2048 into 32); otherwise a learnable 1x1 conv ``shortcut_proj`` without
    bias, zero at the start so only the conv path speaks (VA-VAE: 2048 into 192 for D = 96).
    """

    def __init__(self, feature_channels: int, moment_channels: int, conv_cls: Callable[..., nn.Module] = nn.Conv2d):
        super().__init__()
        if moment_channels % 4:
            raise ValueError(
                f"cannot map {feature_channels} trunk channels to {moment_channels} moments: "
                "the moments (twice the detail channels) must be divisible by 4"
            )
        self.moment_channels = moment_channels
        self.conv = conv_cls(feature_channels, moment_channels // 4, 3, padding=1)
        self.shortcut_proj: nn.Module | None = None
        if (4 * feature_channels) % moment_channels:
            self.shortcut_proj = conv_cls(4 * feature_channels, moment_channels, 1, bias=False)
            nn.init.zeros_(self.shortcut_proj.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        unshuffled = F.pixel_unshuffle(h, 2)
        if self.shortcut_proj is not None:
            shortcut = self.shortcut_proj(unshuffled)
        else:
            shortcut = reduce(unshuffled, "b (c g) x y -> b c x y", "mean", c=self.moment_channels)
        return F.pixel_unshuffle(self.conv(h), 2) + shortcut


def drop_detail(
    z_d: torch.Tensor, p: float, generator: torch.Generator | None = None, rescale: bool = True,
) -> torch.Tensor:
    """Zero the whole detail latent of each sample with probability ``p`` (training only).

    The decoder then also learns to work from the base alone.  ``rescale`` divides the kept
    samples by ``1 - p`` as the authors' ImageNet code does (inverted dropout); without it the
    kept latents pass unchanged, as inference sees them.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"detail dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return z_d
    device = generator.device if generator is not None else z_d.device
    keep = (torch.rand(z_d.shape[0], generator=generator, device=device) >= p).to(z_d.device, z_d.dtype)
    if rescale:
        keep = keep / (1.0 - p)
    return z_d * keep.view(-1, *([1] * (z_d.ndim - 1)))


class JointUpsample(nn.Module):
    """Structured latent (C+D, H/16) -> decoder-trunk features (Cf, H/8).

    A 3x3 conv to 4*Cf then pixel-shuffle, plus the mirror shortcut: each latent channel
    repeated 4*Cf/(C+D) times, then pixel-shuffled.
    """

    def __init__(self, latent_channels: int, feature_channels: int, conv_cls: Callable[..., nn.Module] = nn.Conv2d):
        super().__init__()
        if (4 * feature_channels) % latent_channels:
            raise ValueError(f"4*{feature_channels} trunk channels are not a multiple of {latent_channels} latent channels")
        self.repeats = 4 * feature_channels // latent_channels
        self.conv = conv_cls(latent_channels, 4 * feature_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shortcut = repeat(z, "b c x y -> b (c r) x y", r=self.repeats)
        return F.pixel_shuffle(self.conv(z) + shortcut, 2)
