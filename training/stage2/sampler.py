"""Euler sampler of SD3's rectified flow with classifier-free guidance (sample grids, the demo)."""

from __future__ import annotations

import torch

from .latent_grid import check_latent_sides, transformer_patch_size
from .objective import shift_sigmas


@torch.no_grad()
def sample_latents(model, embeds, pooled, null_embeds, null_pooled, latent_shape, steps: int, guidance: float,
                   shift: float, generator: torch.Generator) -> torch.Tensor:
    """Euler rectified-flow sampler with CFG, SD3's shifted sigma schedule.  ``latent_shape``
    (C, h, w) must be whole patches of ``model`` (for DA latents: image sides multiples of 32)."""
    check_latent_sides(latent_shape, transformer_patch_size(model), "sample_latents(latent_shape)")
    b = embeds.shape[0]
    x = torch.randn((b, *latent_shape), generator=generator, device=generator.device).to(embeds.device)
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    cond_e = torch.cat([embeds, null_embeds.expand(b, *null_embeds.shape)])
    cond_p = torch.cat([pooled, null_pooled.expand(b, *null_pooled.shape)])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((2 * b,), s * 1000.0, device=x.device)
        v = model(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=cond_e, pooled_projections=cond_p, return_dict=False)[0]
        v_c, v_u = v.float().chunk(2)
        x = x + (s_next - s) * (v_u + guidance * (v_c - v_u))
    return x
