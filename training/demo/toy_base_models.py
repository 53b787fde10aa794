"""The demo's stand-ins for the pretrained SD3 VAE and SD3.5 DiT, trained here on procedural images.

They have the real architectures (diffusers ``AutoencoderKL`` with SD3's four blocks and 16
latent channels, ``SD3Transformer2DModel`` with dual attention and RMS qk-norm), only narrow,
so the DA-VAE recipe runs on them exactly as it would on SD3.5-Medium.  Both train at the
*base* resolution, like the real models that DA-VAE upgrades.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from tqdm.auto import tqdm

from davae_core.davae_model import tiny_vae_config
from davae_core.fixtures import TINY_TRANSFORMER_CONFIG
from davae_core.structured_latent import vae_shift_scale

from ..stage2.objective import FlowObjectiveConfig, noisy_latents, sample_sigmas



@dataclass
class ToyTrainResult:
    model: torch.nn.Module
    losses: list[float]


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Indices of ``steps`` shuffled mini-batches over ``n`` items (epoch after epoch)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        yield order[:batch_size]
        order = order[batch_size:]


def toy_vae_config() -> dict:
    """The tiny SD3-layout VAE with one GroupNorm group per layer: with SD3's groups of a few
    channels each, an 8-channel layer normalises flat colour fields away and the toy VAE
    confuses colours (green rendered red); one group keeps the channels' relative values."""
    return {**tiny_vae_config(attention=False), "norm_num_groups": 1}


def train_base_vae(images: torch.Tensor, steps: int = 1000, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                   kl_weight: float = 1e-6, crop: int = 32, progress: bool = True) -> ToyTrainResult:
    """A narrow SD3-layout VAE on ``images`` (N, 3, H, W) in [0, 1], trained with L1 + MSE + a small
    KL; then its latent is standardised (shift/scale written into its config, as SD3's are).

    It trains on ``crop``-pixel crops (on the 8-pixel latent grid): the toy VAE has no attention,
    so it is fully convolutional, and a quarter-size crop is four times as many steps for the
    same time, which is what a VAE trained from scratch needs most."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**toy_vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    crop = min(crop, size)
    losses = []
    vae.train()
    for idx in tqdm(_batches(len(images), batch_size, steps, seed), total=steps, desc="base VAE", disable=not progress):
        oy, ox = (torch.randint(0, (size - crop) // 8 + 1, (2,), generator=gen) * 8).tolist()
        x = images[idx, :, oy : oy + crop, ox : ox + crop] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample  # the mean: posterior noise only slows a from-scratch toy VAE
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images[:256].split(64)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return ToyTrainResult(vae, losses)


@torch.no_grad()
def normalised_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior means in the DiT's space, ``(z - shift) * scale``, as SD3 feeds its MMDiT."""
    z = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images.split(64)])
    shift, scale = vae_shift_scale(vae.config)
    return (z - shift) * scale


# 1x1 patches: at 64 px the latent is 8x8, and SD3's 2x2 patches would leave 4x4 tokens, too few for
# a two-layer toy to place a shape (tried: shape accuracy at chance); the DA recipe does not care
DIT_PATCH_SIZE = 1


def base_dit_config(joint_attention_dim: int, pooled_dim: int) -> dict:
    return {**TINY_TRANSFORMER_CONFIG, "joint_attention_dim": joint_attention_dim, "pooled_projection_dim": pooled_dim,
            "patch_size": DIT_PATCH_SIZE}


def train_base_dit(
    latents: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    null_embeds: torch.Tensor,
    null_pooled: torch.Tensor,
    steps: int = 600,
    batch_size: int = 16,
    lr: float = 1e-3,
    shift: float = 1.0,
    prompt_dropout: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> ToyTrainResult:
    """A narrow SD3.5-layout MMDiT trained by rectified flow on normalised latents and their captions'
    embeddings (all precomputed: the toy data fits in memory)."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**base_dit_config(embeds.shape[-1], pooled.shape[-1]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    objective = FlowObjectiveConfig(shift=shift)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for idx in tqdm(_batches(len(latents), batch_size, steps, seed), total=steps, desc="base DiT", disable=not progress):
        x0, e, p = latents[idx], embeds[idx], pooled[idx]
        drop = torch.rand(len(idx), generator=gen) < prompt_dropout
        e = torch.where(drop.view(-1, 1, 1), null_embeds.expand_as(e), e)
        p = torch.where(drop.view(-1, 1), null_pooled.expand_as(p), p)
        sigmas = sample_sigmas(len(idx), objective, gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = noisy_latents(x0, noise, sigmas)
        v = model(hidden_states=x_t, timestep=sigmas * 1000, encoder_hidden_states=e, pooled_projections=p, return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return ToyTrainResult(model.eval(), losses)
