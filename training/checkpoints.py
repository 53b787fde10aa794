"""A run's checkpoints and everything about resuming from one, in one place.

Checkpoints live in ``<output_dir>/checkpoints/checkpoint-<step:08d>/``.  :func:`write_checkpoint`
lets the caller (the loop kit, :mod:`davae_training.loop`) fill a hidden temporary folder, then
adds ``trainer_state.json``, the run's ``config.yaml`` and ``checksums.json`` (size and SHA-256
of every other file, written last) and renames the folder into place: a kill at any moment leaves
the previous checkpoint intact and never a partial one under a real name.

Resuming: :func:`resolve_resume` picks the checkpoint (``latest`` walks back past damaged ones);
a run with none of its own starts from an earlier phase's when ``train.continue_from`` names one
(:func:`resolve_continue_from`; only the data source may differ, read from its start);
:func:`plan_resume` checks the config against the one the checkpoint was trained with
(:func:`check_resume_config`: which keys may change), :func:`read_trainer_state` reads the step
and data position back and :meth:`ResumePlan.position` adjusts it for a new phase.  :class:`RunCheckpointError` is a run checkpoint that is missing or
damaged; a model file that is refused is :class:`davae_core.CheckpointError`, another meaning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from davae_core.atomic_files import fsync_dir, write_json_atomic, write_text_atomic

from .config import ConfigError, TrainLoopConfig, config_to_dict, flatten_config

logger = logging.getLogger("davae_training")

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
CHECKSUM_FILE = "checksums.json"  # written last: a checkpoint is complete when every file it lists verifies
RUN_CONFIG = "config.yaml"  # the resolved config of a run, in its output_dir
FINAL_DIR = "final"  # end of a run: summary.json (both stages), the trained tensors (stage 2)


class RunCheckpointError(RuntimeError):
    """A run checkpoint to resume or export from is missing, incomplete or damaged."""


@dataclass
class TrainerState:
    """What a checkpoint stores beside the tensors: where the run is."""

    step: int = 0  # optimizer steps completed
    micro_batches: int = 0  # micro-batches this process consumed (data position)
    world_size: int = 1
    engine: str = ""  # "single" | "ddp" | "fsdp2" | "deepspeed" (runtime.ENGINES)
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- folders
def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    name = Path(path).name
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
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def write_run_config(accelerator, output_dir: str | os.PathLike, config: Any) -> None:
    """The resolved config (file + overrides) as ``<output_dir>/config.yaml``: reruns and exports read it."""
    import yaml

    if accelerator.is_main_process:
        write_text_atomic(Path(output_dir) / RUN_CONFIG, yaml.safe_dump(config_to_dict(config), sort_keys=False))


# ---------------------------------------------------------------------------- writing
def write_checkpoint(accelerator, output_dir: str | os.PathLike, state: TrainerState, fill: Callable[[Path], None],
                     total_limit: int | None = None) -> Path:
    """``fill(tmp)`` on every process (it may gather across ranks), then the atomic rename.

    ``fill`` writes the tensors into the temporary folder (the main process, or every rank for an
    engine that writes per-rank files); this function adds the state, the config and the checksums.
    """
    root = checkpoint_dir(output_dir)
    final = root / checkpoint_name(state.step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        tmp.mkdir()
    accelerator.wait_for_everyone()
    fill(tmp)
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
        if final.exists():  # the same step saved again
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in 1 MiB blocks (checkpoint checksums; the stage-2 cache names its DA-VAE by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksums(folder: Path) -> dict[str, Any]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    return {"algorithm": "sha256",
            "files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}}


# ---------------------------------------------------------------------------- verifying and choosing
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
        if file_sha256(f) != want["sha256"]:
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
            raise RunCheckpointError(
                f"--resume latest: no usable checkpoint in {checkpoint_dir(output_dir)}:\n  "
                + "\n  ".join(f"{p.name}: {why}" for p, why in skipped)
                + "\nRestore the damaged files from a backup, or start a new run (no --resume, or another train.output_dir).")
        if latest is None:
            logger.info("--resume latest: no checkpoint in %s yet, starting from step 0", checkpoint_dir(output_dir))
        return latest
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise RunCheckpointError(
            f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); "
            f"use 'latest' or one of {[str(p) for p in list_checkpoints(output_dir)]}")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise RunCheckpointError(f"--resume {resume}: {problem}. Use --resume latest to fall back to the newest intact checkpoint.")
    return path


def tensor_digest(tensors: dict[str, Any]) -> str:
    """SHA-256 over names and float32 bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_trainer_state(path: str | os.PathLike, world_size: int) -> TrainerState:
    state = TrainerState(**json.loads((Path(path) / STATE_FILE).read_text()))
    if state.world_size != world_size:
        logger.warning("checkpoint %s was written with %d processes, now %d: the data order after resume differs "
                       "from an uninterrupted run", path, state.world_size, world_size)
    return state


# ---------------------------------------------------------------------------- what a resume may change
class ResumeConfigError(ConfigError):
    """The resumed config changes keys that would break the exact resume."""


LEARNING_RATE_KEY = "train.learning_rate"
# keys that change neither the data order nor the maths of a step: applied on resume and logged
SAFE_KEYS = frozenset({
    "train.output_dir", "train.max_steps", "train.log_every", "train.checkpoint_every", "train.checkpoints_total_limit",
    "train.image_every", "train.report_to", "train.project_name", "train.dataloader_num_workers",
    "train.gradient_checkpointing", "train.on_nonfinite",
    "data.index_cache", "data.images.index_cache",  # where the file index is cached, not what it holds
    "data.encode_batch_size",  # how many images the frozen DA-VAE encodes at once: same latents
    "train.recipe_global_batch",  # documents the recipe; the launch decides the batch
})
SAFE_SECTIONS = ("export.", "stats.", "sampling.")  # what happens after or beside training
# where the samples come from: a run that continues an earlier phase (train.continue_from) may change
# these, and reads its data from the start (stage 1 has them under data., stage 2 under data.images.)
_DATA_SOURCE_FIELDS = ("sources", "format", "max_images", "verify_images", "hf_image_column", "hf_caption_column",
                       "hf_split", "streaming", "shuffle_buffer")
PHASE_DATA_KEYS = frozenset({f"data.{f}" for f in _DATA_SOURCE_FIELDS} | {f"data.images.{f}" for f in _DATA_SOURCE_FIELDS}
                            | {"data.cache_dir", "train.continue_from"})
# a checkpoint written before a train.* key existed ran with its default
_LOOP_DEFAULTS = {f"train.{f.name}": f.default for f in dataclasses.fields(TrainLoopConfig) if f.default is not dataclasses.MISSING}


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], change_learning_rate: bool,
                        checkpoint: str | os.PathLike, new_phase: bool = False,
                        defaults: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """The keys that differ (``{key: (saved, now)}``) if all may change; otherwise ResumeConfigError.

    ``new_phase``: the checkpoint is an earlier phase's (``train.continue_from``), whose data may differ.
    ``defaults``: the flattened defaults of the run's config class; a key the saved config lacks (the
    checkpoint predates it) ran with its default.
    """
    old, new = flatten_config(saved), flatten_config(current)
    missing = object()
    for key, default in {**_LOOP_DEFAULTS, **(defaults or {})}.items():
        if key not in old and key in new:
            old[key] = default
    diff = {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)}
    show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
    allowed = SAFE_KEYS | PHASE_DATA_KEYS if new_phase else SAFE_KEYS
    unsafe = [k for k in diff if k != LEARNING_RATE_KEY and k not in allowed and not k.startswith(SAFE_SECTIONS)]
    problems = [f"{k}: {show(diff[k][0])} -> {show(diff[k][1])}" for k in unsafe]
    if "train.max_steps" in diff and new.get("train.lr_schedule") == "cosine" and new.get("train.lr_decay_steps") is None:
        problems.append(f"train.max_steps: {show(diff['train.max_steps'][0])} -> {show(diff['train.max_steps'][1])} "
                        "(the cosine learning rate decays over max_steps; set train.lr_decay_steps="
                        f"{show(diff['train.max_steps'][0])} to keep its curve)")
    if LEARNING_RATE_KEY in diff and not change_learning_rate:
        problems.append(f"{LEARNING_RATE_KEY}: {show(diff[LEARNING_RATE_KEY][0])} -> {show(diff[LEARNING_RATE_KEY][1])} "
                        "(the optimizer state holds the old rate; add --change-learning-rate to apply the new one)")
    if problems:
        raise ResumeConfigError(
            f"--resume from {checkpoint}: the config differs from the one this checkpoint was trained with in "
            f"key(s) that break an exact resume:\n  " + "\n  ".join(problems) +
            "\nPut the old values back (they are in " + str(Path(checkpoint) / RUN_CONFIG) + "), or start a new run "
            "(no --resume, or another train.output_dir).")
    return {k: (None if a is missing else a, None if b is missing else b) for k, (a, b) in diff.items()}


@dataclass
class ResumePlan:
    """A verified checkpoint to resume from, and the config changes it accepted."""

    path: Path
    changes: dict[str, tuple[Any, Any]]
    learning_rate: float | None = None  # a new base learning rate to apply after loading
    new_phase: bool = False  # an earlier phase's checkpoint (train.continue_from): its data position is not ours

    def position(self, state: TrainerState) -> TrainerState:
        """The loaded ``state`` as this run starts from it: a new phase reads its own data from the start."""
        if self.new_phase:  # the earlier phase's data position means nothing for this phase's data
            state.micro_batches = 0
            logger.info("continuing an earlier phase at step %d; this phase's data is read from its start", state.step)
        return state


def plan_resume(resume: str | None, config: Any, change_learning_rate: bool = False) -> ResumePlan | None:
    """Pick and verify the checkpoint and check the config against the one it was trained with.

    Call before :func:`write_run_config`, so the run config says what the resumed run uses.
    """
    import yaml

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
        raise RunCheckpointError(f"{path}: no {RUN_CONFIG}, so the config cannot be compared; start a new run")
    saved = yaml.safe_load(saved_file.read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(config_to_dict(config), sort_keys=False))  # tuples -> lists, as saved
    defaults = yaml.safe_load(yaml.safe_dump(config_to_dict(type(config)()), sort_keys=False))
    changes = check_resume_config(saved, current, change_learning_rate, path, new_phase, flatten_config(defaults))
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
            raise RunCheckpointError(f"train.continue_from={where}: {problem}")
        return path
    latest, skipped = latest_complete_checkpoint(path)
    if latest is None:
        damaged = "".join(f"\n  {p.name}: {why}" for p, why in skipped)
        raise RunCheckpointError(f"train.continue_from={where}: no intact checkpoint in {checkpoint_dir(path)}{damaged}\n"
                                 "Train the earlier phase first (its train.output_dir), or name one of its checkpoint folders.")
    logger.info("train.continue_from: %s", latest)
    return latest


def apply_learning_rate(optimizer, lr_scheduler, learning_rate: float) -> None:
    """Make a resumed optimizer and scheduler use ``learning_rate`` as their base rate from now on.

    Loading restores the old base rate into both; the scheduler's factor at the current step
    (warm-up, decay) is kept, only the base changes.
    """
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the torch scheduler
    for i, group in enumerate(optimizer.param_groups):
        old_base = sched.base_lrs[i]
        factor = group["lr"] / old_base if old_base else 1.0
        sched.base_lrs[i] = learning_rate
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]
