"""Aspect-ratio buckets: train on whole images at several shapes instead of square crops only.

A bucket is a (width, height) with both sides multiples of a pixel ``grid`` and an area close to
``resolution**2``.  The grid is the stage's: stage 1 uses :data:`GRID` (16, the DA-VAE's latent
factor: 8x VAE down-sampling of the half-size image), stage 2 the DA-VAE factor times the
transformer's patch size (32 for SD3, :mod:`davae_training.stage2.latent_grid`), since a latent side
that is not a multiple of the patch breaks the transformer.  Every image goes to the bucket whose
aspect ratio is nearest its own (in log space), is scaled down to cover it and cropped to it;
an image that does not cover its bucket is skipped (:func:`admit`); every micro-batch holds
images of one bucket only.

:class:`BucketBatchSampler` is the bucketed twin of :class:`~davae_training.data.images.ResumableSampler`:
an endless, seeded, rank-aware list of micro-batches that restarts exactly at any micro-batch.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..runtime import derive_seed

GRID = 16  # stage 1's bucket sides are multiples of this (the DA-VAE's latent factor)


def make_buckets(resolution: int, max_aspect: float = 2.0, grid: int = GRID) -> list[tuple[int, int]]:
    """Bucket shapes (width, height), sorted by aspect ratio, each side a multiple of ``grid``
    and each area within one grid step of ``resolution**2``; the square bucket is always present."""
    if resolution % grid:
        raise ValueError(f"data.resolution {resolution} must be a multiple of {grid} to use aspect-ratio buckets")
    if max_aspect < 1.0:
        raise ValueError(f"data.bucket_max_aspect must be >= 1, got {max_aspect}")
    area = resolution * resolution
    shapes: set[tuple[int, int]] = {(resolution, resolution)}
    w = grid
    while w <= resolution * max_aspect:
        h = max(grid, int(round(area / w / grid)) * grid)
        if max(w, h) / min(w, h) <= max_aspect + 1e-9:
            shapes.add((w, h))
            shapes.add((h, w))
        w += grid
    return sorted(shapes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to ``width/height`` (log distance)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - target), i))


def fits_bucket(width: int, height: int, bucket: tuple[int, int]) -> bool:
    """The image covers the bucket without upscaling (upscaling would invent detail)."""
    return width >= bucket[0] and height >= bucket[1]


def admit(width: int, height: int, buckets: list[tuple[int, int]], min_size: int | None = None) -> tuple[int, str]:
    """(bucket index, "") for an image that covers its bucket, or (-1, why it is skipped).

    The one rule of the folder index and the streamed formats: the nearest bucket must fit without
    upscaling; ``min_size`` (``data.min_size`` when set) additionally skips short sides below it."""
    b = nearest_bucket(width, height, buckets)
    if not fits_bucket(width, height, buckets[b]):
        return -1, f"{width}x{height} smaller than its bucket {buckets[b][0]}x{buckets[b][1]}"
    if min_size is not None and min(width, height) < min_size:
        return -1, f"{width}x{height}: shorter side below data.min_size {min_size}"
    return b, ""


def crop_to_tensor(img, width: int, height: int, rng: np.random.Generator, crop: str = "random",
                   random_flip: bool = False) -> torch.Tensor:
    """A ``width`` x ``height`` crop of a PIL image that covers it -> (3, H, W) float tensor in [0, 1].

    Random draws, in this order: x, y (``crop="random"``), then the flip, so square and bucketed
    crops consume ``rng`` alike."""
    w, h = img.size
    if crop == "random":
        x = int(rng.integers(0, w - width + 1))
        y = int(rng.integers(0, h - height + 1))
    else:
        x, y = (w - width) // 2, (h - height) // 2
    arr = np.array(img.crop((x, y, x + width, y + height)), dtype=np.uint8)
    if random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def crop_to_bucket(img, bucket: tuple[int, int], rng: np.random.Generator, crop: str = "random",
                   random_flip: bool = False) -> torch.Tensor:
    """PIL image -> (3, H, W) float tensor in [0, 1] of the bucket's shape: scaled down until it
    just covers the bucket, then cropped; every random choice comes from ``rng``."""
    from PIL import Image

    bw, bh = bucket
    w, h = img.size
    if not fits_bucket(w, h, bucket):
        raise ValueError(f"image {w}x{h} is smaller than its bucket {bw}x{bh}")
    scale = max(bw / w, bh / h)
    if scale < 1.0:
        new = (max(bw, round(w * scale)), max(bh, round(h * scale)))
        img = img.resize(new, Image.Resampling.LANCZOS)
    return crop_to_tensor(img, bw, bh, rng, crop, random_flip)


class BucketBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of one bucket each, split between ranks, restartable exactly.

    Epoch ``e``: the records are shuffled (seed, e), grouped by bucket into full micro-batches
    (a bucket's remainder waits for no one: it is dropped this epoch and reshuffled next), and the
    micro-batches shuffled again.  Rank ``r`` of ``W`` takes global micro-batches ``t*W + r``.
    Yields lists of ``epoch * n + index`` like ``ResumableSampler`` yields single items.
    """

    def __init__(self, bucket_of_record: list[int], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_micro_batch: int = 0):
        self.bucket_of_record = np.asarray(bucket_of_record, dtype=np.int64)
        self.n = len(self.bucket_of_record)
        if self.n == 0 or batch_size <= 0:
            raise ValueError(f"need records and a positive batch size, got {self.n}, {batch_size}")
        counts = np.bincount(self.bucket_of_record)
        self.batches_per_epoch = int((counts // batch_size).sum())  # fixed: bucket sizes do not change
        if self.batches_per_epoch == 0:
            raise ValueError(f"no bucket holds a full micro-batch of {batch_size} images (bucket sizes {counts.tolist()}); "
                             "use a smaller train.batch_size, more images, or data.buckets: false")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_micro_batch = start_micro_batch
        self._epoch_cache: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "bucket-epoch", epoch))
            perm = torch.randperm(self.n, generator=g).tolist()
            by_bucket: dict[int, list[int]] = {}
            for i in perm:
                by_bucket.setdefault(int(self.bucket_of_record[i]), []).append(i)
            batches = [members[k:k + self.batch_size]
                       for b in sorted(by_bucket) for members in [by_bucket[b]]
                       for k in range(0, len(members) - self.batch_size + 1, self.batch_size)]
            order = torch.randperm(len(batches), generator=g).tolist()
            self._epoch_cache = {epoch: [[epoch * self.n + i for i in batches[j]] for j in order]}
        return self._epoch_cache[epoch]

    def global_batch(self, g: int) -> list[int]:
        epoch, within = divmod(g, self.batches_per_epoch)
        return self.epoch_batches(epoch)[within]

    def __iter__(self) -> Iterator[list[int]]:
        t = self.start_micro_batch
        while True:
            yield self.global_batch(t * self.world_size + self.rank)
            t += 1
