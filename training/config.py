"""Config files of both trainers: YAML -> nested dataclasses, with ``--set key=value`` overrides.

:class:`TrainLoopConfig` is the ``train:`` section every trainer has; each stage adds its own
sections (``davae_training.stage1.config``, ``davae_training.stage2.config``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


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
    checkpoint_every: int = 500  # optimizer steps between save_state
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
    # data (run_safety.PHASE_DATA_KEYS), read from its start
    continue_from: str | None = None


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


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return dataclass_from_dict(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    if tp is str and isinstance(value, bool):
        return "yes" if value else "no"  # YAML 1.1 reads a bare `no` (mixed_precision=no) as False
    if tp is str and isinstance(value, (int, float)):
        return str(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, bool, str) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    origin = typing.get_origin(tp)
    if origin is list and isinstance(value, str):
        value = [value]  # --set data.sources=/one/folder
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") if inner is not Any else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value


def dataclass_from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build ``cls`` from a (nested) dict; unknown keys are errors that list the known ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=10"`` -> (["train", "max_steps"], 10); the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_config(cls: type, path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> Any:
    """YAML file (optional) + ``key=value`` overrides -> an instance of the dataclass ``cls``."""
    import yaml

    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass --config with a YAML file (see training/configs/)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    return dataclass_from_dict(cls, data, where)


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
