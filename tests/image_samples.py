"""What the data-source tests share: random PNG bytes, tar shards of them, PNG folders."""

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


CORRUPT_SAMPLE = 5  # the index in each shard written by write_tar_shards whose image is not a PNG


def write_tar_shards(folder, shapes, rng: np.random.Generator) -> None:
    """``shard-000.tar`` (plain) and ``shard-001.tar.gz`` (gzip) in ``folder``, 8 samples each
    (``s{shard}_{i}.png`` + ``.txt`` caption ``"caption {shard} {i}"``) cycling through ``shapes``
    (height, width) from an offset of the shard number; sample ``CORRUPT_SAMPLE`` of each is corrupt."""
    for s in range(2):
        name = folder / (f"shard-{s:03d}.tar" + (".gz" if s else ""))
        with tarfile.open(name, "w:gz" if s else "w") as tar:
            for i in range(8):
                h, w = shapes[(i + s) % len(shapes)]
                add_to_tar(tar, f"s{s}_{i}.png", b"not a png at all" if i == CORRUPT_SAMPLE else png_bytes(rng, h, w))
                add_to_tar(tar, f"s{s}_{i}.txt", f"caption {s} {i}".encode())
