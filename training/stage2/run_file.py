"""The files of a stage-2 run: its config, the trained tensors (and EMA) of each checkpoint, ``final/``.

Only what stage 2 trains (LoRA, P, P', O, O') is written, as safetensors; the frozen base never
goes into a run folder.  :func:`load_run_for_export` rebuilds a run's model from these files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoints import FINAL_DIR, RUN_CONFIG, latest_complete_checkpoint
from ..config import load_config
from .config import AdapterTrainConfig
from .model import AdapterModel, build_adapter_model, load_trained_state_dict, stock_head_state

logger = logging.getLogger("davae_training")

TRAINED_FILE = AdapterModel.weights_file
EMA_FILE = AdapterModel.ema_file


def save_trained(trained: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], folder: str | os.PathLike,
                 ema_step: int = 0) -> None:
    """Whole trained tensors (and their EMA, when there is one) as safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.float().contiguous() for n, t in trained.items()}, str(folder / TRAINED_FILE))
    if ema:
        save_file({n: t.float().contiguous() for n, t in ema.items()}, str(folder / EMA_FILE),
                  metadata={"optimization_step": str(ema_step)})


def read_trained(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def run_info(cfg: AdapterTrainConfig, source: str, ema: bool) -> dict[str, Any]:
    """What the exported files say about how they were made."""
    return {"source": source, "base_model": cfg.model.pretrained, "lora_rank": cfg.model.lora_rank,
            "lora_alpha": cfg.model.lora_alpha, "text_encoder": cfg.text.kind, "ema": ema,
            "detail_warmup_steps": cfg.objective.detail_warmup_steps, "prediction": cfg.objective.prediction,
            "resolution": cfg.data.images.resolution}


def load_run_for_export(run_dir: str | os.PathLike, checkpoint: str = "latest", use_ema: bool = True):
    """A run's adapter model with its trained (or EMA) tensors, the base P/O, and info for the files."""
    run = Path(run_dir)
    if not (run / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"{run}: no {RUN_CONFIG}; pass the output_dir of a stage-2 run")
    cfg = load_config(AdapterTrainConfig, run / RUN_CONFIG)
    if checkpoint == "final":
        folder = run / FINAL_DIR
    elif checkpoint == "latest":
        folder = run / FINAL_DIR if (run / FINAL_DIR / TRAINED_FILE).is_file() else latest_complete_checkpoint(run)[0]
        if folder is None:
            raise FileNotFoundError(f"{run}: no checkpoint and no final/ yet")
    else:
        folder = Path(checkpoint)
    transformer = build_adapter_model(cfg.model, gradient_checkpointing=False).eval()
    base_state = stock_head_state(transformer)
    name = EMA_FILE if use_ema and (folder / EMA_FILE).is_file() else TRAINED_FILE
    if use_ema and name != EMA_FILE:
        logger.warning("%s: no EMA weights, exporting the raw trained weights", folder)
    state, _ = read_trained(folder / name)
    load_trained_state_dict(transformer, state, str(folder / name))
    return transformer, base_state, run_info(cfg, str(folder / name), name == EMA_FILE)
