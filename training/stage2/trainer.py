"""Stage 2: warm-start SD3.5 on structured DA latents (LoRA + DA heads), exported for ComfyUI.

    accelerate launch -m davae_training.train_adapter --config training/configs/sd35m_1024.yaml
    python -m davae_training.train_adapter --config training/configs/adapter_tiny.yaml --set train.max_steps=20
    torchrun --nproc_per_node 2 -m davae_training.train_adapter --config ... [--resume latest]
    accelerate launch --config_file training/accelerate/fsdp.yaml -m davae_training.train_adapter --config ...

Per optimizer step: ``train.gradient_accumulation_steps`` micro-batches of structured latents
(from the DA-VAE, or from the cache of :mod:`davae_training.stage2.caption_cache`) and their text
conditioning (prompt dropout for CFG), the rectified-flow loss of
:mod:`davae_training.stage2.objective` with the detail ramp w(n) (:class:`~.step.AdapterStep`),
then AdamW on LoRA + P, P', O, O' and the EMA; the loop around it is the kit of
:mod:`davae_training.loop`.  Checkpoints (``train.checkpoint_every``) hold only the trained tensors
(``adapter_trained.safetensors``, ``adapter_trained_ema.safetensors``) plus the optimizer state and
lr schedule; ``--resume latest`` continues with the exact data order and noise.  TensorBoard gets ``loss``, ``loss/base_mse``, ``loss/detail_mse`` (apart, as in Fig. S3
of the paper), ``detail_weight`` and ``lr``; sample grids go to ``<output_dir>/samples``.  At the
end ``<output_dir>/final`` holds the trained tensors and a summary, and ``<output_dir>/export``
the ComfyUI files (:mod:`davae_training.stage2.export`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from davae_core.dtypes import dtype_from_name

from ..checkpoints import FINAL_DIR
from ..config import add_common_arguments, load_config
from ..data.buckets import BucketBatchSampler
from ..data.images import ResumableSampler
from ..data.loader import make_training_loader
from ..loop import TrainingLoop
from ..runtime import logger
from ..sharding import gather_whole
from .caption_cache import CachedConditioningDataset, cache_is_complete, collate_cached, expected_encoding
from .conditioning import Conditioning, dtype_of
from .config import AdapterTrainConfig
from .export import write_for_comfy
from .latent_grid import LatentGrid
from .model import AdapterModel, check_base_dtype
from .run_file import EMA_FILE, TRAINED_FILE, run_info, save_trained
from .sampler import sample_latents
from .step import AdapterStep


# ---------------------------------------------------------------------------- the run
def train(cfg: AdapterTrainConfig, resume: str | None = None, change_learning_rate: bool = False) -> dict[str, Any]:
    """Train, checkpoint, export; returns the run's summary (``final/summary.json``)."""
    with TrainingLoop(cfg, resume, change_learning_rate, "stage 2", bar_keys=("loss", "detail_weight")) as loop:
        check_base_dtype(cfg.model.base_dtype, cfg.train.mixed_precision)
        adapter = AdapterModel.build(cfg.model, gradient_checkpointing=cfg.train.gradient_checkpointing)
        adapter.network.train()
        logger.info("training %d tensors (%.2fM values): LoRA r=%d alpha=%g on %s, plus P, P', O, O'",
                    len(adapter.trained_parameters()), sum(p.numel() for p in adapter.trained_parameters().values()) / 1e6,
                    cfg.model.lora_rank, cfg.model.lora_alpha, ", ".join(cfg.model.lora_targets))
        loop.prepare(adapter)  # engine; optimizer, lr schedule, EMA of the prepared parameters; resume

        cached = open_cache(cfg, adapter.patch_size)
        cond = Conditioning.from_config(cfg, loop.device, cached)
        grid = LatentGrid(cond.latent_factor, adapter.patch_size)  # image and bucket sides: multiples of grid.pixels (32 for SD3)
        check_sizes(cfg, grid)
        batches = iter(build_dataloader(cfg, loop.accelerator, loop.state.micro_batches, grid, cached))
        step = AdapterStep(adapter, cond, cfg.objective)
        sample_tag = "samples (EMA)" if cfg.sampling.use_ema and adapter.ema is not None else "samples"

        while loop.running:
            for micro in loop.micro_batches():
                with loop.accumulate():
                    loss, logs = step(next(batches), loop.step, loop.generator(micro))
                    loop.backward(loss, logs)
            loop.update()  # clip, non-finite guard, AdamW on LoRA + P, P', O, O', lr, EMA
            loop.log()
            loop.images(sample_tag, lambda: sample_rows(cfg, adapter, cond))
            loop.checkpoint()
        return loop.finish(lambda: export(cfg, loop, adapter))


def export(cfg: AdapterTrainConfig, loop: TrainingLoop, adapter: AdapterModel) -> dict[str, Any]:
    """``final/`` (the whole trained tensors and their EMA) and the ComfyUI files; gathers on every rank."""
    trained = gather_whole(adapter.trained_parameters())
    ema = gather_whole(adapter.ema_tensors())
    if not loop.accelerator.is_main_process:
        return {}
    save_trained(trained, ema, loop.out / FINAL_DIR, adapter.ema.optimization_step if adapter.ema is not None else 0)
    if not cfg.export.enabled:
        return {}
    use_ema = bool(ema) and cfg.export.use_ema
    paths = write_for_comfy(ema if use_ema else trained, adapter.layout, loop.out / "export", cfg.export.name, adapter.base_heads,
                            cfg.export.alpha_keys, run_info(cfg, f"{FINAL_DIR}/{EMA_FILE if use_ema else TRAINED_FILE}", use_ema),
                            dtype_from_name(cfg.export.lora_dtype, "export.lora_dtype"))
    logger.info("exported for ComfyUI: %s", {k: str(v) for k, v in paths.items()})
    return {"export": {k: str(v) for k, v in paths.items()}}


# ---------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_rows(cfg: AdapterTrainConfig, adapter: AdapterModel, cond: Conditioning) -> list[torch.Tensor] | None:
    """The sample prompts at ``sampling.resolution`` with the EMA weights (every rank: a sharded network
    needs all of them); None when there is nothing to decode with or no prompt."""
    if cond.davae is None or cond.sample_embeds is None:
        logger.info("no sample grid: %s", "no tokenizer.path to decode with" if cond.davae is None else "no sampling.prompts")
        return None
    net = adapter.module
    was_training = net.training
    net.eval()
    try:
        with adapter.ema_weights(cfg.sampling.use_ema):
            size = cond.davae.layout.latent_size(cfg.sampling.resolution, cfg.sampling.resolution)
            gen = torch.Generator(device=cond.device).manual_seed(cfg.sampling.seed)
            lat = sample_latents(net, cond.sample_embeds.to(cond.device), cond.sample_pooled.to(cond.device), cond.null_embeds,
                                 cond.null_pooled, (net.config.in_channels, *size), cfg.sampling.steps, cfg.sampling.guidance,
                                 cfg.sampling.shift, gen)
            images = cond.davae.decode(lat.to(dtype_of(cond.davae))).float()
    finally:
        net.train(was_training)
    logger.info("sample grid (%s)", "; ".join(cond.sample_prompts))
    return [images]


def check_sizes(cfg: AdapterTrainConfig, grid: LatentGrid) -> None:
    """Image sizes the run will use, against the patch grid, before any step: a size whose latent is
    not whole patches would make SD3 return a smaller output instead of an error."""
    grid.check_image_size(cfg.data.images.resolution, cfg.data.images.resolution, "data.images.resolution")
    if cfg.train.image_every:
        grid.check_image_size(cfg.sampling.resolution, cfg.sampling.resolution, "sampling.resolution")


# ---------------------------------------------------------------------------- data
def open_cache(cfg: AdapterTrainConfig, patch_size: int) -> CachedConditioningDataset | None:
    """The complete cache of ``data.cache_dir`` (checked against the config and the transformer's
    patch size), or None when training encodes images every step."""
    if not cache_is_complete(cfg.data.cache_dir):
        if cfg.data.cache_dir:
            logger.warning("data.cache_dir %s is not complete: encoding images and captions every step", cfg.data.cache_dir)
        return None
    dataset = CachedConditioningDataset(cfg.data.cache_dir, expect=cfg.data.images, patch_size=patch_size,
                                        encoding=expected_encoding(cfg))  # built for this config's text and DA-VAE
    logger.info("training from the cache %s (%d samples in %d bucket(s), text: %s)", cfg.data.cache_dir, len(dataset),
                len(dataset.buckets_used), dataset.text_encoder)
    return dataset


def build_dataloader(cfg: AdapterTrainConfig, accelerator, start_micro_batch: int, grid: LatentGrid,
                     cached: CachedConditioningDataset | None = None):
    """Endless micro-batches from the cache, or from ``data.images`` with buckets on ``grid.pixels``;
    pinned when they go to a GPU (copies overlap the step)."""
    loop = cfg.train
    pin = accelerator.device.type == "cuda"
    if cached is not None:
        dataset = cached
        workers = loop.dataloader_num_workers
        common = dict(collate_fn=collate_cached, num_workers=workers, pin_memory=pin, prefetch_factor=2 if workers > 0 else None)
        if len(dataset.buckets_used) > 1:  # one latent shape per micro-batch
            batches = BucketBatchSampler(dataset.bucket_of_sample, loop.batch_size, loop.seed, accelerator.process_index,
                                         accelerator.num_processes, start_micro_batch)
            return torch.utils.data.DataLoader(dataset, batch_sampler=batches, **common)
        sampler = ResumableSampler(len(dataset), loop.batch_size, loop.seed, accelerator.process_index,
                                   accelerator.num_processes, start_micro_batch)
        return torch.utils.data.DataLoader(dataset, batch_size=loop.batch_size, sampler=sampler, drop_last=True, **common)
    images = cfg.data.images
    if images.index_cache is None:
        images.index_cache = str(Path(loop.output_dir) / "data_index.json")
    return make_training_loader(images, loop.batch_size, loop.seed, accelerator.process_index, accelerator.num_processes,
                                start_micro_batch, loop.dataloader_num_workers, accelerator, pin_memory=pin,
                                bucket_grid=grid.pixels)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = add_common_arguments(argparse.ArgumentParser(prog="python -m davae_training.train_adapter", description=__doc__.split("\n\n")[0]))
    args = ap.parse_args(argv)
    cfg = load_config(AdapterTrainConfig, args.config, args.overrides)
    return train(cfg, args.resume, args.change_learning_rate)


if __name__ == "__main__":
    main()
