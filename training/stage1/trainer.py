"""Stage 1: train a DA-VAE tokenizer from a pretrained SD3 VAE, then export it in our format.

    accelerate launch -m davae_training.train_tokenizer --config training/configs/tokenizer_sd3_paper.yaml \\
        --set model.pretrained_vae=/models/sd3.5-medium --set model.subfolder=vae \\
        --set data.sources='[/data/images]' --set train.output_dir=runs/davae_sd3

Also runs as ``python -m davae_training.train_tokenizer`` (one process) and under ``torchrun``.
``--resume latest`` continues a killed run with the same data order, optimiser and step;
``--export-from latest|CHECKPOINT`` writes the ``.safetensors`` file from a checkpoint without
training.  See docs/TRAINING_STAGE1.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from davae_core import DAVAE, save_davae
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
    prepare_deepspeed_batch_size,
    progress_bar,
    plan_resume,
    resume_from,
    save_checkpoint,
    save_final_checkpoint,
    save_image_grid,
    seed_everything,
    setup_logging,
    write_run_config,
    setup_plain_logging,
)
from ..run_safety import NonFiniteGuard, OutputLock, check_finite_tensors
from ..config import add_common_arguments, config_to_dict, load_config, log_global_batch
from ..optimizers import make_lr_scheduler, make_optimizer
from ..data.images import ImageDataset, ResumableSampler, load_or_build_index, make_dataloader
from ..data.loader import make_training_loader
from .config import FIXTURE_VAE, TokenizerModelConfig, TokenizerTrainConfig
from .losses import PatchDiscriminator, TokenizerLoss, build_perceptual_loss
from .stats import apply_detail_statistics, measure_detail_statistics

# ---------------------------------------------------------------------------- building
def load_pretrained_vae(cfg: TokenizerModelConfig):
    """The stock VAE in float32, frozen, from a local diffusers folder (hub ids work where online)."""
    from diffusers import AutoencoderKL

    if cfg.pretrained_vae == FIXTURE_VAE:
        from davae_core.fixtures import tiny_vae

        vae = tiny_vae(0)
    else:
        if not cfg.pretrained_vae:
            raise ValueError(
                "model.pretrained_vae is not set: point it at a diffusers AutoencoderKL folder "
                "(e.g. --set model.pretrained_vae=/models/sd3.5-medium --set model.subfolder=vae)"
            )
        path = Path(cfg.pretrained_vae)
        folder = path / cfg.subfolder if cfg.subfolder else path
        if path.exists() and not (folder / "config.json").is_file():
            hint = " (a full SD3 folder? add --set model.subfolder=vae)" if (path / "vae" / "config.json").is_file() else ""
            raise FileNotFoundError(f"{folder} has no config.json: not a diffusers AutoencoderKL folder{hint}")
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        vae = AutoencoderKL.from_pretrained(cfg.pretrained_vae, torch_dtype=torch.float32, **kwargs)
    return vae.float().eval().requires_grad_(False)


def build_model(config: TokenizerTrainConfig, vae=None) -> tuple[DAVAE, nn.Module]:
    """(DA-VAE initialised from the stock VAE with only the configured parts trainable, stock VAE)."""
    vae = vae if vae is not None else load_pretrained_vae(config.model)
    model = DAVAE.from_base_vae(vae, detail_channels=config.model.detail_channels).float()
    model.requires_grad_(False)
    for m in model.trainable_modules(config.model.train_detail_trunk, config.model.train_decoder_trunk):
        m.requires_grad_(True)
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, vae


@torch.no_grad()
def stock_reconstruction(vae, image_pm: torch.Tensor) -> torch.Tensor:
    """The stock VAE's reconstruction in [-1, 1] (the authors' training target)."""
    latent = vae.encode(image_pm.to(next(vae.parameters()).dtype)).latent_dist.mode()
    return vae.decode(latent).sample.clamp(-1.0, 1.0).to(image_pm.dtype)


def make_target(config: TokenizerTrainConfig, vae, image01: torch.Tensor) -> torch.Tensor:
    image_pm = image01 * 2.0 - 1.0
    if config.loss.target == "stock_vae_reconstruction":
        return stock_reconstruction(vae, image_pm)
    return image_pm


# ---------------------------------------------------------------------------- exporting
def stats_batches(config: TokenizerTrainConfig, records) -> Any:
    """Centre crops of a seeded sample of the training records, for the detail statistics."""
    from dataclasses import replace

    data = replace(config.data, crop="center", random_flip=False, buckets=False)  # square crops: one shape
    if records is None:  # a streamed source (data.format webdataset | hf)
        from ..data.streams import StreamingBatches

        for batch in StreamingBatches(data, config.stats.batch_size, seed=config.train.seed + 1):
            yield batch["pixels"]
        return
    dataset = ImageDataset(records, data, seed=config.train.seed + 1)
    sampler = ResumableSampler(len(records), config.stats.batch_size, seed=config.train.seed + 1)
    loader = make_dataloader(dataset, sampler, num_workers=0)
    for batch in loader:
        yield batch["pixels"]


def export_model(config: TokenizerTrainConfig, model: DAVAE, records, step: int, path: Path | None = None, extra: dict | None = None) -> Path:
    """Detail statistics (or identity) into the normaliser, then ``save_davae``."""
    check_finite_tensors(model.state_dict().items(), f"DA-VAE export (step {step})")
    if config.stats.enabled:
        stats = measure_detail_statistics(model, stats_batches(config, records), config.stats.num_images)
    else:
        stats = None
    info = apply_detail_statistics(model, stats)
    info.update({
        "trainer": "davae_training.train_tokenizer",
        "step": int(step),
        "recipe": {"loss": config_to_dict(config.loss), "model": config_to_dict(config.model)},
        **(extra or {}),
    })
    out = path or config.export_path
    dtype = dtype_from_name(config.export.dtype, "export.dtype")
    save_davae(model, out, include_base_encoder=config.export.include_base_encoder, info=info, dtype=dtype)
    logger.info("exported DA-VAE to %s", out)
    return Path(out)


def export_from_checkpoint(config: TokenizerTrainConfig, checkpoint: str, out: str | None = None) -> Path:
    """Rebuild the model, load the trained weights of an accelerate checkpoint, export."""
    from safetensors.torch import load_file

    setup_plain_logging()
    ckpt = latest_complete_checkpoint(config.train.output_dir)[0] if checkpoint == "latest" else Path(checkpoint)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {config.train.output_dir}/checkpoints to export")
    weights = ckpt / "model.safetensors"
    if weights.is_file():
        state = load_file(str(weights))
    elif (ckpt / "pytorch_model.bin").is_file():
        from davae_core.checkpoint import load_pickled_state_dict

        state = load_pickled_state_dict(ckpt / "pytorch_model.bin")
    else:
        raise FileNotFoundError(
            f"{ckpt} holds no model.safetensors (a sharded DeepSpeed/FSDP checkpoint?): merge it first "
            "(`accelerate merge-weights` for FSDP, zero_to_fp32.py for DeepSpeed) into model.safetensors"
        )
    model, _ = build_model(config)
    model.load_state_dict(state)
    records = load_or_build_index(config.data)[0] if config.data.format == "folder" else None
    step = int(ckpt.name.rsplit("-", 1)[-1]) if ckpt.name.rsplit("-", 1)[-1].isdigit() else -1
    return export_model(config, model, records, step, Path(out) if out else None, {"checkpoint": ckpt.name})


# ---------------------------------------------------------------------------- training
def _save_grid(accelerator, config, model, vae, pixels: torch.Tensor, step: int) -> None:
    n = min(4, pixels.shape[0])
    img = pixels[:n]
    with torch.no_grad():
        model.eval()
        ours = ((model(img, sample_posterior=False)["reconstruction"].float() + 1) / 2).clamp(0, 1)
        model.train()
        stock = ((stock_reconstruction(vae, img * 2 - 1).float() + 1) / 2).clamp(0, 1)
    path = save_image_grid([img.float(), stock, ours], Path(config.train.output_dir) / "samples" / f"step_{step:08d}.png")
    from ..tracker_images import log_image_file

    log_image_file(accelerator, "reconstruction (input | stock VAE | DA-VAE)", path, step)


def train(config: TokenizerTrainConfig, resume: str | None = None, perceptual_net: nn.Module | None = None,
          change_learning_rate: bool = False) -> Path | None:
    """Train, checkpoint, export. Returns the exported file on the main process (None elsewhere)."""
    with OutputLock(config.train.output_dir):  # a second run into the same folder refuses to start
        return _train(config, resume, perceptual_net, change_learning_rate)


def _train(config: TokenizerTrainConfig, resume: str | None, perceptual_net: nn.Module | None,
           change_learning_rate: bool) -> Path | None:
    loop = config.train
    out = Path(loop.output_dir)
    accelerator = make_accelerator(loop)
    setup_logging(accelerator, out)
    seed_everything(loop.seed)
    prepare_deepspeed_batch_size(accelerator, loop.batch_size)
    if config.data.index_cache is None:
        config.data.index_cache = str(out / "data_index.json")

    plan = plan_resume(resume, config, change_learning_rate)  # before the run config is rewritten
    write_run_config(accelerator, out, config)
    records = None  # streamed sources (data.format webdataset | hf) have no index; they log skips as they go
    if config.data.format == "folder":
        records, report = load_or_build_index(config.data, accelerator)
        if accelerator.is_main_process:
            from dataclasses import asdict

            write_json_atomic(out / "data_report.json", asdict(report))

    model, vae = build_model(config)
    vae.to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    logger.info("DA-VAE: %.2fM trainable of %.2fM parameters", sum(p.numel() for p in trainable) / 1e6,
                sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = make_optimizer(trainable, loop)
    lr_scheduler = make_lr_scheduler(optimizer, loop, accelerator.num_processes)
    log_global_batch(loop, accelerator.num_processes)
    perceptual = build_perceptual_loss(config.loss, perceptual_net) if config.loss.lpips_weight > 0 else None
    loss_fn = TokenizerLoss(config.loss, perceptual).to(accelerator.device)

    disc = opt_d = None
    if config.loss.uses_gan:
        disc = PatchDiscriminator(3, config.loss.disc_channels, config.loss.disc_layers, config.loss.disc_norm)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=config.loss.disc_learning_rate or loop.learning_rate,
                                  betas=(loop.adam_beta1, loop.adam_beta2), weight_decay=loop.adam_weight_decay)
        model, optimizer, lr_scheduler, disc, opt_d = accelerator.prepare(model, optimizer, lr_scheduler, disc, opt_d)
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    disc_plain = accelerator.unwrap_model(disc) if disc is not None else None
    last_layer = unwrapped.decoder_trunk.conv_out.weight

    state = resume_from(accelerator, plan, optimizer, lr_scheduler)
    guard = NonFiniteGuard(accelerator, loop.on_nonfinite, lambda: latest_complete_checkpoint(out)[0])
    init_trackers(accelerator, loop, config)

    batches = iter(make_training_loader(config.data, loop.batch_size, loop.seed, accelerator.process_index,
                                        accelerator.num_processes, state.micro_batches, loop.dataloader_num_workers,
                                        accelerator, pin_memory=accelerator.device.type == "cuda"))

    bar = progress_bar(accelerator, loop.max_steps, state.step, "DA-VAE")
    model.train()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    last: dict[str, float] = {}
    pixels = None
    while state.step < loop.max_steps:
        batch = next(batches)
        pixels = batch["pixels"].to(accelerator.device, non_blocking=True)
        global_mb = state.micro_batches * accelerator.num_processes + accelerator.process_index
        models = (model, disc) if disc is not None else (model,)
        with accelerator.accumulate(*models):
            with accelerator.autocast():
                target = make_target(config, vae, pixels)
                outputs = model(pixels, sample_posterior=True, generator=torch.Generator().manual_seed(derive_seed(loop.seed, "posterior", global_mb)))
                if disc_plain is not None:
                    disc_plain.requires_grad_(False)  # G step: gradients reach the generator only
                total, logs = loss_fn.generator_loss(outputs, target, state.step, disc_plain, last_layer)
            guard.note_loss(total)
            accelerator.backward(total)
            if accelerator.sync_gradients and loop.max_grad_norm:
                norm = accelerator.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
                if norm is not None:  # DeepSpeed clips inside its engine and returns None
                    logs["grad_norm"] = torch.as_tensor(norm).float()
            if not (accelerator.sync_gradients and guard.skip_step(trainable, state.step + 1)):
                optimizer.step()
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if disc is not None and loss_fn.gan_active(state.step):
                disc_plain.requires_grad_(True)
                with accelerator.autocast():
                    d_loss = loss_fn.discriminator_loss(disc, target, outputs["reconstruction"])
                accelerator.backward(d_loss)
                if accelerator.sync_gradients and loop.max_grad_norm:
                    accelerator.clip_grad_norm_(disc.parameters(), loop.max_grad_norm)
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
                logs["gan_d"] = d_loss.detach().float()
        state.micro_batches += 1
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
        if not accelerator.sync_gradients:
            continue

        state.step += 1
        bar.update(1)
        if state.step % loop.log_every == 0 or state.step == loop.max_steps:
            keys = sorted(sums)
            local = torch.tensor([sums[k] / counts[k] for k in keys], device=accelerator.device)
            mean = accelerator.reduce(local, reduction="mean")
            values = {f"loss/{k}": float(v) for k, v in zip(keys, mean.tolist())}
            values["lr"] = lr_scheduler.get_last_lr()[0]
            accelerator.log(values, step=state.step)
            last = values
            bar.set_postfix(loss=f"{values.get('loss/total', math.nan):.4f}")
            logger.info("step %d: %s", state.step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
        sums, counts = {}, {}
        if loop.image_every and state.step % loop.image_every == 0 and accelerator.is_main_process:
            _save_grid(accelerator, config, unwrapped, vae, pixels, state.step)
        if loop.checkpoint_every and state.step % loop.checkpoint_every == 0:
            save_checkpoint(accelerator, out, state, loop.checkpoints_total_limit)
        maybe_inject_fault(state.step)
    bar.close()

    return finish(config, accelerator, unwrapped, vae, records, state, last, pixels)


def finish(config: TokenizerTrainConfig, accelerator, model: DAVAE, vae, records, state: TrainerState,
           last: dict[str, float], pixels: torch.Tensor | None) -> Path | None:
    """Final checkpoint, ``final/summary.json`` (per-rank digests), the exported DA-VAE file."""
    loop = config.train
    save_final_checkpoint(accelerator, loop.output_dir, state, loop.checkpoints_total_limit)
    summary = {"step": state.step, **gather_rank_digests(accelerator, model), "last_logged": last}
    exported = None
    if accelerator.is_main_process:
        if pixels is not None and loop.image_every and state.step % loop.image_every:
            _save_grid(accelerator, config, model, vae, pixels, state.step)
        exported = export_model(config, model, records, state.step)
        summary["export"] = str(exported)
        write_json_atomic(Path(loop.output_dir) / FINAL_DIR / "summary.json", summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exported


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m davae_training.train_tokenizer", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--export-from", metavar="latest|CHECKPOINT", default=None,
                        help="do not train: export the DA-VAE file from this checkpoint")
    parser.add_argument("--export-to", metavar="FILE", default=None, help="where --export-from writes (default export.path)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(TokenizerTrainConfig, args.config, args.overrides)
    if args.export_from:
        print(export_from_checkpoint(config, args.export_from, args.export_to))
        return
    path = train(config, resume=args.resume, change_learning_rate=args.change_learning_rate)
    if path is not None:
        print(f"DA-VAE written to {path}")


if __name__ == "__main__":
    main()
