"""LightningDiT's flow objective, under the Eq. 12-13 detail schedule.

* ``x_t = t x + (1 - t) noise`` with ``t = 1`` the data and ``t`` drawn logit-normal(0, 1);
  the model reads ``t`` itself (no 1000x) and predicts the velocity ``x - noise``.
* Loss: the squared error through :func:`davae_core.loss_schedule.scheduled_flow_loss` (base
  channels in full, detail channels weighted by ``w(n)``, the Eq. 13 denominator; at
  ``w = 1`` it is LightningDiT's plain mean) plus ``cosine_weight`` times the mean over
  positions of ``1 - cos(prediction, target)`` across channels (LightningDiT's cosine term,
  over all channels as the authors' DA code keeps it).
* Label dropout for classifier-free guidance: each label becomes the null class
  (``num_classes``) with probability ``label_dropout``.

All randomness comes from the caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from davae_core.loss_schedule import detail_weight, scheduled_flow_loss

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, labels) -> velocity


@dataclass
class LightningFlowConfig:
    base_channels: int = 32
    detail_warmup_steps: int = 20000  # N_warm of Eq. 12 (authors' config: cosine to step 20000; paper: 10k); 0: none
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cosine_weight: float = 1.0  # LightningDiT's use_cosine_loss; 0 disables
    label_dropout: float = 0.1
    num_classes: int = 1000  # the null class is this index

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def sample_times(batch: int, cfg: LightningFlowConfig, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal ``t`` in (0, 1), shape ``(batch,)``; 1 is data."""
    u = torch.randn(batch, generator=generator, device=generator.device) * cfg.logit_std + cfg.logit_mean
    return torch.sigmoid(u)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t x + (1 - t) noise``."""
    s = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return s * x + (1.0 - s) * noise


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Each label replaced by ``null_class`` with probability ``p``."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=generator, device=generator.device).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def cosine_term(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions of ``1 - cos`` between prediction and target across channels."""
    return (1.0 - F.cosine_similarity(pred.float(), target.float(), dim=1)).mean()


def lightning_flow_loss(
    model_fn: ModelFn, x: torch.Tensor, labels: torch.Tensor, step: int, cfg: LightningFlowConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One loss evaluation on normalised latents ``x`` (B, C+D, h, w) with class ``labels`` (B,).

    Returns ``loss`` and, for logging, ``mse`` (Eq. 13), ``cosine``, ``base_mse``, ``detail_mse``, ``detail_weight``.
    """
    t = sample_times(x.shape[0], cfg, generator).to(x.device)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x)
    pred = model_fn(interpolate(x, noise, t), t, drop_labels(labels, cfg.label_dropout, cfg.num_classes, generator))
    target = x - noise
    w = detail_weight(step, cfg.detail_warmup_steps)
    losses = scheduled_flow_loss(pred, target, cfg.base_channels, w)
    mse = losses.pop("loss")
    cos = cosine_term(pred, target)
    return {
        "loss": mse + cfg.cosine_weight * cos, "mse": mse.detach(), "cosine": cos.detach(), **losses,
        "detail_weight": torch.tensor(w, dtype=torch.float64),
    }
