"""Stage 2: warm-start SD3.5 on structured DA latents (LoRA + DA heads), exported for ComfyUI.

    accelerate launch -m davae_training.train_adapter --config training/configs/sd35m_1024.yaml
    python -m davae_training.train_adapter --config training/configs/adapter_tiny.yaml --set train.max_steps=20
    torchrun --nproc_per_node 2 -m davae_training.train_adapter --config ... [--resume latest]

Per optimizer step: a micro-batch of structured latents (from the DA-VAE, or from the cache of
:mod:`davae_training.stage2.caption_cache`) and its text conditioning (prompt dropout for CFG), the rectified-flow
loss of :mod:`davae_training.stage2.objective` with the detail ramp w(n), AdamW on LoRA + P, P', O, O',
then the EMA.  Checkpoints (``train.checkpoint_every``) hold only the trained tensors
(``adapter_trained.safetensors``, ``adapter_trained_ema.safetensors``) plus accelerate's
optimiser/scheduler/RNG files; ``--resume latest`` continues with the exact data order and
noise.  TensorBoard gets ``loss``, ``loss/base_mse``, ``loss/detail_mse`` (apart, as in Fig. S3
of the paper), ``detail_weight`` and ``lr``; sample grids go to ``<output_dir>/samples``.  At the
end ``<output_dir>/final`` holds the trained tensors and a summary, and ``<output_dir>/export``
the ComfyUI files (:mod:`davae_training.stage2.export`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from davae_core.atomic_files import write_json_atomic
from davae_core.dtypes import dtype_from_name

from ..common import (
    FINAL_DIR,
    TrainerState,
    derive_seed,
    gather_rank_digests,
    init_trackers,
    latest_complete_checkpoint,
    logger,
    make_accelerator,
    maybe_inject_fault,
    progress_bar,
    plan_resume,
    resume_from,
    save_checkpoint,
    save_final_checkpoint,
    save_image_grid,
    seed_everything,
    setup_logging,
    write_run_config,
)
from ..config import add_common_arguments, load_config, log_global_batch
from ..run_safety import NonFiniteGuard, OutputLock
from ..data.buckets import BucketBatchSampler
from ..data.images import ResumableSampler
from ..data.loader import make_training_loader
from .caption_cache import CachedConditioningDataset, cache_is_complete, collate_cached, expected_encoding
from .config import AdapterTrainConfig, load_davae_for_training
from .latent_grid import LatentGrid, transformer_patch_size
from ..optimizers import make_lr_scheduler, make_optimizer
from .model import build_adapter_model, check_base_dtype, make_ema, trained_parameters, unwrap
from .objective import drop_prompts, flow_matching_loss
from .run_file import EMA_FILE, TRAINED_FILE, load_trained, run_info, save_trained, stock_head_state
from .sampler import sample_latents
from .text_conditioning import build_text_conditioner


# ---------------------------------------------------------------------------- conditioning
class Conditioning:
    """Turns a data batch into (latents, embeds, pooled) and knows the empty prompt's conditioning."""

    def __init__(self, cfg: AdapterTrainConfig, device: torch.device, cached: CachedConditioningDataset | None):
        self.device = device
        self.cached = cached
        self.text = None
        # from a cache the DA-VAE is only needed to decode sample grids
        self.davae = load_davae_for_training(cfg.tokenizer, device) if cached is None or cfg.tokenizer.path else None
        if cached is None:
            self.text = build_text_conditioner(cfg.text, cfg.model.pretrained, device)
            null_e, null_p = self.text.encode([""])
            self.null_embeds, self.null_pooled = null_e[0], null_p[0]
            self.sample_prompts = list(cfg.sampling.prompts)
            self.sample_embeds, self.sample_pooled = self.text.encode(self.sample_prompts) if self.sample_prompts else (None, None)
        else:
            prompts = cached.prompts()
            self.null_embeds, self.null_pooled = prompts["null_embeds"], prompts["null_pooled"]
            self.sample_prompts = prompts["sample_prompts"]
            self.sample_embeds, self.sample_pooled = prompts.get("sample_embeds"), prompts.get("sample_pooled")
        self.null_embeds = self.null_embeds.to(device)
        self.null_pooled = self.null_pooled.to(device)
        # pixels per latent cell: of the DA-VAE that encodes (or decodes sample grids), else of the cache
        self.latent_factor = self.davae.layout.factor if self.davae is not None else cached.latent_factor
        if cached is not None and cached.latent_factor != self.latent_factor:
            raise ValueError(f"the cache {cached.root} holds latents at 1/{cached.latent_factor} of the image, the DA-VAE "
                             f"{cfg.tokenizer.path} makes 1/{self.latent_factor}: use the DA-VAE the cache was built with")

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "latents" in batch:
            return batch["latents"].to(self.device), batch["embeds"].to(self.device), batch["pooled"].to(self.device)
        pixels = batch["pixels"].to(self.device, _dtype_of(self.davae))
        latents = self.davae.encode(pixels).float()
        embeds, pooled = self.text.encode(list(batch["caption"]))
        return latents, embeds.float().to(self.device), pooled.float().to(self.device)


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def check_sizes(cfg: AdapterTrainConfig, grid: LatentGrid) -> None:
    """Image sizes the run will use, against the patch grid, before any step: a size whose latent is
    not whole patches would make SD3 return a smaller output instead of an error."""
    grid.check_image_size(cfg.data.images.resolution, cfg.data.images.resolution, "data.images.resolution")
    if cfg.train.image_every:
        grid.check_image_size(cfg.sampling.resolution, cfg.sampling.resolution, "sampling.resolution")


def check_shapes(model: torch.nn.Module, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
    cfg = unwrap(model).config
    if latents.shape[1] != cfg.in_channels:
        raise ValueError(f"latents have {latents.shape[1]} channels, the patched transformer reads {cfg.in_channels} "
                         "(model.detail_channels + 16); is tokenizer.path a DA-VAE with that many detail channels?")
    if embeds.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise ValueError(f"text conditioning ({tuple(embeds.shape)}, {tuple(pooled.shape)}) does not fit the transformer "
                         f"(joint_attention_dim {cfg.joint_attention_dim}, pooled {cfg.pooled_projection_dim}); check text.*")


# ---------------------------------------------------------------------------- sampling
def write_sample_grid(cfg: AdapterTrainConfig, model, ema, cond: Conditioning, step: int) -> Path | None:
    if cond.davae is None or cond.sample_embeds is None:
        logger.info("no sample grid: %s", "no tokenizer.path to decode with" if cond.davae is None else "no sampling.prompts")
        return None
    net = unwrap(model)
    params = list(trained_parameters(net).values())
    use_ema = ema is not None and cfg.sampling.use_ema
    if use_ema:
        ema.store(params)
        ema.copy_to(params)
    was_training = net.training
    net.eval()
    try:
        size = cond.davae.layout.latent_size(cfg.sampling.resolution, cfg.sampling.resolution)
        shape = (net.config.in_channels, *size)
        gen = torch.Generator(device=cond.device).manual_seed(cfg.sampling.seed)
        lat = sample_latents(net, cond.sample_embeds.to(cond.device), cond.sample_pooled.to(cond.device), cond.null_embeds,
                             cond.null_pooled, shape, cfg.sampling.steps, cfg.sampling.guidance, cfg.sampling.shift, gen)
        images = cond.davae.decode(lat.to(_dtype_of(cond.davae))).float()
    finally:
        net.train(was_training)
        if use_ema:
            ema.restore(params)
    path = save_image_grid([images], Path(cfg.train.output_dir) / "samples" / f"step-{step:08d}.png")
    logger.info("sample grid %s (%s)", path, "; ".join(cond.sample_prompts))
    return path


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
    """Endless micro-batches from the cache, or from ``data.images`` with buckets on ``grid.pixels``."""
    loop = cfg.train
    if cached is not None:
        dataset = cached
        workers = loop.dataloader_num_workers
        if len(dataset.buckets_used) > 1:  # one latent shape per micro-batch
            batches = BucketBatchSampler(dataset.bucket_of_sample, loop.batch_size, loop.seed, accelerator.process_index,
                                         accelerator.num_processes, start_micro_batch)
            return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_cached, num_workers=workers,
                                               prefetch_factor=2 if workers > 0 else None)
        sampler = ResumableSampler(len(dataset), loop.batch_size, loop.seed, accelerator.process_index,
                                   accelerator.num_processes, start_micro_batch)
        return torch.utils.data.DataLoader(dataset, batch_size=loop.batch_size, sampler=sampler, collate_fn=collate_cached,
                                           num_workers=workers, drop_last=True, prefetch_factor=2 if workers > 0 else None)
    images = cfg.data.images
    if images.index_cache is None:
        images.index_cache = str(Path(loop.output_dir) / "data_index.json")
    return make_training_loader(images, loop.batch_size, loop.seed, accelerator.process_index, accelerator.num_processes,
                                start_micro_batch, loop.dataloader_num_workers, accelerator, bucket_grid=grid.pixels)


# ---------------------------------------------------------------------------- the run
def train(cfg: AdapterTrainConfig, resume: str | None = None, change_learning_rate: bool = False) -> dict[str, Any]:
    with OutputLock(cfg.train.output_dir):  # a second run into the same folder refuses to start
        return _train(cfg, resume, change_learning_rate)


def _train(cfg: AdapterTrainConfig, resume: str | None, change_learning_rate: bool) -> dict[str, Any]:
    loop = cfg.train
    accelerator = make_accelerator(loop)
    setup_logging(accelerator, loop.output_dir)
    seed_everything(loop.seed)
    plan = plan_resume(resume, cfg, change_learning_rate)  # before the run config is rewritten
    write_run_config(accelerator, loop.output_dir, cfg)

    check_base_dtype(cfg.model.base_dtype, loop.mixed_precision)
    model = build_adapter_model(cfg.model, gradient_checkpointing=loop.gradient_checkpointing).to(accelerator.device)
    model.train()
    base_heads = stock_head_state(model)  # the export ships P and O only if training moved them
    params = trained_parameters(model)
    logger.info("training %d tensors (%.2fM values): LoRA r=%d alpha=%g on %s, plus P, P', O, O'",
                len(params), sum(p.numel() for p in params.values()) / 1e6, cfg.model.lora_rank, cfg.model.lora_alpha,
                ", ".join(cfg.model.lora_targets))
    optimizer = make_optimizer(params.values(), loop)
    lr_scheduler = make_lr_scheduler(optimizer, loop, accelerator.num_processes)
    log_global_batch(loop, accelerator.num_processes)
    ema = make_ema(model, cfg.model.ema_decay)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)

    def save_hook(models, weights, output_dir):  # the frozen base never goes into a checkpoint
        if accelerator.is_main_process:
            save_trained(models[0], ema, output_dir)
        weights.clear()

    def load_hook(models, input_dir):
        load_trained(models[0], ema, input_dir)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    state = resume_from(accelerator, plan, optimizer, lr_scheduler)
    guard = NonFiniteGuard(accelerator, loop.on_nonfinite, lambda: latest_complete_checkpoint(loop.output_dir)[0])

    patch_size = transformer_patch_size(unwrap(model))
    cached = open_cache(cfg, patch_size)
    cond = Conditioning(cfg, accelerator.device, cached)
    grid = LatentGrid(cond.latent_factor, patch_size)  # image and bucket sides: multiples of grid.pixels (32 for SD3)
    check_sizes(cfg, grid)
    loader = build_dataloader(cfg, accelerator, state.micro_batches, grid, cached)
    init_trackers(accelerator, loop, cfg)
    batches = iter(loader)
    bar = progress_bar(accelerator, loop.max_steps, state.step, "stage 2")
    last: dict[str, float] = {}
    checked = False
    while state.step < loop.max_steps:
        for micro in range(loop.gradient_accumulation_steps):
            batch = next(batches)
            state.micro_batches += 1
            latents, embeds, pooled = cond(batch)  # off-grid sides: refused by the model's own pre-hook (model.py)
            if not checked:
                check_shapes(model, latents, embeds, pooled)
                checked = True
            gen = torch.Generator(device=accelerator.device).manual_seed(
                derive_seed(loop.seed, state.step, micro, accelerator.process_index))
            embeds, pooled, _ = drop_prompts(embeds, pooled, cond.null_embeds, cond.null_pooled, cfg.objective.prompt_dropout, gen)

            def model_fn(x_t, t, embeds=embeds, pooled=pooled):
                return model(hidden_states=x_t, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                             return_dict=False)[0]

            with accelerator.accumulate(model):
                losses = flow_matching_loss(model_fn, latents, state.step, cfg.objective, gen)
                guard.note_loss(losses["loss"])
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and loop.max_grad_norm:
                    accelerator.clip_grad_norm_(list(params.values()), loop.max_grad_norm)
                if not (accelerator.sync_gradients and guard.skip_step(params.values(), state.step + 1)):
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if ema is not None:
            ema.step(list(params.values()))
        bar.update(1)
        if state.step % loop.log_every == 0 or state.step == loop.max_steps:
            logged = torch.stack([losses["loss"].detach(), losses["base_mse"], losses["detail_mse"]]).float()
            logged = accelerator.reduce(logged, reduction="mean")
            last = {"loss": logged[0].item(), "loss/base_mse": logged[1].item(), "loss/detail_mse": logged[2].item(),
                    "detail_weight": float(losses["detail_weight"]), "lr": lr_scheduler.get_last_lr()[0]}
            accelerator.log(last, step=state.step)
            bar.set_postfix(loss=f"{last['loss']:.4f}", w=f"{last['detail_weight']:.2f}")
        if loop.image_every and state.step % loop.image_every == 0 and accelerator.is_main_process:
            grid = write_sample_grid(cfg, model, ema, cond, state.step)
            if grid is not None:
                from ..tracker_images import log_image_file

                log_image_file(accelerator, "samples (EMA)" if cfg.sampling.use_ema else "samples", grid, state.step)
        if loop.checkpoint_every and state.step % loop.checkpoint_every == 0:
            save_checkpoint(accelerator, loop.output_dir, state, loop.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        maybe_inject_fault(state.step)
    bar.close()
    return finish(cfg, accelerator, model, ema, state, last, base_heads)


def finish(cfg: AdapterTrainConfig, accelerator, model, ema, state: TrainerState, last: dict[str, float],
           base_heads: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Final checkpoint, ``final/`` (trained tensors, per-rank digests), ComfyUI export."""
    loop = cfg.train
    if loop.checkpoint_every:
        save_final_checkpoint(accelerator, loop.output_dir, state, loop.checkpoints_total_limit)
    net = unwrap(model)
    summary = {"step": state.step, **gather_rank_digests(accelerator, net), "last_logged": last}
    if accelerator.is_main_process:
        final = Path(loop.output_dir) / FINAL_DIR
        final.mkdir(parents=True, exist_ok=True)
        save_trained(net, ema, final)
        write_json_atomic(final / "summary.json", summary)
        if cfg.export.enabled:
            from .export import export_for_comfy

            params = list(trained_parameters(net).values())
            use_ema = ema is not None and cfg.export.use_ema
            if use_ema:  # export the EMA weights from the live model, then put the raw ones back
                ema.store(params)
                ema.copy_to(params)
            try:
                paths = export_for_comfy(net, Path(loop.output_dir) / "export", cfg.export.name, base_heads, cfg.export.alpha_keys,
                                         run_info(cfg, f"{FINAL_DIR}/{EMA_FILE if use_ema else TRAINED_FILE}", use_ema),
                                         dtype_from_name(cfg.export.lora_dtype, "export.lora_dtype"))
            finally:
                if use_ema:
                    ema.restore(params)
            summary["export"] = {k: str(v) for k, v in paths.items()}
            write_json_atomic(final / "summary.json", summary)
            logger.info("exported for ComfyUI: %s", summary["export"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():  # tear gloo down while every rank is alive: at exit it can hang
        torch.distributed.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = add_common_arguments(argparse.ArgumentParser(prog="python -m davae_training.train_adapter", description=__doc__.split("\n\n")[0]))
    args = ap.parse_args(argv)
    cfg = load_config(AdapterTrainConfig, args.config, args.overrides)
    return train(cfg, args.resume, args.change_learning_rate)


if __name__ == "__main__":
    main()
