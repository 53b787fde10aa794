"""What the run-safety tests of both stages share: damaging checkpoint files, copying runs, in-process runs."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

DAMAGES = ("truncated", "missing", "overwritten")


def damage(path: Path, how: str) -> None:
    """Damage one checkpoint file as a crash, a careless user or a bad disk would."""
    if how == "missing":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "overwritten":  # a few kilobytes flipped in the middle: the size stays the same
        start = len(data) // 4
        end = min(len(data), start + 4096)
        data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
        path.write_bytes(bytes(data))
        assert path.stat().st_size == len(data)
    else:
        raise ValueError(how)


def copy_run(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a finished run's folder to try things on (the original is shared by many tests)."""
    shutil.copytree(src, dst)
    for rel in drop:
        target = dst / rel
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    return dst


def reset_accelerate() -> None:
    """accelerate keeps process-wide state; leave none behind between in-process runs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder: Path, host: str, pid: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.lock"
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "earlier"}))
    return path


def resolve_latest_logging(output_dir: Path, caplog) -> tuple[Path | None, str]:
    """``resolve_resume('latest')`` and what it logged."""
    from davae_training.checkpoints import resolve_resume

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="davae_training"):
        chosen = resolve_resume("latest", output_dir)
    return chosen, caplog.text
