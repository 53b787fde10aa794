"""Streamed training data: WebDataset shards (``data.format: webdataset``) and Hugging Face
datasets (``data.format: hf``), decoded, cropped (or bucketed) and batched inside the loader's workers.

Order and resume
    The samples are split into *slots*, one per (rank, dataloader worker): whole shards when
    there are at least as many shards as slots, otherwise every ``slots``-th sample.  Each slot is a
    deterministic stream (shard order and shuffle buffer seeded by ``(seed, slot, epoch)``) cut into
    micro-batches; rank ``r``'s local micro-batch ``t`` comes from its slot ``t % workers``, which is
    how ``DataLoader`` interleaves workers.  Resuming at micro-batch ``t`` replays each slot and drops
    the micro-batches it had already given, so the order is exactly the uninterrupted one - as long
    as the world size, ``dataloader_num_workers``, seed and shards are the same (replaying costs
    reading, not training; an approximation would be cheaper but would change the order).
Corrupt samples
    An undecodable image, a truncated shard or a row without an image is skipped, counted, and
    logged (first 20 per slot by name, then every 100th); a run never stops for one.  Because
    the skip is part of the deterministic stream, it never shifts the order on resume.

Each batch: ``{"pixels": (B, 3, H, W) in [0, 1], "caption": [str], "key": [str], "index": (B,) int64
(position in the slot's stream), "skipped": (1,) int64 (samples this slot skipped so far)}``.
"""

from __future__ import annotations

import glob
import io
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..runtime import derive_seed
from .buckets import GRID, admit, crop_to_bucket, make_buckets
from .images import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, JSON_CAPTION_FIELDS, ImageDataConfig, crop_image

logger = logging.getLogger("davae_training.data")

_LOG_FIRST = 20


@dataclass
class RawSample:
    key: str
    image: Any  # bytes, a path, a PIL image, or None (missing)
    caption: str = ""


@dataclass
class StreamReport:
    """Per-slot counts; ``skipped_examples`` holds the first names with the reason."""

    seen: int = 0
    kept: int = 0
    skipped_corrupt: int = 0
    skipped_too_small: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, kind: str, key: str, why: str, slot: int) -> None:
        if kind == "corrupt":
            self.skipped_corrupt += 1
        else:
            self.skipped_too_small += 1
        total = self.skipped_corrupt + self.skipped_too_small
        if len(self.skipped_examples) < _LOG_FIRST:
            self.skipped_examples.append(f"{key}: {why}")
        if total <= _LOG_FIRST or total % 100 == 0:
            logger.warning("data slot %d: skipping %s sample %s (%s); %d corrupt and %d too small skipped so far",
                           slot, kind, key, why, self.skipped_corrupt, self.skipped_too_small)


def decode_rgb(image: Any):
    """bytes / path / PIL image / HF ``{"bytes", "path"}`` -> RGB PIL image (EXIF applied, alpha over
    white); raises on anything that is not a readable image."""
    from PIL import Image, ImageOps

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if image is None:
        raise ValueError("no image in this sample")
    if isinstance(image, Image.Image):
        im = image
        im.load()
    else:
        im = Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image)
        im.load()  # decode now: truncation must fail here, not in the training step
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------------- sources
def expand_shards(sources: list[str]) -> list[str]:
    """Local shard paths from paths, globs and brace ranges (``shard-{000..099}.tar``), sorted."""
    from webdataset.shardlists import expand_urls

    out: list[str] = []
    for src in sources:
        for item in expand_urls(str(src)):
            if any(c in item for c in "*?["):
                out.extend(sorted(glob.glob(item, recursive=True)))
            elif Path(item).is_dir():
                out.extend(sorted(str(p) for p in Path(item).iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz"))))
            elif Path(item).is_file():
                out.append(item)
            else:
                raise FileNotFoundError(f"webdataset shard {item} does not exist (data.sources: {sources})")
    if not out:
        raise ValueError(f"data.sources {sources} name no .tar/.tar.gz shards")
    return out


def _split(items: list, slot: int, slots: int, epoch: int, seed: int) -> tuple[list, bool]:
    """This slot's share of an epoch's shuffled shards; (all of them, True) when there are fewer
    shards than slots, in which case the caller keeps every ``slots``-th sample."""
    order = list(items)
    random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    if len(order) >= slots:
        return order[slot::slots], False
    return order, True


class WebDatasetSource:
    """Shards read by the ``webdataset`` package (streaming; gzip detected by the tar reader)."""

    def __init__(self, config: ImageDataConfig):
        self.shards = expand_shards(list(config.sources))

    def samples(self, epoch: int, slot: int, slots: int, seed: int, report: StreamReport) -> Iterator[RawSample]:
        shards, by_sample = _split(self.shards, slot, slots, epoch, seed)
        for j, sample in enumerate(_read_shards(shards, report, slot)):
            if by_sample and j % slots != slot:
                continue
            yield sample

    def in_order(self, report: StreamReport) -> Iterator[RawSample]:
        """Every sample once, shards in their listed order, no shuffling (what the cache reads)."""
        yield from _read_shards(self.shards, report, 0)


def _read_shards(shards: list[str], report: StreamReport, slot: int) -> Iterator[RawSample]:
    import webdataset as wds

    def on_error(exc: Exception) -> bool:  # a broken shard: count it, keep going
        report.skip("corrupt", "shard", f"{type(exc).__name__}: {exc}", slot)
        return True

    # grouped by key as WebDataset defines it: the member path up to the base name's first dot
    for sample in wds.tarfile_samples([{"url": s} for s in shards], handler=on_error):
        yield _webdataset_sample(sample)


def _webdataset_sample(grouped: dict[str, Any]) -> RawSample:
    import json

    sample = {"." + k.lower(): v for k, v in grouped.items() if not k.startswith("__")}

    img_ext = next((e for e in sorted(sample) if e.endswith(IMAGE_EXTENSIONS)), None)
    caption = ""
    cap_ext = next((e for e in CAPTION_EXTENSIONS if e in sample), None)
    if cap_ext is not None:
        caption = sample[cap_ext].decode("utf-8", "replace").strip()
    elif ".json" in sample:
        try:
            obj = json.loads(sample[".json"])
            caption = next((str(obj[k]) for k in JSON_CAPTION_FIELDS if isinstance(obj, dict) and k in obj), "")
        except (json.JSONDecodeError, UnicodeDecodeError):
            caption = ""
    key = f"{Path(grouped.get('__url__', '')).name}:{grouped.get('__key__', '')}"
    return RawSample(key=key, image=sample[img_ext] if img_ext else None, caption=caption)


class HFSource:
    """A Hugging Face dataset: a ``save_to_disk`` folder (map-style: exact per-epoch permutation),
    an ``imagefolder`` folder, or a hub name (``data.streaming`` iterates without loading it all)."""

    def __init__(self, config: ImageDataConfig):
        if len(config.sources) != 1:
            raise ValueError(f"data.format hf reads one dataset; data.sources has {len(config.sources)}: {config.sources}")
        import datasets

        src = str(config.sources[0])
        path = Path(src)
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(src)
            if isinstance(ds, datasets.DatasetDict):
                if config.hf_split not in ds:
                    raise ValueError(f"{src} has splits {list(ds)}, not data.hf_split={config.hf_split!r}")
                ds = ds[config.hf_split]
            if config.streaming:
                ds = ds.to_iterable_dataset()
        elif path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=src, split=config.hf_split, streaming=config.streaming)
        else:
            ds = datasets.load_dataset(src, split=config.hf_split, streaming=config.streaming)
        columns = list(ds.column_names or ds.features or [])
        if config.hf_image_column not in columns:
            raise ValueError(f"dataset {src} has no image column {config.hf_image_column!r} (columns: {columns}); "
                             "set data.hf_image_column")
        if isinstance(ds.features[config.hf_image_column], datasets.Image):
            # decode in our code, where a corrupt image is skipped instead of failing the row access
            ds = ds.cast_column(config.hf_image_column, datasets.Image(decode=False))
        self.caption_column = config.hf_caption_column if config.hf_caption_column in columns else None
        if config.hf_caption_column and self.caption_column is None:
            logger.warning("dataset %s has no caption column %r (columns: %s); captions are empty",
                           src, config.hf_caption_column, columns)
        self.ds = ds
        self.image_column = config.hf_image_column
        self.buffer = config.shuffle_buffer
        self.map_style = isinstance(ds, datasets.Dataset)

    def _raw(self, key: str, row: dict[str, Any]) -> RawSample:
        caption = row.get(self.caption_column) if self.caption_column else ""
        return RawSample(key=key, image=row.get(self.image_column), caption="" if caption is None else str(caption))

    def samples(self, epoch: int, slot: int, slots: int, seed: int, report: StreamReport) -> Iterator[RawSample]:
        if self.map_style:
            g = torch.Generator().manual_seed(derive_seed(seed, "hf-epoch", epoch))
            for i in torch.randperm(len(self.ds), generator=g)[slot::slots].tolist():
                yield self._raw(str(i), self.ds[i])
            return
        stream = self.ds.shuffle(seed=derive_seed(seed, "hf-epoch", epoch) % 2**32, buffer_size=self.buffer)
        for j, row in enumerate(stream):
            if j % slots == slot:
                yield self._raw(str(j), row)

    def in_order(self, report: StreamReport) -> Iterator[RawSample]:
        """Every row once in the dataset's own order, no shuffling (what the cache reads);
        keys are row numbers, as in :meth:`samples`."""
        rows = (self.ds[i] for i in range(len(self.ds))) if self.map_style else iter(self.ds)
        for j, row in enumerate(rows):
            yield self._raw(str(j), row)


def make_source(config: ImageDataConfig):
    if config.format == "webdataset":
        return WebDatasetSource(config)
    if config.format == "hf":
        return HFSource(config)
    raise ValueError(f"data.format {config.format!r} is not streamed; use the folder index (data/images.py)")


# ---------------------------------------------------------------------------- batches
def sample_pixels(img, config: ImageDataConfig, buckets: list[tuple[int, int]] | None,
                  rng: np.random.Generator) -> tuple[torch.Tensor | None, str, int]:
    """(pixels, "", bucket index) for a decoded image, or (None, why, -1) when it is too small
    (buckets: :func:`~davae_training.data.buckets.admit`, the folder index's rule too); the square
    crop counts as bucket 0."""
    c = config
    if buckets is None:
        need = c.effective_min_size if c.upscale_small else max(c.effective_min_size, c.resolution)
        if min(img.size) < need:
            return None, f"{img.width}x{img.height} < {need}px", -1
        return crop_image(img, c.resolution, rng, c.crop, c.resize_short_side, c.random_flip, c.upscale_small), "", 0
    b, why = admit(img.width, img.height, buckets, c.min_size)
    if b < 0:
        return None, why, -1
    return crop_to_bucket(img, buckets[b], rng, c.crop, c.random_flip), "", b


def _collate(items: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    return {"pixels": torch.stack([it["pixels"] for it in items]), "caption": [it["caption"] for it in items],
            "key": [it["key"] for it in items], "index": torch.tensor([it["index"] for it in items]),
            "skipped": torch.tensor([skipped])}


class StreamingBatches(IterableDataset):
    """Endless micro-batches for one rank (see the module docstring); use with ``batch_size=None``."""

    def __init__(self, config: ImageDataConfig, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_micro_batch: int = 0, num_workers: int = 0, bucket_grid: int = GRID):
        self.config = config
        self.source = make_source(config)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.start = start_micro_batch
        self.num_workers = max(1, num_workers)
        self.buckets = make_buckets(config.resolution, config.bucket_max_aspect, bucket_grid) if config.buckets else None
        self.report = StreamReport()  # of the last slot iterated in this process

    def slot_of_worker(self, worker: int) -> tuple[int, int]:
        """(this rank's slot served by ``worker``, micro-batches that slot gave before ``start``)."""
        nw = self.num_workers
        local = (self.start + worker) % nw
        skip = max(0, (self.start - local + nw - 1) // nw)
        return local, skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise ValueError(f"StreamingBatches was built for {self.num_workers} workers, the loader has {info.num_workers}")
        local, skip = self.slot_of_worker(worker)
        slot = self.rank * self.num_workers + local
        for b, batch in enumerate(self.slot_batches(slot, self.world_size * self.num_workers)):
            if b >= skip:
                yield batch

    def _pixels(self, img, rng: np.random.Generator) -> tuple[torch.Tensor | None, str]:
        pixels, why, _ = sample_pixels(img, self.config, self.buckets, rng)
        return pixels, why

    def slot_batches(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        report = self.report = StreamReport()
        pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
        position = 0
        for epoch in range(1 << 62):
            kept_before = report.kept
            shuffle = random.Random(derive_seed(self.seed, "buffer", slot, epoch))
            samples = self.source.samples(epoch, slot, slots, self.seed, report)
            if not getattr(self.source, "map_style", False):
                samples = _buffer_shuffle(samples, self.config.shuffle_buffer, shuffle)
            for raw in samples:
                report.seen += 1
                rng = np.random.default_rng([self.seed, slot, position])
                index = position
                position += 1
                try:
                    pixels, why = self._pixels(decode_rgb(raw.image), rng)
                except Exception as e:  # PIL raises many types on bad data
                    report.skip("corrupt", raw.key, f"{type(e).__name__}: {e}", slot)
                    continue
                if pixels is None:
                    report.skip("too_small", raw.key, why, slot)
                    continue
                report.kept += 1
                shape = tuple(pixels.shape[-2:])
                group = pending.setdefault(shape, [])
                group.append({"pixels": pixels, "caption": raw.caption, "key": raw.key, "index": index})
                if len(group) == self.batch_size:
                    del pending[shape]
                    yield _collate(group, report.skipped_corrupt + report.skipped_too_small)
            if report.kept == kept_before:
                raise RuntimeError(f"data slot {slot} of {slots} got no usable sample in a whole epoch from "
                                   f"{self.config.sources} ({report.skipped_corrupt} corrupt, {report.skipped_too_small} "
                                   f"too small; examples: {report.skipped_examples[:3]})")


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """WebDataset-style shuffle buffer with its own seeded generator (so replay is exact)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf
