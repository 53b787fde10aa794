"""Plumbing shared by both trainers: seeding, accelerate, checkpoints, logging, images.

Stable API (stage 1 and stage 2 build on it):

* configs live in :mod:`davae_training.config`;
* runtime: :func:`seed_everything`, :func:`make_accelerator`, :func:`init_trackers`,
  :func:`setup_logging`, :func:`progress_bar`, :func:`prepare_deepspeed_batch_size`;
* checkpoints: :func:`save_checkpoint` (atomic, checksummed), :func:`find_latest_checkpoint`,
  :func:`verify_checkpoint`, :func:`latest_complete_checkpoint`, :func:`resolve_resume`,
  :func:`plan_resume` + :func:`resume_from` (verified checkpoint, config diff) -> :class:`TrainerState`;
* :func:`maybe_inject_fault` (test hook: exit hard after step k), :func:`save_image_grid`,
  :func:`parameter_digest`.

Checkpoints live in ``<output_dir>/checkpoints/checkpoint-<step:08d>/`` and are written by
``accelerator.save_state`` into a hidden temporary folder that is renamed into place only once
complete, so a kill at any moment leaves the previous checkpoint intact and never a partial one
under a real name.  ``checksums.json`` (size and SHA-256 of every other file) is written last;
a checkpoint whose files do not all verify is skipped by ``--resume latest``.  (accelerate's ``automatic_checkpoint_naming`` numbers saves rather than steps
and writes in place, so we name by step ourselves; ``ProjectConfiguration`` still sets the project
and logging folders.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from davae_core.atomic_files import atomic_write, fsync_dir, write_json_atomic, write_text_atomic

from .config import TrainLoopConfig, config_to_dict

logger = logging.getLogger("davae_training")

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
CHECKSUM_FILE = "checksums.json"  # written last: a checkpoint is complete when every file it lists verifies
RUN_CONFIG = "config.yaml"  # the resolved config of a run, in its output_dir
FINAL_DIR = "final"  # end of a run: summary.json (both stages), the trained tensors (stage 2)
FAULT_ENV = "DAVAE_FAULT_AFTER_STEP"  # test hook: os._exit after this optimizer step


# ---------------------------------------------------------------------------- runtime
def seed_everything(seed: int) -> None:
    """Same seed on every process: model init and data order must agree across ranks."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, *parts: int | str) -> int:
    """A seed for one draw (a micro-batch's noise, an epoch's shuffle) from the run's seed.

    A pure function of its arguments, so a resumed run redraws exactly what the uninterrupted
    one drew, without saving any RNG state; hashing keeps nearby parts' seeds unrelated.
    """
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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


def write_run_config(accelerator, output_dir: str | os.PathLike, config: Any) -> None:
    """The resolved config (file + overrides) as ``<output_dir>/config.yaml``: reruns and exports read it."""
    import yaml

    if accelerator.is_main_process:
        write_text_atomic(Path(output_dir) / RUN_CONFIG, yaml.safe_dump(config_to_dict(config), sort_keys=False))


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


def setup_plain_logging() -> None:
    """Log to stderr outside a training run (exports, evaluation)."""
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)


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
    """Checkpoint folders renamed into place, oldest first (:func:`verify_checkpoint` says which are intact)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := _checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


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
        run_config = Path(output_dir) / RUN_CONFIG
        if run_config.is_file():  # the config this state was trained with: resume compares against it
            shutil.copyfile(run_config, tmp / RUN_CONFIG)
        write_json_atomic(tmp / CHECKSUM_FILE, _checksums(tmp))
        for p in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksums(folder: Path) -> dict[str, Any]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    return {"algorithm": "sha256",
            "files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """``None`` when every file of the checkpoint is present and matches its checksum, else the problem."""
    path = Path(path)
    listing = path / CHECKSUM_FILE
    if not listing.is_file():
        return f"{listing} is missing (the save did not finish, or an older version wrote it)"
    try:
        files = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{listing} is damaged (not the JSON the trainer writes)"
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f} has {size} bytes, {want['size']} were written (truncated or replaced)"
        if _sha256(f) != want["sha256"]:
            return f"{f} does not match its checksum (overwritten or corrupted in place)"
    return None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint whose files all verify, [(newer damaged checkpoint, problem), ...])."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``None`` -> fresh start; ``"latest"`` -> newest complete checkpoint or fresh; else a folder.

    ``latest`` walks back past damaged checkpoints (logging each and why) and refuses only when
    checkpoints exist but none verifies; an explicit folder must verify.
    """
    if not resume:
        return None
    if resume == "latest":
        latest, skipped = latest_complete_checkpoint(output_dir)
        for path, problem in skipped:
            logger.warning("--resume latest: skipping %s: %s", path.name, problem)
        if latest is None and skipped:
            raise CheckpointError(
                f"--resume latest: no usable checkpoint in {checkpoint_dir(output_dir)}:\n  "
                + "\n  ".join(f"{p.name}: {why}" for p, why in skipped)
                + "\nRestore the damaged files from a backup, or start a new run (no --resume, or another train.output_dir).")
        if latest is None:
            logger.info("--resume latest: no checkpoint in %s yet, starting from step 0", checkpoint_dir(output_dir))
        return latest
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); "
            f"use 'latest' or one of {[str(p) for p in list_checkpoints(output_dir)]}"
        )
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"--resume {resume}: {problem}. Use --resume latest to fall back to the newest intact checkpoint.")
    return path


@dataclass
class ResumePlan:
    """A verified checkpoint to resume from, and the config changes it accepted."""

    path: Path
    changes: dict[str, tuple[Any, Any]]
    learning_rate: float | None = None  # a new base learning rate to apply after loading
    new_phase: bool = False  # an earlier phase's checkpoint (train.continue_from): its data position is not ours


def plan_resume(resume: str | None, config: Any, change_learning_rate: bool = False) -> ResumePlan | None:
    """Pick and verify the checkpoint and check the config against the one it was trained with.

    Call before :func:`write_run_config`, so the run config says what the resumed run uses.
    """
    import yaml

    from .run_safety import LEARNING_RATE_KEY, check_resume_config

    path = resolve_resume(resume, config.train.output_dir)
    new_phase = path is None and bool(config.train.continue_from)
    if new_phase:  # no checkpoint of its own yet: start where the earlier phase ended
        path = resolve_continue_from(config.train.continue_from)
    if path is None:
        if change_learning_rate:
            logger.info("--change-learning-rate: nothing to resume, train.learning_rate is used from step 0")
        return None
    saved_file = path / RUN_CONFIG
    if not saved_file.is_file():
        raise CheckpointError(f"{path}: no {RUN_CONFIG}, so the config cannot be compared; start a new run")
    saved = yaml.safe_load(saved_file.read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(config_to_dict(config), sort_keys=False))  # tuples -> lists, as saved
    changes = check_resume_config(saved, current, change_learning_rate, path, new_phase)
    for key, (old, new) in changes.items():
        logger.info("resume: %s changed %r -> %r (applied)", key, old, new)
    new_lr = changes[LEARNING_RATE_KEY][1] if LEARNING_RATE_KEY in changes else None
    return ResumePlan(path, changes, float(new_lr) if new_lr is not None else None, new_phase)


def resolve_continue_from(where: str) -> Path:
    """``train.continue_from``: a checkpoint folder, or a run folder's newest intact checkpoint."""
    path = Path(where)
    if (path / STATE_FILE).is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"train.continue_from={where}: {problem}")
        return path
    latest, skipped = latest_complete_checkpoint(path)
    if latest is None:
        damaged = "".join(f"\n  {p.name}: {why}" for p, why in skipped)
        raise CheckpointError(f"train.continue_from={where}: no intact checkpoint in {checkpoint_dir(path)}{damaged}\n"
                              "Train the earlier phase first (its train.output_dir), or name one of its checkpoint folders.")
    logger.info("train.continue_from: %s", latest)
    return latest


def resume_from(accelerator, plan: ResumePlan | None, optimizer, lr_scheduler) -> TrainerState:
    """Load the planned checkpoint (or a fresh state) and apply an accepted learning-rate change."""
    if plan is None:
        return TrainerState(world_size=accelerator.num_processes)
    state = load_checkpoint(accelerator, plan.path)
    if plan.new_phase:  # the earlier phase's data position means nothing for this phase's data
        state.micro_batches = 0
        logger.info("continuing an earlier phase at step %d; this phase's data is read from its start", state.step)
    if plan.learning_rate is not None:
        from .run_safety import apply_learning_rate

        apply_learning_rate(optimizer, lr_scheduler, plan.learning_rate)
        logger.info("resume: learning rate set to %g (was %g in the checkpoint)", plan.learning_rate,
                    plan.changes["train.learning_rate"][0])
    return state


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


def save_final_checkpoint(accelerator, output_dir: str | os.PathLike, state: TrainerState, total_limit: int | None = None) -> Path:
    """The checkpoint of the last step, unless the loop has just written it."""
    latest = find_latest_checkpoint(output_dir)
    if latest is not None and latest.name == f"{CHECKPOINT_PREFIX}{state.step:08d}":
        return latest
    return save_checkpoint(accelerator, output_dir, state, total_limit)


def gather_rank_digests(accelerator, module: torch.nn.Module) -> dict[str, Any]:
    """Every rank's digest of its trained weights; after data-parallel training they must agree."""
    from accelerate.utils import gather_object

    digests = gather_object([parameter_digest(module, trainable_only=True)])
    in_sync = len(set(digests)) == 1
    if not in_sync:
        logger.error("trained weights differ between ranks: %s", digests)
    return {"world_size": accelerator.num_processes, "rank_digests": digests, "ranks_in_sync": in_sync}


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
    with atomic_write(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
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
