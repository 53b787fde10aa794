"""Cost plan on paper: FLOPs, parameters, memory and projected GPU time of every shipped config.

    python -m bench.plan [--out DIR] [--mfu 0.4] [--no-readme]

Nothing runs for real: the models are built on the meta device at full size (the trainers'
own builders, as in ``davae_training.preflight``) and torch's FLOP counter
(``torch.utils.flop_counter.FlopCounterMode``) counts one training sample (forward, backward,
gradient-checkpointing recompute) or one denoiser call.  Memory is an estimate: weights and
trained state from the dtypes the config names, activations from the tensors autograd saves
for backward (a saved-tensor hook on the meta pass), plus one block's recompute when
gradient checkpointing is on.  Time = FLOPs / (peak bf16 dense TFLOPS x utilisation).
Writes ``plan.json`` and the table between the PLAN markers of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import common

CONFIGS_DIR = common.REPO_DIR / "training" / "configs"
IMAGENET_CONFIGS_DIR = CONFIGS_DIR / "imagenet"
README = common.BENCH_DIR / "README.md"
MARK_BEGIN, MARK_END = "<!-- PLAN:BEGIN -->", "<!-- PLAN:END -->"

# Peak dense bf16 tensor-core TFLOPS (no sparsity), from the vendors' datasheets:
# H100 SXM5 80 GB: 989.4 (NVIDIA H100 Tensor Core GPU datasheet); A100 80 GB SXM: 312 (NVIDIA A100
# datasheet); RTX 4090: 165.2 with FP32 accumulate (NVIDIA Ada Lovelace architecture whitepaper, App. A).
GPUS: dict[str, dict[str, float]] = {
    "H100 80GB": {"bf16_tflops": 989.4, "memory_gib": 80 * 1e9 / 2**30},
    "A100 80GB": {"bf16_tflops": 312.0, "memory_gib": 80 * 1e9 / 2**30},
    "RTX 4090 24GB": {"bf16_tflops": 165.2, "memory_gib": 24 * 1e9 / 2**30},
}
DEFAULT_MFU = 0.40  # a typical sustained share of peak for DiT training/inference in bf16

# Process counts the batch table shows: train.batch_size is per process, so the global batch grows with them.
PROCESS_COUNTS = (1, 2, 4, 8)

# Frozen text encoders of SD3 (parameters), held in memory when stage 2 encodes captions every step.
TEXT_ENCODER_PARAMS = {"t5xxl": 4.76e9, "clip_g": 0.695e9, "clip_l": 0.123e9}

# What the paper measured (METHOD.md): sampling throughput at 1024 and the stage-2 budget.
PAPER = {
    "img_per_s_1024": {"da": 1.03, "stock": 0.25, "ratio": 1.03 / 0.25},
    "stage2_h100_days": 5.0,
}

# Sampling variants: (latent channels, latent side, DA heads)
SAMPLING = {
    "stock_512": (16, 64, False),
    "stock_1024": (16, 128, False),
    "da_1024": (32, 64, True),
    "stock_2048": (16, 256, False),
    "da_2048": (32, 128, True),
}
TEXT_TOKENS = 333  # 77 CLIP + 256 T5, diffusers' SD3 pipeline
# The paper's ImageNet line (Sec. 4): VA-VAE f16d32 (C = 32) widened by D = 96 at twice the factor, LightningDiT-XL/1
IMAGENET_DA = {"base_channels": 32, "detail_channels": 96, "factor": 32, "dit": "XL/1"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


# ---------------------------------------------------------------------------- batch and LoRA
def batch_plan(loop) -> dict[str, Any]:
    """The global batch a config gives per process count, the processes its recipe batch is written for
    (``train.recipe_global_batch``), and what one GPU sets to reach that batch."""
    from davae_training.config import global_batch, reach_recipe_batch

    target = loop.recipe_global_batch
    per_process = loop.batch_size * loop.gradient_accumulation_steps
    return {
        "batch_size_per_process": loop.batch_size, "gradient_accumulation_steps": loop.gradient_accumulation_steps,
        "recipe_global_batch": target,
        "written_for_processes": target // per_process if target and target % per_process == 0 else 1,
        "global_batch_by_processes": {n: global_batch(loop, n) for n in PROCESS_COUNTS},
        "one_gpu_reaches_recipe_with": reach_recipe_batch(loop, 1, target) if target else None,
    }


def lora_plan(model, targets) -> dict[str, Any]:
    """Which LoRA target set a config names, and the layers and values it adapts."""
    from davae_core.mmdit_keys import SD3_LORA_TARGETS, SD3_LORA_TARGETS_ALL_BLOCKS
    from davae_training.stage2.model import lora_wrapped_names

    label = {frozenset(SD3_LORA_TARGETS_ALL_BLOCKS): "paper: every block linear",
             frozenset(SD3_LORA_TARGETS): "authors' list"}.get(frozenset(targets), "custom")
    return {"lora_targets": label, "lora_layers": len(lora_wrapped_names(model)),
            "lora_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)}


def phase_steps(cfg, configs_dir: Path = CONFIGS_DIR) -> int:
    """Optimizer steps a config trains: a later phase (train.continue_from) starts at the max_steps of the
    shipped stage-2 config whose output_dir it continues."""
    from davae_training.config import load_config
    from davae_training.preflight import detect_stage
    from davae_training.stage2.config import AdapterTrainConfig

    loop = cfg.train
    if not loop.continue_from:
        return loop.max_steps
    for path in sorted(configs_dir.glob("*.yaml")):
        if detect_stage(path) != "stage2":
            continue
        earlier = load_config(AdapterTrainConfig, path).train
        if Path(earlier.output_dir) == Path(loop.continue_from) and not earlier.continue_from:
            return loop.max_steps - earlier.max_steps
    return loop.max_steps


# ---------------------------------------------------------------------------- counting
class SavedTensorMeter:
    """Bytes of the distinct tensors autograd saves for backward (an activation-memory estimate)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or id(t) in self.seen:
            return t
        self.seen.add(id(t))
        self.bytes += t.numel() * t.element_size()
        return t

    @contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


def count(fn) -> tuple[int, int]:
    """(FLOPs, saved-tensor bytes) of ``fn()`` on meta tensors."""
    meter = SavedTensorMeter()
    with FlopCounterMode(display=False) as flops, meter():
        fn()
    return int(flops.get_total_flops()), meter.bytes


def _adapter_model(cfg, dtype: torch.dtype, gradient_checkpointing: bool, toy: bool = False):
    from davae_training.stage2.model import prepare_adapter_model
    from davae_training.stage2.architectures import toy_width, transformer_config
    from davae_training.preflight import random_sd3_transformer

    arch = transformer_config(cfg.model.architecture)
    transformer = random_sd3_transformer(toy_width(arch) if toy else arch, dtype, torch.device("meta"))
    model = prepare_adapter_model(transformer, cfg.model, gradient_checkpointing)
    return model.to(dtype)  # meta: activations in the autocast dtype


def stage2_plan(name: str, cfg, toy: bool = False) -> dict[str, Any]:
    """``toy``: at the preflight's toy width (what ``--toy`` runs check against)."""
    from davae_training.stage2.model import trained_parameters
    from davae_training.stage2.architectures import CLIP_TOKENS
    from davae_training.optimizers import optimizer_state_bytes_per_value

    loop = cfg.train
    act_dtype = torch.bfloat16 if loop.mixed_precision == "bf16" else torch.float32
    side = cfg.data.images.resolution // 16
    tokens = CLIP_TOKENS + cfg.text.max_sequence_length if cfg.text.kind == "sd3" else cfg.text.standin_tokens
    model = _adapter_model(cfg, act_dtype, loop.gradient_checkpointing, toy).train()
    c = model.config
    with torch.device("meta"):
        x = torch.randn(1, c.in_channels, side, side, dtype=act_dtype)
        emb = torch.randn(1, tokens, c.joint_attention_dim, dtype=act_dtype)
        pooled = torch.randn(1, c.pooled_projection_dim, dtype=act_dtype)
        t = torch.full((1,), 500.0)

    def train_sample():
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    flops, saved = count(train_sample)
    block_saved = 0
    if loop.gradient_checkpointing:  # backward recomputes one block at a time and holds its activations
        model.disable_gradient_checkpointing()
        block = model.transformer_blocks[0]  # block 0 is a dual-attention block where there are any
        with torch.device("meta"):
            h = torch.randn(1, side * side // 4, c.num_attention_heads * c.attention_head_dim, dtype=act_dtype)
            e = torch.randn(1, tokens, c.caption_projection_dim, dtype=act_dtype)
            temb = torch.randn(1, c.caption_projection_dim, dtype=act_dtype)
        _, block_saved = count(lambda: sum(o.float().sum() for o in block(h, e, temb) if o is not None).backward())
    trained = sum(p.numel() for p in trained_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    lora = lora_plan(model, cfg.model.lora_targets)
    state_bytes = optimizer_state_bytes_per_value(loop.optimizer)
    memory = {
        "frozen_weights": (total - trained) * DTYPE_BYTES[cfg.model.base_dtype],
        "trained_weights_fp32": trained * 4,
        "gradients_fp32": trained * 4,
        "optimizer_state": trained * state_bytes,
        "ema_fp32": trained * 4 if cfg.model.ema_decay > 0 else 0,
        "activations_per_sample": saved + block_saved,
    }
    encode_flops = 0
    micro = loop.batch_size
    if not cfg.data.cache_dir:  # the frozen DA-VAE encodes each image and the text encoders each caption
        memory["text_encoders"] = int(sum(TEXT_ENCODER_PARAMS.values()) * DTYPE_BYTES[cfg.text.dtype])
        encode_flops = davae_encode_flops(cfg.data.images.resolution)
        memory.update(davae_encode_memory(cfg, act_dtype))
    memory["activations_micro_batch"] = memory["activations_per_sample"] * micro
    # the encode runs before the forward pass, whose activations are not alive yet: the larger of the two counts
    transient = max(memory["activations_micro_batch"], memory.get("encode_transient", 0))
    memory["total_estimate"] = transient + sum(v for k, v in memory.items()
                                               if k not in ("activations_per_sample", "activations_micro_batch", "encode_transient"))
    per_sample = flops + encode_flops
    return {
        "stage": "stage2", "architecture": cfg.model.architecture, "resolution": cfg.data.images.resolution,
        "image_tokens": (side // 2) ** 2, "text_tokens": tokens, "params_total": total, "params_trained": trained,
        "train_flops_per_sample": per_sample, "transformer_flops_per_sample": flops, "encode_flops_per_sample": encode_flops,
        "micro_batch": micro, "gradient_accumulation_steps": loop.gradient_accumulation_steps, **lora,
        "max_steps": phase_steps(cfg), "optimizer": loop.optimizer, "base_dtype": cfg.model.base_dtype,
        "gradient_checkpointing": loop.gradient_checkpointing, "memory_bytes": memory,
    }


def davae_encode_flops(resolution: int) -> int:
    from diffusers import AutoencoderKL

    from davae_core import DAVAE, SD3_VAE_CONFIG

    with torch.device("meta"):
        davae = DAVAE.from_base_vae(AutoencoderKL(**SD3_VAE_CONFIG)).to(torch.bfloat16)
        img = torch.rand(1, 3, resolution, resolution, dtype=torch.bfloat16)
    with torch.no_grad():
        flops, _ = count(lambda: davae.encode_raw(img))
    return flops


def davae_encode_memory(cfg, act_dtype: torch.dtype) -> dict[str, int]:
    """The DA-VAE the trainer keeps to encode images (all of it, in ``tokenizer.dtype``) and the transient of
    one encode pass (``data.encode_batch_size`` images of the micro-batch, in the autocast dtype)."""
    from diffusers import AutoencoderKL

    from davae_core import DAVAE, SD3_VAE_CONFIG
    from davae_training.preflight import encode_transient_bytes

    with torch.device("meta"):
        davae = DAVAE.from_base_vae(AutoencoderKL(**SD3_VAE_CONFIG), detail_channels=cfg.model.detail_channels)
    images = min(cfg.data.encode_batch_size, cfg.train.batch_size)
    return {"davae_weights": sum(p.numel() for p in davae.parameters()) * DTYPE_BYTES[cfg.tokenizer.dtype],
            "encode_transient": encode_transient_bytes(davae.config, images, cfg.data.images.resolution, act_dtype)}


def stage1_plan(name: str, cfg, toy: bool = False) -> dict[str, Any]:
    """``toy``: on the preflight's toy VAE (what ``--toy`` runs check against)."""
    from diffusers import AutoencoderKL

    from davae_core import tiny_vae_config
    from davae_training.optimizers import optimizer_state_bytes_per_value
    from davae_training.preflight import RandomVGG16Features
    from davae_training.stage1.losses import PatchDiscriminator
    from davae_training.stage1.trainer import build_model

    loop = cfg.train
    act = torch.bfloat16 if loop.mixed_precision == "bf16" else torch.float32
    res = cfg.data.resolution
    with torch.device("meta"):
        vae = AutoencoderKL(**(tiny_vae_config(attention=True) if toy else base_vae_config(cfg.model.base_vae)))
        model, _ = build_model(cfg, vae)
        model = model.to(act)
        vgg = RandomVGG16Features().to(act) if cfg.loss.lpips_weight > 0 else None
        disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers, cfg.loss.disc_norm).to(act) if cfg.loss.uses_gan else None
        img = torch.rand(1, 3, res, res, dtype=act)

    def train_sample():
        rec = model(img, sample_posterior=False)["reconstruction"]
        loss = (rec - img).abs().mean()
        if vgg is not None:
            loss = loss + vgg(rec, img).mean()
        if disc is not None:
            loss = loss - disc(rec).mean()
        loss.float().backward()
        if disc is not None:  # the discriminator's own step on real and fake
            disc(torch.cat([img, rec.detach()])).float().mean().backward()

    flops, saved = count(train_sample)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    disc_params = sum(p.numel() for p in disc.parameters()) if disc is not None else 0
    learn = trained + disc_params
    memory = {
        # the frozen base encoder, plus the stock VAE the trainer keeps for targets and grids, fp32
        "frozen_weights": (total - trained + sum(p.numel() for p in vae.parameters())) * 4,
        "trained_weights_fp32": learn * 4,
        "gradients_fp32": learn * 4,
        "optimizer_state": learn * optimizer_state_bytes_per_value(loop.optimizer),
        "lpips_vgg16": (sum(p.numel() for p in vgg.parameters()) * 4) if vgg is not None else 0,
        "activations_per_sample": saved,
    }
    memory["activations_micro_batch"] = saved * loop.batch_size
    memory["total_estimate"] = sum(v for k, v in memory.items() if k != "activations_per_sample")
    return {
        "stage": "stage1", "base_vae": cfg.model.base_vae, "resolution": res, "params_total": total, "params_trained": trained,
        "params_discriminator": disc_params, "train_flops_per_sample": flops, "micro_batch": loop.batch_size,
        "gradient_accumulation_steps": loop.gradient_accumulation_steps, "max_steps": loop.max_steps,
        "optimizer": loop.optimizer, "gradient_checkpointing": loop.gradient_checkpointing, "memory_bytes": memory,
        "note": "activations counted without gradient checkpointing (an upper bound when it is on)",
    }


def base_vae_config(name: str) -> dict[str, Any]:
    """The architecture of the pretrained VAE a stage-1 config builds on (``model.base_vae``)."""
    from davae_core import SD3_VAE_CONFIG
    from davae_core.davae_config import VAVAE_CONFIG

    return dict(VAVAE_CONFIG if name == "vavae" else SD3_VAE_CONFIG)


def imagenet_stage2_plan(name: str, cfg) -> dict[str, Any]:
    """LightningDiT-XL/1 with DA heads on the paper's 128-channel latent, fully trained, with its EMA."""
    from diffusers import AutoencoderKL

    from davae_core import DAVAE
    from davae_core.davae_config import VAVAE_CONFIG
    from davae_core.heads import DAHeads
    from davae_training.imagenet.da_heads import attach_da_heads, heads_config_for_lightningdit
    from davae_training.imagenet.lightningdit import LightningDiT, lightningdit_config
    from davae_training.optimizers import optimizer_state_bytes_per_value
    from davae_training.preflight import encode_transient_bytes

    loop = cfg.train
    act = torch.bfloat16 if loop.mixed_precision == "bf16" else torch.float32
    base, detail = IMAGENET_DA["base_channels"], IMAGENET_DA["detail_channels"]
    side = cfg.data.resolution // IMAGENET_DA["factor"]
    with torch.device("meta"):
        dit = LightningDiT(lightningdit_config(IMAGENET_DA["dit"], input_size=side, in_channels=base,
                                               use_qknorm=cfg.model.enable_qknorm))
        dit = attach_da_heads(dit, DAHeads(heads_config_for_lightningdit(dit, detail))).to(act).train()
        if loop.gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        x = torch.randn(1, base + detail, side, side, dtype=act)
        t, y = torch.rand(1), torch.zeros(1, dtype=torch.long)

    def train_sample():
        dit(x, t, y).float().pow(2).mean().backward()

    flops, saved = count(train_sample)
    params = sum(p.numel() for p in dit.parameters())
    memory = {
        "trained_weights_fp32": params * 4, "gradients_fp32": params * 4,
        "optimizer_state": params * optimizer_state_bytes_per_value(loop.optimizer),
        "ema_fp32": params * 4 if cfg.ema_decay > 0 else 0, "activations_per_sample": saved,
    }
    encode_flops, micro = 0, loop.batch_size
    if not cfg.data.latent_cache:  # the frozen DA-VAE encodes every image in the step, in its own dtype
        from davae_core.dtypes import dtype_from_name

        vae_dtype = dtype_from_name(cfg.tokenizer.dtype, "tokenizer.dtype")
        with torch.device("meta"):
            davae = DAVAE.from_base_vae(AutoencoderKL(**VAVAE_CONFIG), detail, base_name="vavae", decoder_base_space="raw")
            img = torch.rand(1, 3, cfg.data.resolution, cfg.data.resolution, dtype=vae_dtype)
        with torch.no_grad():
            encode_flops, _ = count(lambda: davae.to(vae_dtype).encode_raw(img))
        memory["davae_weights"] = sum(p.numel() for p in davae.parameters()) * DTYPE_BYTES[cfg.tokenizer.dtype]
        memory["encode_transient"] = encode_transient_bytes(davae.config, min(cfg.data.encode_batch_size, micro),
                                                            cfg.data.resolution, vae_dtype)
    memory["activations_micro_batch"] = saved * micro
    transient = max(memory["activations_micro_batch"], memory.get("encode_transient", 0))
    memory["total_estimate"] = transient + sum(v for k, v in memory.items()
                                               if k not in ("activations_per_sample", "activations_micro_batch", "encode_transient"))
    return {
        "stage": "imagenet_stage2", "architecture": f"LightningDiT-{IMAGENET_DA['dit']} + DA heads", "resolution": cfg.data.resolution,
        "image_tokens": side * side, "params_total": params, "params_trained": params,
        "train_flops_per_sample": flops + encode_flops, "transformer_flops_per_sample": flops, "encode_flops_per_sample": encode_flops,
        "micro_batch": micro, "gradient_accumulation_steps": loop.gradient_accumulation_steps, "max_steps": loop.max_steps,
        "optimizer": loop.optimizer, "head_init": cfg.model.head_init, "qk_norm": cfg.model.enable_qknorm,
        "detail_warmup_steps": cfg.objective.detail_warmup_steps, "gradient_checkpointing": loop.gradient_checkpointing,
        "memory_bytes": memory,
    }


def imagenet_stage(path: Path) -> str:
    """``lightningdit`` (ImageNet stage 2: has ``ema_decay:``) or ``stage1`` (has ``loss:``)."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if "ema_decay" in data:
        return "lightningdit"
    if "loss" in data:
        return "stage1"
    raise ValueError(f"{path}: neither an ImageNet stage-2 (has ema_decay:) nor a stage-1 (has loss:) config")


def plan_imagenet_config(path: Path) -> dict[str, Any]:
    """One config of ``training/configs/imagenet/`` parsed and planned (its global batch too)."""
    from davae_training.config import load_config
    from davae_training.imagenet.config import LightningDiTTrainConfig
    from davae_training.stage1.config import TokenizerTrainConfig

    dit = imagenet_stage(path) == "lightningdit"
    cfg = load_config(LightningDiTTrainConfig if dit else TokenizerTrainConfig, path)
    entry = imagenet_stage2_plan(path.stem, cfg) if dit else stage1_plan(path.stem, cfg)
    entry["batch"] = batch_plan(cfg.train)
    return entry


def sampling_plan() -> dict[str, Any]:
    """Forward FLOPs of one SD3.5M denoiser call (batch 1; a CFG step is two) per variant."""
    from davae_training.stage2.model import AdapterModelConfig, prepare_adapter_model
    from davae_training.stage2.architectures import transformer_config
    from davae_training.preflight import random_sd3_transformer

    stock = random_sd3_transformer(transformer_config("sd35m"), torch.bfloat16, torch.device("meta")).eval()
    da = prepare_adapter_model(random_sd3_transformer(transformer_config("sd35m"), torch.bfloat16, torch.device("meta")),
                               AdapterModelConfig(lora_rank=0)).to(torch.bfloat16).eval()
    out = {}
    for name, (channels, side, heads) in SAMPLING.items():
        model = da if heads else stock
        with torch.device("meta"):
            x = torch.randn(1, channels, side, side, dtype=torch.bfloat16)
            emb = torch.randn(1, TEXT_TOKENS, 4096, dtype=torch.bfloat16)
            pooled = torch.randn(1, 2048, dtype=torch.bfloat16)
            t = torch.full((1,), 500.0)
        with torch.no_grad():
            flops, _ = count(lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled))
        out[name] = {"latent": [channels, side, side], "image_tokens": (side // 2) ** 2, "text_tokens": TEXT_TOKENS,
                     "forward_flops": flops}
    return out


# ---------------------------------------------------------------------------- projections
def project(entry: dict[str, Any], processes: int, mfu: float) -> None:
    """GPU time at ``processes`` processes (those the recipe batch is written for)."""
    per_step_samples = entry["micro_batch"] * entry["gradient_accumulation_steps"] * processes
    entry["processes"] = processes
    entry["global_batch"] = per_step_samples
    entry["train_flops_per_step"] = entry["train_flops_per_sample"] * per_step_samples
    total = entry["train_flops_per_step"] * entry["max_steps"]
    entry["train_flops_total"] = total
    entry["gpus"] = {}
    for gpu, spec in GPUS.items():
        rate = spec["bf16_tflops"] * 1e12 * mfu
        need = entry["memory_bytes"]["total_estimate"] / 2**30
        entry["gpus"][gpu] = {
            "seconds_per_sample": entry["train_flops_per_sample"] / rate,
            "samples_per_s": rate / entry["train_flops_per_sample"],
            "gpu_days_total": total / rate / 86400,
            "fits_estimate": need <= spec["memory_gib"],
        }


def build_plan(mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    from davae_training.config import load_config
    from davae_training.stage2.config import AdapterTrainConfig
    from davae_training.stage1.config import TokenizerTrainConfig

    start = time.perf_counter()
    configs: dict[str, Any] = {}
    skipped = {}
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        name = path.stem
        if "tiny" in name:
            skipped[name] = "toy-sized CPU config"
            continue
        from davae_training.preflight import detect_stage

        print(f"plan: {name}", flush=True)
        cfg = load_config(AdapterTrainConfig if detect_stage(path) == "stage2" else TokenizerTrainConfig, path)
        entry = stage2_plan(name, cfg) if detect_stage(path) == "stage2" else stage1_plan(name, cfg)
        entry["batch"] = batch_plan(cfg.train)
        project(entry, entry["batch"]["written_for_processes"], mfu)
        configs[name] = entry
    for path in sorted(IMAGENET_CONFIGS_DIR.glob("*.yaml")):  # the paper's ImageNet line (Tables 1, 4, 5)
        name = f"imagenet/{path.stem}"
        if "tiny" in path.stem:
            skipped[name] = "toy-sized CPU config"
            continue
        print(f"plan: {name}", flush=True)
        entry = plan_imagenet_config(path)
        project(entry, entry["batch"]["written_for_processes"], mfu)
        configs[name] = entry
    print("plan: sampling variants", flush=True)
    sampling = sampling_plan()
    for entry in sampling.values():
        rate = GPUS["H100 80GB"]["bf16_tflops"] * 1e12 * mfu
        entry["h100_calls_per_s"] = rate / entry["forward_flops"]
    f = {k: v["forward_flops"] for k, v in sampling.items()}
    ratios = {
        "flops_stock_1024_over_da_1024": f["stock_1024"] / f["da_1024"],
        "flops_stock_2048_over_da_2048": f["stock_2048"] / f["da_2048"],
        "flops_da_1024_over_stock_512": f["da_1024"] / f["stock_512"],
    }
    stage2 = configs.get("sd35m_1024")
    paper = dict(PAPER)
    if stage2 is not None:
        paper["ours_stage2_h100_days_sd35m_1024"] = stage2["gpus"]["H100 80GB"]["gpu_days_total"]
    paper["ours_flops_ratio_1024"] = ratios["flops_stock_1024_over_da_1024"]
    return {
        "mfu": mfu, "gpus": GPUS, "gpu_source": "peak dense bf16 tensor TFLOPS from NVIDIA's H100/A100 datasheets and the Ada whitepaper",
        "configs": configs, "skipped": skipped, "sampling": sampling, "ratios": ratios, "paper": paper,
        "seconds_to_plan": time.perf_counter() - start, "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------- output
def _g(x: float) -> str:
    return f"{x / 2**30:.1f}"


def table(plan: dict[str, Any]) -> str:
    mfu = plan["mfu"]
    lines = [f"Projected at {mfu:.0%} of peak bf16 dense tensor throughput (H100 989 TFLOPS, A100 312, RTX 4090 165; "
             "datasheets). Memory is an estimate per GPU (GiB): weights + trained state + activations of one micro-batch "
             "(+ text encoders and the DA-VAE when not training from the cache, with the larger of the micro-batch's "
             "activations and one DA-VAE encode pass of data.encode_batch_size images).", "",
             "| config | trained / total params | TFLOP per sample | global batch x steps | memory est. GiB | H100 GPU-days | A100 GPU-days | 4090 GPU-days | fits 24 / 80 GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in plan["configs"].items():
        g = e["gpus"]
        fits = f"{'yes' if g['RTX 4090 24GB']['fits_estimate'] else 'no'} / {'yes' if g['H100 80GB']['fits_estimate'] else 'no'}"
        lines.append(f"| {name} | {e['params_trained'] / 1e6:.0f}M / {e['params_total'] / 1e6:.0f}M | "
                     f"{e['train_flops_per_sample'] / 1e12:.2f} | {e['global_batch']} x {e['max_steps']} | "
                     f"{_g(e['memory_bytes']['total_estimate'])} | {g['H100 80GB']['gpu_days_total']:.1f} | "
                     f"{g['A100 80GB']['gpu_days_total']:.1f} | {g['RTX 4090 24GB']['gpu_days_total']:.1f} | {fits} |")
    counts = " / ".join(str(n) for n in PROCESS_COUNTS)
    lines += ["", f"`train.batch_size` is per process: the global batch is batch x accumulation x processes. GPU-days above "
              "are at the processes the recipe batch is written for; one GPU gets there by accumulation.", "",
              f"| config | batch per process x accumulation | global batch on {counts} processes | recipe batch (processes) | one GPU: |",
              "|---|---|---|---|---|"]
    for name, e in plan["configs"].items():
        b = e["batch"]
        by = " / ".join(str(b["global_batch_by_processes"][n]) for n in PROCESS_COUNTS)
        recipe = f"{b['recipe_global_batch']} ({b['written_for_processes']})" if b["recipe_global_batch"] else "-"
        lines.append(f"| {name} | {b['batch_size_per_process']} x {b['gradient_accumulation_steps']} | {by} | {recipe} | "
                     f"{'`' + b['one_gpu_reaches_recipe_with'] + '`' if b['one_gpu_reaches_recipe_with'] else '-'} |")
    stage2 = {n: e for n, e in plan["configs"].items() if e["stage"] == "stage2"}
    lines += ["", "| stage-2 config | LoRA targets | LoRA layers | LoRA values (M) |", "|---|---|---|---|"]
    for name, e in stage2.items():
        lines.append(f"| {name} | {e['lora_targets']} | {e['lora_layers']} | {e['lora_params'] / 1e6:.0f} |")
    lines += ["", "| sampling (SD3.5M, batch 1, 333 text tokens) | image tokens | TFLOP per call | H100 calls/s |", "|---|---|---|---|"]
    for name, e in plan["sampling"].items():
        lines.append(f"| {name} | {e['image_tokens']} | {e['forward_flops'] / 1e12:.2f} | {e['h100_calls_per_s']:.1f} |")
    r, p = plan["ratios"], plan["paper"]
    lines += ["", f"- FLOPs stock 1024 / DA 1024: **{r['flops_stock_1024_over_da_1024']:.2f}** "
              f"(paper, measured img/s: {p['img_per_s_1024']['da']} vs {p['img_per_s_1024']['stock']} = {p['img_per_s_1024']['ratio']:.2f})",
              f"- FLOPs stock 2048 / DA 2048: **{r['flops_stock_2048_over_da_2048']:.2f}**",
              f"- FLOPs DA 1024 / stock 512: {r['flops_da_1024_over_stock_512']:.3f}"]
    if "ours_stage2_h100_days_sd35m_1024" in p:
        lines.append(f"- stage 2 (sd35m_1024, 20k steps x 128): **{p['ours_stage2_h100_days_sd35m_1024']:.1f} H100-days** "
                     f"projected (paper: {p['stage2_h100_days']:.0f} H100-days, at 10k-20k steps)")
    return "\n".join(lines)


def write_readme(text: str, path: Path = README) -> None:
    common.replace_marked(path, text, MARK_BEGIN, MARK_END, "## Cost plan (python -m bench.plan)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="folder for plan.json")
    ap.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed share of peak throughput (0-1)")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the table in bench/README.md")
    args = ap.parse_args(argv)
    plan = build_plan(args.mfu)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan.json").write_text(json.dumps(plan, indent=2))
    text = table(plan)
    print(text)
    if not args.no_readme:
        write_readme(text)
    print(f"wrote {args.out / 'plan.json'} in {plan['seconds_to_plan']:.1f} s")
    return plan


if __name__ == "__main__":
    main()
