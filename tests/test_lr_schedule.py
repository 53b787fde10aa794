"""Learning-rate schedules (``train.lr_schedule``) and the optimizer's weight-decay groups.

The authors' stage-1 config decays the rate with a cosine to ``end_lr`` over their
``max_train_steps`` (sd3/utils/lr_schedulers.py, sd3/davae/configs/training/SD3DAVAE/base.yaml);
``make_lr_scheduler`` is the one place both trainers build their schedule.
"""

from __future__ import annotations

import math

import pytest
import torch

from davae_training.config import ConfigError, TrainLoopConfig
from davae_training.optimizers import make_lr_scheduler, make_optimizer


def _lrs(loop: TrainLoopConfig, steps: int, processes: int = 1) -> list[float]:
    """The rate each optimizer step uses, stepping the scheduler as a prepared one is stepped:
    ``processes`` times per optimizer step (accelerate's AcceleratedScheduler)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=loop.learning_rate)
    sched = make_lr_scheduler(opt, loop, processes)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # (no gradients: nothing moves) the order torch expects
        for _ in range(processes):
            sched.step()
    return out


def _cosine(step: int, lr: float, lr_min: float, horizon: int, warmup: int = 0) -> float:
    if step < warmup:
        return lr * step / warmup
    progress = min(1.0, (step - warmup) / (horizon - warmup))
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_constant_schedule_with_warmup_is_the_old_behaviour():
    loop = TrainLoopConfig(learning_rate=1e-3, lr_warmup_steps=4, max_steps=10)
    assert _lrs(loop, 10) == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 6)


@pytest.mark.parametrize("processes", [1, 2])
def test_cosine_decays_to_lr_min_at_max_steps_and_holds(processes):
    loop = TrainLoopConfig(learning_rate=1e-4, lr_schedule="cosine", lr_min=1e-5, max_steps=100)
    lrs = _lrs(loop, 120, processes)
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[50] == pytest.approx(5.5e-5)  # half way: the mean of the two rates
    assert lrs[25] == pytest.approx(_cosine(25, 1e-4, 1e-5, 100))
    assert lrs[100] == pytest.approx(1e-5) and lrs[119] == pytest.approx(1e-5)  # held, not rising again
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_over_its_own_horizon_with_warmup():
    loop = TrainLoopConfig(learning_rate=1e-4, lr_schedule="cosine", lr_min=1e-5, lr_warmup_steps=10,
                           lr_decay_steps=1000, max_steps=200)
    lrs = _lrs(loop, 200)
    for step in (0, 5, 10, 55, 199):
        assert lrs[step] == pytest.approx(_cosine(step, 1e-4, 1e-5, 1000, warmup=10)), step
    assert 9e-5 < lrs[199] < 1e-4  # 190 of 990 decay steps: still near the top


def test_the_authors_horizon_leaves_ten_thousand_steps_near_the_peak():
    """Their base.yaml decays over 650k steps; Table S1's 10k steps see almost none of it."""
    assert _cosine(10_000, 1e-4, 1e-5, 650_000) == pytest.approx(1e-4, rel=1e-3)


def test_unknown_schedule_and_bad_lr_min_are_refused():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-4)
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        make_lr_scheduler(opt, TrainLoopConfig(lr_schedule="linear"), 1)
    with pytest.raises(ConfigError, match="train.lr_min"):
        make_lr_scheduler(opt, TrainLoopConfig(lr_schedule="cosine", learning_rate=1e-4, lr_min=2e-4), 1)


def test_weight_decay_skips_biases_and_norm_gains_when_asked():
    """The authors' create_optimizer gives tensors of fewer than two dimensions no weight decay."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    params = list(net.parameters())
    everywhere = make_optimizer(params, TrainLoopConfig(adam_weight_decay=1e-4))
    assert [g["weight_decay"] for g in everywhere.param_groups] == [1e-4]
    split = make_optimizer(params, TrainLoopConfig(adam_weight_decay=1e-4, weight_decay_on_1d=False))
    by_decay = {g["weight_decay"]: [tuple(p.shape) for p in g["params"]] for g in split.param_groups}
    assert by_decay == {1e-4: [(4, 3, 3, 3)], 0.0: [(4,), (4,), (4,)]}
    # a schedule built on the split optimizer scales both groups
    loop = TrainLoopConfig(learning_rate=1e-4, lr_schedule="cosine", lr_min=1e-5, max_steps=2, weight_decay_on_1d=False)
    sched = make_lr_scheduler(split, loop, 1)
    split.step()
    sched.step()
    assert [g["lr"] for g in split.param_groups] == pytest.approx([5.5e-5, 5.5e-5])
