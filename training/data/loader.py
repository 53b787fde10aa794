"""One entry point both trainers use: the endless micro-batch loader for ``data.format`` and ``data.buckets``."""

from __future__ import annotations

import logging

from torch.utils.data import DataLoader

from .buckets import GRID
from .images import ImageDataConfig, ImageDataset, ResumableSampler, collate, load_or_build_index, make_dataloader

logger = logging.getLogger("davae_training.data")


def make_training_loader(config: ImageDataConfig, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                         start_micro_batch: int = 0, num_workers: int = 0, accelerator=None,
                         pin_memory: bool = False, bucket_grid: int = GRID) -> DataLoader:
    """Folders/uncompressed shards: the scanned index with exact resume (square crops or buckets);
    ``webdataset`` / ``hf``: :class:`~davae_training.data.streams.StreamingBatches` (also exact on resume
    with the same world size and worker count).  ``bucket_grid``: the stage's bucket grid in pixels
    (stage 1: 16; stage 2: DA-VAE factor x transformer patch, see stage2/latent_grid.py)."""
    if config.format == "folder":
        records, _ = load_or_build_index(config, accelerator, bucket_grid)
        dataset = ImageDataset(records, config, seed=seed, bucket_grid=bucket_grid)
        if dataset.bucket_of_record is None:
            sampler = ResumableSampler(len(records), batch_size, seed=seed, rank=rank, world_size=world_size,
                                       start_micro_batch=start_micro_batch)
            return make_dataloader(dataset, sampler, num_workers, pin_memory)
        from .buckets import BucketBatchSampler

        batches = BucketBatchSampler(dataset.bucket_of_record, batch_size, seed=seed, rank=rank,
                                     world_size=world_size, start_micro_batch=start_micro_batch)
        return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                          pin_memory=pin_memory, prefetch_factor=2 if num_workers > 0 else None)
    from .streams import StreamingBatches

    stream = StreamingBatches(config, batch_size, seed=seed, rank=rank, world_size=world_size,
                              start_micro_batch=start_micro_batch, num_workers=num_workers, bucket_grid=bucket_grid)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=2 if num_workers > 0 else None)
