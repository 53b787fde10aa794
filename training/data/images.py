"""Images (and their captions) from folders and WebDataset ``.tar`` shards, deterministic and resumable.

Stable API (stage 1 and stage 2 build on it):

* :class:`ImageDataConfig` - where the images are and how to crop them;
* :func:`build_index` / :func:`load_or_build_index` -> (``list[ImageRecord]``, :class:`ScanReport`):
  one scan that skips and counts images too small to train on (square crops: shorter side below
  ``min_size``; buckets: not covering their bucket, as the streamed formats decide) and unreadable
  files (logged by name), never raising on bad data;
* :class:`ImageDataset` - map-style; item ``k`` is record ``k % n`` in "epoch" ``k // n``, and the
  random crop/flip of an item depends only on ``(seed, epoch, index)``;
* :class:`ResumableSampler` - an endless, seeded, rank-aware order whose position is a number
  of micro-batches: resuming at micro-batch ``t`` reproduces the exact data order;
* :func:`make_dataloader`.

Each item is ``{"pixels": float32 (3, R, R) in [0, 1], "caption": str ("" if none), "key": str,
"index": int}``.  Captions come from a sidecar ``<stem>.txt`` next to a folder image, or from the
``<key>.txt`` (or ``.caption``, or ``.json`` with a "caption"/"text"/"prompt" field) entry of the
same sample in a shard.  Shards follow the WebDataset convention (a sample's files share the
key: the member path up to the first dot of its base name) and must be uncompressed tars, which
allows random access by byte offset.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..runtime import derive_seed
from .buckets import GRID, admit, crop_to_tensor, make_buckets, nearest_bucket

logger = logging.getLogger("davae_training.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")
JSON_CAPTION_FIELDS = ("caption", "text", "prompt")
INDEX_VERSION = 1
_HEADER_PROBE = 256 * 1024  # bytes read to learn an image's size inside a shard


@dataclass
class ImageDataConfig:
    """``sources``: folders (searched recursively), ``.tar`` shards, glob patterns or brace ranges
    such as ``data/shard-{000000..000099}.tar``."""

    sources: list[str] = field(default_factory=list)
    resolution: int = 256  # square crop side in pixels
    # shorter side below this is skipped; default: resolution for square crops, and with buckets
    # only the bucket rule (an image must cover its bucket; a set min_size applies on top)
    min_size: int | None = None
    crop: str = "random"  # "random" | "center"
    resize_short_side: bool = False  # first scale the image so its short side == resolution
    # with resize_short_side: also scale smaller images UP to the resolution (ImageNet at 512, where most
    # images are smaller); the scan then admits every image whose short side is >= min_size (default: all)
    upscale_small: bool = False
    random_flip: bool = False
    max_images: int | None = None  # use the first N records (after sorting) only
    index_cache: str | None = None  # JSON index; trainers default it into their output_dir
    verify_images: bool = False  # fully decode every image while scanning (slower, catches truncation early)
    # where the samples come from: "folder" (folders / uncompressed .tar shards, indexed once, exact
    # resume), "webdataset" (shards streamed by the webdataset package, .tar or .tar.gz), "hf" (a
    # Hugging Face dataset: save_to_disk folder, imagefolder folder or hub name); see data/streams.py
    format: str = "folder"
    buckets: bool = False  # aspect-ratio buckets (data/buckets.py) instead of square crops
    bucket_max_aspect: float = 2.0  # the longest bucket side over the shortest
    hf_image_column: str = "image"
    hf_caption_column: str | None = "text"  # None or a missing column: empty captions
    hf_split: str = "train"
    streaming: bool = False  # hf: iterate without downloading/loading it all (order by shuffle buffer)
    shuffle_buffer: int = 1000  # webdataset / streamed hf: samples shuffled within a buffer this big

    def __post_init__(self) -> None:
        if self.format not in ("folder", "webdataset", "hf"):
            raise ValueError(f"data.format must be 'folder', 'webdataset' or 'hf', got {self.format!r}")
        if self.crop not in ("random", "center"):
            raise ValueError(f"data.crop must be 'random' or 'center', got {self.crop!r}")
        if self.resolution <= 0:
            raise ValueError(f"data.resolution must be positive, got {self.resolution}")
        if self.upscale_small and (not self.resize_short_side or self.buckets):
            raise ValueError("data.upscale_small scales the short side up to data.resolution: it needs "
                             "data.resize_short_side=true and square crops (data.buckets=false)")

    @property
    def effective_min_size(self) -> int:
        if self.min_size is not None:
            return self.min_size
        return 1 if self.upscale_small else self.resolution


@dataclass
class ImageRecord:
    key: str
    path: str  # image file, or the shard holding it
    width: int
    height: int
    offset: int = -1  # byte offset of the image inside the shard; -1 for a plain file
    size: int = 0
    caption_path: str | None = None  # sidecar file, or the shard
    caption_offset: int = -1
    caption_size: int = 0
    caption_kind: str = "txt"  # "txt" | "json"


@dataclass
class ScanReport:
    """What the scan kept and skipped; ``too_small``/``unreadable`` hold up to 20 example names."""

    kept: int = 0
    skipped_too_small: int = 0
    skipped_unreadable: int = 0
    too_small: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def note(self, kind: str, name: str, why: str = "") -> None:
        if kind == "too_small":
            self.skipped_too_small += 1
            if len(self.too_small) < 20:
                self.too_small.append(name)
        else:
            self.skipped_unreadable += 1
            if len(self.unreadable) < 20:
                self.unreadable.append(name)
            logger.warning("skipping unreadable image %s (%s)", name, why)

    def summary(self) -> str:
        return (
            f"{self.kept} images kept, {self.skipped_too_small} skipped as smaller than the training "
            f"resolution (or their bucket), {self.skipped_unreadable} skipped as unreadable"
        )


# ---------------------------------------------------------------------------- finding files
def expand_braces(pattern: str) -> list[str]:
    """``shard-{000..002}.tar`` -> three names (zero padding kept), as WebDataset writes them."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out: list[str] = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


def _expand_sources(sources: list[str]) -> list[Path]:
    paths: list[Path] = []
    for src in sources:
        for item in expand_braces(str(src)):
            if any(c in item for c in "*?["):
                matches = sorted(glob.glob(item, recursive=True))
                if not matches:
                    logger.warning("data source %s matches no files", item)
                paths.extend(Path(p) for p in matches)
            else:
                p = Path(item)
                if not p.exists():
                    raise FileNotFoundError(f"data source {p} does not exist; set data.sources to image folders or .tar shards")
                paths.append(p)
    return paths


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _probe_size(data: bytes | str, verify: bool = False) -> tuple[int, int]:
    """(width, height) after EXIF orientation; raises on anything PIL cannot identify
    (with ``verify``, on anything it cannot fully decode)."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        w, h = im.size
        if verify:
            im.load()
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block is not a broken image
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class SizeRule:
    """Which images the index keeps: square crops need a shorter side of ``data.min_size`` (default
    ``data.resolution``); with buckets an image must cover its bucket (:func:`~.buckets.admit`, the
    rule of the streamed formats too), which a wide image with a short side below the resolution can."""

    def __init__(self, config: ImageDataConfig, bucket_grid: int = GRID):
        self.buckets = make_buckets(config.resolution, config.bucket_max_aspect, bucket_grid) if config.buckets else None
        self.min_size = config.min_size if config.buckets else config.effective_min_size

    def too_small(self, width: int, height: int) -> bool:
        if self.buckets is None:
            return min(width, height) < self.min_size
        return admit(width, height, self.buckets, self.min_size)[0] < 0

    def describe(self) -> str:
        if self.buckets is None:
            return f"images need a shorter side >= {self.min_size} px (data.resolution / data.min_size)"
        return ("images need to cover their aspect-ratio bucket (" + ", ".join(f"{w}x{h}" for w, h in self.buckets)
                + ")" + (f" and a shorter side >= {self.min_size} px (data.min_size)" if self.min_size else ""))


def _scan_folder(root: Path, rule: SizeRule, report: ScanReport, verify: bool = False) -> list[ImageRecord]:
    from tqdm.auto import tqdm

    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image_name(p.name))
    records: list[ImageRecord] = []
    for p in tqdm(files, desc=f"scan {root}", disable=len(files) < 1000):
        try:
            w, h = _probe_size(str(p), verify)
        except Exception as e:  # PIL raises many types on bad files
            report.note("unreadable", str(p), f"{type(e).__name__}: {e}")
            continue
        if rule.too_small(w, h):
            report.note("too_small", str(p))
            continue
        key = str(p.relative_to(root).with_suffix(""))
        caption = next((p.with_suffix(ext) for ext in CAPTION_EXTENSIONS if p.with_suffix(ext).is_file()), None)
        records.append(ImageRecord(key=key, path=str(p), width=w, height=h, caption_path=str(caption) if caption else None))
    return records


def _sample_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/abc.seg.jpg`` -> key ``dir/abc``, extension ``.seg.jpg``."""
    head, base = os.path.split(member_name)
    stem, dot, rest = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (dot + rest).lower()


def _scan_shard(shard: Path, rule: SizeRule, report: ScanReport, verify: bool = False) -> list[ImageRecord]:
    if shard.suffix != ".tar" or shard.name.endswith((".tar.gz", ".tgz")):
        raise ValueError(f"{shard}: only uncompressed .tar shards can be read by offset; decompress it (e.g. gunzip) first")
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if m.isfile():
                    key, ext = _sample_key(m.name)
                    samples.setdefault(key, {})[ext] = m
    except (tarfile.TarError, OSError) as e:
        report.note("unreadable", str(shard), f"broken shard after {len(samples)} samples: {e}")
    records: list[ImageRecord] = []
    with open(shard, "rb") as f:
        for key in sorted(samples):
            parts = samples[key]
            img_ext = next((e for e in sorted(parts) if e.endswith(IMAGE_EXTENSIONS)), None)
            if img_ext is None:
                continue
            m = parts[img_ext]
            name = f"{shard}:{m.name}"
            try:
                f.seek(m.offset_data)
                head = f.read(m.size if verify else min(m.size, _HEADER_PROBE))
                try:
                    w, h = _probe_size(head, verify)
                except Exception:
                    if verify:
                        raise
                    f.seek(m.offset_data)
                    w, h = _probe_size(f.read(m.size))
            except Exception as e:
                report.note("unreadable", name, f"{type(e).__name__}: {e}")
                continue
            if rule.too_small(w, h):
                report.note("too_small", name)
                continue
            rec = ImageRecord(key=f"{shard.name}/{key}", path=str(shard), width=w, height=h, offset=m.offset_data, size=m.size)
            cap_ext = next((e for e in CAPTION_EXTENSIONS if e in parts), None)
            cap_kind = "txt"
            if cap_ext is None and ".json" in parts:
                cap_ext, cap_kind = ".json", "json"
            if cap_ext is not None:
                c = parts[cap_ext]
                rec.caption_path, rec.caption_offset, rec.caption_size, rec.caption_kind = str(shard), c.offset_data, c.size, cap_kind
            records.append(rec)
    return records


def build_index(config: ImageDataConfig, bucket_grid: int = GRID) -> tuple[list[ImageRecord], ScanReport]:
    """Scan every source once; bad or small images are counted and skipped, never fatal.
    ``bucket_grid``: the stage's bucket grid in pixels (see data/buckets.py), used with ``data.buckets``."""
    if not config.sources:
        raise ValueError("data.sources is empty: list image folders and/or .tar shards in the config")
    report = ScanReport()
    records: list[ImageRecord] = []
    rule = SizeRule(config, bucket_grid)
    for path in _expand_sources(list(config.sources)):
        if path.is_dir():
            records.extend(_scan_folder(path, rule, report, config.verify_images))
        elif path.suffix == ".tar" or path.name.endswith((".tar.gz", ".tgz")):
            records.extend(_scan_shard(path, rule, report, config.verify_images))
        elif _is_image_name(path.name):
            try:
                w, h = _probe_size(str(path), config.verify_images)
            except Exception as e:
                report.note("unreadable", str(path), f"{type(e).__name__}: {e}")
                continue
            if rule.too_small(w, h):
                report.note("too_small", str(path))
                continue
            records.append(ImageRecord(key=path.stem, path=str(path), width=w, height=h))
        else:
            logger.warning("data source %s is neither a folder, a .tar shard nor an image; ignored", path)
    if config.max_images is not None:
        records = records[: config.max_images]
    report.kept = len(records)
    logger.info("data: %s", report.summary())
    if not records:
        raise ValueError(
            f"no usable images in {list(config.sources)} ({report.summary()}); {rule.describe()}"
        )
    return records, report


def _index_signature(config: ImageDataConfig, bucket_grid: int = GRID) -> dict[str, Any]:
    sig = {"version": INDEX_VERSION, "sources": [str(s) for s in config.sources],
           "min_size": config.effective_min_size, "max_images": config.max_images,
           "verify": config.verify_images}
    if config.buckets:  # the kept images depend on the buckets
        sig.update(min_size=config.min_size, buckets=[config.resolution, config.bucket_max_aspect, bucket_grid])
    return sig


def load_or_build_index(config: ImageDataConfig, accelerator=None, bucket_grid: int = GRID) -> tuple[list[ImageRecord], ScanReport]:
    """:func:`build_index`, cached in ``config.index_cache``: a resumed run sees exactly the same
    records even if files were added meanwhile.  With an accelerator, the main process scans and
    the others read its cache."""
    cache = Path(config.index_cache) if config.index_cache else None
    sig = _index_signature(config, bucket_grid)

    def read_cache() -> tuple[list[ImageRecord], ScanReport] | None:
        if cache is None or not cache.is_file():
            return None
        data = json.loads(cache.read_text())
        if data.get("signature") != sig:
            logger.info("data index %s was built for other sources/sizes; rescanning", cache)
            return None
        return [ImageRecord(**r) for r in data["records"]], ScanReport(**data["report"])

    def build_and_write() -> tuple[list[ImageRecord], ScanReport]:
        records, report = build_index(config, bucket_grid)
        if cache is not None:
            from davae_core.atomic_files import write_json_atomic

            write_json_atomic(cache, {"signature": sig, "report": asdict(report), "records": [asdict(r) for r in records]})
        return records, report

    if accelerator is None or accelerator.num_processes == 1:
        return read_cache() or build_and_write()
    if accelerator.is_main_process:
        result = read_cache() or build_and_write()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        result = read_cache() if cache is not None else None
        if result is None:
            result = build_index(config, bucket_grid)  # no shared cache: each rank scans (same sorted result)
    return result


# ---------------------------------------------------------------------------- reading
def _read_bytes(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        if offset >= 0:
            f.seek(offset)
            return f.read(size)
        return f.read()


def read_caption(record: ImageRecord) -> str:
    if record.caption_path is None:
        return ""
    try:
        raw = _read_bytes(record.caption_path, record.caption_offset, record.caption_size).decode("utf-8", "replace")
    except OSError as e:
        logger.warning("caption of %s unreadable (%s); using an empty caption", record.key, e)
        return ""
    if record.caption_kind == "json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return ""
        return next((str(obj[k]) for k in JSON_CAPTION_FIELDS if isinstance(obj, dict) and k in obj), "")
    return raw.strip()


def load_rgb(record: ImageRecord):
    """The record's image as an RGB PIL image (EXIF orientation applied, alpha over white)."""
    from PIL import Image, ImageOps

    data = _read_bytes(record.path, record.offset, record.size)
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return im.convert("RGB")


def crop_image(img, resolution: int, rng: np.random.Generator, crop: str = "random",
               resize_short_side: bool = False, random_flip: bool = False, upscale_small: bool = False) -> torch.Tensor:
    """PIL image -> (3, R, R) float tensor in [0, 1]; every random choice comes from ``rng``."""
    from PIL import Image

    if resize_short_side:
        scale = resolution / min(img.size)
        # no upscaling unless asked: it invents detail the tokenizer must learn
        if scale < 1.0 or (upscale_small and scale > 1.0):
            new = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
            img = img.resize(new, Image.Resampling.LANCZOS)
    w, h = img.size
    if min(w, h) < resolution:
        raise ValueError(f"image {w}x{h} is smaller than the {resolution}px crop")
    return crop_to_tensor(img, resolution, resolution, rng, crop, random_flip)



class ImageDataset(Dataset):
    """Map-style view of an index. Item ``k`` = record ``k % n`` at epoch ``k // n``.

    A record that fails to decode at read time (a truncated file the header scan could not
    catch) is logged and replaced by the next record, deterministically.
    """

    def __init__(self, records: list[ImageRecord], config: ImageDataConfig, seed: int = 0, bucket_grid: int = GRID):
        if not records:
            raise ValueError("ImageDataset needs at least one record")
        self.records = records
        self.config = config
        self.seed = int(seed)
        self.read_failures = 0  # per worker process
        self.buckets: list[tuple[int, int]] | None = None
        self.bucket_of_record: list[int] | None = None
        if config.buckets:
            self.buckets = make_buckets(config.resolution, config.bucket_max_aspect, bucket_grid)
            self.bucket_of_record = [nearest_bucket(r.width, r.height, self.buckets) for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def item_rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def __getitem__(self, k: int) -> dict[str, Any]:
        n = len(self.records)
        epoch, index = divmod(int(k), n)
        same_bucket = (lambda i: True) if self.bucket_of_record is None else (
            lambda i: self.bucket_of_record[i] == self.bucket_of_record[index])
        candidates = itertools.islice((j for j in ((index + a) % n for a in range(n)) if same_bucket(j)), 16)
        tried = 0
        for i in candidates:  # a replacement comes from the same bucket: batches stay one shape
            tried += 1
            rec = self.records[i]
            try:
                img = load_rgb(rec)
                if self.buckets is not None:
                    from .buckets import crop_to_bucket

                    pixels = crop_to_bucket(img, self.buckets[self.bucket_of_record[i]], self.item_rng(epoch, i),
                                            self.config.crop, self.config.random_flip)
                else:
                    pixels = crop_image(img, self.config.resolution, self.item_rng(epoch, i), self.config.crop,
                                        self.config.resize_short_side, self.config.random_flip, self.config.upscale_small)
            except Exception as e:
                self.read_failures += 1
                logger.warning("skipping unreadable image %s (%s: %s); using the next one", rec.key, type(e).__name__, e)
                continue
            return {"pixels": pixels, "caption": read_caption(rec), "key": rec.key, "index": i}
        raise RuntimeError(f"{tried} images in a row from index {index} failed to load; is the data source intact?")


class ResumableSampler(Sampler[int]):
    """Endless seeded order, split between ranks by micro-batch, restartable at any micro-batch.

    Global micro-batch ``g`` holds positions ``g*B ... g*B+B-1`` of the stream made of one
    shuffled permutation per epoch (seeded by ``seed`` and the epoch).  Rank ``r`` of ``W`` takes
    global micro-batches ``t*W + r`` for its local micro-batches ``t = start, start+1, ...``.
    Yields ``epoch * n + index`` so the dataset knows the epoch too.
    """

    def __init__(self, num_records: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_micro_batch: int = 0, shuffle: bool = True):
        if num_records <= 0 or batch_size <= 0:
            raise ValueError(f"need records and a positive batch size, got {num_records}, {batch_size}")
        self.n = num_records
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_micro_batch = start_micro_batch
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
                self._perm = torch.randperm(self.n, generator=g)
            else:
                self._perm = torch.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def position(self, local_micro_batch: int, j: int) -> int:
        return ((local_micro_batch * self.world_size + self.rank) * self.batch_size) + j

    def item_at(self, position: int) -> int:
        epoch, within = divmod(position, self.n)
        return epoch * self.n + int(self._permutation(epoch)[within])

    def __iter__(self) -> Iterator[int]:
        t = self.start_micro_batch
        while True:
            for j in range(self.batch_size):
                yield self.item_at(self.position(t, j))
            t += 1


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }


def make_dataloader(dataset: Dataset, sampler: ResumableSampler, num_workers: int = 2, pin_memory: bool = False) -> DataLoader:
    """An endless loader of micro-batches (``next(iter(loader))`` forever); not for ``accelerator.prepare``."""
    return DataLoader(
        dataset, batch_size=sampler.batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory, drop_last=True, persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
