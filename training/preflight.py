"""Run a shipped config for a few optimizer steps at its real size, with random weights.

    python -m davae_training.preflight --config training/configs/sd35m_1024.yaml [--steps 1] [--out DIR]
    python -m davae_training.preflight --config training/configs/tokenizer_sd3_paper.yaml --steps 1
    python -m davae_training.preflight --config training/configs/sd35m_1024_24gb.yaml --toy   # seconds, CPU
    python -m davae_training.preflight --config training/configs/imagenet/lightningdit_xl_da_paper.yaml   # ImageNet stage 2

Before renting GPUs: does the config build, step and fit?  Builds what the config names
(stage 2: the SD3.5 transformer of ``model.architecture`` with LoRA and the DA heads, the frozen
DA-VAE on the SD3 VAE that encodes its images; stage 1: the DA-VAE on the SD3 VAE, its losses
and discriminator; ImageNet stage 2: LightningDiT-XL/1 with DA heads and the DA-VAE on VA-VAE) through the
trainers' own builders, with random weights unless the config
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
    if "ema_decay" in data:  # training/configs/imagenet/lightningdit_*.yaml
        return "imagenet"
    if "objective" in data or "tokenizer" in data:
        return "stage2"
    if "loss" in data:
        return "stage1"
    raise ValueError(f"{config_path}: neither a stage-1 (has loss:), a stage-2 (has objective:/tokenizer:) nor an "
                     "ImageNet stage-2 (has ema_decay:) config")


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


def random_vavae(toy: bool):
    from diffusers import AutoencoderKL

    from davae_core.davae_config import VAVAE_CONFIG, tiny_vavae_config

    vae = AutoencoderKL(**(tiny_vavae_config() if toy else VAVAE_CONFIG))
    _randomize_(vae)
    return vae.eval().requires_grad_(False)


def build_stage2(cfg, toy: bool, device: torch.device, num_layers: int | None = None):
    """(AdapterModel, Conditioning, batch, description) for an AdapterTrainConfig: what the trainer builds,
    with random weights unless ``model.pretrained`` names real ones, and random data of the config's shapes.
    ``num_layers``: fewer transformer blocks at the real width (a CPU benchmark)."""
    from .stage2.architectures import CLIP_TOKENS, toy_width, transformer_config
    from .stage2.conditioning import Conditioning
    from .stage2.model import BASE_DTYPES, AdapterModel, load_base_transformer, prepare_adapter_model
    from .stage2.text_conditioning import HashingTextConditioner

    base_dtype = BASE_DTYPES[cfg.model.base_dtype]
    if cfg.model.pretrained and not toy:
        transformer = load_base_transformer(cfg.model.pretrained, base_dtype).to(device)
        source = cfg.model.pretrained
    else:
        arch = transformer_config(cfg.model.architecture)
        if toy:
            arch = toy_width(arch)
        if num_layers is not None:
            arch = {**arch, "num_layers": num_layers, "dual_attention_layers": [i for i in arch["dual_attention_layers"] if i < num_layers]}
        transformer = random_sd3_transformer(arch, base_dtype, device)
        source = f"{cfg.model.architecture}{' at toy width' if toy else ''}{f', {num_layers} blocks' if num_layers else ''}, random weights"
    adapter = AdapterModel(prepare_adapter_model(transformer, cfg.model, cfg.train.gradient_checkpointing).to(device), cfg.model)
    net = adapter.module.config
    tokens = CLIP_TOKENS + cfg.text.max_sequence_length if cfg.text.kind == "sd3" and not toy else (8 if toy else cfg.text.standin_tokens)
    # the text encoders' output shapes (their cost is not the transformer's: the hashing stand-in makes them)
    text = HashingTextConditioner(net.joint_attention_dim, net.pooled_projection_dim, tokens).to(device)
    res, b = cfg.data.images.resolution, cfg.train.batch_size
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    captions = [f"a test caption {i}" for i in range(b)]
    if cfg.data.cache_dir:  # the trainer reads latents and text from the cache
        embeds, pooled = text.encode(captions)
        latents = torch.randn(b, net.in_channels, res // 16, res // 16, generator=gen, device=device)
        cond = Conditioning(device, text=text, latent_factor=16)
        batch = {"latents": latents, "embeds": embeds, "pooled": pooled}
    else:  # the frozen DA-VAE encodes every micro-batch
        cond = Conditioning(device, random_davae(cfg, toy, device), text, encode_batch_size=cfg.data.encode_batch_size)
        batch = {"pixels": torch.rand(b, 3, res, res, generator=gen, device=device), "caption": captions}
    return adapter, cond, batch, source, tokens


def random_davae(cfg, toy: bool, device: torch.device):
    from davae_core import DAVAE
    from davae_core.dtypes import dtype_from_name

    davae = DAVAE.from_base_vae(random_sd3_vae(toy), detail_channels=cfg.model.detail_channels)
    return davae.to(device, dtype_from_name(cfg.tokenizer.dtype, "tokenizer.dtype")).requires_grad_(False).eval()


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


def step_engine(train, device: torch.device):
    """The loop kit's engine on one device, one micro-batch per optimizer step, no trackers."""
    from dataclasses import replace

    from .loop import Engine
    from .runtime import make_accelerator

    train = replace(train, gradient_accumulation_steps=1, report_to="none", on_nonfinite="stop")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return Engine(train, make_accelerator(train, cpu=device.type == "cpu"))


def run_steps(engine, step, batch, steps: int, log, first_step: int = 0) -> list[float]:
    """``steps`` optimizer steps of the trainer's own ``step`` through the kit; seconds each."""
    times = []
    for i in range(steps):
        start = time.perf_counter()
        for micro in engine.micro_batches():
            with engine.accumulate():
                loss, logs = step(batch, first_step + i, engine.generator(micro))
                engine.backward(loss, logs)
        engine.update()
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        times.append(time.perf_counter() - start)
        log(f"step {i + 1}/{steps}: {times[-1]:.2f} s, loss {loss.item():.4f}")
    return times


def run_stage2(cfg, steps: int, toy: bool, device: torch.device, log, cpu_float32: bool = True) -> dict[str, Any]:
    from dataclasses import replace

    from .stage2.model import check_base_dtype
    from .stage2.step import AdapterStep

    check_base_dtype(cfg.model.base_dtype, cfg.train.mixed_precision)
    torch.manual_seed(cfg.train.seed)
    adapter, cond, batch, source, tokens = build_stage2(cfg, toy, device)
    autocast = cfg.train.mixed_precision
    if device.type == "cpu" and cfg.model.base_dtype == "bfloat16" and cpu_float32:
        compute_in_float32(adapter.network, torch.bfloat16)
        autocast = "no"
    engine = step_engine(replace(cfg.train, mixed_precision=autocast), device)
    try:
        adapter.network.train()
        engine.prepare(adapter)
        net_cfg = adapter.module.config
        res = cfg.data.images.resolution
        info = {
            "stage": "stage2", "model": source, "layers": net_cfg.num_layers,
            "hidden": net_cfg.num_attention_heads * net_cfg.attention_head_dim, "resolution": res,
            "micro_batch": cfg.train.batch_size, "latent_shape": [cfg.train.batch_size, net_cfg.in_channels, res // 16, res // 16],
            "text_tokens": tokens, "params_total": _count(adapter.module), "params_trained": _count(adapter.module, True),
            "base_dtype": cfg.model.base_dtype, "mixed_precision": cfg.train.mixed_precision, "autocast": autocast,
            "optimizer": cfg.train.optimizer, "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "encodes_images": cond.davae is not None,
        }
        if cond.davae is not None:
            info.update(encode_memory(cond, batch["pixels"], engine))
        log(f"preflight stage 2: {source}; {info['layers']} layers x {info['hidden']} wide; "
            f"{info['params_total'] / 1e6:.1f}M parameters, {info['params_trained'] / 1e6:.1f}M trained; "
            f"micro-batch {cfg.train.batch_size} at {res}px = latents {tuple(info['latent_shape'])}, {tokens} text tokens; "
            f"base {cfg.model.base_dtype}, autocast {autocast}{' (CPU: float32 compute)' if autocast != cfg.train.mixed_precision else ''}, "
            f"{cfg.train.optimizer}, gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}"
            + (f"; DA-VAE encode per step: weights {info['davae_weights_bytes'] / GIB:.2f} GiB, transient "
               f"{info['encode_transient_bytes'] / GIB:.2f} GiB ({info['encode_transient_kind']}, "
               f"{info['encode_batch_size']} images per pass)" if cond.davae is not None else ""))
        times = run_steps(engine, AdapterStep(adapter, cond, cfg.objective), batch, steps, log)
    finally:
        engine.close()
    return {**info, "step_seconds": times}


def encode_memory(cond, pixels: torch.Tensor, engine) -> dict[str, Any]:
    """The frozen DA-VAE's weights and the transient of one micro-batch's encode (measured on a GPU,
    estimated from the tensors alive at once on a CPU)."""
    davae = cond.davae
    weights = sum(p.numel() * p.element_size() for p in davae.parameters())
    chunk = min(cond.encode_batch_size, pixels.shape[0])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine.train.mixed_precision, next(davae.parameters()).dtype)
    out = {"davae_weights_bytes": weights, "encode_batch_size": cond.encode_batch_size,
           "encode_transient_bytes": encode_transient_bytes(davae.config, chunk, pixels.shape[-1], dtype),
           "encode_transient_kind": f"estimate: tensors alive at once in {str(dtype).removeprefix('torch.')}"}
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
        before = torch.cuda.memory_allocated(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
        with engine.autocast():
            cond.encode_images(pixels)
        out["encode_transient_bytes"] = torch.cuda.max_memory_allocated(engine.device) - before
        out["encode_transient_kind"] = "measured: torch.cuda.max_memory_allocated"
    return out


class LiveTensorBytes:
    """Peak bytes of the tensors alive at once while a function runs (a dispatch mode; works on meta tensors)."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def __call__(self, fn) -> int:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        meter = self

        def freed(n: int) -> None:
            meter.live -= n

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not (func.is_view or func._schema.is_mutable):  # views and in-place ops allocate nothing
                    for t in tree_leaves(out):
                        if isinstance(t, torch.Tensor):
                            n = t.numel() * t.element_size()
                            meter.live += n
                            weakref.finalize(t, freed, n)
                    meter.peak = max(meter.peak, meter.live)
                return out

        with Mode():
            fn()
        return self.peak


def encode_transient_bytes(davae_config, images: int, resolution: int, dtype: torch.dtype) -> int:
    """Estimated transient memory of encoding ``images`` square images with a DA-VAE of ``davae_config``:
    the input and the activations alive at once, in ``dtype`` (a meta pass: nothing is computed).

    Attention counts its output only, as GPU kernels run it (flash / memory-efficient): the meta
    pass would otherwise spell out the (tokens x tokens) matrix of the VAE's mid-block (16384
    tokens at 1024 px), which no GPU run holds.
    """
    from unittest import mock

    from davae_core import DAVAE

    def attention_output(query, key, value, *args, **kwargs):
        return query.new_empty((*query.shape[:-1], value.shape[-1]))

    with torch.device("meta"):
        davae = DAVAE(davae_config).to(dtype).eval()
        pixels = torch.rand(images, 3, resolution, resolution, dtype=dtype)
    with torch.no_grad(), mock.patch("torch.nn.functional.scaled_dot_product_attention", attention_output):
        peak = LiveTensorBytes()(lambda: davae.encode(pixels))
    return peak + pixels.numel() * pixels.element_size()


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


def build_stage1(cfg, toy: bool, device: torch.device):
    """(TokenizerModel, batch, description) for a TokenizerTrainConfig: the trainer's builders, random weights
    unless ``model.pretrained_vae`` names real ones, random images of the config's micro-batch."""
    from .stage1.losses import RandomFeaturePerceptual
    from .stage1.step import TokenizerModel
    from .stage1.trainer import build_model

    vae = None
    source = cfg.model.pretrained_vae
    if toy or not cfg.model.pretrained_vae:
        vae = random_vavae(toy) if cfg.model.base_vae == "vavae" else random_sd3_vae(toy)
        source = f"{'VA-VAE' if cfg.model.base_vae == 'vavae' else 'SD3 VAE'}{' at toy width' if toy else ''}, random weights"
        if toy and cfg.model.base_vae == "vavae":  # D per base channel kept: the toy VA-VAE has 4, not 32
            from dataclasses import replace

            from davae_core.davae_config import VAVAE_CONFIG

            per_channel = cfg.model.detail_channels // VAVAE_CONFIG["latent_channels"]
            cfg = replace(cfg, model=replace(cfg.model, detail_channels=per_channel * vae.config.latent_channels))
    davae, vae = build_model(cfg, vae)
    # at toy width the VGG16 stack would dominate: the small random-feature stand-in there
    perceptual = (RandomFeaturePerceptual() if toy else RandomVGG16Features()) if cfg.loss.lpips_weight > 0 else None
    model = TokenizerModel.build(cfg, davae.to(device), vae, perceptual).to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    res = cfg.data.resolution
    batch = {"pixels": torch.rand(cfg.train.batch_size, 3, res, res, generator=gen, device=device)}
    return model, batch, source


def run_stage1(cfg, steps: int, toy: bool, device: torch.device, log, cpu_float32: bool = True) -> dict[str, Any]:
    from dataclasses import replace

    from .stage1.step import TokenizerStep

    torch.manual_seed(cfg.train.seed)
    model, batch, source = build_stage1(cfg, toy, device)
    # stage 1 keeps fp32 weights; on a CPU bf16 autocast only slows it down (reference bf16 GEMM/conv)
    autocast = "no" if device.type == "cpu" and cpu_float32 else cfg.train.mixed_precision
    # the costliest phase of the loss schedule: past the GAN warm-up, the discriminator's
    # generator term and its own update run too, so the peak printed is the run's peak
    disc = model.discriminator
    phase = max(0, cfg.loss.gan_start_step) if disc is not None else 0
    engine = step_engine(replace(cfg.train, mixed_precision=autocast), device)
    try:
        model.network.train()
        engine.prepare(model)
        info = {"stage": "stage1", "model": source, "resolution": cfg.data.resolution, "micro_batch": cfg.train.batch_size,
                "params_total": _count(model.module), "params_trained": _count(model.module, True),
                "discriminator": disc is not None, "mixed_precision": cfg.train.mixed_precision, "autocast": autocast,
                "optimizer": cfg.train.optimizer, "gradient_checkpointing": cfg.train.gradient_checkpointing,
                "loss_schedule_step": phase}
        log(f"preflight stage 1: DA-VAE on {source}; {info['params_total'] / 1e6:.1f}M parameters, "
            f"{info['params_trained'] / 1e6:.1f}M trained; micro-batch {cfg.train.batch_size} at {cfg.data.resolution}px; "
            f"autocast {autocast}, {cfg.train.optimizer}, gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}, "
            f"LPIPS {('small random-feature stand-in' if toy else 'VGG16-shaped, random weights') if model.loss.perceptual is not None else 'off'}, "
            f"GAN {'on' if disc is not None else 'off'}" + (f" (losses as at step {phase}, past the GAN warm-up)" if phase else ""))
        step = TokenizerStep(cfg, model, loss_step_offset=phase)
        d_updates = 0

        def counting(batch, s, gen):
            nonlocal d_updates
            loss, logs = step(batch, s, gen)
            d_updates += "loss/gan_d" in logs
            return loss, logs

        times = run_steps(engine, counting, batch, steps, log)
    finally:
        engine.close()
    return {**info, "step_seconds": times, "discriminator_updates": d_updates}


# ---------------------------------------------------------------------------- ImageNet stage 2 (LightningDiT)
# the paper's ImageNet DA-VAE: D = 96 detail channels on VA-VAE's C = 32 (toy: 12 on the tiny VA-VAE's 4)
IMAGENET_DETAIL_CHANNELS = {False: 96, True: 12}


def random_vavae_davae(toy: bool, device: torch.device, dtype: torch.dtype):
    """A DA-VAE on VA-VAE's architecture (the tiny one with ``toy``), random weights, frozen."""
    from davae_core import DAVAE

    davae = DAVAE.from_base_vae(random_vavae(toy), IMAGENET_DETAIL_CHANNELS[toy], base_name="vavae", decoder_base_space="raw")
    return davae.to(device, dtype).requires_grad_(False).eval()


def build_imagenet_dit(cfg, toy: bool, side: int, base_channels: int, detail_channels: int):
    """(DA LightningDiT, description): the checkpoint when it exists and not ``toy``, else random weights."""
    from davae_core.heads import DAHeads

    from .imagenet.da_heads import attach_da_heads, heads_config_for_lightningdit, initialize_detail_heads
    from .imagenet.fixtures import TINY_DIT, randomize
    from .imagenet.lightningdit import LightningDiT, LightningDiTConfig, lightningdit_config
    from .imagenet.step import build_da_dit

    if not toy and cfg.model.checkpoint and Path(cfg.model.checkpoint).is_file():
        return build_da_dit(cfg.model, detail_channels), cfg.model.checkpoint
    fields = dict(input_size=side, in_channels=base_channels, use_qknorm=cfg.model.enable_qknorm)
    config = LightningDiTConfig(**{**TINY_DIT, **fields}) if toy else lightningdit_config("XL/1", **fields)
    dit = randomize(LightningDiT(config), seed=cfg.train.seed)
    heads = initialize_detail_heads(DAHeads(heads_config_for_lightningdit(dit, detail_channels)), dit, cfg.model.head_init)
    return attach_da_heads(dit, heads).train(), f"LightningDiT-{'toy' if toy else 'XL/1'}, random weights"


def run_imagenet(cfg, steps: int, toy: bool, device: torch.device, log, cpu_float32: bool = True) -> dict[str, Any]:
    """LightningDiT's trainer step (:class:`~davae_training.imagenet.step.DiTStep`) on random images (or, with
    ``data.latent_cache``, random latents: no encoder) of the config's micro-batch and resolution."""
    from dataclasses import replace

    from davae_core.dtypes import dtype_from_name

    from .imagenet.latent_codec import LatentCodec
    from .imagenet.step import DiTModel, DiTStep, check_latent_grid, fit_objective

    torch.manual_seed(cfg.train.seed)
    if cfg.tokenizer.path and Path(cfg.tokenizer.path).is_file() and not toy:
        codec, vae_source = LatentCodec.from_config(cfg.tokenizer, cfg.data.encode_batch_size, device), cfg.tokenizer.path
    else:
        davae = random_vavae_davae(toy, device, dtype_from_name(cfg.tokenizer.dtype, "tokenizer.dtype"))
        codec, vae_source = LatentCodec(davae, cfg.data.encode_batch_size), "DA-VAE on VA-VAE, random weights"
    layout, res, micro = codec.layout, cfg.data.resolution, cfg.train.batch_size
    dit, source = build_imagenet_dit(cfg, toy, codec.latent_side(res), layout.base_channels, layout.detail_channels)
    if cfg.train.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    check_latent_grid(dit, codec, res)
    autocast = "no" if device.type == "cpu" and cpu_float32 else cfg.train.mixed_precision  # fp32 weights; see run_stage1
    engine = step_engine(replace(cfg.train, mixed_precision=autocast), device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    batch = {"label": torch.randint(0, dit.config.num_classes, (micro,), generator=gen, device=device)}
    if cfg.data.latent_cache:
        side = dit.config.input_size
        batch["latents"] = torch.randn(micro, dit.in_channels, side, side, generator=gen, device=device)
    else:
        batch["pixels"] = torch.rand(micro, 3, res, res, generator=gen, device=device)
    try:
        model = DiTModel(dit, cfg.ema_decay)
        engine.prepare(model)
        info = {"stage": "imagenet", "model": source, "tokenizer": vae_source, "resolution": res, "micro_batch": micro,
                "latent_shape": [micro, dit.in_channels, dit.config.input_size, dit.config.input_size],
                "params_total": _count(dit), "params_trained": _count(dit, True), "head_init": cfg.model.head_init,
                "qk_norm": dit.config.use_qknorm, "mixed_precision": cfg.train.mixed_precision, "autocast": autocast,
                "optimizer": cfg.train.optimizer, "gradient_checkpointing": cfg.train.gradient_checkpointing,
                "encodes_images": "pixels" in batch}
        log(f"preflight ImageNet stage 2: {source}; {info['params_total'] / 1e6:.1f}M parameters, all trained; "
            f"micro-batch {micro} at {res}px = latents {tuple(info['latent_shape'])} ({vae_source}"
            f"{', encoded every step' if 'pixels' in batch else ', from the latent cache'}); autocast {autocast}, "
            f"{cfg.train.optimizer}, gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}")
        step = DiTStep(model, codec if "pixels" in batch else None, fit_objective(cfg.objective, codec, dit))
        times = run_steps(engine, step, batch, steps, log)
    finally:
        engine.close()
    return {**info, "step_seconds": times}


# ---------------------------------------------------------------------------- command line
def preflight(config: str | Path, steps: int = 1, overrides: list[str] | tuple[str, ...] = (), toy: bool = False,
              device: str = "auto", out: str | Path | None = None, log=print, cpu_float32: bool = True) -> dict[str, Any]:
    stage = detect_stage(config)
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if stage == "imagenet":
        from .imagenet.config import LightningDiTTrainConfig

        cfg = load_config(LightningDiTTrainConfig, config, overrides)
        result = run_imagenet(cfg, steps, toy, dev, log, cpu_float32)
    elif stage == "stage2":
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
