"""Pictures of a run: image grids as PNG files, and the same files sent to accelerate's trackers.

Stage-1 reconstruction grids and stage-2 sample grids go through :func:`save_image_grid` (written
atomically) and :func:`log_image_file` (TensorBoard, wandb).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from davae_core.atomic_files import atomic_write

logger = logging.getLogger("davae_training")


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



def log_image_file(accelerator, tag: str, path: str | Path, step: int) -> list[str]:
    """Send the PNG at ``path`` to every TensorBoard and wandb tracker; returns the tracker names
    that took it (others, e.g. none configured, are left alone)."""
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))
    sent: list[str] = []
    for tracker in getattr(accelerator, "trackers", []):
        name = getattr(tracker, "name", "")
        try:
            if name == "tensorboard":
                tracker.writer.add_image(tag, array, step, dataformats="HWC")
                tracker.writer.flush()
            elif name == "wandb":
                import wandb  # only reachable when accelerate built a wandb tracker

                tracker.log({tag: wandb.Image(array, caption=Path(path).name)}, step=step)
            else:
                continue
        except Exception as e:  # a tracker hiccup must not stop training; the PNG is on disk anyway
            logger.warning("could not log %s to %s: %s", path, name, e)
            continue
        sent.append(name)
    return sent
