"""The optimizer a trainer's ``train.optimizer`` names (torch AdamW or bitsandbytes' 8-bit AdamW)
and the learning-rate schedule ``train.lr_schedule`` names.

8-bit AdamW keeps both Adam moments in one byte each (blockwise quantised), 2 bytes per
trained value instead of 8; for stage 2's ~230M LoRA values at rank 256 that is ~0.5 GB
instead of ~1.8 GB, what lets stage 2 fit a 24 GB card.  bitsandbytes is an optional
dependency (``pip install "davae[lowmem]"``); its optimizers also step on CPU (>= 0.46).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import ConfigError

OPTIMIZERS = ("adamw", "adamw_8bit")
LR_SCHEDULES = ("constant", "cosine")


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def check_optimizer_name(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "adamw_8bit" and not bitsandbytes_available():
        raise ImportError("train.optimizer=adamw_8bit needs bitsandbytes: pip install 'bitsandbytes>=0.46' "
                          "(or pip install 'davae[lowmem]'), or set train.optimizer=adamw")


def make_optimizer(params: Iterable[torch.nn.Parameter], loop) -> torch.optim.Optimizer:
    """AdamW with the loop's lr, betas, weight decay and eps (``loop``: a TrainLoopConfig).

    ``weight_decay_on_1d: false`` puts tensors of fewer than two dimensions (biases, norm gains) in a
    group without weight decay, as the authors' stage-1 ``create_optimizer`` does.
    """
    name = getattr(loop, "optimizer", "adamw")
    check_optimizer_name(name)
    kwargs = dict(lr=loop.learning_rate, betas=(loop.adam_beta1, loop.adam_beta2), weight_decay=loop.adam_weight_decay,
                  eps=loop.adam_epsilon)
    params = list(params)
    groups: list = params
    if not getattr(loop, "weight_decay_on_1d", True):
        groups = [g for g in ({"params": [p for p in params if p.ndim >= 2]},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}) if g["params"]]
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, loop, num_processes: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The loop's learning-rate schedule: a linear warm-up over ``lr_warmup_steps``, then the rate held
    (``lr_schedule: constant``) or a half cosine from ``learning_rate`` down to ``lr_min`` at
    ``lr_decay_steps`` (default ``max_steps``) and held there (``cosine``, as the authors' stage 1).

    The loop kit has accelerate prepare it, and accelerate steps a prepared scheduler once per process
    per optimizer step, so every length here is counted in process-steps (times ``num_processes``):
    optimizer step n gets the same rate whatever the process count.  The schedule is a factor on the base rate, which ``--change-learning-rate``
    replaces on resume.
    """
    if loop.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {loop.lr_schedule!r}")
    warmup = loop.lr_warmup_steps * num_processes
    horizon = (loop.lr_decay_steps or loop.max_steps) * num_processes
    cosine = loop.lr_schedule == "cosine"
    if cosine and not 0.0 <= loop.lr_min <= loop.learning_rate:
        raise ConfigError(f"train.lr_min={loop.lr_min} must lie between 0 and train.learning_rate={loop.learning_rate}")
    if cosine and horizon <= warmup:
        raise ConfigError(f"train.lr_decay_steps (or max_steps) = {horizon // num_processes} must exceed "
                          f"train.lr_warmup_steps = {loop.lr_warmup_steps}")
    floor = loop.lr_min / loop.learning_rate if cosine and loop.learning_rate else 0.0

    def factor(count: int) -> float:
        if count < warmup:
            return count / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (count - warmup) / (horizon - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_state_bytes_per_value(name: str) -> int:
    """Adam moments per trained value (bench.plan's memory estimate)."""
    return {"adamw": 8, "adamw_8bit": 2}[name]
