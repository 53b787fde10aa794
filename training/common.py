"""Plumbing shared by both trainers: configs, seeding, accelerate, checkpoints, logging, images.

Stable API (stage 1 and stage 2 build on it):

* configs: :class:`TrainLoopConfig` (the loop settings every trainer has), :func:`load_config`
  (YAML -> nested dataclasses, with ``--set key=value`` overrides), :func:`config_to_dict`,
  :func:`add_common_arguments`;
* runtime: :func:`seed_everything`, :func:`make_accelerator`, :func:`init_trackers`,
  :func:`setup_logging`, :func:`progress_bar`, :func:`prepare_deepspeed_batch_size`;
* checkpoints: :func:`save_checkpoint` (atomic), :func:`find_latest_checkpoint`,
  :func:`resolve_resume`, :func:`load_checkpoint` -> :class:`TrainerState`;
* :func:`maybe_inject_fault` (test hook: exit hard after step k), :func:`save_image_grid`,
  :func:`parameter_digest`.

Checkpoints live in ``<output_dir>/checkpoints/checkpoint-<step:08d>/`` and are written by
``accelerator.save_state`` into a hidden temporary folder that is renamed into place only once
complete, so a kill at any moment leaves the previous checkpoint intact and never a partial one
under a real name.  (accelerate's ``automatic_checkpoint_naming`` numbers saves rather than steps
and writes in place, so we name by step ourselves; ``ProjectConfiguration`` still sets the project
and logging folders.)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

logger = logging.getLogger("davae_training")

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
FAULT_ENV = "DAVAE_FAULT_AFTER_STEP"  # test hook: os._exit after this optimizer step


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
    return parser


# ---------------------------------------------------------------------------- runtime
def seed_everything(seed: int) -> None:
    """Same seed on every process: model init and data order must agree across ranks."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_accelerator(loop: TrainLoopConfig, cpu: bool | None = None):
    """An ``Accelerator`` with the loop's precision, accumulation, trackers and project folders."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(loop.output_dir)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    report = None if loop.report_to in ("none", "", None) else loop.report_to
    kwargs: dict[str, Any] = {}
    if cpu is None and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cpu = True  # accelerate only sets up gloo (MULTI_CPU) for torchrun/mpirun workers when told cpu=True
    if cpu is not None:
        kwargs["cpu"] = cpu
    accelerator = Accelerator(
        mixed_precision=loop.mixed_precision,
        gradient_accumulation_steps=loop.gradient_accumulation_steps,
        log_with=report,
        project_config=project,
        **kwargs,
    )
    if loop.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def prepare_deepspeed_batch_size(accelerator, batch_size: int) -> None:
    """DeepSpeed wants the micro-batch size; our data loaders are not passed to ``prepare``."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


def _flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            flat[key] = v
        else:
            flat[key] = str(v)  # tensorboard's hparams take scalars and strings only
    return flat


def init_trackers(accelerator, loop: TrainLoopConfig, config: Any) -> None:
    if loop.report_to not in ("none", "", None):
        accelerator.init_trackers(loop.project_name, config=_flat_scalars(config_to_dict(config)))


def setup_logging(accelerator, output_dir: str | os.PathLike) -> None:
    """INFO to stderr on the main process (warnings everywhere) and to ``<output_dir>/train.log``.

    Records still propagate to the root logger, so an application (or pytest) that configured
    logging keeps seeing them; the stderr handler is only added when the root has none.
    """
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    for h in [h for h in logger.handlers if getattr(h, "_davae_training", False)]:
        logger.removeHandler(h)
        h.close()
    handlers: list[logging.Handler] = []
    if not logging.getLogger().handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    if accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._davae_training = True  # ours to replace on the next call
        logger.addHandler(h)


def progress_bar(accelerator, total: int, initial: int = 0, desc: str = "train"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class TrainerState:
    """What a checkpoint stores beside accelerate's own files (models, optimisers, RNG)."""

    step: int = 0  # optimizer steps completed
    micro_batches: int = 0  # micro-batches this process consumed (data position)
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    try:
        return int(name[len(CHECKPOINT_PREFIX):])
    except ValueError:
        return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed into place, with a trainer state), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := _checkpoint_step(p)) is not None and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: TrainerState, total_limit: int | None = None) -> Path:
    """``accelerator.save_state`` into a temporary folder, then an atomic rename to ``checkpoint-<step>``.

    Call on every process (sharded DeepSpeed/FSDP states are written by each rank).
    """
    root = checkpoint_dir(output_dir)
    name = f"{CHECKPOINT_PREFIX}{state.step:08d}"
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, dataclasses.asdict(state))
        for p in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``None`` -> fresh start; ``"latest"`` -> newest complete checkpoint or fresh; else a folder."""
    if not resume:
        return None
    if resume == "latest":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            logger.info("--resume latest: no checkpoint in %s yet, starting from step 0", checkpoint_dir(output_dir))
        return latest
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); "
            f"use 'latest' or one of {[str(p) for p in list_checkpoints(output_dir)]}"
        )
    return path


def load_checkpoint(accelerator, path: str | os.PathLike) -> TrainerState:
    """Restore models, optimisers, schedulers and RNG through accelerate; return the trainer state."""
    path = Path(path)
    accelerator.load_state(str(path))
    data = json.loads((path / STATE_FILE).read_text())
    state = TrainerState(**data)
    if state.world_size != accelerator.num_processes:
        logger.warning(
            "checkpoint %s was written with %d processes, now %d: the data order after resume differs "
            "from an uninterrupted run", path, state.world_size, accelerator.num_processes,
        )
    logger.info("resumed from %s at step %d", path, state.step)
    return state


def maybe_inject_fault(step: int) -> None:
    """Test hook: with ``DAVAE_FAULT_AFTER_STEP=k`` the process dies hard (no cleanup) after step k."""
    target = os.environ.get(FAULT_ENV)
    if target is not None and int(target) == step:
        sys.stderr.write(f"{FAULT_ENV}={target}: exiting hard after step {step}\n")
        sys.stderr.flush()
        os._exit(17)


# ---------------------------------------------------------------------------- images and digests
def to_uint8_image(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    arr = img.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return arr.permute(1, 2, 0).numpy()


def save_image_grid(rows: list[torch.Tensor], path: str | os.PathLike, padding: int = 2) -> Path:
    """Rows of (B, 3, H, W) images in [0, 1] (same B, H, W) -> one PNG; written atomically."""
    from PIL import Image

    if not rows:
        raise ValueError("save_image_grid needs at least one row")
    b, _, h, w = rows[0].shape
    for r in rows:
        if r.shape[0] != b or r.shape[-2:] != (h, w):
            raise ValueError(f"all grid rows must be (B={b}, 3, {h}, {w}); got {tuple(r.shape)}")
    canvas = np.full((len(rows) * (h + padding) + padding, b * (w + padding) + padding, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j in range(b):
            y, x = padding + i * (h + padding), padding + j * (w + padding)
            canvas[y:y + h, x:x + w] = to_uint8_image(row[j])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(canvas).save(tmp)
    os.replace(tmp, path)
    return path


def parameter_digest(module: torch.nn.Module, trainable_only: bool = False) -> str:
    """SHA-256 over parameter names and bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if trainable_only and not p.requires_grad:
            continue
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
