"""Training throughput of both stages: forward + backward + AdamW step, in samples per second.

    python -m bench.train_throughput               # auto: real sizes on a GPU, reduced on a CPU
    python -m bench.train_throughput --stage2-batch 16 --gradient-checkpointing

Stage 1: the DA-VAE at SD3 VAE size, detail-encoder trunk and decoder trunk trainable (the
frozen base encoder runs too), loss = 2 L1 + 1e-7 KL + 1 alignment (Table S1 without LPIPS
and the adversarial term: no pretrained LPIPS net here, so real steps cost somewhat more).
Stage 2: SD3.5-Medium with DA heads, peft LoRA rank 256 on to_q, to_k, to_v, to_out.0,
ff.net.2, norm1.linear, plus P, P', O, O' trained in full, on 32-channel 64x64 latents
(32x32 tokens = 1024px), rectified-flow loss with the detail schedule (Eq. 13).
Target (issue 6): stage 2 >= 12 samples/s on one H100 at 1024.  Self-contained: it does
not use the training package, so it measures the models, not a particular trainer.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

from davae_core import DAVAE, SD3_VAE_CONFIG, DAVAEConfig, alignment_loss, scheduled_flow_loss
from davae_core.heads import DAHeads, attach_to_sd3_transformer, heads_config_for_diffusers
from davae_core.mmdit_keys import SD3_LORA_TARGETS

from . import common
from .sd3_models import SD3_TEXT_TOKENS, SD35M_CONFIG, build_diffusers, conditioning

NAME = "train_throughput"


def autocast(device: torch.device):
    """bf16 mixed precision on a GPU (fp32 master weights), as accelerate's mixed_precision="bf16"."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def stage1_step(device: torch.device, image_size: int, batch: int, checkpointing: bool, seed: int) -> tuple[Callable[[], float], dict]:
    torch.manual_seed(seed)
    model = DAVAE(DAVAEConfig(base_vae=dict(SD3_VAE_CONFIG)), with_base_encoder=True).to(device)
    model.requires_grad_(False)
    trainable = [p for m in model.trainable_modules(train_detail_trunk=True, train_decoder_trunk=True) for p in m.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999))
    image = torch.rand(batch, 3, image_size, image_size, device=device)

    def step() -> float:
        with autocast(device):
            out = model(image)
            loss = (
                2.0 * F.l1_loss(out["reconstruction"].float(), image * 2 - 1)
                + 1e-7 * out["posterior"].kl().mean()
                + 1.0 * alignment_loss(out["detail"].float(), out["base"].float())
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    info = {
        "model": "DA-VAE on the SD3 VAE architecture, random weights",
        "image_size": image_size,
        "batch": batch,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "gradient_checkpointing": checkpointing,
        "loss": "2 L1 + 1e-7 KL + 1 align (no LPIPS / adversarial term)",
    }
    return step, info


def stage2_step(
    device: torch.device, layers: int, batch: int, text_tokens: int, rank: int, checkpointing: bool, seed: int
) -> tuple[Callable[[], float], dict]:
    from peft import LoraConfig, inject_adapter_in_model

    model = build_diffusers(layers, device, torch.bfloat16 if device.type == "cuda" else torch.float32, seed)
    attach_to_sd3_transformer(model, DAHeads(heads_config_for_diffusers(model), device=device))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(SD3_LORA_TARGETS), init_lora_weights="gaussian"), model)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    for head in (model.pos_embed.proj, model.proj_out):  # P, P' and O, O' train in full
        head.float().requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # fp32 master copies of everything that trains
        p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999))

    cond = conditioning(batch, text_tokens, device, torch.float32)
    x0 = torch.randn(batch, 32, 64, 64, device=device)
    noise = torch.randn_like(x0)

    def step() -> float:
        sigma = torch.sigmoid(torch.randn(batch, device=device))  # logit-normal(0, 1)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        with autocast(device):
            pred = model(
                hidden_states=x_t, encoder_hidden_states=cond["context"], pooled_projections=cond["pooled"],
                timestep=sigma * 1000.0, return_dict=False,
            )[0]
        loss = scheduled_flow_loss(pred, noise - x0, base_channels=16, weight=0.5)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    info = {
        "model": f"diffusers SD3.5M, {layers}/24 layers, DA heads, LoRA rank {rank} (alpha {rank}) on {', '.join(SD3_LORA_TARGETS)}",
        "latent": [batch, 32, 64, 64],
        "image_tokens": 32 * 32,
        "text_tokens": text_tokens,
        "batch": batch,
        "base_weights_dtype": "bfloat16" if device.type == "cuda" else "float32",
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "gradient_checkpointing": checkpointing,
    }
    return step, info


def fit_batch(make: Callable[[int], tuple[Callable[[], float], dict]], batch: int, device: torch.device, name: str):
    """Build a stage and run one trial step; on a GPU out-of-memory, halve the batch and retry
    (an unattended GPU run should report a number, not a traceback).  The trial step is not timed."""
    requested = batch
    while True:
        try:
            step, info = make(batch)
            step()
            info["requested_batch"] = requested
            return step, info
        except (RuntimeError, MemoryError) as error:
            if device.type != "cuda" or batch == 1 or not common.is_out_of_memory(error):
                raise
        # outside the except block, so the failed attempt's tensors can be freed
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2
        print(f"  {name}: out of memory, retrying with batch {batch}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=["stage1", "stage2"], default=["stage1", "stage2"])
    parser.add_argument("--stage1-size", type=int, default=None, help="stage-1 image side (default: 1024 GPU, 128 CPU)")
    parser.add_argument("--stage1-batch", type=int, default=None, help="default: 8 GPU (the authors' per-GPU batch), 1 CPU")
    parser.add_argument("--stage2-layers", type=int, default=None, help="default: 24 GPU, 2 CPU")
    parser.add_argument("--stage2-batch", type=int, default=None, help="default: 8 GPU, 1 CPU")
    parser.add_argument("--text-tokens", type=int, default=SD3_TEXT_TOKENS)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="also in stage 2 (stage 1 always uses it on a GPU)")
    args = parser.parse_args(argv)

    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    repeats = common.default_repeats(args, device, gpu=10, cpu=3)
    s1_size = args.stage1_size or (1024 if gpu else 128)
    s1_batch = args.stage1_batch or (8 if gpu else 1)
    s2_layers = args.stage2_layers or (SD35M_CONFIG["num_layers"] if gpu else 2)
    s2_batch = args.stage2_batch or (8 if gpu else 1)

    steps, setups = {}, {}
    if "stage1" in args.stages:
        steps["stage1"], setups["stage1"] = fit_batch(
            lambda b: stage1_step(device, s1_size, b, gpu, args.seed), s1_batch, device, "stage1"
        )
        setups["stage1"]["full_size"] = s1_size == 1024
    if "stage2" in args.stages:
        steps["stage2"], setups["stage2"] = fit_batch(
            lambda b: stage2_step(device, s2_layers, b, args.text_tokens, args.rank, args.gradient_checkpointing, args.seed),
            s2_batch, device, "stage2",
        )
        setups["stage2"]["full_size"] = s2_layers == SD35M_CONFIG["num_layers"]
    print(f"{NAME}: {device}, " + "; ".join(f"{k}: {v['model']}, batch {v['batch']}" for k, v in setups.items()))

    try:
        # fit_batch's trial step already warmed each stage up (optimizer state, allocator)
        times = common.interleaved_timings(steps, device, repeats, max(0, args.warmup - 1))
    except (RuntimeError, MemoryError) as error:
        if common.is_out_of_memory(error):
            raise SystemExit(f"out of memory ({error}); lower --stage1-batch / --stage2-batch or add --gradient-checkpointing")
        raise

    memory = {}
    if gpu:  # one more step each, untimed, for the peak (a CPU RSS sampler would only add noise here)
        for name, step in steps.items():
            with common.peak_memory(device) as mem:
                step()
            memory[name] = mem

    throughput, targets = {}, []
    for name, summary in common.summarize_clocks(times).items():
        summary["samples_per_s"] = round(setups[name]["batch"] / summary["median_s"], 4)  # wall clock
        throughput[name] = summary
        print(f"  {name}: {summary['samples_per_s']} samples/s (median step {summary['median_s']:.3f} s)")
    if gpu and "stage2" in throughput and setups["stage2"]["full_size"]:
        targets.append(common.target("stage-2 samples/s per GPU at 1024 (32x32 tokens)", throughput["stage2"]["samples_per_s"], ">=", 12))

    result = {
        "benchmark": NAME,
        "machine": common.machine_info(device),
        "setup": {
            **setups,
            "optimizer": "AdamW lr 1e-4, betas (0.9, 0.999), fp32 master weights",
            "precision": "bf16 autocast" if gpu else "fp32",
            "repeats": repeats,
            "warmup": args.warmup,
            "timing": "one optimizer step per call, stages interleaved, median",
            "memory_note": "peaks include both stages' resident weights and optimizer states (both stay loaded to interleave)"
            if gpu else "",
            "reduced_note": "" if gpu else (
                f"CPU run at reduced size: stage 1 at {s1_size}px, stage 2 with {s2_layers}/24 layers; "
                "the samples/s say nothing about a GPU"
            ),
        },
        "throughput": throughput,
        "peak_memory": memory,
        "targets": targets,
    }
    if not gpu:
        result["setup"]["gpu_only_targets"] = "stage 2 >= 12 samples/s per H100 is a GPU target: not evaluated on a CPU"
    common.write_results(NAME, result, args.out, plot)
    common.print_targets(targets)
    return result


def plot(ax, data: dict[str, Any]) -> None:
    labels = list(data["throughput"])
    values = [data["throughput"][k]["samples_per_s"] for k in labels]
    s = data["setup"]
    note = s["precision"] + "".join(f"\n{k}: batch {s[k]['batch']}, full size: {s[k]['full_size']}" for k in labels)
    common.bar_plot(ax, labels, values, "samples / s", "training throughput (fwd + bwd + AdamW)", note)


if __name__ == "__main__":
    main()
