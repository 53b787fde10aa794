"""Guards both trainers share so that a run is never silently lost or poisoned.

* :class:`OutputLock`: one run per output folder (owner host and pid in ``run.lock``; a lock whose
  process died on this host is stale and taken over; a lock from another host is refused).
* :func:`check_resume_config`: what may change between a checkpoint's config and the resumed one.
* :class:`NonFiniteGuard`: a non-finite loss or gradient stops the run (or skips the step).
* :func:`check_finite_tensors`: exports refuse NaN/inf weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .config import ConfigError, TrainLoopConfig

logger = logging.getLogger("davae_training")

LOCK_FILE = "run.lock"
NONFINITE_POLICIES = ("stop", "skip")


# ---------------------------------------------------------------------------- output-folder lock
class RunLockError(RuntimeError):
    """Another run (alive, or on another host) owns the output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _is_global_main_process() -> bool:
    # taken before the Accelerator exists (creating one early would fix its backend); torchrun and
    # accelerate launch both set RANK, a plain `python -m` run has none
    return int(os.environ.get("RANK", "0")) == 0


class OutputLock:
    """``<output_dir>/run.lock`` held by the global main process for the whole run.

    Use as a context manager; other ranks of the same run do nothing (they write where rank 0 says).
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.owner, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> None:
        if not _is_global_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # second try after removing a stale lock
            if self._try_create():
                self.held = True
                return
            try:
                holder = json.loads(self.path.read_text())
                host, pid = str(holder["host"]), int(holder["pid"])
            except FileNotFoundError:
                continue  # released between our two looks
            except (ValueError, KeyError, TypeError):
                raise RunLockError(f"{self.path}: unreadable lock file; if no run writes to {self.path.parent}, "
                                   f"delete {self.path} and start again") from None
            if host != self.owner["host"]:
                raise RunLockError(
                    f"{self.path.parent} is in use by pid {pid} on host {host!r} (lock {self.path}, since "
                    f"{holder.get('started', '?')}); this host cannot tell whether it still runs. If no run on {host!r} "
                    f"writes here, delete {self.path}; otherwise choose another train.output_dir")
            if pid != self.owner["pid"] and _pid_alive(pid):
                raise RunLockError(
                    f"{self.path.parent} is in use by a running process (pid {pid} on this host, since "
                    f"{holder.get('started', '?')}): two runs would interleave their checkpoints. Stop that run "
                    f"(kill {pid}) or choose another train.output_dir")
            why = "this process (an earlier run that failed)" if pid == self.owner["pid"] else f"pid {pid}, no longer running"
            logger.warning("%s: stale lock of %s on this host; taking it over", self.path, why)
            self.path.unlink(missing_ok=True)
        raise RunLockError(f"{self.path}: could not take the lock (another run started at the same moment?)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("host") == self.owner["host"] and holder.get("pid") == self.owner["pid"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------- resume config diff
class ResumeConfigError(ConfigError):
    """The resumed config changes keys that would break the exact resume."""


LEARNING_RATE_KEY = "train.learning_rate"
# keys that change neither the data order nor the maths of a step: applied on resume and logged
SAFE_KEYS = frozenset({
    "train.output_dir", "train.max_steps", "train.log_every", "train.checkpoint_every", "train.checkpoints_total_limit",
    "train.image_every", "train.report_to", "train.project_name", "train.dataloader_num_workers",
    "train.gradient_checkpointing", "train.on_nonfinite",
    "data.index_cache", "data.images.index_cache",  # where the file index is cached, not what it holds
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


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten_config(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], change_learning_rate: bool,
                        checkpoint: str | os.PathLike, new_phase: bool = False) -> dict[str, tuple[Any, Any]]:
    """The keys that differ (``{key: (saved, now)}``) if all may change; otherwise ResumeConfigError.

    ``new_phase``: the checkpoint is an earlier phase's (``train.continue_from``), whose data may differ.
    """
    old, new = flatten_config(saved), flatten_config(current)
    missing = object()
    for key, default in _LOOP_DEFAULTS.items():
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
            "\nPut the old values back (they are in " + str(Path(checkpoint) / "config.yaml") + "), or start a new run "
            "(no --resume, or another train.output_dir).")
    return {k: (None if a is missing else a, None if b is missing else b) for k, (a, b) in diff.items()}


def apply_learning_rate(optimizer, lr_scheduler, learning_rate: float) -> None:
    """Make a resumed optimizer and scheduler use ``learning_rate`` as their base rate from now on.

    ``load_state`` restores the old base rate into both; the scheduler's factor at the current step
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


# ---------------------------------------------------------------------------- non-finite losses and gradients
class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or weight: the run stops before it spreads into weights or exports."""


class NonFiniteGuard:
    """Watches each micro-batch's loss and each optimizer step's gradients.

    ``policy="stop"`` raises :class:`NonFiniteError` naming the step and the last good checkpoint;
    ``"skip"`` drops that optimizer step (weights and optimizer state unchanged) and goes on.
    All ranks decide together (one all-reduce per optimizer step), so none is left waiting.
    """

    def __init__(self, accelerator, policy: str, last_good_checkpoint: Callable[[], Any]):
        if policy not in NONFINITE_POLICIES:
            raise ConfigError(f"train.on_nonfinite={policy!r}: use one of {NONFINITE_POLICIES}")
        self.accelerator = accelerator
        self.policy = policy
        self.last_good_checkpoint = last_good_checkpoint
        self.bad_loss = False
        self.skipped = 0
        # with fp16 loss scaling, inf gradients are routine: the scaler skips those steps itself
        self.check_grads = getattr(accelerator, "scaler", None) is None

    def note_loss(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self.bad_loss = True

    def skip_step(self, parameters: Iterable[torch.Tensor], step: int) -> bool:
        """At an optimizer step: True to skip it (policy "skip"); raises under policy "stop"."""
        bad_grad = self.check_grads and any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in parameters)
        flags = torch.tensor([float(self.bad_loss), float(bad_grad)], device=self.accelerator.device)
        flags = self.accelerator.reduce(flags, reduction="sum")
        self.bad_loss = False
        if not bool((flags > 0).any()):
            return False
        what = " and ".join(w for w, f in zip(("loss", "gradient"), flags.tolist()) if f > 0)
        if self.policy == "skip":
            self.skipped += 1
            logger.warning("non-finite %s at step %d: step skipped (train.on_nonfinite=skip; %d skipped so far)", what, step, self.skipped)
            return True
        last = self.last_good_checkpoint()
        raise NonFiniteError(
            f"non-finite {what} at step {step}: stopped before the weights took it. Last good checkpoint: "
            f"{last if last is not None else 'none'}. Resume from it with --resume latest (a lower learning rate: "
            f"--set train.learning_rate=... --change-learning-rate), or set train.on_nonfinite=skip to skip such steps.")


def check_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse to write weights holding NaN or inf; names the first offending tensors."""
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"{where}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:5])}"
                             f"{', ...' if len(bad) > 5 else ''}); refusing to export them. Export an earlier checkpoint.")
