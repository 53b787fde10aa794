"""Image + caption pairs for stage 2, and an on-disk cache of what the transformer reads.

Pairs come from :mod:`davae_training.data.images` (folders with sidecar ``.txt`` captions, or WebDataset
``.tar`` shards with ``.txt``/``.json`` captions); captions are kept (the authors' loader
drops them).  Training can run straight from pixels (the DA-VAE and the text encoders run
every step) or from a cache:

    python -m davae_training.stage2.caption_cache --config training/configs/sd35m_1024.yaml

writes ``data.cache_dir``: ``shard-00000.safetensors ...`` holding, per sample, the
normalised structured latent (``latents``, (32, H/16, W/16)), the text tokens (``embeds``,
(T, joint_attention_dim)) and the pooled text vector (``pooled``), in ``cache_dtype``;
``prompts.safetensors`` with the empty prompt's conditioning (prompt dropout) and the sample
prompts'; ``index.json`` with keys, captions and shapes.  A run with a complete cache touches
neither the VAE nor the text encoders.  Crops in the cache are the centre crops (random crops
would freeze one draw per image anyway).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from davae_core.atomic_files import atomic_write, write_json_atomic
from davae_core.dtypes import dtype_from_name

from ..data.images import ImageDataConfig, ImageDataset, ImageRecord
from .config import CaptionDataConfig

logger = logging.getLogger("davae_training.data")

CACHE_INDEX = "index.json"
CACHE_PROMPTS = "prompts.safetensors"
CACHE_VERSION = 1


def cache_is_complete(cache_dir: str | os.PathLike | None) -> bool:
    return cache_dir is not None and (Path(cache_dir) / CACHE_INDEX).is_file()


class CachedConditioningDataset(Dataset):
    """Items ``{"latents", "embeds", "pooled", "caption", "key", "index"}`` from a cache.

    Item ``k`` is sample ``k % n`` (the convention of :class:`davae_training.data.images.ResumableSampler`).
    Tensors are returned in float32.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir)
        if not cache_is_complete(self.root):
            raise FileNotFoundError(
                f"{self.root}: no complete stage-2 cache (missing {CACHE_INDEX}); build it with "
                "python -m davae_training.stage2.caption_cache --config CONFIG"
            )
        index = json.loads((self.root / CACHE_INDEX).read_text())
        if index.get("version") != CACHE_VERSION:
            raise ValueError(f"{self.root}: cache version {index.get('version')} is not {CACHE_VERSION}; rebuild it")
        self.samples: list[dict[str, Any]] = index["samples"]
        self.shapes = index["shapes"]
        self.shard_size = int(index["shard_size"])
        self.text_encoder = index.get("text_encoder", "?")
        if not self.samples:
            raise ValueError(f"{self.root}: the cache holds no samples")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(k) % len(self.samples)
        shard, row = divmod(i, self.shard_size)
        with safe_open(str(self.root / f"shard-{shard:05d}.safetensors"), framework="pt") as f:
            item = {name: f.get_slice(name)[row : row + 1][0].float() for name in ("latents", "embeds", "pooled")}
        s = self.samples[i]
        return {**item, "caption": s["caption"], "key": s["key"], "index": i}

    def prompts(self) -> dict[str, Any]:
        """``null_embeds``/``null_pooled`` (empty prompt) and the sample prompts' conditioning."""
        path = self.root / CACHE_PROMPTS
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
            meta = f.metadata() or {}
        return {**tensors, "sample_prompts": json.loads(meta.get("sample_prompts", "[]"))}


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "latents": torch.stack([it["latents"] for it in items]),
        "embeds": torch.stack([it["embeds"] for it in items]),
        "pooled": torch.stack([it["pooled"] for it in items]),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }


@torch.no_grad()
def build_cache(
    records: list[ImageRecord],
    config: CaptionDataConfig,
    encode_images,
    text,
    sample_prompts: list[str] = (),
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Path:
    """Encode every record once: ``encode_images(pixels01) -> latents`` and ``text.encode(captions)``.

    Shards are written atomically one by one; an interrupted build restarts at the first
    missing shard.  ``index.json`` is written last, so a cache is used only when complete.
    """
    from tqdm.auto import tqdm

    if config.cache_dir is None:
        raise ValueError("data.cache_dir is not set: say where the cache goes")
    if config.images.buckets or config.images.format != "folder":
        # shards hold one latent shape and are indexed by record; bucketed/streamed caches are not built yet
        raise ValueError("data.cache_dir needs data.images.format: folder without data.images.buckets; "
                         "drop data.cache_dir to encode bucketed or streamed images every step")
    root = Path(config.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    dtype = dtype_from_name(config.cache_dtype, "data.cache_dtype")
    images = ImageDataConfig(**{**config.images.__dict__, "crop": "center", "random_flip": False})
    dataset = ImageDataset(records, images, seed=seed)
    n, size = len(dataset), config.cache_shard_size
    samples: list[dict[str, Any]] = []
    shapes: dict[str, list[int]] = {}
    bar = tqdm(total=n, desc="cache latents+text", dynamic_ncols=True)
    for shard in range(math.ceil(n / size)):
        path = root / f"shard-{shard:05d}.safetensors"
        lo, hi = shard * size, min(n, (shard + 1) * size)
        if path.is_file():  # built before an interruption: only its index entries are needed
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["samples"])
                shapes = {k: list(f.get_slice(k).get_shape()[1:]) for k in ("latents", "embeds", "pooled")}
            samples.extend(meta)
            bar.update(hi - lo)
            continue
        out: dict[str, list[torch.Tensor]] = {"latents": [], "embeds": [], "pooled": []}
        meta = []
        for b in range(lo, hi, config.cache_batch_size):  # one batch of pixels in memory at a time
            chunk = [dataset[i] for i in range(b, min(hi, b + config.cache_batch_size))]
            pixels = torch.stack([it["pixels"] for it in chunk]).to(device)
            out["latents"].append(encode_images(pixels).cpu().to(dtype))
            embeds, pooled = text.encode([it["caption"] for it in chunk])
            out["embeds"].append(embeds.cpu().to(dtype))
            out["pooled"].append(pooled.cpu().to(dtype))
            meta.extend({"key": it["key"], "caption": it["caption"]} for it in chunk)
            bar.update(len(chunk))
        tensors = {k: torch.cat(v).contiguous() for k, v in out.items()}
        shapes = {k: list(v.shape[1:]) for k, v in tensors.items()}
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={"samples": json.dumps(meta)})
        samples.extend(meta)
    bar.close()
    null_embeds, null_pooled = text.encode([""])
    prompt_tensors = {"null_embeds": null_embeds[0].float().cpu().contiguous(), "null_pooled": null_pooled[0].float().cpu().contiguous()}
    if sample_prompts:
        e, p = text.encode(list(sample_prompts))
        prompt_tensors.update(sample_embeds=e.float().cpu().contiguous(), sample_pooled=p.float().cpu().contiguous())
    save_file(prompt_tensors, str(root / CACHE_PROMPTS), metadata={"sample_prompts": json.dumps(list(sample_prompts))})
    index = {"version": CACHE_VERSION, "shard_size": size, "shapes": shapes, "samples": samples,
             "text_encoder": getattr(text, "name", type(text).__name__), "dtype": config.cache_dtype}
    write_json_atomic(root / CACHE_INDEX, index, indent=None)  # last: its presence means the cache is complete
    logger.info("cache %s: %d samples, shapes %s", root, len(samples), shapes)
    return root


def main(argv: list[str] | None = None) -> None:
    from ..config import load_config
    from ..data.images import load_or_build_index
    from .config import AdapterTrainConfig, load_davae_for_training
    from .text_conditioning import build_text_conditioner

    ap = argparse.ArgumentParser(prog="python -m davae_training.stage2.caption_cache", description="Build the stage-2 latent+text cache.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cfg = load_config(AdapterTrainConfig, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO)
    if cfg.data.images.index_cache is None:
        cfg.data.images.index_cache = str(Path(cfg.train.output_dir) / "data_index.json")
    records, _ = load_or_build_index(cfg.data.images)
    davae = load_davae_for_training(cfg.tokenizer, args.device)
    text = build_text_conditioner(cfg.text, cfg.model.pretrained, args.device)
    build_cache(records, cfg.data, davae.encode, text, cfg.sampling.prompts, args.device, cfg.train.seed)


if __name__ == "__main__":
    main()
