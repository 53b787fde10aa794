"""One ImageNet stage-2 micro-batch: encode (or read cached latents), LightningDiT's flow loss under w(n).

:class:`DiTModel` is the model object the loop kit (:mod:`davae_training.loop`) trains: the
pretrained LightningDiT with DA heads attached (P'/O' at patch 1, started as ``model.head_init``
says), fully fine-tuned, with its EMA.  :class:`DiTStep` is the forward pass and loss.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..loop import TrainedModel
from ..runtime import logger
from .config import DiTModelConfig
from .da_heads import attach_da_heads, heads_config_for_lightningdit, initialize_detail_heads
from .flow import LightningFlowConfig, lightning_flow_loss
from .lightningdit import LightningDiT
from .lightningdit_checkpoint import load_lightningdit
from .latent_codec import LatentCodec


def build_da_dit(cfg: DiTModelConfig, detail_channels: int) -> LightningDiT:
    """The pretrained LightningDiT (``cfg.prefer`` weights) reading and writing C+D channels."""
    from davae_core.heads import DAHeads

    if not cfg.checkpoint:
        raise ValueError("model.checkpoint is empty: set it to a LightningDiT {model, ema} file "
                         "(hustvl/lightningdit-xl-imagenet256-800ep's lightningdit-xl-imagenet256-800ep.pt)")
    dit = load_lightningdit(cfg.checkpoint, cfg.prefer, enable_qknorm=cfg.enable_qknorm)
    heads = DAHeads(heads_config_for_lightningdit(dit, detail_channels))
    generator = torch.Generator().manual_seed(cfg.head_init_seed)
    initialize_detail_heads(heads, dit, cfg.head_init, generator)
    return attach_da_heads(dit, heads).train()


class DiTModel(TrainedModel):
    """The DA LightningDiT, every parameter trained, with its EMA."""

    shard_classes = ("LightningDiTBlock",)
    weights_file = "dit.safetensors"
    ema_file = "dit_ema.safetensors"
    load_hint = " (was the checkpoint written for another model.checkpoint, model.enable_qknorm or DA-VAE?)"

    @classmethod
    def build(cls, cfg: DiTModelConfig, detail_channels: int, ema_decay: float, gradient_checkpointing: bool = False) -> "DiTModel":
        dit = build_da_dit(cfg, detail_channels)
        if gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        logger.info("LightningDiT: %.1fM parameters, %d -> %d channels (heads: %s init)",
                    sum(p.numel() for p in dit.parameters()) / 1e6, dit.config.in_channels, dit.in_channels, cfg.head_init)
        return cls(dit, ema_decay)


def check_latent_grid(dit: LightningDiT, codec: LatentCodec, resolution: int, what: str = "data.resolution") -> None:
    """The DA-VAE's latent of ``resolution`` must be the DiT's grid: its position tables are fixed to it."""
    side = codec.latent_side(resolution)
    if side != dit.config.input_size or codec.layout.channels != dit.in_channels:
        raise ValueError(
            f"{what}={resolution} gives a {codec.layout.channels}x{side}x{side} latent through the DA-VAE (factor "
            f"{codec.layout.factor}), but the DiT reads {dit.in_channels}x{dit.config.input_size}x{dit.config.input_size}; "
            f"use {what}={dit.config.input_size * codec.layout.factor}")


def fit_objective(objective: LightningFlowConfig, codec: LatentCodec, dit: LightningDiT) -> LightningFlowConfig:
    """``objective`` with the channel split and null class of the models actually loaded."""
    fitted = replace(objective, base_channels=codec.layout.base_channels, num_classes=dit.config.num_classes)
    if fitted != objective:
        logger.info("objective: base_channels=%d, num_classes=%d (from the DA-VAE and the DiT)", fitted.base_channels,
                    fitted.num_classes)
    return fitted


class DiTStep:
    """``step(batch, step_index, generator) -> (loss, logs)``; logs stay on the device."""

    def __init__(self, model: DiTModel, codec: LatentCodec | None, objective: LightningFlowConfig):
        self.model, self.codec, self.objective = model, codec, objective

    def latents(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        if "latents" in batch:  # from the latent cache
            return batch["latents"].to(device, torch.float32, non_blocking=True)
        if self.codec is None:
            raise ValueError("a batch of images but no DA-VAE to encode them (tokenizer.path)")
        return self.codec.encode(batch["pixels"].to(device, non_blocking=True)).to(device)

    def __call__(self, batch: dict[str, Any], step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        device = generator.device
        x = self.latents(batch, device)
        labels = batch["label"].to(device, non_blocking=True)
        losses = lightning_flow_loss(self.model.network, x, labels, step, self.objective, generator)
        logs = {"loss": losses["loss"], "loss/mse": losses["mse"], "loss/cosine": losses["cosine"],
                "loss/base_mse": losses["base_mse"], "loss/detail_mse": losses["detail_mse"],
                "detail_weight": losses["detail_weight"]}
        return losses["loss"], logs
