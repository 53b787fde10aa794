"""Write a file so that a crash never leaves half of it under the real name.

Everything the project writes that someone reads later (weights, checkpoints' state, caches,
summaries, images, bench results) goes through :func:`atomic_write`: the content goes to a
hidden temporary file next to the target, is flushed to disk, and only then renamed over the
target (a rename within one folder is atomic on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: some systems cannot open folders)."""
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temporary path to write; on leaving the block it replaces ``path``.

    The temporary name (``.NAME.tmp``) is hidden and has no usable extension, so folder scans
    never take a leftover for a real file; writers that pick a format by extension (PIL) must
    name the format.  On an error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> Path:
    """Indented, sorted JSON (``dumps_kwargs`` override, e.g. ``indent=None`` for a large index)."""
    options = {"indent": 2, "sort_keys": True, "default": str, **dumps_kwargs}
    return write_text_atomic(path, json.dumps(data, **options))
