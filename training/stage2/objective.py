"""Stage-2 objective: SD3's rectified flow on structured latents, with the detail ramp of Eq. 12-13.

* ``x_t = (1 - s) x0 + s eps`` with ``s`` drawn logit-normal(mean, std) and then shifted as
  SD3's scheduler does (``s' = shift s / (1 + (shift - 1) s)``); the transformer sees
  ``t = 1000 s``.
* ``prediction="velocity"`` (default, SD3's own): target ``eps - x0``.
* ``prediction="x0"`` (the authors' code): the output ``v`` is preconditioned to
  ``x0_hat = x_t - s v`` and compared with ``x0``, each sample weighted by
  ``min((1 - s) / s, gamma)`` (min-SNR, gamma 5 in their code).
* Either way the squared error goes through :func:`davae_core.scheduled_flow_loss`: base
  channels in full, detail channels weighted by ``w(n)``, and the Eq. 13 denominator.
* Prompt dropout for classifier-free guidance swaps a sample's text conditioning for the
  empty prompt's.

All randomness comes from a generator the caller passes, so a resumed run can redraw
exactly the noise of the step it resumes at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from davae_core.loss_schedule import detail_weight, scheduled_flow_loss

PREDICTIONS = ("velocity", "x0")


@dataclass
class FlowObjectiveConfig:
    """The ``objective:`` section of a stage-2 config."""

    prediction: str = "velocity"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    detail_warmup_steps: int = 5000  # N_warm of Eq. 12 (paper 5k, authors' code 10k); 0 = no ramp
    min_snr_gamma: float = 5.0  # x0 prediction only; 0 disables
    prompt_dropout: float = 0.1
    base_channels: int = 16

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"objective.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.shift <= 0:
            raise ValueError(f"objective.shift must be > 0, got {self.shift}")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift (FlowMatchEulerDiscreteScheduler with ``shift``)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sample_sigmas(batch: int, cfg: FlowObjectiveConfig, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """Logit-normal noise levels in (0, 1), shifted; shape ``(batch,)``, float32."""
    u = torch.randn(batch, generator=generator, device=generator.device) * cfg.logit_std + cfg.logit_mean
    return shift_sigmas(torch.sigmoid(u), cfg.shift).to(device)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def min_snr_weight(sigmas: torch.Tensor, gamma: float) -> torch.Tensor:
    """``min((1 - s) / s, gamma)`` per sample, as the authors' x0 objective weights it."""
    return ((1.0 - sigmas) / sigmas.clamp_min(1e-6)).clamp(max=gamma)


def drop_prompts(
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    null_embeds: torch.Tensor,
    null_pooled: torch.Tensor,
    p: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each sample's conditioning by the empty prompt's with probability ``p``."""
    keep_draw = torch.rand(embeds.shape[0], generator=generator, device=generator.device).to(embeds.device)
    drop = keep_draw < p  # applied by torch.where below: no host wait to ask whether any sample dropped
    if null_embeds.shape[-2:] != embeds.shape[-2:]:
        raise ValueError(f"empty-prompt embedding {tuple(null_embeds.shape)} does not fit the batch's {tuple(embeds.shape)}")
    e = torch.where(drop.view(-1, 1, 1), null_embeds.to(embeds).expand_as(embeds), embeds)
    q = torch.where(drop.view(-1, 1), null_pooled.to(pooled).expand_as(pooled), pooled)
    return e, q, drop


def flow_matching_loss(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    step: int,
    cfg: FlowObjectiveConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One loss evaluation.  ``model_fn(x_t, t)`` returns the transformer output (t on 0-1000).

    Returns ``loss`` (Eq. 13, with the min-SNR weight in x0 mode) and for logging ``base_mse`` and
    ``detail_mse`` (unweighted: neither min-SNR nor w(n), as Fig. S3 plots them) and ``detail_weight``.
    """
    b = x0.shape[0]
    sigmas = sample_sigmas(b, cfg, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x0)
    x_t = noisy_latents(x0, noise, sigmas)
    out = model_fn(x_t, sigmas * 1000.0)
    sample_weight = None
    if cfg.prediction == "velocity":
        pred, target = out, noise - x0
    else:
        s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(out.dtype)
        pred, target = x_t - s * out, x0
        if cfg.min_snr_gamma > 0:
            sample_weight = min_snr_weight(sigmas, cfg.min_snr_gamma)
    w = detail_weight(step, cfg.detail_warmup_steps)
    losses = scheduled_flow_loss(pred, target, cfg.base_channels, w, sample_weight)
    losses["detail_weight"] = torch.tensor(w, dtype=torch.float64)
    return losses
