"""``python -m davae_training.preflight`` for ImageNet stage 2: the config's LightningDiT and DA-VAE, a few steps.

Builds LightningDiT-XL/1 (or the config's checkpoint when it exists) with DA heads started as
``model.head_init`` says, and the frozen DA-VAE on VA-VAE that encodes the images (or, with
``data.latent_cache``, no encoder: random latents of the cache's shape), random weights where no
file is named, random images and labels of the config's micro-batch at ``data.resolution``; then
runs the trainer's own :class:`~.step.DiTStep` through the loop kit's engine.  ``--toy`` keeps
the shapes' pattern at a width a CPU test runs in seconds (a 2-block, 64-wide DiT; the tiny VA-VAE).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

# the paper's ImageNet DA-VAE: D = 96 detail channels on VA-VAE's C = 32 (toy: 12 on the tiny VA-VAE's 4)
DETAIL_CHANNELS = {False: 96, True: 12}


def random_vavae_davae(toy: bool, device: torch.device, dtype: torch.dtype):
    """A DA-VAE on VA-VAE's architecture (the tiny one with ``toy``), random weights, frozen."""
    from davae_core import DAVAE

    from ..preflight import random_vavae

    davae = DAVAE.from_base_vae(random_vavae(toy), DETAIL_CHANNELS[toy], base_name="vavae", decoder_base_space="raw")
    return davae.to(device, dtype).requires_grad_(False).eval()


def build_dit(cfg, toy: bool, side: int, base_channels: int, detail_channels: int):
    """(DA LightningDiT, description): the checkpoint when it exists and not ``toy``, else random weights."""
    from davae_core.heads import DAHeads

    from .da_heads import attach_da_heads, heads_config_for_lightningdit, initialize_detail_heads
    from .fixtures import TINY_DIT, randomize
    from .lightningdit import LightningDiT, LightningDiTConfig, lightningdit_config
    from .step import build_da_dit

    if not toy and cfg.model.checkpoint and Path(cfg.model.checkpoint).is_file():
        return build_da_dit(cfg.model, detail_channels), cfg.model.checkpoint
    fields = dict(input_size=side, in_channels=base_channels, use_qknorm=cfg.model.enable_qknorm)
    config = LightningDiTConfig(**{**TINY_DIT, **fields}) if toy else lightningdit_config("XL/1", **fields)
    dit = randomize(LightningDiT(config), seed=cfg.train.seed)
    heads = initialize_detail_heads(DAHeads(heads_config_for_lightningdit(dit, detail_channels)), dit, cfg.model.head_init)
    return attach_da_heads(dit, heads).train(), f"LightningDiT-{'toy' if toy else 'XL/1'}, random weights"


def run_imagenet(cfg, steps: int, toy: bool, device: torch.device, log, cpu_float32: bool = True) -> dict[str, Any]:
    from davae_core.dtypes import dtype_from_name

    from ..preflight import _count, run_steps, step_engine
    from .latent_codec import LatentCodec
    from .step import DiTModel, DiTStep, check_latent_grid, fit_objective

    torch.manual_seed(cfg.train.seed)
    if cfg.tokenizer.path and Path(cfg.tokenizer.path).is_file() and not toy:
        codec, vae_source = LatentCodec.from_config(cfg.tokenizer, cfg.data.encode_batch_size, device), cfg.tokenizer.path
    else:
        davae = random_vavae_davae(toy, device, dtype_from_name(cfg.tokenizer.dtype, "tokenizer.dtype"))
        codec, vae_source = LatentCodec(davae, cfg.data.encode_batch_size), "DA-VAE on VA-VAE, random weights"
    layout, res, micro = codec.layout, cfg.data.resolution, cfg.train.batch_size
    dit, source = build_dit(cfg, toy, codec.latent_side(res), layout.base_channels, layout.detail_channels)
    if cfg.train.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    check_latent_grid(dit, codec, res)
    autocast = "no" if device.type == "cpu" and cpu_float32 else cfg.train.mixed_precision  # fp32 weights; see run_stage1
    engine = step_engine(replace(cfg.train, mixed_precision=autocast), device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    batch = {"label": torch.randint(0, dit.config.num_classes, (micro,), generator=gen, device=device)}
    if cfg.data.latent_cache:
        side = dit.config.input_size
        batch["latents"] = torch.randn(micro, dit.in_channels, side, side, generator=gen, device=device)
    else:
        batch["pixels"] = torch.rand(micro, 3, res, res, generator=gen, device=device)
    try:
        model = DiTModel(dit, cfg.ema_decay)
        engine.prepare(model)
        info = {"stage": "imagenet", "model": source, "tokenizer": vae_source, "resolution": res, "micro_batch": micro,
                "latent_shape": [micro, dit.in_channels, dit.config.input_size, dit.config.input_size],
                "params_total": _count(dit), "params_trained": _count(dit, True), "head_init": cfg.model.head_init,
                "qk_norm": dit.config.use_qknorm, "mixed_precision": cfg.train.mixed_precision, "autocast": autocast,
                "optimizer": cfg.train.optimizer, "gradient_checkpointing": cfg.train.gradient_checkpointing,
                "encodes_images": "pixels" in batch}
        log(f"preflight ImageNet stage 2: {source}; {info['params_total'] / 1e6:.1f}M parameters, all trained; "
            f"micro-batch {micro} at {res}px = latents {tuple(info['latent_shape'])} ({vae_source}"
            f"{', encoded every step' if 'pixels' in batch else ', from the latent cache'}); autocast {autocast}, "
            f"{cfg.train.optimizer}, gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}")
        step = DiTStep(model, codec if "pixels" in batch else None, fit_objective(cfg.objective, codec, dit))
        times = run_steps(engine, step, batch, steps, log)
    finally:
        engine.close()
    return {**info, "step_seconds": times}
