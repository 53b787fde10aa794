"""Pure tensor work behind the latent nodes (no ComfyUI import, unit-tested on its own).

The latent convention of the node pack (raw SD3 base, normalised detail) lives in
:mod:`davae_core.comfy_latent`; see also docs/NODES.md.
"""

from __future__ import annotations

import torch

from ..davae_core.comfy_latent import comfy_latent_to_model, model_to_comfy_latent
from ..davae_core.structured_latent import LatentLayout, merge, split
from .errors import node_error

LAYOUT = LatentLayout()  # SD3: 16 base + 16 detail channels, f16


def empty_structured_latent(node: str, width: int, height: int, batch_size: int, device=None) -> torch.Tensor:
    """Zeros of shape (B, 32, H/16, W/16); sizes off the f16 grid are refused with the nearest valid ones."""
    try:
        h, w = LAYOUT.latent_size(height, width)
    except ValueError as e:
        raise node_error(
            node, "width/height", f"multiples of {LAYOUT.factor}", f"{width}x{height}", f"{e}."
        ) from None
    return torch.zeros((batch_size, LAYOUT.channels, h, w), device=device)


def check_da_latent(node: str, input_name: str, samples: torch.Tensor) -> None:
    """Refuse anything that is not a 4-D 32-channel DA latent, saying which node makes one."""
    if samples.ndim == 4 and samples.shape[1] == LAYOUT.channels:
        return
    got = f"a latent of shape {tuple(samples.shape)}"
    if samples.ndim == 4 and samples.shape[1] == LAYOUT.base_channels:
        fix = (
            "That is a 16-channel SD3 latent: decode it with the stock 'VAE Decode' and the SD3 VAE, "
            "or turn it into a DA latent with 'DA Latent From Base' (DALatentFromBase). If it came out "
            "of a KSampler, put 'DA-SD3 Model Patch' (DASD3ModelPatch) on that sampler's model: an "
            "unpatched SD3 model narrows an empty DA latent to 16 channels."
        )
    else:
        fix = "Make DA latents with 'Empty Structured Latent', 'Structured Latent Encode' or 'DA Latent From Base'."
    raise node_error(node, input_name, f"a DA latent (B, {LAYOUT.channels}, H/16, W/16)", got, fix)


def latent_from_base(node: str, base: torch.Tensor) -> torch.Tensor:
    """16-channel SD3 latent (B, 16, h, w) -> DA latent (B, 32, h, w) with zero detail.

    The grid is kept: an SD3 latent of a 512 image (64x64 at f8) becomes the DA latent of the
    1024 image (64x64 at f16), so refining costs the tokens of 512.
    """
    if base.ndim != 4 or base.shape[1] != LAYOUT.base_channels:
        fix = (
            "It is already a DA latent; use it directly."
            if base.ndim == 4 and base.shape[1] == LAYOUT.channels
            else "Connect the LATENT of a stock SD3 / SD3.5 sampler or 'VAE Encode' with the SD3 VAE."
        )
        raise node_error(node, "samples", f"an SD3 latent (B, {LAYOUT.base_channels}, H/8, W/8)", f"shape {tuple(base.shape)}", fix)
    b, _, h, w = base.shape
    return merge(base, base.new_zeros(b, LAYOUT.detail_channels, h, w))


def base_latent(node: str, samples: torch.Tensor) -> torch.Tensor:
    """DA latent -> its 16 base channels: the SD3 latent of the half-resolution image."""
    check_da_latent(node, "samples", samples)
    return split(samples, LAYOUT.base_channels)[0].contiguous()


def da_process_in(latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI LATENT -> what the diffusion model sees (SD3 normalisation on base only)."""
    return comfy_latent_to_model(latent, LAYOUT.base_channels)


def da_process_out(latent: torch.Tensor) -> torch.Tensor:
    return model_to_comfy_latent(latent, LAYOUT.base_channels)
