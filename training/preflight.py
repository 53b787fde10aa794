"""Run a shipped config for a few optimizer steps at its real size, with random weights.

    python -m davae_training.preflight --config training/configs/sd35m_1024.yaml [--steps 1] [--out DIR]
    python -m davae_training.preflight --config training/configs/tokenizer_sd3_paper.yaml --steps 1
    python -m davae_training.preflight --config training/configs/sd35m_1024_24gb.yaml --toy   # seconds, CPU

Before renting GPUs: does the config build, step and fit?  Builds what the config names
(stage 2: the SD3.5 transformer of ``model.architecture`` with LoRA and the DA heads, the frozen
DA-VAE on the SD3 VAE that encodes its images; stage 1: the DA-VAE on the SD3 VAE, its losses
and discriminator) through the trainers' own builders, with random weights unless the config
points at real ones (no downloads), random images and text conditioning of the real shapes
(77 CLIP + ``text.max_sequence_length`` T5 tokens x 4096, pooled 2048), batch 1 at the config's
resolution, and the config's memory savers (gradient checkpointing, ``model.base_dtype``,
``train.mixed_precision``, ``train.optimizer``).  Prints each step's time and, last, the peak
memory (process RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU).  ``--toy`` keeps
the architecture's pattern at a width a CPU test runs in seconds.  Real runs of real data are
still the trainers' job: LPIPS here is a VGG16-shaped net with random weights (same cost).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import load_config

GIB = 1024**3


# ---------------------------------------------------------------------------- shared
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, mixed_precision: str):
    if mixed_precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
    return nullcontext()


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def _randomize_(module: nn.Module, std: float = 0.02) -> None:
    """Small random weights (cost only; no uninitialised memory, no all-zero layers)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.normal_(0.0, std)


def _count(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def detect_stage(config_path: str | Path) -> str:
    import yaml

    data = yaml.safe_load(Path(config_path).read_text()) or {}
    if "objective" in data or "tokenizer" in data:
        return "stage2"
    if "loss" in data:
        return "stage1"
    raise ValueError(f"{config_path}: neither a stage-1 (has loss:) nor a stage-2 (has objective:/tokenizer:) config")


# ---------------------------------------------------------------------------- stage 2
def random_sd3_transformer(config: dict[str, Any], dtype: torch.dtype, device: torch.device):
    """``SD3Transformer2DModel`` of ``config`` built on meta and materialised once, in ``dtype``."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    model = model.to(dtype=dtype).to_empty(device=device)
    _randomize_(model)
    return model


def random_sd3_vae(toy: bool):
    from diffusers import AutoencoderKL

    from davae_core import SD3_VAE_CONFIG, tiny_vae_config

    vae = AutoencoderKL(**(tiny_vae_config(attention=True) if toy else SD3_VAE_CONFIG))
    _randomize_(vae)
    return vae.eval().requires_grad_(False)


def build_stage2(cfg, toy: bool, device: torch.device):
    """(model, frozen DA-VAE or None, text shapes) for an AdapterTrainConfig."""
    from .stage2.model import BASE_DTYPES, load_base_transformer, prepare_adapter_model
    from .architectures import CLIP_TOKENS, toy_width, transformer_config

    base_dtype = BASE_DTYPES[cfg.model.base_dtype]
    if cfg.model.pretrained and not toy:
        transformer = load_base_transformer(cfg.model.pretrained, base_dtype).to(device)
        source = cfg.model.pretrained
    else:
        arch = transformer_config(cfg.model.architecture)
        if toy:
            arch = toy_width(arch)
        transformer = random_sd3_transformer(arch, base_dtype, device)
        source = f"{cfg.model.architecture}{' at toy width' if toy else ''}, random weights"
    model = prepare_adapter_model(transformer, cfg.model, cfg.train.gradient_checkpointing).to(device)
    if cfg.text.kind == "sd3" and not toy:
        tokens = CLIP_TOKENS + cfg.text.max_sequence_length
    else:
        tokens = 8 if toy else cfg.text.standin_tokens
    davae = None
    if not cfg.data.cache_dir:  # the trainer encodes every batch with the frozen DA-VAE
        from davae_core import DAVAE

        davae = DAVAE.from_base_vae(random_sd3_vae(toy), detail_channels=cfg.model.detail_channels)
        davae = davae.to(device, {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.tokenizer.dtype])
        davae.requires_grad_(False).eval()
    return model, davae, tokens, source


def compute_in_float32(model: nn.Module, storage: torch.dtype) -> None:
    """Frozen Linear/Conv weights stay in ``storage`` and are cast to float32 layer by layer
    (diffusers' layerwise casting); the small rest (norm weights) goes to float32.  For CPUs,
    where torch's bfloat16 GEMM is a slow reference loop unless the CPU has AVX512-BF16/AMX."""
    import re

    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    skip = ("lora_", "pos_embed.proj", "proj_out")  # trained tensors: already float32
    apply_layerwise_casting(model, storage_dtype=storage, compute_dtype=torch.float32, skip_modules_pattern=skip)
    for name, module in model.named_modules():
        hooked = isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS) and not any(re.search(p, name) for p in skip)
        if not hooked:
            for p in module.parameters(recurse=False):
                p.data = p.data.float()


def run_stage2(cfg, steps: int, toy: bool, device: torch.device, log, cpu_float32: bool = True) -> dict[str, Any]:
    from .stage2.model import make_ema, trained_parameters
    from .stage2.objective import flow_matching_loss
    from .optimizers import make_optimizer

    from .stage2.model import check_base_dtype

    loop = cfg.train
    check_base_dtype(cfg.model.base_dtype, loop.mixed_precision)
    torch.manual_seed(loop.seed)
    model, davae, tokens, source = build_stage2(cfg, toy, device)
    autocast = loop.mixed_precision
    if device.type == "cpu" and cfg.model.base_dtype == "bfloat16" and cpu_float32:
        compute_in_float32(model, torch.bfloat16)
        autocast = "no"
    model.train()
    params = trained_parameters(model)
    optimizer = make_optimizer(params.values(), loop)
    ema = make_ema(model, cfg.model.ema_decay)
    if ema is not None:
        ema.to(device)
    net_cfg = model.config
    res = cfg.data.images.resolution
    side = res // 16  # DA-VAE latents are f16
    info = {
        "stage": "stage2", "model": source, "layers": net_cfg.num_layers,
        "hidden": net_cfg.num_attention_heads * net_cfg.attention_head_dim, "resolution": res,
        "latent_shape": [1, net_cfg.in_channels, side, side], "text_tokens": tokens,
        "params_total": _count(model), "params_trained": _count(model, True),
        "base_dtype": cfg.model.base_dtype, "mixed_precision": loop.mixed_precision, "autocast": autocast, "optimizer": loop.optimizer,
        "gradient_checkpointing": loop.gradient_checkpointing, "encodes_images": davae is not None,
    }
    log(f"preflight stage 2: {source}; {info['layers']} layers x {info['hidden']} wide; "
        f"{info['params_total'] / 1e6:.1f}M parameters, {info['params_trained'] / 1e6:.1f}M trained; "
        f"batch 1 at {res}px = latents {tuple(info['latent_shape'])}, {tokens} text tokens; base {cfg.model.base_dtype}, "
        f"autocast {autocast}{' (CPU: float32 compute)' if autocast != loop.mixed_precision else ''}, {loop.optimizer}, gradient checkpointing {'on' if loop.gradient_checkpointing else 'off'}"
        f"{', DA-VAE encode per step' if davae is not None else ''}")
    gen = torch.Generator(device=device).manual_seed(loop.seed)
    step_times = []
    for step in range(steps):
        start = time.perf_counter()
        with torch.no_grad():
            if davae is not None:
                pixels = torch.rand(1, 3, res, res, generator=gen, device=device, dtype=next(davae.parameters()).dtype)
                latents = davae.encode(pixels).float()
            else:
                latents = torch.randn(info["latent_shape"], generator=gen, device=device)
        embeds = torch.randn(1, tokens, net_cfg.joint_attention_dim, generator=gen, device=device)
        pooled = torch.randn(1, net_cfg.pooled_projection_dim, generator=gen, device=device)

        def model_fn(x_t, t):
            return model(hidden_states=x_t, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]

        with _autocast(device, autocast):
            losses = flow_matching_loss(model_fn, latents, step, cfg.objective, gen)
        losses["loss"].backward()
        if loop.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), loop.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(list(params.values()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        log(f"step {step + 1}/{steps}: {step_times[-1]:.2f} s, loss {losses['loss'].item():.4f}")
        if not torch.isfinite(losses["loss"]):
            raise RuntimeError(f"step {step + 1}: the loss is {losses['loss'].item()}")
    return {**info, "step_seconds": step_times}


# ---------------------------------------------------------------------------- stage 1
class RandomVGG16Features(nn.Module):
    """VGG16's conv stack (LPIPS-VGG's backbone) with random weights: LPIPS's cost, not its meaning."""

    PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in self.PLAN:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        _randomize_(self)
        self.requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dist = 0.0
        x = torch.cat([a, b])
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                fa, fb = x.chunk(2)
                fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
                fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
                dist = dist + (fa - fb).pow(2).sum(1).mean((1, 2))
        return dist


def run_stage1(cfg, steps: int, toy: bool, device: torch.device, log, cpu_float32: bool = True) -> dict[str, Any]:
    from .optimizers import make_optimizer
    from .stage1.losses import PatchDiscriminator, RandomFeaturePerceptual, TokenizerLoss, build_perceptual_loss, hinge_d_loss
    from .stage1.trainer import build_model, make_target

    loop = cfg.train
    torch.manual_seed(loop.seed)
    vae = None
    source = cfg.model.pretrained_vae
    if toy or not cfg.model.pretrained_vae:
        vae = random_sd3_vae(toy)
        source = f"SD3 VAE{' at toy width' if toy else ''}, random weights"
    model, vae = build_model(cfg, vae)
    model.to(device).train()
    vae.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, loop)
    perceptual = None
    if cfg.loss.lpips_weight > 0:
        # at toy width the VGG16 stack would dominate: the small random-feature stand-in there
        perceptual = build_perceptual_loss(cfg.loss, RandomFeaturePerceptual() if toy else RandomVGG16Features())
    loss_fn = TokenizerLoss(cfg.loss, perceptual).to(device)
    disc = opt_d = None
    if cfg.loss.uses_gan:
        disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers, cfg.loss.disc_norm).to(device)
        opt_d = make_optimizer(disc.parameters(), loop)
    res = cfg.data.resolution
    # stage 1 keeps fp32 weights; on a CPU bf16 autocast only slows it down (reference bf16 GEMM/conv)
    autocast = "no" if device.type == "cpu" and cpu_float32 else loop.mixed_precision
    info = {"stage": "stage1", "model": source, "resolution": res, "params_total": _count(model),
            "params_trained": _count(model, True), "discriminator": disc is not None,
            "mixed_precision": loop.mixed_precision, "autocast": autocast, "optimizer": loop.optimizer,
            "gradient_checkpointing": loop.gradient_checkpointing}
    # the costliest phase of the loss schedule: past the GAN warm-up, the discriminator's
    # generator term and its own update run too, so the peak printed is the run's peak
    phase = max(0, cfg.loss.gan_start_step) if disc is not None else 0
    info["loss_schedule_step"] = phase
    log(f"preflight stage 1: DA-VAE on {source}; {info['params_total'] / 1e6:.1f}M parameters, "
        f"{info['params_trained'] / 1e6:.1f}M trained; batch 1 at {res}px; autocast {autocast}, {loop.optimizer}, "
        f"gradient checkpointing {'on' if loop.gradient_checkpointing else 'off'}, "
        f"LPIPS {('small random-feature stand-in' if toy else 'VGG16-shaped, random weights') if perceptual is not None else 'off'}, GAN {'on' if disc is not None else 'off'}"
        + (f" (losses as at step {phase}, past the GAN warm-up)" if phase else ""))
    gen = torch.Generator(device=device).manual_seed(loop.seed)
    last_layer = model.decoder_trunk.conv_out.weight
    step_times, d_updates = [], 0
    for step in range(steps):
        start = time.perf_counter()
        pixels = torch.rand(1, 3, res, res, generator=gen, device=device)
        # the generator and discriminator updates of train_tokenizer.train, without accelerate
        with _autocast(device, autocast):
            target = make_target(cfg, vae, pixels)
            outputs = model(pixels, sample_posterior=True, generator=gen)
            if disc is not None:
                disc.requires_grad_(False)
            total, logs = loss_fn.generator_loss(outputs, target, phase + step, disc, last_layer)
        total.backward()
        if loop.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, loop.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if disc is not None and loss_fn.gan_active(phase + step):
            disc.requires_grad_(True)
            with _autocast(device, autocast):
                real, fake = disc(torch.cat([target, outputs["reconstruction"].detach()])).chunk(2)
                d_loss = hinge_d_loss(real, fake)
            d_loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            d_updates += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        log(f"step {step + 1}/{steps}: {step_times[-1]:.2f} s, loss {total.item():.4f}")
        if not torch.isfinite(total):
            raise RuntimeError(f"step {step + 1}: the loss is {total.item()}")
    return {**info, "step_seconds": step_times, "discriminator_updates": d_updates}


# ---------------------------------------------------------------------------- command line
def preflight(config: str | Path, steps: int = 1, overrides: list[str] | tuple[str, ...] = (), toy: bool = False,
              device: str = "auto", out: str | Path | None = None, log=print, cpu_float32: bool = True) -> dict[str, Any]:
    stage = detect_stage(config)
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if stage == "stage2":
        from .stage2.config import AdapterTrainConfig

        cfg = load_config(AdapterTrainConfig, config, overrides)
        result = run_stage2(cfg, steps, toy, dev, log, cpu_float32)
    else:
        from .stage1.config import TokenizerTrainConfig

        cfg = load_config(TokenizerTrainConfig, config, overrides)
        result = run_stage1(cfg, steps, toy, dev, log, cpu_float32)
    peak, how = peak_memory_bytes(dev)
    result.update({"config": str(config), "overrides": list(overrides), "toy": toy, "device": str(dev),
                   "peak_memory_bytes": peak, "peak_memory_kind": how, "torch": torch.__version__})
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "preflight.json").write_text(json.dumps(result, indent=2))
    times = result["step_seconds"]
    log(f"peak memory: {peak / GIB:.2f} GiB ({how}, {dev}); step time {min(times):.2f} s (best of {len(times)})")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m davae_training.preflight", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a stage-1 or stage-2 YAML config (training/configs/)")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps (batch 1 each)")
    ap.add_argument("--out", default=None, help="folder for preflight.json")
    ap.add_argument("--toy", action="store_true", help="the architecture at toy width (CPU tests)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="on a CPU, compute in bf16 as the config says (default: float32 compute, bf16 storage kept)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config entry (repeatable), as for the trainers")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return preflight(args.config, args.steps, args.overrides, args.toy, args.device, args.out,
                     log=lambda s: print(s, flush=True), cpu_float32=not args.cpu_bf16)


if __name__ == "__main__":
    main()
