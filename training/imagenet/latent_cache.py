"""A latent cache for ImageNet stage 2: encode the class folder once, train from the latents.

    python -m davae_training.imagenet.latent_cache --config training/configs/imagenet/lightningdit_xl_da_paper.yaml \\
        --set data.root=/data/imagenet/train --set tokenizer.path=davae.safetensors --out /data/imagenet_da_latents

then train with ``--set data.latent_cache=/data/imagenet_da_latents``.  Every image is encoded as
the trainer would (ADM centre crop, DA-VAE, normalisation), once as it is and, with
``--flips`` (the default, as LightningDiT's latent extraction does), once mirrored; a training
sample is one of these, so the flip augmentation survives the cache.  Shards are safetensors
(``latents`` (N, C+D, h, w), ``labels`` (N,)); ``cache.json`` is written last and says what
made the cache, and a trainer refuses a cache made for another resolution or class table.
"""

from __future__ import annotations

import argparse
import bisect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from davae_core.atomic_files import atomic_write, write_json_atomic
from davae_core.dtypes import dtype_from_name

from ..checkpoints import file_sha256
from ..data.images import ResumableSampler
from .data import ClassImageFolder, class_names, collate_labelled, index_class_folder

MANIFEST = "cache.json"
VERSION = 1


def write_latent_cache(cfg, out_dir: str | Path, flips: bool = True, shard_size: int = 4096, dtype: str = "bfloat16",
                       device: str | torch.device = "cpu", batch_size: int = 32, num_workers: int = 0) -> dict[str, Any]:
    """Encode ``cfg.data.root`` with ``cfg.tokenizer`` into ``out_dir``; returns the manifest."""
    from tqdm.auto import tqdm

    from .latent_codec import LatentCodec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is back
    codec = LatentCodec.from_config(cfg.tokenizer, cfg.data.encode_batch_size, device)
    names = class_names(cfg.data.root, cfg.data.class_names_file)
    records, labels = index_class_folder(cfg.data.root, names, str(out / "data_index.json"), cfg.data.max_images)
    store = dtype_from_name(dtype, "--dtype")
    shards, count = [], 0
    pending: dict[str, list[torch.Tensor]] = {"latents": [], "labels": []}

    def flush(final: bool = False) -> None:
        """Write whole shards of ``shard_size`` samples (and the rest at the end)."""
        if not pending["labels"]:
            return
        latents, labels_ = torch.cat(pending["latents"]), torch.cat(pending["labels"])
        while len(labels_) >= shard_size or (final and len(labels_)):
            path = out / f"latents-{len(shards):05d}.safetensors"
            with atomic_write(path) as tmp:
                save_file({"latents": latents[:shard_size].to(store).contiguous(), "labels": labels_[:shard_size].contiguous()},
                          str(tmp))
            shards.append({"file": path.name, "count": int(min(shard_size, len(labels_)))})
            latents, labels_ = latents[shard_size:], labels_[shard_size:]
        pending["latents"], pending["labels"] = [latents], [labels_]

    for flip in ([False, True] if flips else [False]):
        dataset = ClassImageFolder(records, labels, cfg.data.resolution, random_flip=False)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_labelled)
        for batch in tqdm(loader, desc="encode (mirrored)" if flip else "encode"):
            pixels = batch["pixels"].flip(-1) if flip else batch["pixels"]
            pending["latents"].append(codec.encode(pixels).cpu())
            pending["labels"].append(batch["label"])
            count += len(batch["label"])
            flush()
    flush(final=True)
    side = codec.latent_side(cfg.data.resolution)
    manifest = {"version": VERSION, "count": count, "resolution": cfg.data.resolution, "flips": flips,
                "channels": codec.layout.channels, "side": side, "num_classes": len(names), "dtype": dtype,
                "tokenizer": cfg.tokenizer.path, "tokenizer_sha256": file_sha256(Path(cfg.tokenizer.path)), "shards": shards}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir}: no {MANIFEST}, so the cache is missing or was not finished; "
                                "rebuild it with python -m davae_training.imagenet.latent_cache")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: cache version {manifest.get('version')}, this trainer reads version {VERSION}; rebuild it")
    return manifest


class LatentCache(Dataset):
    """Item ``k`` = cached sample ``k % n``: ``{"latents" (C+D, h, w) float32, "label", "index"}``."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(cache_dir)
        self.starts, total = [], 0
        for shard in self.manifest["shards"]:
            self.starts.append(total)
            total += int(shard["count"])
        if total != self.manifest["count"] or total == 0:
            raise ValueError(f"{cache_dir}: its shards hold {total} samples, its manifest says {self.manifest['count']}")
        self.n = total
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.n

    def _shard(self, i: int):
        if i not in self._open:  # opened lazily: each loader worker keeps its own handles
            self._open[i] = safe_open(str(self.dir / self.manifest["shards"][i]["file"]), framework="pt")
        return self._open[i]

    def __getitem__(self, k: int) -> dict[str, Any]:
        index = int(k) % self.n
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        f = self._shard(shard)
        return {"latents": f.get_slice("latents")[row:row + 1][0].float(), "label": int(f.get_slice("labels")[row:row + 1][0]),
                "index": index}


def collate_latents(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"latents": torch.stack([it["latents"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items])}


def make_latent_loader(cache_dir: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                       start_micro_batch: int = 0, num_workers: int = 0, pin_memory: bool = False,
                       expect_resolution: int | None = None, num_classes: int = 1000,
                       tokenizer: str | None = None) -> DataLoader:
    """Endless micro-batches of cached latents in the resumable, rank-split order; refuses a cache made at
    another resolution, for more classes, or by another DA-VAE file than ``tokenizer`` (by content)."""
    dataset = LatentCache(cache_dir)
    m = dataset.manifest
    if tokenizer and Path(tokenizer).is_file() and file_sha256(Path(tokenizer)) != m["tokenizer_sha256"]:
        raise ValueError(f"{cache_dir} was encoded by another DA-VAE ({m['tokenizer']}) than tokenizer.path={tokenizer}; "
                         "its latents are not this run's latent space: rebuild the cache or set tokenizer.path to that file")
    if expect_resolution is not None and m["resolution"] != expect_resolution:
        raise ValueError(f"{cache_dir} was made at data.resolution={m['resolution']}, this run trains at {expect_resolution}")
    if m["num_classes"] > num_classes:
        raise ValueError(f"{cache_dir} has {m['num_classes']} classes, the DiT's class table {num_classes}")
    sampler = ResumableSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                               start_micro_batch=start_micro_batch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_latents,
                      pin_memory=pin_memory, drop_last=True, prefetch_factor=2 if num_workers > 0 else None)


def main(argv: list[str] | None = None) -> None:
    from ..config import load_config
    from .config import LightningDiTTrainConfig

    ap = argparse.ArgumentParser(prog="python -m davae_training.imagenet.latent_cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the stage-2 config (its data.* and tokenizer.*)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", required=True, help="cache folder")
    ap.add_argument("--no-flips", action="store_true", help="only the images as they are (no mirrored copies)")
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cfg = load_config(LightningDiTTrainConfig, args.config, args.overrides)
    manifest = write_latent_cache(cfg, args.out, not args.no_flips, args.shard_size, args.dtype, args.device,
                                  args.batch_size, args.num_workers)
    print(f"wrote {manifest['count']} latents ({manifest['channels']}x{manifest['side']}x{manifest['side']}) to {args.out}")


if __name__ == "__main__":
    main()
