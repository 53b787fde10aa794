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
import logging
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
    # after the warm-up: "constant", or "cosine" from learning_rate down to lr_min at lr_decay_steps
    # (None: max_steps), held there after (optimizers.make_lr_scheduler)
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    lr_decay_steps: int | None = None
    weight_decay_on_1d: bool = True  # False: biases and norm gains get no weight decay (the authors' stage 1)
    # the global batch (batch_size x gradient_accumulation_steps x processes) the config's recipe is
    # written for; the trainers log what a launch gives and the accumulation that reaches it
    recipe_global_batch: int | None = None
    # a run folder (its newest intact checkpoint) or a checkpoint of an EARLIER PHASE this run starts
    # from when it has no checkpoint of its own (e.g. stage 2's realism phase); it may use other
    # data (checkpoints.PHASE_DATA_KEYS), read from its start
    continue_from: str | None = None

    def __post_init__(self) -> None:
        if self.mixed_precision == "False":  # YAML 1.1 reads a bare `no` as false
            self.mixed_precision = "no"
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(f"train.mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError(f"train.batch_size ({self.batch_size}) and train.gradient_accumulation_steps "
                              f"({self.gradient_accumulation_steps}) must be >= 1")


def global_batch(loop: TrainLoopConfig, processes: int) -> int:
    """Samples per optimizer step: ``batch_size`` is per process and per micro-batch."""
    return loop.batch_size * loop.gradient_accumulation_steps * processes


def reach_recipe_batch(loop: TrainLoopConfig, processes: int, target: int) -> str:
    """The overrides that make the global batch ``target`` on ``processes`` processes, keeping
    ``batch_size`` when a whole accumulation count does it, else the largest batch_size that does."""
    if target % processes:
        return f"no setting gives {target} on {processes} processes: use a process count that divides {target}"
    per_process = target // processes
    batch = max(b for b in range(1, min(loop.batch_size, per_process) + 1) if per_process % b == 0)
    keep = "" if batch == loop.batch_size else f"--set train.batch_size={batch} "
    return f"{keep}--set train.gradient_accumulation_steps={per_process // batch}"


def log_global_batch(loop: TrainLoopConfig, processes: int) -> int:
    """Log the global batch a launch gives; when it is not the recipe's, say how to reach it."""
    log = logging.getLogger("davae_training")
    got = global_batch(loop, processes)
    how = (f"global batch {got} = train.batch_size {loop.batch_size} per process x gradient_accumulation_steps "
           f"{loop.gradient_accumulation_steps} x {processes} process(es)")
    target = loop.recipe_global_batch
    if target is None or got == target:
        log.info("%s%s", how, "" if target is None else " (the recipe's batch)")
    else:
        log.warning("%s, but this config's recipe is written for a global batch of %d; on %d process(es): %s",
                    how, target, processes, reach_recipe_batch(loop, processes, target))
    return got


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
