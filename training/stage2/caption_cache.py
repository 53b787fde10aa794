"""Image + caption pairs for stage 2, and an on-disk cache of what the transformer reads.

Pairs come from ``data.images`` (:mod:`davae_training.data.images`: folders with sidecar ``.txt``
captions or uncompressed ``.tar`` shards; :mod:`davae_training.data.streams`: WebDataset shards or
a Hugging Face dataset); captions are kept (the authors' loader drops them).  Training can run
straight from pixels (the DA-VAE and the text encoders run every step) or from a cache:

    python -m davae_training.stage2.caption_cache --config training/configs/sd35m_1024.yaml

writes ``data.cache_dir``:

* ``shard-WWWWW-bBBB.safetensors``: the samples of source window ``W`` (``cache_shard_size``
  consecutive source positions: records of a folder index, or samples of a stream, corrupt ones
  included) that fell into bucket ``B``, so a shard holds one latent shape.  Per sample: the
  normalised structured latent (``latents``, (32, H/16, W/16)), the text tokens (``embeds``,
  (T, joint_attention_dim)) and the pooled text vector (``pooled``), in ``cache_dtype``.
  Without ``data.images.buckets`` every sample is a square centre crop in bucket 0.  Bucket sides
  (and the square side) are multiples of the DA-VAE factor times the transformer's patch size
  (32 for SD3, :mod:`davae_training.stage2.latent_grid`), so every cached latent has whole patches.
* ``prompts.safetensors``: the empty prompt's conditioning (prompt dropout) and the sample prompts'.
* ``index.json``, written last: the settings the cache was built with (the bucket grid among
  them), the latent factor and patch size, the bucket list, the shards, and per sample its key,
  caption, shard, row and bucket.

A cache serves only a config that would make the same tensors: the crop settings, the DA-VAE (its
file's SHA-256 and ``tokenizer.dtype``), the text conditioning (``text.kind``, the T5 length
``text.max_sequence_length``, ``text.dtype``, whether T5 is there; the stand-in's sizes) and
``data.cache_dtype`` are recorded, and training refuses a cache built with other ones, naming each
setting and the command that rebuilds it.  (The text encoders' folder is not compared: SD3,
SD3.5-Medium and -Large share CLIP-L, CLIP-G and T5.)

Crops are centre crops, never flipped (random ones would freeze one draw per image anyway).
Streams are read once, single process, in their own order (shards as listed, dataset rows in
order), without shuffling; corrupt or too-small samples are skipped and counted in the log as in
training.  Restart: shards are written atomically once their window is encoded; a rerun reads
the source again (the order is deterministic) and encodes only the windows whose shards are
missing, so it ends with the same files as an uninterrupted build.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from davae_core.atomic_files import atomic_write, write_json_atomic
from davae_core.dtypes import dtype_from_name

from ..checkpoints import file_sha256
from ..data.buckets import make_buckets
from ..data.images import ImageDataConfig, ImageRecord, load_rgb, read_caption
from ..data.streams import StreamReport, decode_rgb, make_source, sample_pixels
from .config import CaptionDataConfig, TokenizerConfig
from .latent_grid import LatentGrid, check_latent_sides
from .text_conditioning import text_settings

logger = logging.getLogger("davae_training.data")

CACHE_INDEX = "index.json"
CACHE_PROMPTS = "prompts.safetensors"
CACHE_VERSION = 4  # 2: shards per bucket; 3: the bucket grid of the transformer's patches; 4: text and DA-VAE settings
TENSORS = ("latents", "embeds", "pooled")
BUILD_COMMAND = "python -m davae_training.stage2.caption_cache --config CONFIG"


def cache_is_complete(cache_dir: str | os.PathLike | None) -> bool:
    return cache_dir is not None and (Path(cache_dir) / CACHE_INDEX).is_file()


def cache_settings(images: ImageDataConfig, bucket_grid: int | None) -> dict[str, Any]:
    """The settings that decide a cached latent's shape and crop: ``data.images`` ones and, with
    buckets, the bucket grid in pixels; a cache serves only a config that asks for the same."""
    settings: dict[str, Any] = {"resolution": int(images.resolution), "buckets": bool(images.buckets)}
    if images.buckets:
        settings["bucket_max_aspect"] = float(images.bucket_max_aspect)
        settings["bucket_grid"] = None if bucket_grid is None else int(bucket_grid)
    else:
        settings["resize_short_side"] = bool(images.resize_short_side)
        if images.upscale_small:  # recorded only when on: caches made before the option stay valid
            settings["upscale_small"] = True
    return settings


def davae_identity(tokenizer: TokenizerConfig) -> dict[str, Any]:
    """The DA-VAE that encodes, by content (its file's SHA-256), and the dtype it runs in."""
    return {"tokenizer.sha256": file_sha256(Path(tokenizer.path)), "tokenizer.dtype": tokenizer.dtype}


def expected_encoding(cfg) -> dict[str, Any]:
    """What a stage-2 config (``AdapterTrainConfig``) would make the cached tensors with: the storage
    dtype, its text settings and, when ``tokenizer.path`` is set, its DA-VAE."""
    encoding = {"data.cache_dtype": cfg.data.cache_dtype, **text_settings(cfg.text, cfg.model.pretrained)}
    if cfg.tokenizer.path:
        encoding.update(davae_identity(cfg.tokenizer))
    return encoding


_ORDER = ("resolution", "buckets", "bucket_max_aspect", "resize_short_side", "upscale_small", "bucket_grid")


def _describe(settings: dict[str, Any]) -> str:
    """Settings as the config names them: bare keys are ``data.images.*``, dotted keys their own."""
    def one(key: str, value: Any) -> str:
        if key == "bucket_grid":
            return f"bucket sides multiples of {value} px (DA-VAE factor x transformer patch)"
        if key == "tokenizer.sha256":
            return f"the DA-VAE file (tokenizer.path) with SHA-256 {value[:16]}..."
        if key == "text.t5":
            return f"T5 {'present' if value else 'absent'} in the text encoders' folder (text_encoder_3)"
        return f"{key if '.' in key else 'data.images.' + key}={json.dumps(value)}"

    keys = sorted(settings, key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))
    return ", ".join(one(k, settings[k]) for k in keys)


def _differing(built: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Keys whose values differ; the DA-VAE's only where both sides know it (training from a cache
    needs no tokenizer.path, and a cache built through the API may not record one)."""
    missing = object()
    return [k for k in sorted(built.keys() | wanted.keys()) if built.get(k, missing) != wanted.get(k, missing)
            and not (k.startswith("tokenizer.") and (k not in built or k not in wanted))]


def check_cache_settings(root: Path, built: dict[str, Any], wanted: dict[str, Any]) -> None:
    keys = _differing(built, wanted)
    if keys:
        raise ValueError(
            f"{root}: the cache was built with {_describe({k: built[k] for k in keys if k in built})}, but the config "
            f"asks for {_describe({k: wanted[k] for k in keys if k in wanted})}. Rebuild it for this config "
            f"({BUILD_COMMAND}) into another data.cache_dir (or after deleting {root}), "
            "or set data.cache_dir to a cache built with these settings."
        )


def cache_buckets(images: ImageDataConfig, bucket_grid: int) -> list[tuple[int, int]]:
    """(width, height) of each bucket; the square crop is the only bucket without ``data.images.buckets``."""
    if images.buckets:
        return make_buckets(images.resolution, images.bucket_max_aspect, bucket_grid)
    return [(images.resolution, images.resolution)]


def shard_name(window: int, bucket: int) -> str:
    return f"shard-{window:05d}-b{bucket:03d}.safetensors"


# ---------------------------------------------------------------------------- reading a cache
class CachedConditioningDataset(Dataset):
    """Items ``{"latents", "embeds", "pooled", "caption", "key", "index", "bucket"}`` from a cache.

    Item ``k`` is sample ``k % n`` (the convention of :class:`davae_training.data.images.ResumableSampler`
    and :class:`davae_training.data.buckets.BucketBatchSampler`).  Tensors are returned in float32.
    With ``expect`` (the config's ``data.images``) a cache built with other crop settings is refused;
    with ``patch_size`` (the transformer's) one whose latents are not whole patches, or whose buckets
    are on another grid than the cache's latent factor times ``patch_size``, is refused too; with
    ``encoding`` (:func:`expected_encoding` of the config) one whose tensors another DA-VAE, other
    text settings (the T5 length...) or another storage dtype made.
    """

    def __init__(self, cache_dir: str | os.PathLike, expect: ImageDataConfig | None = None, patch_size: int | None = None,
                 encoding: dict[str, Any] | None = None):
        self.root = Path(cache_dir)
        if not cache_is_complete(self.root):
            raise FileNotFoundError(f"{self.root}: no complete stage-2 cache (missing {CACHE_INDEX}); build it with {BUILD_COMMAND}")
        index = json.loads((self.root / CACHE_INDEX).read_text())
        version = index.get("version")
        if version != CACHE_VERSION:
            raise ValueError(
                f"{self.root}: cache version {version}, this code reads version {CACHE_VERSION} (shards per bucket, the text and DA-VAE "
                f"settings recorded, buckets on the transformer's patch grid); rebuild it with {BUILD_COMMAND} into another data.cache_dir (or after deleting {self.root})"
            )
        self.settings: dict[str, Any] = index["settings"]
        self.encoding: dict[str, Any] = index["encoding"]
        self.latent_factor: int = int(index["latent_factor"])
        built, wanted = {}, {}
        if expect is not None:
            grid = self.latent_factor * patch_size if patch_size else self.settings.get("bucket_grid")
            built.update(self.settings)
            wanted.update(cache_settings(expect, grid))
        if encoding is not None:
            built.update(self.encoding)
            wanted.update(encoding)
        check_cache_settings(self.root, built, wanted)
        self.samples: list[dict[str, Any]] = index["samples"]
        self.shards: list[str] = index["shards"]
        self.buckets: list[tuple[int, int]] = [tuple(b) for b in index["buckets"]]
        self.bucket_of_sample: list[int] = [int(s["bucket"]) for s in self.samples]
        self.text_encoder = self.encoding["text.kind"]
        if not self.samples:
            raise ValueError(f"{self.root}: the cache holds no samples")
        if patch_size is not None:
            for b, shape in sorted(index.get("latent_shapes", {}).items()):
                w, h = self.buckets[int(b)]
                check_latent_sides(shape, patch_size, f"{self.root}: the cached latents of bucket {w}x{h}", self.latent_factor)

    @property
    def buckets_used(self) -> list[int]:
        return sorted(set(self.bucket_of_sample))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(k) % len(self.samples)
        s = self.samples[i]
        row = int(s["row"])
        with safe_open(str(self.root / self.shards[s["shard"]]), framework="pt") as f:
            item = {name: f.get_slice(name)[row : row + 1][0].float() for name in TENSORS}
        return {**item, "caption": s["caption"], "key": s["key"], "index": i, "bucket": int(s["bucket"])}

    def prompts(self) -> dict[str, Any]:
        """``null_embeds``/``null_pooled`` (empty prompt) and the sample prompts' conditioning."""
        path = self.root / CACHE_PROMPTS
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
            meta = f.metadata() or {}
        return {**tensors, "sample_prompts": json.loads(meta.get("sample_prompts", "[]"))}


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    shapes = {tuple(it["latents"].shape) for it in items}
    if len(shapes) > 1:  # a sampler that mixes buckets; BucketBatchSampler never does
        raise ValueError(f"a micro-batch mixes latent shapes {sorted(shapes)}; batch a bucketed cache with BucketBatchSampler")
    return {
        "latents": torch.stack([it["latents"] for it in items]),
        "embeds": torch.stack([it["embeds"] for it in items]),
        "pooled": torch.stack([it["pooled"] for it in items]),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }


# ---------------------------------------------------------------------------- building a cache
# a source position, the sample's key, and how to get its (image, caption): decoding is deferred so
# that a rerun can step over windows already written without decoding them
Candidate = tuple[int, str, Callable[[], tuple[Any, str]]]


def _folder_candidates(records: list[ImageRecord]) -> Iterator[Candidate]:
    for i, rec in enumerate(records):
        yield i, rec.key, (lambda rec=rec: (load_rgb(rec), read_caption(rec)))


def _stream_candidates(images: ImageDataConfig, report: StreamReport) -> Iterator[Candidate]:
    for i, raw in enumerate(make_source(images).in_order(report)):
        yield i, raw.key, (lambda raw=raw: (decode_rgb(raw.image), raw.caption))


def _build_signature(config: CaptionDataConfig, encoding: dict[str, Any], grid: LatentGrid) -> dict[str, Any]:
    """What must match for a rerun to reuse shards already written."""
    im = config.images
    source = {"format": im.format, "sources": [str(s) for s in im.sources], "max_images": im.max_images}
    if im.format == "hf":
        source.update(hf_image_column=im.hf_image_column, hf_caption_column=im.hf_caption_column, hf_split=im.hf_split)
    return {"settings": cache_settings(im, grid.pixels), "source": source, "shard_size": int(config.cache_shard_size),
            "encoding": encoding}


def _flat_signature(signature: dict[str, Any]) -> dict[str, Any]:
    return {**signature.get("source", {}), "data.cache_shard_size": signature.get("shard_size"),
            **signature.get("settings", {}), **signature.get("encoding", {})}


class _CacheWriter:
    """Encodes one window of source positions at a time and writes its shards (one per bucket)."""

    def __init__(self, root: Path, config: CaptionDataConfig, signature: dict[str, Any], encode_images, text,
                 device, report: StreamReport, rng: np.random.Generator, grid: LatentGrid):
        self.root, self.config, self.signature, self.grid = root, config, signature, grid
        self.images = ImageDataConfig(**{**config.images.__dict__, "crop": "center", "random_flip": False})
        self.buckets = cache_buckets(self.images, grid.pixels) if self.images.buckets else None
        self.encode_images, self.text, self.device, self.report, self.rng = encode_images, text, device, report, rng
        self.dtype = dtype_from_name(config.cache_dtype, "data.cache_dtype")
        self.encoded_windows = 0

    def written_window(self, window: int) -> list[tuple[str, dict[str, Any]]] | None:
        """The shards of a window an earlier run finished, as (file name, metadata); None if it did not."""
        files = sorted(self.root.glob(f"shard-{window:05d}-b*.safetensors"))
        if not files:
            return None
        out = []
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shapes = {k: list(f.get_slice(k).get_shape()[1:]) for k in TENSORS}
            built, wanted = _flat_signature(json.loads(meta.get("build", "{}"))), _flat_signature(self.signature)
            keys = _differing(built, wanted)
            if keys:
                raise ValueError(
                    f"{path} was written by a cache build with {_describe({k: built[k] for k in keys if k in built})}; this "
                    f"build has {_describe({k: wanted[k] for k in keys if k in wanted})}. Delete {self.root} or choose "
                    "another data.cache_dir"
                )
            out.append((path.name, {**meta, "shapes": shapes}))
        expected = {shard_name(window, b) for b in json.loads(out[0][1]["window_buckets"])}
        if {name for name, _ in out} != expected:
            return None  # interrupted between two of its shards: encode the window again
        return out

    def encode_window(self, window: int, candidates: Iterator[Candidate], bar) -> list[tuple[str, dict[str, Any]]]:
        batch_size = self.config.cache_batch_size
        pending: dict[int, list[tuple[int, str, str, torch.Tensor]]] = {}
        encoded: dict[int, dict[str, list[torch.Tensor]]] = {}
        metas: dict[int, list[dict[str, Any]]] = {}
        skipped = {"corrupt": 0, "too_small": 0}

        def flush(b: int) -> None:  # one batch of pixels in memory per bucket at a time
            chunk = pending.pop(b, [])
            if not chunk:
                return
            pixels = torch.stack([c[3] for c in chunk]).to(self.device)
            embeds, pooled = self.text.encode([c[2] for c in chunk])
            latents = self.encode_images(pixels)
            self.grid.check_latent(latents.shape, f"the DA-VAE's latents of {pixels.shape[-1]}x{pixels.shape[-2]} crops")
            out = encoded.setdefault(b, {k: [] for k in TENSORS})
            out["latents"].append(latents.cpu().to(self.dtype))
            out["embeds"].append(embeds.cpu().to(self.dtype))
            out["pooled"].append(pooled.cpu().to(self.dtype))
            metas.setdefault(b, []).extend({"key": c[1], "caption": c[2], "position": c[0]} for c in chunk)

        for position, key, load in candidates:
            self.report.seen += 1
            bar.update(1)
            try:
                img, caption = load()
                pixels, why, b = sample_pixels(img, self.images, self.buckets, self.rng)
            except Exception as e:  # PIL raises many types on bad data
                self.report.skip("corrupt", key, f"{type(e).__name__}: {e}", 0)
                skipped["corrupt"] += 1
                continue
            if pixels is None:
                self.report.skip("too_small", key, why, 0)
                skipped["too_small"] += 1
                continue
            self.report.kept += 1
            pending.setdefault(b, []).append((position, key, caption, pixels))
            if len(pending[b]) == batch_size:
                flush(b)
        for b in sorted(pending):
            flush(b)
        written = []
        window_buckets = sorted(encoded)
        for b in window_buckets:
            tensors = {k: torch.cat(v).contiguous() for k, v in encoded[b].items()}
            meta = {"samples": json.dumps(metas[b]), "window": str(window), "bucket": str(b),
                    "window_buckets": json.dumps(window_buckets), "window_skipped": json.dumps(skipped),
                    "build": json.dumps(self.signature)}
            with atomic_write(self.root / shard_name(window, b)) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
            written.append((shard_name(window, b), {**meta, "shapes": {k: list(v.shape[1:]) for k, v in tensors.items()}}))
        self.encoded_windows += 1
        return written


@torch.no_grad()
def build_cache(
    records: list[ImageRecord] | None,
    config: CaptionDataConfig,
    encode_images,
    text,
    sample_prompts: list[str] = (),
    device: torch.device | str = "cpu",
    seed: int = 0,
    *,
    grid: LatentGrid,
    davae: dict[str, Any] | None = None,
) -> Path:
    """Encode every sample once: ``encode_images(pixels01) -> latents`` and ``text.encode(captions)``.

    ``grid``: the DA-VAE's latent factor and the transformer's patch size; crops (square or
    bucketed) have sides that are multiples of their product, and every latent is checked.
    ``davae``: :func:`davae_identity` of the DA-VAE behind ``encode_images``, recorded with
    ``text.settings`` and ``data.cache_dtype`` so that training can refuse a cache that another
    DA-VAE, other text settings or another dtype made (the command always records it).

    ``records`` is the folder index (``data.images.format: folder``); streamed formats pass None
    and are read from ``data.images.sources``.  See the module docstring for the layout and restart.
    ``seed`` seeds the crop generator (centre crops without flips draw nothing from it).
    """
    from tqdm.auto import tqdm

    if config.cache_dir is None:
        raise ValueError("data.cache_dir is not set: say where the cache goes")
    images = config.images
    if images.format == "folder" and records is None:
        raise ValueError("data.images.format folder: pass the records of its index (data.images.load_or_build_index)")
    if images.format != "folder" and records is not None:
        raise ValueError(f"data.images.format {images.format} is read from data.images.sources; pass records=None")
    grid.check_image_size(images.resolution, images.resolution, "data.images.resolution")
    root = Path(config.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    encoding = {"data.cache_dtype": config.cache_dtype, **text.settings, **(davae or {})}
    if cache_is_complete(root):  # rebuilding over a finished cache is fine only with the same settings
        old = json.loads((root / CACHE_INDEX).read_text())
        if old.get("version") != CACHE_VERSION:
            raise ValueError(f"{root} holds a version-{old.get('version')} cache; delete it or choose another data.cache_dir")
        check_cache_settings(root, {**old["settings"], **old["encoding"]}, {**cache_settings(images, grid.pixels), **encoding})
    signature = _build_signature(config, encoding, grid)
    report = StreamReport()
    writer = _CacheWriter(root, config, signature, encode_images, text, device, report, np.random.default_rng(seed), grid)
    candidates = _folder_candidates(records) if records is not None else _stream_candidates(images, report)
    size = config.cache_shard_size
    shards: list[tuple[str, dict[str, Any]]] = []
    restored = {"corrupt": 0, "too_small": 0}
    bar = tqdm(total=len(records) if records is not None else None, desc="cache latents+text", dynamic_ncols=True)
    for window, group in itertools.groupby(candidates, key=lambda c: c[0] // size):
        done = writer.written_window(window)
        if done is None:
            shards.extend(writer.encode_window(window, group, bar))
            continue
        keys = {position: key for position, key, _ in group}  # read past it (the order is fixed), decode nothing
        bar.update(len(keys))
        for name, meta in done:
            for m in json.loads(meta["samples"]):
                if keys.get(m["position"]) != m["key"]:
                    raise ValueError(f"{root / name}: the source changed since this shard was written (position "
                                     f"{m['position']} held {m['key']}, now {keys.get(m['position'])}); delete {root} "
                                     "or choose another data.cache_dir")
        shards.extend(done)
        for kind, n in json.loads(done[0][1]["window_skipped"]).items():
            restored[kind] += n
    bar.close()

    samples: list[dict[str, Any]] = []
    latent_shapes: dict[str, list[int]] = {}
    shapes: dict[str, list[int]] = {}
    for s, (name, meta) in enumerate(shards):
        b = int(meta["bucket"])
        latent_shapes[str(b)] = meta["shapes"]["latents"]
        shapes = {k: meta["shapes"][k] for k in ("embeds", "pooled")}
        samples.extend({**m, "shard": s, "row": r, "bucket": b} for r, m in enumerate(json.loads(meta["samples"])))
    samples.sort(key=lambda m: m["position"])
    if not samples:
        raise ValueError(f"no usable sample in {list(images.sources)} ({report.skipped_corrupt + restored['corrupt']} corrupt, "
                         f"{report.skipped_too_small + restored['too_small']} too small; examples: {report.skipped_examples[:3]})")
    skipped = {"corrupt": report.skipped_corrupt + restored["corrupt"], "too_small": report.skipped_too_small + restored["too_small"]}

    null_embeds, null_pooled = text.encode([""])
    prompt_tensors = {"null_embeds": null_embeds[0].float().cpu().contiguous(), "null_pooled": null_pooled[0].float().cpu().contiguous()}
    if sample_prompts:
        e, p = text.encode(list(sample_prompts))
        prompt_tensors.update(sample_embeds=e.float().cpu().contiguous(), sample_pooled=p.float().cpu().contiguous())
    with atomic_write(root / CACHE_PROMPTS) as tmp:
        save_file(prompt_tensors, str(tmp), metadata={"sample_prompts": json.dumps(list(sample_prompts))})
    index = {"version": CACHE_VERSION, "settings": signature["settings"], "source": signature["source"],
             "latent_factor": grid.latent_factor, "patch_size": grid.patch_size,
             "buckets": [list(b) for b in cache_buckets(images, grid.pixels)], "shard_size": size, "shards": [name for name, _ in shards],
             "latent_shapes": latent_shapes, "shapes": shapes, "skipped": skipped, "samples": samples,
             "encoding": encoding}
    write_json_atomic(root / CACHE_INDEX, index, indent=None)  # last: its presence means the cache is complete
    logger.info("cache %s: %d samples in %d shards (%d windows encoded now), %d corrupt and %d too small skipped; latent shapes %s",
                root, len(samples), len(shards), writer.encoded_windows, skipped["corrupt"], skipped["too_small"], latent_shapes)
    return root


def main(argv: list[str] | None = None) -> None:
    from ..config import load_config
    from ..data.images import load_or_build_index
    from .config import AdapterTrainConfig, load_davae_for_training
    from .model import read_patch_size
    from .text_conditioning import build_text_conditioner

    ap = argparse.ArgumentParser(prog="python -m davae_training.stage2.caption_cache", description="Build the stage-2 latent+text cache.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cfg = load_config(AdapterTrainConfig, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO)
    if not cfg.model.pretrained:
        raise ValueError("model.pretrained is empty: the cache needs the transformer's patch size for its bucket grid; "
                         "set it to the SD3.5 folder or single file that stage 2 trains")
    davae = load_davae_for_training(cfg.tokenizer, args.device)
    grid = LatentGrid(davae.layout.factor, read_patch_size(cfg.model.pretrained))
    records = None
    if cfg.data.images.format == "folder":
        if cfg.data.images.index_cache is None:
            cfg.data.images.index_cache = str(Path(cfg.train.output_dir) / "data_index.json")
        records, _ = load_or_build_index(cfg.data.images, bucket_grid=grid.pixels)
    text = build_text_conditioner(cfg.text, cfg.model.pretrained, args.device)
    build_cache(records, cfg.data, davae.encode, text, cfg.sampling.prompts, args.device, cfg.train.seed, grid=grid,
                davae=davae_identity(cfg.tokenizer))


if __name__ == "__main__":
    main()
