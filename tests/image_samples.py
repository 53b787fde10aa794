"""What the data-source tests share: random PNG bytes and adding them to a tar shard."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image


def png_bytes(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_png_folder(folder, shapes, count: int, rng: np.random.Generator, captions: bool = False):
    """``count`` random PNGs ``00.png ...`` cycling through ``shapes`` (height, width), each with a
    ``.txt`` caption when ``captions``; the folder is created."""
    folder.mkdir()
    for i in range(count):
        h, w = shapes[i % len(shapes)]
        (folder / f"{i:02d}.png").write_bytes(png_bytes(rng, h, w))
        if captions:
            (folder / f"{i:02d}.txt").write_text(f"picture number {i}")
    return folder
