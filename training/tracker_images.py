"""Validation images (stage-1 reconstructions, stage-2 sample grids) to accelerate's trackers."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("davae_training")


def log_image_file(accelerator, tag: str, path: str | Path, step: int) -> list[str]:
    """Send the PNG at ``path`` to every TensorBoard and wandb tracker; returns the tracker names
    that took it (others, e.g. none configured, are left alone)."""
    import numpy as np
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
