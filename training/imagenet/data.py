"""Class-labelled images for stage 2 on ImageNet: ``root/<class>/<image>`` (ImageNet's train layout).

Labels are the positions of the class folders in ``data.class_names_file`` or, without one, in
the sorted list of sub-folders: ImageNet's 1000 wnids sorted are the labels LightningDiT was
trained with.  Each image is ADM's centre crop (short side resized to the resolution, up or
down, bicubic; the centre square) with a seeded random flip; the order is the resumable,
rank-split order of :class:`~davae_training.data.images.ResumableSampler`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import ImageDataConfig, ImageRecord, ResumableSampler, load_or_build_index, load_rgb

logger = logging.getLogger("davae_training.imagenet")


def class_names(root: str | Path, names_file: str | Path | None = None) -> list[str]:
    """The class folder names in label order."""
    if names_file is not None:
        names = [ln.strip() for ln in Path(names_file).read_text().splitlines() if ln.strip()]
        if len(set(names)) != len(names):
            raise ValueError(f"{names_file}: a class name appears twice")
        return names
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} is not a folder; point it at ImageNet's train folder (one sub-folder per class)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"data.root {root} has no class sub-folders (expected root/<class>/<image>)")
    return names


def center_crop(img, resolution: int, rng: np.random.Generator, random_flip: bool) -> torch.Tensor:
    """ADM's ``center_crop_arr``: box-halve while the short side is >= 2x the target, bicubic to it, centre square."""
    from PIL import Image

    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(img, dtype=np.uint8)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    arr = arr[top:top + resolution, left:left + resolution]
    if random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0


class ClassImageFolder(Dataset):
    """Item ``k`` = image ``k % n`` at epoch ``k // n``: ``{"pixels" (3, R, R) in [0, 1], "label", "index"}``."""

    def __init__(self, records: list[ImageRecord], labels: list[int], resolution: int, random_flip: bool, seed: int = 0):
        if not records:
            raise ValueError("no images to train on")
        self.records, self.labels = records, labels
        self.resolution, self.random_flip, self.seed = resolution, random_flip, int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, k: int) -> dict[str, Any]:
        epoch, index = divmod(int(k), len(self.records))
        for i in ((index + a) % len(self.records) for a in range(16)):
            try:
                img = load_rgb(self.records[i])
            except Exception as e:  # a truncated file the header scan could not catch: the next one
                logger.warning("skipping unreadable image %s (%s: %s)", self.records[i].key, type(e).__name__, e)
                continue
            pixels = center_crop(img, self.resolution, np.random.default_rng([self.seed, epoch, i]), self.random_flip)
            return {"pixels": pixels, "label": self.labels[i], "index": i}
        raise RuntimeError(f"16 images in a row from index {index} failed to load; is data.root intact?")


def collate_labelled(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"pixels": torch.stack([it["pixels"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items])}


def index_class_folder(root: str, names: list[str], index_cache: str | None, max_images: int | None = None,
                       accelerator=None) -> tuple[list[ImageRecord], list[int]]:
    """The scanned images under ``root`` and their labels; images outside the named class folders are refused."""
    scan = ImageDataConfig(sources=[root], resolution=1, min_size=1, max_images=max_images, index_cache=index_cache)
    records, report = load_or_build_index(scan, accelerator)
    logger.info("%s: %s", root, report.summary())
    label_of = {name: i for i, name in enumerate(names)}
    labels, unknown = [], set()
    for rec in records:
        folder = Path(rec.key).parts[0] if len(Path(rec.key).parts) > 1 else ""
        if folder not in label_of:
            unknown.add(folder or rec.key)
        labels.append(label_of.get(folder, -1))
    if unknown:
        raise ValueError(f"{root}: images outside the class folders ({', '.join(sorted(unknown)[:3])}); "
                         "expected root/<class>/<image> with every class in data.class_names_file")
    return records, labels


def make_class_loader(data, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_micro_batch: int = 0,
                      num_workers: int = 0, accelerator=None, pin_memory: bool = False, num_classes: int = 1000) -> DataLoader:
    """Endless micro-batches of ``data`` (:class:`~.config.ClassDataConfig`), restartable at any micro-batch."""
    names = class_names(data.root, data.class_names_file)
    if len(names) > num_classes:
        raise ValueError(f"{len(names)} classes under {data.root}, but the DiT's class table has {num_classes}")
    records, labels = index_class_folder(data.root, names, data.index_cache, data.max_images, accelerator)
    dataset = ClassImageFolder(records, labels, data.resolution, data.random_flip, seed)
    sampler = ResumableSampler(len(records), batch_size, seed=seed, rank=rank, world_size=world_size,
                               start_micro_batch=start_micro_batch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_labelled,
                      pin_memory=pin_memory, drop_last=True, prefetch_factor=2 if num_workers > 0 else None)


def with_index_cache(data, output_dir: str):
    """``data`` with its index cache defaulting into the run folder."""
    return data if data.index_cache else replace(data, index_cache=str(Path(output_dir) / "data_index.json"))
