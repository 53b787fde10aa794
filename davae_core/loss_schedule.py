"""Gradual loss scheduling (paper Eq. 12-13).

The detail channels of the flow-matching loss are faded in with a cosine ramp, so the
warm-started DiT first keeps its base prediction and only then learns the detail.
"""

from __future__ import annotations

import math

import torch


def detail_weight(step: int, warmup_steps: int) -> float:
    """``w(n) = (1 - cos(pi n / N)) / 2`` for ``n < N``, else 1 (``N = 0`` disables the ramp)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * max(step, 0) / warmup_steps))


def scheduled_flow_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    base_channels: int,
    weight: float,
    sample_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. 13: ``(||u^ - u||^2 + w ||u^_d - u_d||^2) / (|B| + w |R|)``.

    ``|B|`` and ``|R|`` count the base and detail elements of the batch.  ``sample_weight``
    (shape ``(B,)``, e.g. min-SNR) scales each sample's squared error in the loss.  Returns the
    loss and, for logging, the unweighted mean-squared errors of both halves (neither ``weight``
    nor ``sample_weight``): the curves of the paper's Fig. S3.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    plain = (pred.float() - target.float()) ** 2
    err = plain if sample_weight is None else plain * sample_weight.float().view(-1, *([1] * (plain.ndim - 1)))
    base, detail = err[:, :base_channels], err[:, base_channels:]
    denom = base.numel() + weight * detail.numel()
    loss = (base.sum() + weight * detail.sum()) / denom
    return {"loss": loss, "base_mse": plain[:, :base_channels].mean().detach(),
            "detail_mse": plain[:, base_channels:].mean().detach()}
