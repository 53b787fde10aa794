"""Config files of both trainers: YAML -> typed dataclasses (OmegaConf structured configs).

:class:`TrainLoopConfig` is the ``train:`` section every trainer has; each stage adds its own
sections (``davae_training.stage1.config``, ``davae_training.stage2.config``).  A config is a
plain dataclass object: build it in Python (``AdapterTrainConfig(train=TrainLoopConfig(...))``)
or from a YAML file plus ``key=value`` overrides with :func:`load_config`; OmegaConf checks the
keys and converts the values to the fields' types, then the dataclasses' own ``__post_init__``
checks the values.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

MIXED_PRECISIONS = ("no", "fp16", "bf16")


class ConfigError(ValueError):
    """A config file or override that does not fit the trainer's config schema."""


# ---------------------------------------------------------------------------- configs
@dataclass
class TrainLoopConfig:
    """Settings every trainer's loop has; embedded as ``train:`` in both stages' YAML."""

    output_dir: str = "runs/davae"
    seed: int = 0
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 1  # per process, per micro-batch
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate)
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 500  # optimizer steps between checkpoints (0: only the final one)
    checkpoints_total_limit: int | None = 3  # keep this many newest; None keeps all
    log_every: int = 10
    image_every: int = 500  # reconstruction / sample grids; 0 disables
    report_to: str = "tensorboard"  # any accelerate tracker name, "all" or "none"
    project_name: str = "davae"
    dataloader_num_workers: int = 2
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # "adamw" | "adamw_8bit" (bitsandbytes; see optimizers.py)
    allow_tf32: bool = True
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" that optimizer step

    def __post_init__(self) -> None:
        if self.mixed_precision == "False":  # YAML 1.1 reads a bare `no` as false
            self.mixed_precision = "no"
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(f"train.mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError(f"train.batch_size ({self.batch_size}) and train.gradient_accumulation_steps "
                              f"({self.gradient_accumulation_steps}) must be >= 1")


def load_config(cls: type, path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> Any:
    """YAML file (optional) + ``key=value`` overrides (values parsed as YAML) -> an instance of ``cls``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where = "config"
    layers = [OmegaConf.structured(cls)]
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass --config with a YAML file (see training/configs/)")
        try:
            data = OmegaConf.load(p)
        except Exception as e:  # yaml's own errors, e.g. a tab or an unclosed bracket
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if not OmegaConf.is_dict(data):
            raise ConfigError(f"{p}: the top level must be a mapping")
        layers.append(data)
    overrides = list(overrides)
    for text in overrides:
        if "=" not in text or not text.split("=", 1)[0].strip():
            raise ConfigError(f"override {text!r} must look like key.sub=value")
    try:
        layers.append(OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_first_lines(e)}") from None


def _first_lines(error: Exception) -> str:
    """OmegaConf's message and the key it is about, without its object dump."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    keep = [lines[0]] + [ln for ln in lines[1:] if ln.startswith("full_key:")]
    return "; ".join(keep)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists (what ``config.yaml`` holds)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(config))


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}`` (resume diffs, tracker hyperparameters)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten_config(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--config``, repeated ``--set key=value`` and ``--resume latest|PATH``."""
    parser.add_argument("--config", required=True, help="YAML config (see training/configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config entry, e.g. --set train.max_steps=100 (repeatable; value parsed as YAML)",
    )
    parser.add_argument(
        "--resume", default=None, metavar="latest|PATH",
        help="continue from the newest checkpoint in output_dir ('latest') or from a checkpoint folder",
    )
    parser.add_argument(
        "--change-learning-rate", action="store_true",
        help="with --resume: apply train.learning_rate even though the checkpoint was trained with another one",
    )
    return parser
