"""One stage-2 micro-batch: conditioning, prompt dropout and the rectified-flow loss with the detail ramp.

The trainer, ``python -m davae_training.preflight`` and ``python -m bench.train_throughput`` all
call :class:`AdapterStep`; the loop kit (:mod:`davae_training.loop`) does the backward pass and
the optimizer step around it.
"""

from __future__ import annotations

from typing import Any

import torch

from davae_core.loss_schedule import detail_weight

from .conditioning import Conditioning
from .model import AdapterModel
from .objective import FlowObjectiveConfig, drop_prompts, flow_matching_loss


def check_shapes(adapter: AdapterModel, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
    cfg = adapter.module.config
    if latents.shape[1] != cfg.in_channels:
        raise ValueError(f"latents have {latents.shape[1]} channels, the patched transformer reads {cfg.in_channels} "
                         "(model.detail_channels + 16); is tokenizer.path a DA-VAE with that many detail channels?")
    if embeds.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise ValueError(f"text conditioning ({tuple(embeds.shape)}, {tuple(pooled.shape)}) does not fit the transformer "
                         f"(joint_attention_dim {cfg.joint_attention_dim}, pooled {cfg.pooled_projection_dim}); check text.*")


class AdapterStep:
    """``step(batch, step_index, generator) -> (loss, logs)``; no host waits (logs stay on the device)."""

    def __init__(self, adapter: AdapterModel, cond: Conditioning, objective: FlowObjectiveConfig, prompt_dropout: float | None = None):
        self.adapter, self.cond, self.objective = adapter, cond, objective
        self.prompt_dropout = objective.prompt_dropout if prompt_dropout is None else prompt_dropout
        self.checked = False

    def __call__(self, batch: dict[str, Any], step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        latents, embeds, pooled = self.cond(batch)  # off-grid sides: refused by the model's own pre-hook (model.py)
        if not self.checked:
            check_shapes(self.adapter, latents, embeds, pooled)
            self.checked = True
        embeds, pooled, _ = drop_prompts(embeds, pooled, self.cond.null_embeds, self.cond.null_pooled, self.prompt_dropout, generator)
        losses = flow_matching_loss(self.adapter.predictor(embeds, pooled), latents, step, self.objective, generator)
        return losses["loss"], {"loss": losses["loss"], "loss/base_mse": losses["base_mse"], "loss/detail_mse": losses["detail_mse"],
                                "detail_weight": detail_weight(step, self.objective.detail_warmup_steps)}
