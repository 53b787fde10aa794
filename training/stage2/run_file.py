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

from ..common import FINAL_DIR, RUN_CONFIG, latest_complete_checkpoint
from ..config import load_config
from .config import AdapterTrainConfig
from .model import build_adapter_model, load_trained_state_dict, trained_parameters, unwrap

logger = logging.getLogger("davae_training")

TRAINED_FILE = "adapter_trained.safetensors"
EMA_FILE = "adapter_trained_ema.safetensors"


def save_trained(model: torch.nn.Module, ema, folder: str | os.PathLike) -> None:
    """Only what stage 2 trains (LoRA, P, P', O, O'), and its EMA, as safetensors."""
    folder = Path(folder)
    params = trained_parameters(unwrap(model))
    save_file({n: p.detach().float().cpu().contiguous() for n, p in params.items()}, str(folder / TRAINED_FILE))
    if ema is not None:
        shadow = {n: s.detach().float().cpu().contiguous() for n, s in zip(params, ema.shadow_params)}
        save_file(shadow, str(folder / EMA_FILE), metadata={"optimization_step": str(ema.optimization_step)})


def read_trained(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_trained(model: torch.nn.Module, ema, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    state, _ = read_trained(folder / TRAINED_FILE)
    load_trained_state_dict(unwrap(model), state, str(folder / TRAINED_FILE))
    if ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise FileNotFoundError(f"{folder / EMA_FILE}: missing; this run has an EMA (model.ema_decay > 0) but the checkpoint has none")
        shadow, meta = read_trained(folder / EMA_FILE)
        names = list(trained_parameters(unwrap(model)))
        with torch.no_grad():
            for name, s in zip(names, ema.shadow_params):
                s.copy_(shadow[name].to(s))
        ema.optimization_step = int(meta.get("optimization_step", 0))


def stock_head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The current P and O (``pos_embed.proj``/``proj_out`` of the stock model) as CPU copies."""
    net = unwrap(model)
    layers = {"pos_embed.proj": net.pos_embed.proj.stock, "proj_out": net.proj_out.stock}
    return {f"{name}.{k}": v.detach().float().cpu().clone() for name, layer in layers.items() for k, v in layer.state_dict().items()}


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
