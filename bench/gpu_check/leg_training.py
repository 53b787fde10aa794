"""Leg 4: the trainers' own steps (``davae_training.preflight``'s builders and ``run_steps``, the
loop kit's engine: AdamW, EMA, the non-finite guard) beside ``bench.plan``'s prediction for the
same setting.

Stage 2 as ``sd35m_1024.yaml`` trains from a latent cache (bf16 base, gradient checkpointing, bf16
autocast) at each micro-batch of ``Sizes.train_batches``; stage 1 as ``tokenizer_sd3_paper.yaml``,
one step at 1024 at its own micro-batch.  The first step of each is a warm-up and not timed.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from .. import common
from . import memory
from .settings import GIB, Sizes

STAGE2_CONFIG = common.REPO_DIR / "training" / "configs" / "sd35m_1024.yaml"
STAGE1_CONFIG = common.REPO_DIR / "training" / "configs" / "tokenizer_sd3_paper.yaml"
PLAN_GPU = "H100 80GB"  # what bench.plan projects for; the check's own GPU is in the JSON's machine


def stage2_overrides(batch: int, sizes: Sizes, seed: int = 0) -> list[str]:
    return [f"train.seed={seed}", f"train.batch_size={batch}", "train.gradient_checkpointing=true", "model.base_dtype=bfloat16",
            "train.mixed_precision=bf16", "data.cache_dir=latent-cache", f"data.images.resolution={sizes.train_resolution}"]


def stage1_overrides(sizes: Sizes, seed: int = 0) -> list[str]:
    return [f"train.seed={seed}", f"data.resolution={sizes.stage1_resolution}", "train.gradient_checkpointing=true", "train.mixed_precision=bf16"]


def _measure(run, device: torch.device, batch: int) -> dict[str, Any]:
    """``run()`` -> the step seconds of the trainers' run; samples/s from the median of the timed steps."""
    with memory.peak(device) as mem:
        info = run()
    seconds = info.pop("step_seconds")
    timed = seconds[1:] or seconds
    median = statistics.median(timed)
    return {"setting": info, "step_seconds": [round(s, 4) for s in seconds], "warmup_steps": len(seconds) - len(timed),
            "median_step_s": round(median, 4), "samples_per_s": round(batch / median, 4), "peak_memory": mem}


def _prediction(entry: dict[str, Any]) -> dict[str, Any]:
    from ..plan import GPUS, DEFAULT_MFU

    rate = GPUS[PLAN_GPU]["bf16_tflops"] * 1e12 * DEFAULT_MFU
    return {"gpu": PLAN_GPU, "mfu": DEFAULT_MFU, "train_tflop_per_sample": round(entry["train_flops_per_sample"] / 1e12, 3),
            "samples_per_s": round(rate / entry["train_flops_per_sample"], 4),
            "memory_gib": round(entry["memory_bytes"]["total_estimate"] / GIB, 3)}


def stage2(batch: int, sizes: Sizes, device: torch.device, seed: int = 0) -> dict[str, Any]:
    from davae_training.config import load_config
    from davae_training.preflight import run_stage2
    from davae_training.stage2.config import AdapterTrainConfig

    from ..plan import stage2_plan

    overrides = stage2_overrides(batch, sizes, seed)
    cfg = load_config(AdapterTrainConfig, STAGE2_CONFIG, overrides)
    steps = 1 + sizes.train_timed_steps
    result = _measure(lambda: run_stage2(cfg, steps, sizes.toy, device, log=print), device, batch)
    result["setting"]["ema_decay"] = cfg.model.ema_decay
    result["setting"]["on_nonfinite"] = "stop (preflight's engine: the guard checks every step)"
    result.update(config=STAGE2_CONFIG.name, overrides=overrides, plan=_prediction(stage2_plan(STAGE2_CONFIG.stem, cfg, toy=sizes.toy)))
    return result


def stage1(sizes: Sizes, device: torch.device, seed: int = 0) -> dict[str, Any]:
    from davae_training.config import load_config
    from davae_training.preflight import run_stage1
    from davae_training.stage1.config import TokenizerTrainConfig

    from ..plan import stage1_plan

    overrides = stage1_overrides(sizes, seed)
    cfg = load_config(TokenizerTrainConfig, STAGE1_CONFIG, overrides)
    result = _measure(lambda: run_stage1(cfg, 2, sizes.toy, device, log=print), device, cfg.train.batch_size)
    result.update(config=STAGE1_CONFIG.name, overrides=overrides, plan=_prediction(stage1_plan(STAGE1_CONFIG.stem, cfg, toy=sizes.toy)))
    return result


def run(sizes: Sizes, device: torch.device, seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"stage2": {}}
    for batch in sizes.train_batches:
        print(f"gpu_check training: stage 2, micro-batch {batch}", flush=True)
        out["stage2"][str(batch)] = stage2(batch, sizes, device, seed)
        memory.release(device)
    print("gpu_check training: stage 1", flush=True)
    out["stage1"] = stage1(sizes, device, seed)
    memory.release(device)
    return out
