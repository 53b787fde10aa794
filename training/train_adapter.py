"""Stage 2: warm-start SD3.5 on structured DA latents (LoRA + DA heads), exported for ComfyUI.

    accelerate launch -m davae_training.train_adapter --config training/configs/sd35m_1024.yaml
    python -m davae_training.train_adapter --config training/configs/adapter_tiny.yaml --set train.max_steps=20
    torchrun --nproc_per_node 2 -m davae_training.train_adapter --config ... [--resume latest]

Per optimizer step: a micro-batch of structured latents (from the DA-VAE, or from the cache of
:mod:`.caption_data`) and its text conditioning (prompt dropout for CFG), the rectified-flow
loss of :mod:`.adapter_objective` with the detail ramp w(n), AdamW on LoRA + P, P', O, O',
then the EMA.  Checkpoints (``train.checkpoint_every``) hold only the trained tensors
(``adapter_trained.safetensors``, ``adapter_trained_ema.safetensors``) plus accelerate's
optimiser/scheduler/RNG files; ``--resume latest`` continues with the exact data order and
noise.  TensorBoard gets ``loss``, ``loss/base_mse``, ``loss/detail_mse`` (apart, as in Fig. S3
of the paper), ``detail_weight`` and ``lr``; sample grids go to ``<output_dir>/samples``.  At the
end ``<output_dir>/final`` holds the trained tensors and a summary, and ``<output_dir>/export``
the ComfyUI files (:mod:`.export_comfy`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter_model import (
    AdapterModelConfig,
    build_adapter_model,
    check_base_dtype,
    load_trained_state_dict,
    make_ema,
    trained_parameters,
    unwrap,
)
from .adapter_objective import FlowObjectiveConfig, drop_prompts, flow_matching_loss, shift_sigmas
from .caption_data import CachedConditioningDataset, CaptionDataConfig, cache_is_complete, collate_cached
from .common import (
    TrainerState,
    TrainLoopConfig,
    add_common_arguments,
    config_to_dict,
    find_latest_checkpoint,
    init_trackers,
    load_checkpoint,
    load_config,
    logger,
    make_accelerator,
    maybe_inject_fault,
    parameter_digest,
    progress_bar,
    resolve_resume,
    save_checkpoint,
    save_image_grid,
    seed_everything,
    setup_logging,
    write_json_atomic,
)
from .optimizers import make_optimizer
from .image_data import ImageDataset, ResumableSampler, load_or_build_index, make_dataloader
from .text_encoding import TextConfig, build_text_conditioner

TRAINED_FILE = "adapter_trained.safetensors"
EMA_FILE = "adapter_trained_ema.safetensors"
RUN_CONFIG = "config.yaml"
FINAL_DIR = "final"


@dataclass
class TokenizerConfig:
    """The stage-1 DA-VAE (our file format).  Needed unless training runs from a complete cache
    (then only for sample grids)."""

    path: str = ""
    dtype: str = "float32"


@dataclass
class SamplingConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photograph of a red fox in the snow", "a bowl of ramen, studio light"])
    resolution: int = 1024  # pixels; the latent grid is resolution / 16
    steps: int = 30
    guidance: float = 2.5
    shift: float = 3.0
    seed: int = 0
    use_ema: bool = True


@dataclass
class ExportConfig:
    enabled: bool = True
    name: str = "da_sd35m"
    use_ema: bool = True
    alpha_keys: str = "auto"  # "auto" (only when alpha != rank) | "always"
    lora_dtype: str = "float32"  # "float16"/"bfloat16" halve the LoRA file


@dataclass
class AdapterTrainConfig:
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    model: AdapterModelConfig = field(default_factory=AdapterModelConfig)
    objective: FlowObjectiveConfig = field(default_factory=FlowObjectiveConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_davae_for_training(cfg: TokenizerConfig, device: torch.device | str = "cpu"):
    from davae_core.checkpoint import load_davae

    if not cfg.path:
        raise ValueError("tokenizer.path is empty: set it to the stage-1 DA-VAE file (or train from a complete data.cache_dir)")
    davae = load_davae(cfg.path, device=device, dtype=_dtype(cfg.dtype))
    if davae.base_encoder is None:
        raise ValueError(f"{cfg.path}: this DA-VAE file has no base encoder, so it cannot encode images; export it with the base encoder")
    return davae.requires_grad_(False).eval()


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Noise/timestep/dropout seed of one micro-batch: a resumed run redraws exactly the same."""
    digest = hashlib.sha256(f"{seed}:{step}:{micro}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------- trained-tensor files
def save_trained(model: torch.nn.Module, ema, folder: str | os.PathLike) -> None:
    """Only what stage 2 trains (LoRA, P, P', O, O'), and its EMA, as safetensors."""
    folder = Path(folder)
    params = trained_parameters(unwrap(model))
    save_file({n: p.detach().float().cpu().contiguous() for n, p in params.items()}, str(folder / TRAINED_FILE))
    if ema is not None:
        shadow = {n: s.detach().float().cpu().contiguous() for n, s in zip(params, ema.shadow_params)}
        save_file(shadow, str(folder / EMA_FILE), metadata={"optimization_step": str(ema.optimization_step)})


def read_trained(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_trained(model: torch.nn.Module, ema, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    state, _ = read_trained(folder / TRAINED_FILE)
    load_trained_state_dict(unwrap(model), state, str(folder / TRAINED_FILE))
    if ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise FileNotFoundError(f"{folder / EMA_FILE}: missing; this run has an EMA (model.ema_decay > 0) but the checkpoint has none")
        shadow, meta = read_trained(folder / EMA_FILE)
        names = list(trained_parameters(unwrap(model)))
        with torch.no_grad():
            for name, s in zip(names, ema.shadow_params):
                s.copy_(shadow[name].to(s))
        ema.optimization_step = int(meta.get("optimization_step", 0))


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


def check_shapes(model: torch.nn.Module, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
    cfg = unwrap(model).config
    if latents.shape[1] != cfg.in_channels:
        raise ValueError(f"latents have {latents.shape[1]} channels, the patched transformer reads {cfg.in_channels} "
                         "(model.detail_channels + 16); is tokenizer.path a DA-VAE with that many detail channels?")
    if embeds.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise ValueError(f"text conditioning ({tuple(embeds.shape)}, {tuple(pooled.shape)}) does not fit the transformer "
                         f"(joint_attention_dim {cfg.joint_attention_dim}, pooled {cfg.pooled_projection_dim}); check text.*")


# ---------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_latents(model, embeds, pooled, null_embeds, null_pooled, latent_shape, steps: int, guidance: float,
                   shift: float, generator: torch.Generator) -> torch.Tensor:
    """Euler rectified-flow sampler with CFG, SD3's shifted sigma schedule."""
    b = embeds.shape[0]
    x = torch.randn((b, *latent_shape), generator=generator, device=generator.device).to(embeds.device)
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    cond_e = torch.cat([embeds, null_embeds.expand(b, *null_embeds.shape)])
    cond_p = torch.cat([pooled, null_pooled.expand(b, *null_pooled.shape)])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((2 * b,), s * 1000.0, device=x.device)
        v = model(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=cond_e, pooled_projections=cond_p, return_dict=False)[0]
        v_c, v_u = v.float().chunk(2)
        x = x + (s_next - s) * (v_u + guidance * (v_c - v_u))
    return x


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
def build_dataloader(cfg: AdapterTrainConfig, accelerator, start_micro_batch: int):
    loop = cfg.train
    if cache_is_complete(cfg.data.cache_dir):
        dataset = CachedConditioningDataset(cfg.data.cache_dir)
        logger.info("training from the cache %s (%d samples, text: %s)", cfg.data.cache_dir, len(dataset), dataset.text_encoder)
        sampler = ResumableSampler(len(dataset), loop.batch_size, loop.seed, accelerator.process_index,
                                   accelerator.num_processes, start_micro_batch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=loop.batch_size, sampler=sampler, collate_fn=collate_cached,
                                             num_workers=loop.dataloader_num_workers, drop_last=True,
                                             prefetch_factor=2 if loop.dataloader_num_workers > 0 else None)
        return loader, dataset
    if cfg.data.cache_dir:
        logger.warning("data.cache_dir %s is not complete: encoding images and captions every step", cfg.data.cache_dir)
    images = cfg.data.images
    if images.index_cache is None:
        images.index_cache = str(Path(loop.output_dir) / "data_index.json")
    records, _ = load_or_build_index(images, accelerator)
    dataset = ImageDataset(records, images, seed=loop.seed)
    sampler = ResumableSampler(len(dataset), loop.batch_size, loop.seed, accelerator.process_index,
                               accelerator.num_processes, start_micro_batch)
    return make_dataloader(dataset, sampler, loop.dataloader_num_workers), None


# ---------------------------------------------------------------------------- the run
def train(cfg: AdapterTrainConfig, resume: str | None = None) -> dict[str, Any]:
    import yaml
    from diffusers.optimization import get_scheduler

    loop = cfg.train
    accelerator = make_accelerator(loop)
    setup_logging(accelerator, loop.output_dir)
    seed_everything(loop.seed)
    out = Path(loop.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    check_base_dtype(cfg.model.base_dtype, loop.mixed_precision)
    model = build_adapter_model(cfg.model, gradient_checkpointing=loop.gradient_checkpointing).to(accelerator.device)
    model.train()
    base_heads = stock_head_state(model)  # the export ships P and O only if training moved them
    params = trained_parameters(model)
    logger.info("training %d tensors (%.2fM values): LoRA r=%d alpha=%g on %s, plus P, P', O, O'",
                len(params), sum(p.numel() for p in params.values()) / 1e6, cfg.model.lora_rank, cfg.model.lora_alpha,
                ", ".join(cfg.model.lora_targets))
    optimizer = make_optimizer(params.values(), loop)
    # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                 num_warmup_steps=loop.lr_warmup_steps * accelerator.num_processes)
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

    state = TrainerState(world_size=accelerator.num_processes)
    resume_path = resolve_resume(resume, loop.output_dir)
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path)

    loader, cached = build_dataloader(cfg, accelerator, state.micro_batches)
    cond = Conditioning(cfg, accelerator.device, cached)
    init_trackers(accelerator, loop, cfg)
    batches = iter(loader)
    bar = progress_bar(accelerator, loop.max_steps, state.step, "stage 2")
    last: dict[str, float] = {}
    checked = False
    while state.step < loop.max_steps:
        for micro in range(loop.gradient_accumulation_steps):
            batch = next(batches)
            state.micro_batches += 1
            latents, embeds, pooled = cond(batch)
            if not checked:
                check_shapes(model, latents, embeds, pooled)
                checked = True
            gen = torch.Generator(device=accelerator.device).manual_seed(
                step_seed(loop.seed, state.step, micro, accelerator.process_index))
            embeds, pooled, _ = drop_prompts(embeds, pooled, cond.null_embeds, cond.null_pooled, cfg.objective.prompt_dropout, gen)

            def model_fn(x_t, t, embeds=embeds, pooled=pooled):
                return model(hidden_states=x_t, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                             return_dict=False)[0]

            with accelerator.accumulate(model):
                losses = flow_matching_loss(model_fn, latents, state.step, cfg.objective, gen)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and loop.max_grad_norm:
                    accelerator.clip_grad_norm_(list(params.values()), loop.max_grad_norm)
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
            write_sample_grid(cfg, model, ema, cond, state.step)
        if loop.checkpoint_every and state.step % loop.checkpoint_every == 0:
            save_checkpoint(accelerator, loop.output_dir, state, loop.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        maybe_inject_fault(state.step)
    bar.close()
    return finish(cfg, accelerator, model, ema, state, last, base_heads)


def stock_head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The current P and O (``pos_embed.proj``/``proj_out`` of the stock model) as CPU copies."""
    net = unwrap(model)
    layers = {"pos_embed.proj": net.pos_embed.proj.stock, "proj_out": net.proj_out.stock}
    return {f"{name}.{k}": v.detach().float().cpu().clone() for name, layer in layers.items() for k, v in layer.state_dict().items()}


def finish(cfg: AdapterTrainConfig, accelerator, model, ema, state: TrainerState, last: dict[str, float],
           base_heads: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Final checkpoint, ``final/`` (trained tensors, per-rank digests), ComfyUI export."""
    loop = cfg.train
    latest = find_latest_checkpoint(loop.output_dir)
    if loop.checkpoint_every and (latest is None or not latest.name.endswith(f"{state.step:08d}")):
        save_checkpoint(accelerator, loop.output_dir, state, loop.checkpoints_total_limit)
    net = unwrap(model)
    digests = accelerator.gather_for_metrics([parameter_digest(net, trainable_only=True)], use_gather_object=True)
    summary = {"step": state.step, "world_size": accelerator.num_processes, "rank_digests": digests,
               "ranks_in_sync": len(set(digests)) == 1, "last_logged": last}
    if not summary["ranks_in_sync"]:
        logger.error("trained weights differ between ranks: %s", digests)
    if accelerator.is_main_process:
        final = Path(loop.output_dir) / FINAL_DIR
        final.mkdir(parents=True, exist_ok=True)
        save_trained(net, ema, final)
        write_json_atomic(final / "summary.json", summary)
        if cfg.export.enabled:
            from .export_comfy import LORA_DTYPES, export_for_comfy

            params = list(trained_parameters(net).values())
            use_ema = ema is not None and cfg.export.use_ema
            if use_ema:  # export the EMA weights from the live model, then put the raw ones back
                ema.store(params)
                ema.copy_to(params)
            try:
                paths = export_for_comfy(net, Path(loop.output_dir) / "export", cfg.export.name, base_heads, cfg.export.alpha_keys,
                                         run_info(cfg, f"{FINAL_DIR}/{EMA_FILE if use_ema else TRAINED_FILE}", use_ema),
                                         LORA_DTYPES[cfg.export.lora_dtype])
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


def run_info(cfg: AdapterTrainConfig, source: str, ema: bool) -> dict[str, Any]:
    """What the exported files say about how they were made."""
    return {"source": source, "base_model": cfg.model.pretrained, "lora_rank": cfg.model.lora_rank,
            "lora_alpha": cfg.model.lora_alpha, "text_encoder": cfg.text.kind, "ema": ema,
            "detail_warmup_steps": cfg.objective.detail_warmup_steps, "prediction": cfg.objective.prediction,
            "resolution": cfg.data.images.resolution}


def load_run_for_export(run_dir: str | os.PathLike, checkpoint: str = "latest", use_ema: bool = True):
    """A run's adapter model with its trained (or EMA) tensors, the base P/O, and info for the files."""
    run = Path(run_dir)
    if not (run / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"{run}: no {RUN_CONFIG}; pass the output_dir of a stage-2 run")
    cfg = load_config(AdapterTrainConfig, run / RUN_CONFIG)
    if checkpoint == "final":
        folder = run / FINAL_DIR
    elif checkpoint == "latest":
        folder = run / FINAL_DIR if (run / FINAL_DIR / TRAINED_FILE).is_file() else find_latest_checkpoint(run)
        if folder is None:
            raise FileNotFoundError(f"{run}: no checkpoint and no final/ yet")
    else:
        folder = Path(checkpoint)
    transformer = build_adapter_model(cfg.model, gradient_checkpointing=False).eval()
    base_state = stock_head_state(transformer)
    name = EMA_FILE if use_ema and (folder / EMA_FILE).is_file() else TRAINED_FILE
    if use_ema and name != EMA_FILE:
        logger.warning("%s: no EMA weights, exporting the raw trained weights", folder)
    state, _ = read_trained(folder / name)
    load_trained_state_dict(transformer, state, str(folder / name))
    return transformer, base_state, run_info(cfg, str(folder / name), name == EMA_FILE)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = add_common_arguments(argparse.ArgumentParser(prog="python -m davae_training.train_adapter", description=__doc__.split("\n\n")[0]))
    args = ap.parse_args(argv)
    cfg = load_config(AdapterTrainConfig, args.config, args.overrides)
    return train(cfg, args.resume)


if __name__ == "__main__":
    main()
