"""Guards both trainers share so that a run is never silently lost or poisoned.

* :class:`OutputLock`: one run per output folder (owner host and pid in ``run.lock``; a lock whose
  process died on this host is stale and taken over; a lock from another host is refused).
* :class:`NonFiniteGuard`: a non-finite loss or gradient stops the run (or skips the step), with one
  device read per optimizer step.
* :func:`check_finite_tensors`: exports refuse NaN/inf weights.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .config import ConfigError
from .sharding import full_tensor

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


# ---------------------------------------------------------------------------- non-finite losses and gradients
class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or weight: the run stops before it spreads into weights or exports."""


class NonFiniteGuard:
    """Watches each micro-batch's loss and each optimizer step's gradients.

    ``policy="stop"`` raises :class:`NonFiniteError` naming the step and the last good checkpoint;
    ``"skip"`` drops that optimizer step (weights and optimizer state unchanged) and goes on.
    Losses are flagged on the device (no wait per micro-batch); at the optimizer step the flags
    and the gradients' total norm (one fused reduction, or the norm clipping already computed)
    go through one all-reduce and one read, so all ranks decide together and none is left waiting.
    """

    def __init__(self, accelerator, policy: str, last_good_checkpoint: Callable[[], Any]):
        if policy not in NONFINITE_POLICIES:
            raise ConfigError(f"train.on_nonfinite={policy!r}: use one of {NONFINITE_POLICIES}")
        self.accelerator = accelerator
        self.policy = policy
        self.last_good_checkpoint = last_good_checkpoint
        self.bad_loss: torch.Tensor | None = None
        self.skipped = 0
        # with fp16 loss scaling, inf gradients are routine: the scaler skips those steps itself
        self.check_grads = getattr(accelerator, "scaler", None) is None

    def note_loss(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.bad_loss = bad if self.bad_loss is None else self.bad_loss | bad

    def skip_step(self, parameters: Iterable[torch.Tensor], step: int, grad_norm: torch.Tensor | None = None,
                  applied: bool = False) -> bool:
        """At an optimizer step: True to skip it (policy "skip"); raises under policy "stop".

        ``grad_norm``: the gradients' total norm when clipping computed it (else it is computed
        here over ``parameters``); ``applied``: the engine has already stepped (DeepSpeed).
        """
        device = self.accelerator.device
        bad_grad = torch.zeros((), dtype=torch.bool, device=device)
        if self.check_grads:
            if grad_norm is None:
                grads = [p.grad for p in parameters if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
            if grad_norm is not None:
                bad_grad = ~torch.isfinite(full_tensor(grad_norm).to(device))
        bad_loss = self.bad_loss.to(device) if self.bad_loss is not None else torch.zeros((), dtype=torch.bool, device=device)
        self.bad_loss = None
        flags = self.accelerator.reduce(torch.stack([bad_loss, bad_grad]).float(), reduction="sum").tolist()
        if not any(f > 0 for f in flags):
            return False
        what = " and ".join(w for w, f in zip(("loss", "gradient"), flags) if f > 0)
        if self.policy == "skip":
            self.skipped += 1
            logger.warning("non-finite %s at step %d: step skipped (train.on_nonfinite=skip; %d skipped so far)", what, step, self.skipped)
            return True
        last = self.last_good_checkpoint()
        when = ("DeepSpeed had already applied this step" if applied else "stopped before the weights took it")
        raise NonFiniteError(
            f"non-finite {what} at step {step}: {when}. Last good checkpoint: "
            f"{last if last is not None else 'none'}. Resume from it with --resume latest (a lower learning rate: "
            f"--set train.learning_rate=... --change-learning-rate), or set train.on_nonfinite=skip to skip such steps.")


def check_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse to write weights holding NaN or inf; names the first offending tensors."""
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"{where}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:5])}"
                             f"{', ...' if len(bad) > 5 else ''}); refusing to export them. Export an earlier checkpoint.")
