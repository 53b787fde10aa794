"""Which image sizes stage 2 can train and sample: the DA-VAE's factor times the transformer's patch.

The DA-VAE maps ``latent_factor`` pixels to one latent cell (16 for SD3) and the SD3 transformer
reads ``patch_size`` x ``patch_size`` cells per token (2).  A latent side that is not a multiple of
the patch is not refused by diffusers' ``SD3Transformer2DModel``: its patch embedding drops the
last row/column and the output comes back smaller (a 3x6 latent returns 2x6).  So stage 2 keeps
image sides, bucket sides included, on a grid of ``latent_factor * patch_size`` pixels (32 for
SD3), and everything that hands the transformer a latent checks its sides first.  Stage 1 only
needs the DA-VAE's own grid (16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def _nearest(value: int, step: int) -> str:
    lower = value // step * step
    if lower == value:
        return f"{value}"
    return f"{lower} or {lower + step}" if lower > 0 else f"{step}"


def check_latent_sides(shape: Sequence[int], patch_size: int, what: str, latent_factor: int | None = None) -> None:
    """Raise a ValueError naming ``what``, the shape and the fix when the last two sides of a
    latent ``shape`` are not multiples of ``patch_size``."""
    h, w = int(shape[-2]), int(shape[-1])
    if h % patch_size == 0 and w % patch_size == 0:
        return
    if latent_factor:
        grid = latent_factor * patch_size
        fix = (f"use image sides that are multiples of {grid} px (DA-VAE factor {latent_factor} x patch {patch_size}): "
               f"width {_nearest(w * latent_factor, grid)}, height {_nearest(h * latent_factor, grid)}")
    else:
        fix = (f"use latent sides that are multiples of {patch_size} (width {_nearest(w, patch_size)}, height "
               f"{_nearest(h, patch_size)}); for DA-VAE latents, image sides that are multiples of the DA-VAE's factor "
               f"x {patch_size} ({16 * patch_size} px for SD3)")
    raise ValueError(
        f"{what}: latent of shape {tuple(int(s) for s in shape)} has a {w}x{h} grid, not a multiple of the "
        f"transformer's patch size {patch_size}; SD3 would silently drop its last row/column and return a smaller "
        f"output. Fix: {fix}."
    )


@dataclass(frozen=True)
class LatentGrid:
    """``latent_factor`` (pixels per latent cell) and ``patch_size`` (cells per token side)."""

    latent_factor: int
    patch_size: int

    def __post_init__(self) -> None:
        if self.latent_factor <= 0 or self.patch_size <= 0:
            raise ValueError(f"latent factor and patch size must be positive, got {self.latent_factor}, {self.patch_size}")

    @property
    def pixels(self) -> int:
        """Image sides (and bucket sides) are multiples of this: 32 for SD3 + DA-VAE."""
        return self.latent_factor * self.patch_size

    def check_latent(self, shape: Sequence[int], what: str) -> None:
        check_latent_sides(shape, self.patch_size, what, self.latent_factor)

    def check_image_size(self, width: int, height: int, setting: str) -> None:
        """Refuse an image size off the grid, naming the config ``setting`` and the nearest valid sizes."""
        g = self.pixels
        if width % g or height % g or width <= 0 or height <= 0:
            size = f"{width}" if width == height else f"{width}x{height}"
            raise ValueError(
                f"{setting}={size} is not a multiple of {g} px: the DA-VAE's latent is 1/{self.latent_factor} of the image "
                f"and the transformer reads {self.patch_size}x{self.patch_size} latent cells per token, so the latent of a "
                f"{width}x{height} image ({width // self.latent_factor}x{height // self.latent_factor} cells) cannot be cut into "
                f"whole patches. Use {_nearest(width, g)}" + ("" if width == height else f" x {_nearest(height, g)}") + "."
            )


def transformer_patch_size(model) -> int:
    """``patch_size`` of a diffusers SD3 transformer (or anything with such a ``config``)."""
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None) if config is not None else None
    if patch is None and isinstance(config, dict):
        patch = config.get("patch_size")
    if patch is None:
        raise ValueError(f"{type(model).__name__} has no config.patch_size; stage 2 expects a diffusers SD3Transformer2DModel")
    return int(patch)
