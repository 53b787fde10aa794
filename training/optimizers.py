"""The optimizer a trainer's ``train.optimizer`` names (torch AdamW or bitsandbytes' 8-bit AdamW) and its lr schedule.

8-bit AdamW keeps both Adam moments in one byte each (blockwise quantised), 2 bytes per
trained value instead of 8; for stage 2's ~230M LoRA values at rank 256 that is ~0.5 GB
instead of ~1.8 GB, what lets stage 2 fit a 24 GB card.  bitsandbytes is an optional
dependency (``pip install "davae[lowmem]"``); its optimizers also step on CPU (>= 0.46).
"""

from __future__ import annotations

from typing import Iterable

import torch

OPTIMIZERS = ("adamw", "adamw_8bit")


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
    """AdamW with the loop's lr, betas, weight decay and eps (``loop``: a TrainLoopConfig)."""
    name = getattr(loop, "optimizer", "adamw")
    check_optimizer_name(name)
    kwargs = dict(lr=loop.learning_rate, betas=(loop.adam_beta1, loop.adam_beta2), weight_decay=loop.adam_weight_decay,
                  eps=loop.adam_epsilon)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(list(params), **kwargs)
    return torch.optim.AdamW(list(params), **kwargs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, loop, num_processes: int):
    """The learning-rate schedule of ``loop`` (constant after a linear warm-up of ``lr_warmup_steps``).

    The loop kit has accelerate prepare it, and accelerate steps a prepared scheduler once per
    process per optimizer step: step counts are multiplied by ``num_processes``.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=loop.lr_warmup_steps * num_processes)


def optimizer_state_bytes_per_value(name: str) -> int:
    """Adam moments per trained value (bench.plan's memory estimate)."""
    return {"adamw": 8, "adamw_8bit": 2}[name]
