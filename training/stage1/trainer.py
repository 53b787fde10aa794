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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from davae_core import DAVAE, save_davae
from davae_core.atomic_files import write_json_atomic
from davae_core.dtypes import dtype_from_name

from ..checkpoints import RunCheckpointError, checkpoint_step, latest_complete_checkpoint
from ..config import add_common_arguments, config_to_dict, load_config
from ..data.images import ImageDataset, ResumableSampler, load_or_build_index, make_dataloader
from ..data.loader import make_training_loader
from ..loop import TrainingLoop
from ..run_safety import check_finite_tensors
from ..runtime import logger, setup_plain_logging
from ..sharding import gather_whole
from .config import FIXTURE_VAE, PICKLED_VAE_SUFFIXES, TokenizerModelConfig, TokenizerTrainConfig
from .stats import apply_detail_statistics, measure_detail_statistics
from .step import TokenizerModel, TokenizerStep

# ---------------------------------------------------------------------------- building
def load_pretrained_vae(cfg: TokenizerModelConfig):
    """The stock VAE in float32, frozen, from a local diffusers folder (hub ids work where online)."""
    from diffusers import AutoencoderKL

    if cfg.pretrained_vae == FIXTURE_VAE:
        from davae_core.fixtures import tiny_vae

        vae = tiny_vae(0)
    elif Path(cfg.pretrained_vae).suffix in PICKLED_VAE_SUFFIXES and Path(cfg.pretrained_vae).is_file():
        import json

        from davae_core.vavae_import import import_vavae

        arch = json.loads(Path(cfg.vae_config).read_text()) if cfg.vae_config else None
        vae = import_vavae(cfg.pretrained_vae, cfg.latent_stats, arch)
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
    model = DAVAE.from_base_vae(vae, detail_channels=config.model.detail_channels, base_name=config.model.base_vae,
                                decoder_base_space=config.model.decoder_base_space).float()
    model.requires_grad_(False)
    for m in model.trainable_modules(config.model.train_detail_trunk, config.model.train_decoder_trunk):
        m.requires_grad_(True)
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, vae


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


def export_from_state(config: TokenizerTrainConfig, state: dict[str, torch.Tensor], records, step: int,
                      path: Path | None = None, extra: dict | None = None, vae=None, device: torch.device | str = "cpu") -> Path:
    """A whole DA-VAE state dict (a checkpoint's ``model.safetensors``, or the end of a run under any
    engine) into a plain DA-VAE on ``device``, then :func:`export_model`."""
    model, _ = build_model(config, vae)
    model.load_state_dict(state)
    model.to(device)
    return export_model(config, model, records, step, path, extra)


def export_from_checkpoint(config: TokenizerTrainConfig, checkpoint: str, out: str | None = None) -> Path:
    """Rebuild the model, load the trained weights of a checkpoint, export."""
    from safetensors.torch import load_file

    setup_plain_logging()
    ckpt = latest_complete_checkpoint(config.train.output_dir)[0] if checkpoint == "latest" else Path(checkpoint)
    if ckpt is None:
        raise RunCheckpointError(f"no checkpoint in {config.train.output_dir}/checkpoints to export")
    weights = ckpt / TokenizerModel.weights_file
    if not weights.is_file():
        raise RunCheckpointError(f"{ckpt} holds no {weights.name}: not a stage-1 checkpoint of this trainer")
    records = load_or_build_index(config.data)[0] if config.data.format == "folder" else None
    step = checkpoint_step(ckpt)
    return export_from_state(config, load_file(str(weights)), records, step if step is not None else -1,
                             Path(out) if out else None, {"checkpoint": ckpt.name})


# ---------------------------------------------------------------------------- training
def train(config: TokenizerTrainConfig, resume: str | None = None, perceptual_net: nn.Module | None = None,
          change_learning_rate: bool = False) -> Path | None:
    """Train, checkpoint, export. Returns the exported file on the main process (None elsewhere)."""
    if config.data.index_cache is None:  # resolved before the run config is written
        config.data.index_cache = str(Path(config.train.output_dir) / "data_index.json")
    with TrainingLoop(config, resume, change_learning_rate, "DA-VAE", bar_keys=("loss/total",)) as loop:
        records = index_data(config, loop)
        davae, vae = build_model(config)
        trained = [p for p in davae.parameters() if p.requires_grad]
        logger.info("DA-VAE: %.2fM trainable of %.2fM parameters", sum(p.numel() for p in trained) / 1e6,
                    sum(p.numel() for p in davae.parameters()) / 1e6)
        model = TokenizerModel.build(config, davae, vae, perceptual_net).to(loop.device)
        loop.prepare(model)  # engine; optimizer, lr schedule of the prepared parameters; resume

        batches = iter(make_training_loader(config.data, config.train.batch_size, config.train.seed, loop.accelerator.process_index,
                                            loop.accelerator.num_processes, loop.state.micro_batches,
                                            config.train.dataloader_num_workers, loop.accelerator,
                                            pin_memory=loop.device.type == "cuda"))
        step = TokenizerStep(config, model)
        model.network.train()

        while loop.running:
            for micro in loop.micro_batches():
                with loop.accumulate():
                    loss, logs = step(next(batches), loop.step, loop.generator(micro))
                    loop.backward(loss, logs)
            loop.update()  # clip, non-finite guard, AdamW on the DA-VAE (and the discriminator), lr
            loop.log()
            loop.images("reconstruction (input | stock VAE | DA-VAE)", step.reconstruction_rows)
            loop.checkpoint()
        summary = loop.finish(lambda: export(config, model, records, loop))
    return Path(summary["export"]) if "export" in summary else None


def index_data(config: TokenizerTrainConfig, loop: TrainingLoop):
    """The scanned file index (``data.format: folder``; its report beside the run), or None for a stream."""
    if config.data.format != "folder":
        return None  # streamed sources (webdataset | hf) have no index; they log skips as they go
    records, report = load_or_build_index(config.data, loop.accelerator)
    if loop.accelerator.is_main_process:
        from dataclasses import asdict

        write_json_atomic(loop.out / "data_report.json", asdict(report))
    return records


def export(config: TokenizerTrainConfig, model: TokenizerModel, records, loop: TrainingLoop) -> dict[str, Any]:
    """The DA-VAE file from the whole trained state (gathered on every rank, exported by the main one)."""
    state = gather_whole(model.checkpoint_tensors())
    if not loop.accelerator.is_main_process:
        return {}
    return {"export": str(export_from_state(config, state, records, loop.step, vae=model.vae, device=loop.device))}


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
