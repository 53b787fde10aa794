"""The structured latent ``[base C | detail D]`` and everything that only depends on its layout.

A structured latent lives on the grid of the full-resolution image at twice the base VAE's
downsampling factor (SD3: f8 -> f16).  Its first ``C`` channels are the base VAE's latent of
the half-resolution image, the next ``D`` channels carry the detail of the full image.

Two spaces matter:

* *raw*: what the autoencoders produce (base: the SD3 VAE's posterior mean, detail: the
  detail encoder's posterior mean);
* *normalised*: what a diffusion model sees.  Base channels use the base VAE's own
  ``(z - shift) * scale`` (or, for a VA-VAE base, ``(z - mean) / std * scale`` per channel);
  detail channels use a per-channel affine ``(z_d - mean) / std``
  that is identity while the tokenizer trains and is measured on data afterwards.

:class:`LatentNormalizer` is the single place where one becomes the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from einops import reduce
from torch import nn

# SD3 / SD3.5 VAE normalisation (diffusers: shift_factor, scaling_factor).
SD3_SHIFT = 0.0609
SD3_SCALE = 1.5305


def vae_shift_scale(vae_config: Mapping[str, Any]) -> tuple[float, float]:
    """``(shift, scale)`` of a base VAE, read from its diffusers config (``vae.config`` or a dict).

    The DiT reads ``(z - shift) * scale``, as diffusers' SD3 pipelines compute it; a VAE without
    ``shift_factor`` (SD1/SDXL style) has shift 0, one without ``scaling_factor`` scale 1.
    """
    shift = vae_config.get("shift_factor")
    scale = vae_config.get("scaling_factor")
    return float(shift or 0.0), float(scale or 1.0)


@dataclass(frozen=True)
class LatentLayout:
    """Channel layout of a structured latent."""

    base_channels: int = 16
    detail_channels: int = 16
    factor: int = 16  # pixels per latent cell of the full-resolution image

    @property
    def channels(self) -> int:
        return self.base_channels + self.detail_channels

    @property
    def group_size(self) -> int:
        """``r = D / C``: detail channels averaged into one base channel by ``Proj``."""
        if self.detail_channels % self.base_channels:
            raise ValueError(
                f"detail channels D={self.detail_channels} must be a multiple of base channels "
                f"C={self.base_channels} for the grouped-mean projection"
            )
        return self.detail_channels // self.base_channels

    def check(self, latent: torch.Tensor, what: str = "latent") -> None:
        if latent.ndim != 4 or latent.shape[1] != self.channels:
            hint = ""
            if latent.ndim == 4 and latent.shape[1] == self.base_channels:
                hint = (
                    f" It has {self.base_channels} channels: that is a plain base-VAE latent; "
                    "build a structured latent from it first (zero detail)."
                )
            raise ValueError(
                f"{what} must have shape (B, {self.channels}, H, W) "
                f"([base {self.base_channels} | detail {self.detail_channels}]), "
                f"got {tuple(latent.shape)}.{hint}"
            )

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid for an image of ``height x width`` pixels; refuses sizes off the grid."""
        f = self.factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {width}x{height} is not a multiple of {f}; use width "
                f"{_nearest_multiples(width, f)} and height {_nearest_multiples(height, f)}"
            )
        return height // f, width // f


def _nearest_multiples(value: int, factor: int) -> str:
    lower = value // factor * factor
    return f"{lower} or {lower + factor}" if lower > 0 else f"{factor}"


def split(latent: torch.Tensor, base_channels: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``[z, z_d] -> (z, z_d)`` along the channel axis."""
    return latent[:, :base_channels], latent[:, base_channels:]


def merge(base: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
    """``(z, z_d) -> [z, z_d]``; the grids must agree."""
    if base.shape[0] != detail.shape[0] or base.shape[2:] != detail.shape[2:]:
        raise ValueError(
            f"base latent {tuple(base.shape)} and detail latent {tuple(detail.shape)} "
            "must share batch and grid"
        )
    return torch.cat([base, detail], dim=1)


def grouped_mean_proj(detail: torch.Tensor, base_channels: int) -> torch.Tensor:
    """``Proj(z_d)[i] = mean_j z_d[i*r + j]``: parameter-free, over contiguous channel groups."""
    if detail.shape[1] % base_channels:
        raise ValueError(
            f"detail latent has {detail.shape[1]} channels, not a multiple of {base_channels}"
        )
    return reduce(detail, "b (c r) h w -> b c h w", "mean", c=base_channels)


def alignment_loss(detail: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Eq. 3-4: ``|| Proj(z_d) - z ||^2`` (mean over elements); ``z`` is detached."""
    return torch.mean((grouped_mean_proj(detail, base.shape[1]) - base.detach()) ** 2)


def _channel_vector(values: Sequence[float] | None, channels: int, name: str) -> torch.Tensor | None:
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() != channels or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must hold {channels} finite numbers (one per base channel), got {t.numel()}")
    return t


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like).view(1, -1, 1, 1)


class LatentNormalizer(nn.Module):
    """raw <-> normalised for both halves of a structured latent.

    The detail affine is stored as buffers so that it travels in the checkpoint.
    """

    def __init__(
        self, layout: LatentLayout, base_shift: float = SD3_SHIFT, base_scale: float = SD3_SCALE,
        base_mean: Sequence[float] | None = None, base_std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.layout = layout
        self.base_shift = float(base_shift)
        self.base_scale = float(base_scale)
        self.register_buffer("detail_mean", torch.zeros(layout.detail_channels))
        self.register_buffer("detail_std", torch.ones(layout.detail_channels))
        # Per-channel base statistics (VA-VAE's latents_stats.pt) replace the scalar shift; they come
        # from the config, so they stay out of the state dict (files without them are unchanged).
        self.register_buffer("base_mean", _channel_vector(base_mean, layout.base_channels, "base_mean"), persistent=False)
        self.register_buffer("base_std", _channel_vector(base_std, layout.base_channels, "base_std"), persistent=False)
        if (self.base_mean is None) != (self.base_std is None):
            raise ValueError("base_mean and base_std go together: give both or neither")
        if self.base_std is not None and not bool((self.base_std > 0).all()):
            raise ValueError("base_std must be positive in every channel")

    def _affine(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.detail_mean.to(like).view(1, -1, 1, 1)
        std = self.detail_std.to(like).view(1, -1, 1, 1)
        return mean, std

    def normalize_base(self, z: torch.Tensor) -> torch.Tensor:
        if self.base_mean is not None:
            return (z - _per_channel(self.base_mean, z)) / _per_channel(self.base_std, z) * self.base_scale
        return (z - self.base_shift) * self.base_scale

    def denormalize_base(self, z: torch.Tensor) -> torch.Tensor:
        if self.base_mean is not None:
            return z / self.base_scale * _per_channel(self.base_std, z) + _per_channel(self.base_mean, z)
        return z / self.base_scale + self.base_shift

    def normalize_detail(self, z_d: torch.Tensor) -> torch.Tensor:
        mean, std = self._affine(z_d)
        return (z_d - mean) / std

    def denormalize_detail(self, z_d: torch.Tensor) -> torch.Tensor:
        mean, std = self._affine(z_d)
        return z_d * std + mean

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        self.layout.check(raw, "raw latent")
        z, z_d = split(raw, self.layout.base_channels)
        return merge(self.normalize_base(z), self.normalize_detail(z_d))

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        self.layout.check(latent, "latent")
        z, z_d = split(latent, self.layout.base_channels)
        return merge(self.denormalize_base(z), self.denormalize_detail(z_d))

    @torch.no_grad()
    def set_detail_statistics(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        d = self.layout.detail_channels
        if mean.shape != (d,) or std.shape != (d,):
            raise ValueError(f"detail statistics must have shape ({d},), got {tuple(mean.shape)}, {tuple(std.shape)}")
        self.detail_mean.copy_(mean)
        self.detail_std.copy_(std.clamp_min(eps))

    @property
    def detail_is_identity(self) -> bool:
        return bool((self.detail_mean == 0).all() and (self.detail_std == 1).all())
