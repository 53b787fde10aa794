"""The node pack's latent convention, as one named pair of conversions.

A DA latent in a ComfyUI ``LATENT`` is ``[base C | detail D]`` on the f16 grid, with raw base
channels (what every ComfyUI VAE hands out, so stock SD3 nodes can take them) and detail
channels already normalised by the file's per-channel affine (they have no other ComfyUI
meaning).  The diffusion model sees SD3's ``(z - shift) * scale`` on the base channels and
the detail as stored.

* ``to_comfy_latent`` / ``from_comfy_latent``: raw ``[z | z_d]`` <-> ComfyUI ``LATENT``
  (what the VAE's ``encode`` returns and ``decode`` reads);
* ``comfy_latent_to_model`` / ``model_to_comfy_latent``: ComfyUI ``LATENT`` <-> what the
  DiT sees (the latent format's ``process_in`` / ``process_out``).
"""

from __future__ import annotations

import torch

from .structured_latent import SD3_SCALE, SD3_SHIFT, LatentNormalizer, merge, split


def to_comfy_latent(raw: torch.Tensor, normalizer: LatentNormalizer) -> torch.Tensor:
    """Raw ``[z | z_d]`` -> ``[z | normalised z_d]``."""
    z, z_d = split(raw, normalizer.layout.base_channels)
    return merge(z, normalizer.normalize_detail(z_d))


def from_comfy_latent(latent: torch.Tensor, normalizer: LatentNormalizer) -> torch.Tensor:
    """``[z | normalised z_d]`` -> raw ``[z | z_d]``."""
    z, z_d = split(latent, normalizer.layout.base_channels)
    return merge(z, normalizer.denormalize_detail(z_d))


def comfy_latent_to_model(
    latent: torch.Tensor, base_channels: int = 16, shift: float = SD3_SHIFT, scale: float = SD3_SCALE,
) -> torch.Tensor:
    """ComfyUI ``LATENT`` -> the DiT's space: the base VAE's normalisation on the base channels only."""
    z, z_d = split(latent, base_channels)
    return merge((z - shift) * scale, z_d)


def model_to_comfy_latent(
    latent: torch.Tensor, base_channels: int = 16, shift: float = SD3_SHIFT, scale: float = SD3_SCALE,
) -> torch.Tensor:
    """Inverse of :func:`comfy_latent_to_model`."""
    z, z_d = split(latent, base_channels)
    return merge(z / scale + shift, z_d)
