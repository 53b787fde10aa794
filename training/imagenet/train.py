"""Stage 2 on ImageNet: fine-tune LightningDiT on DA-VAE latents (the paper's Tables 1, 4, 5).

    accelerate launch --multi_gpu --num_processes 8 -m davae_training.train_lightningdit \\
        --config training/configs/imagenet/lightningdit_xl_da_paper.yaml \\
        --set data.root=/data/imagenet/train --set tokenizer.path=runs/davae_vavae/davae.safetensors \\
        --set model.checkpoint=/models/lightningdit-xl-imagenet256-800ep.pt
    python -m davae_training.train_lightningdit --config training/configs/imagenet/lightningdit_tiny.yaml ... [--resume latest]

Per optimizer step: ``train.gradient_accumulation_steps`` micro-batches of class-labelled images,
encoded by the frozen DA-VAE (base: VA-VAE of the bicubic half image; then the detail channels),
normalised per channel (or read from a latent cache, :mod:`.latent_cache`); LightningDiT's flow
loss plus its cosine term, the detail channels weighted by the Eq. 12 ramp w(n)
(:mod:`.flow`); AdamW on every DiT parameter (P'/O' included) and the EMA.  The loop around it is
the kit of :mod:`davae_training.loop` (guard, checkpoints, ``--resume``, trackers).  Sample grids
(Euler, time shift, CFG with an interval; EMA weights) go to ``<output_dir>/samples``; at the end
``<output_dir>/export`` holds ``<name>_dit.pt`` and ``<name>_heads.safetensors`` for
``python -m davae_training.imagenet.generate`` (:mod:`.export`).  Guide: docs/TRAINING_IMAGENET.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..checkpoints import FINAL_DIR
from ..config import add_common_arguments, load_config
from ..loop import TrainingLoop
from ..runtime import logger
from ..sharding import gather_whole
from .config import LightningDiTTrainConfig
from .data import make_class_loader, with_index_cache
from .export import save_trained, write_exports
from .latent_codec import LatentCodec
from .sampler import sample_euler
from .step import DiTModel, DiTStep, check_latent_grid, fit_objective


def train(cfg: LightningDiTTrainConfig, resume: str | None = None, change_learning_rate: bool = False) -> dict[str, Any]:
    """Train, checkpoint, export; returns the run's summary (``final/summary.json``)."""
    cfg.data = with_index_cache(cfg.data, cfg.train.output_dir)  # resolved before the run config is written
    with TrainingLoop(cfg, resume, change_learning_rate, "LightningDiT", bar_keys=("loss", "detail_weight")) as loop:
        codec = LatentCodec.from_config(cfg.tokenizer, cfg.data.encode_batch_size, loop.device)
        model = DiTModel.build(cfg.model, codec.layout.detail_channels, cfg.ema_decay, cfg.train.gradient_checkpointing)
        dit = model.module
        check_latent_grid(dit, codec, cfg.data.resolution)
        objective = fit_objective(cfg.objective, codec, dit)
        loop.prepare(model)  # engine; AdamW, lr schedule and EMA on the prepared parameters; resume

        batches = iter(make_batches(cfg, loop, dit.config.num_classes))
        step = DiTStep(model, codec, objective)
        tag = "samples (EMA)" if cfg.sampling.use_ema else "samples"

        while loop.running:
            for micro in loop.micro_batches():
                with loop.accumulate():
                    loss, logs = step(next(batches), loop.step, loop.generator(micro))
                    loop.backward(loss, logs)
            loop.update()  # clip, non-finite guard, AdamW, lr, EMA
            loop.log()
            loop.images(tag, lambda: sample_rows(cfg, model, codec))
            loop.checkpoint()
        return loop.finish(lambda: export(cfg, loop, model))


def make_batches(cfg: LightningDiTTrainConfig, loop: TrainingLoop, num_classes: int):
    """Endless micro-batches: from the latent cache when ``data.latent_cache`` is set, else images."""
    acc, train = loop.accelerator, cfg.train
    common = dict(seed=train.seed, rank=acc.process_index, world_size=acc.num_processes,
                  start_micro_batch=loop.state.micro_batches, num_workers=train.dataloader_num_workers,
                  pin_memory=loop.device.type == "cuda")
    if cfg.data.latent_cache:
        from .latent_cache import make_latent_loader

        return make_latent_loader(cfg.data.latent_cache, train.batch_size, expect_resolution=cfg.data.resolution,
                                  num_classes=num_classes, tokenizer=cfg.tokenizer.path, **common)
    return make_class_loader(cfg.data, train.batch_size, accelerator=acc, num_classes=num_classes, **common)


@torch.no_grad()
def sample_rows(cfg: LightningDiTTrainConfig, model: DiTModel, codec: LatentCodec) -> list[torch.Tensor]:
    """One row of ``sampling.classes`` with the EMA weights (every rank: a sharded network needs all)."""
    net, s = model.module, cfg.sampling
    was_training = net.training
    net.eval()
    try:
        with model.ema_weights(s.use_ema):
            device = next(net.parameters()).device
            labels = torch.tensor(s.classes, dtype=torch.long, device=device) % (net.config.num_classes)
            generator = torch.Generator(device).manual_seed(s.seed)
            side = net.config.input_size
            latents = sample_euler(model.network, labels, (net.in_channels, side, side), generator, steps=s.steps,
                                   shift=s.shift, cfg_scale=s.cfg_scale, cfg_interval_start=s.cfg_interval_start,
                                   null_class=net.config.null_class)
            images = codec.decode(latents)
    finally:
        net.train(was_training)
    return [images]


def export(cfg: LightningDiTTrainConfig, loop: TrainingLoop, model: DiTModel) -> dict[str, Any]:
    """``final/`` (the whole trained tensors and their EMA), then ``export/<name>_dit.pt`` and
    ``export/<name>_heads.safetensors`` (gathered on every rank, written by the main one)."""
    trained = gather_whole(model.trained_parameters())
    ema = gather_whole(model.ema_tensors())
    if not loop.accelerator.is_main_process:
        return {}
    save_trained(trained, ema, loop.out / FINAL_DIR, model.ema.optimization_step if model.ema is not None else 0,
                 model.weights_file, model.ema_file)
    if not cfg.export.enabled:
        return {}
    info = {"trainer": "davae_training.train_lightningdit", "step": loop.step, "head_init": cfg.model.head_init,
            "detail_warmup_steps": cfg.objective.detail_warmup_steps, "qk_norm": model.module.config.use_qknorm}
    paths = write_exports(trained, ema, model.module, loop.out / "export", cfg.export.name, cfg.export.use_ema, info)
    logger.info("exported: %s", {k: str(v) for k, v in paths.items()})
    return {"export": {k: str(v) for k, v in paths.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = add_common_arguments(argparse.ArgumentParser(prog="python -m davae_training.train_lightningdit",
                                                      description=__doc__.split("\n\n")[0]))
    args = ap.parse_args(argv)
    cfg = load_config(LightningDiTTrainConfig, args.config, args.overrides)
    return train(cfg, args.resume, args.change_learning_rate)


if __name__ == "__main__":
    main()
