"""Training throughput of both stages: the trainers' own steps (forward, loss, backward, AdamW), in samples per second.

    python -m bench.train_throughput               # auto: real sizes on a GPU, reduced on a CPU
    python -m bench.train_throughput --stage2-batch 16 --gradient-checkpointing

Both stages are built by the preflight's builders (:mod:`davae_training.preflight`: the trainers'
model objects with random weights at real size) and stepped by the loop kit's engine
(:mod:`davae_training.loop`) with the trainers' step objects, so what is timed is the step the
trainers take, with the loss of the shipped configs:
stage 1, ``tokenizer_sd3_paper.yaml``: the DA-VAE on the SD3 VAE with its LPIPS (a VGG16-shaped
net with random weights: the same cost), KL, alignment and, as past the GAN warm-up, the
discriminator's term and its own update;
stage 2, ``sd35m_1024.yaml`` read from a latent cache: SD3.5-Medium with DA heads, peft LoRA
rank 256 on to_q, to_k, to_v, to_out.0, ff.net.2, norm1.linear, P, P', O, O' trained in full, on
32-channel 64x64 latents (32x32 tokens = 1024px), rectified flow with the detail ramp (Eq. 13).
Target (issue 6): stage 2 >= 12 samples/s on one H100 at 1024.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import torch

from . import common
from .sd3_models import SD3_TEXT_TOKENS, SD35M_CONFIG

NAME = "train_throughput"
STAGE1_CONFIG = common.REPO_DIR / "training" / "configs" / "tokenizer_sd3_paper.yaml"
STAGE2_CONFIG = common.REPO_DIR / "training" / "configs" / "sd35m_1024.yaml"


def _engine(cfg, device: torch.device, accelerator):
    from dataclasses import replace

    from davae_training.loop import Engine

    precision = cfg.train.mixed_precision if device.type == "cuda" else "no"  # CPU: fp32 compute
    return Engine(replace(cfg.train, mixed_precision=precision, gradient_accumulation_steps=1, report_to="none"), accelerator)


def _one_step(engine, step, batch, first: int) -> Callable[[], float]:
    from davae_training.preflight import run_steps

    count = iter(range(10**9))
    return lambda: run_steps(engine, step, batch, 1, log=lambda _: None, first_step=first + next(count))[0]


def stage1_step(device: torch.device, accelerator, image_size: int, batch: int, checkpointing: bool, seed: int) -> tuple[Callable[[], float], dict]:
    from davae_training.config import load_config
    from davae_training.preflight import build_stage1
    from davae_training.stage1.config import TokenizerTrainConfig
    from davae_training.stage1.step import TokenizerStep

    cfg = load_config(TokenizerTrainConfig, STAGE1_CONFIG, [f"data.resolution={image_size}", f"train.batch_size={batch}",
                                                             f"train.gradient_checkpointing={checkpointing}", f"train.seed={seed}"])
    torch.manual_seed(seed)
    model, data, source = build_stage1(cfg, toy=False, device=device)
    engine = _engine(cfg, device, accelerator)
    model.network.train()
    engine.prepare(model)
    phase = cfg.loss.gan_start_step if model.discriminator is not None else 0  # past the GAN warm-up: the costliest step
    info = {
        "model": f"DA-VAE on {source}",
        "config": STAGE1_CONFIG.name,
        "image_size": image_size,
        "batch": batch,
        "trainable_params": sum(p.numel() for p in model.trained_parameters().values()),
        "total_params": sum(p.numel() for p in model.module.parameters()),
        "gradient_checkpointing": checkpointing,
        "loss": f"the config's: L1, LPIPS (VGG16-shaped, random weights), KL, alignment, GAN (as at step {phase})",
    }
    return _one_step(engine, TokenizerStep(cfg, model, loss_step_offset=phase), data, 0), info


def stage2_step(device: torch.device, accelerator, layers: int, batch: int, text_tokens: int, rank: int, checkpointing: bool,
                seed: int) -> tuple[Callable[[], float], dict]:
    from davae_training.config import load_config
    from davae_training.preflight import build_stage2
    from davae_training.stage2.architectures import CLIP_TOKENS
    from davae_training.stage2.config import AdapterTrainConfig
    from davae_training.stage2.step import AdapterStep

    sets = [f"train.batch_size={batch}", f"model.lora_rank={rank}", f"model.lora_alpha={rank}", "data.images.resolution=1024",
            f"train.gradient_checkpointing={checkpointing}", f"text.max_sequence_length={text_tokens - CLIP_TOKENS}",
            "data.cache_dir=latent-cache", f"train.seed={seed}"]  # from a cache: latents and text are inputs
    if device.type != "cuda":
        sets.append("model.base_dtype=float32")  # CPU: fp32 compute
    cfg = load_config(AdapterTrainConfig, STAGE2_CONFIG, sets)
    torch.manual_seed(seed)
    adapter, cond, data, source, tokens = build_stage2(cfg, toy=False, device=device,
                                                       num_layers=None if layers == SD35M_CONFIG["num_layers"] else layers)
    engine = _engine(cfg, device, accelerator)
    adapter.network.train()
    engine.prepare(adapter)
    info = {
        "model": f"{source}; DA heads, LoRA rank {rank} (alpha {rank}) on {', '.join(cfg.model.lora_targets)}",
        "config": STAGE2_CONFIG.name,
        "latent": list(data["latents"].shape),
        "image_tokens": 32 * 32,
        "text_tokens": tokens,
        "batch": batch,
        "base_weights_dtype": cfg.model.base_dtype,
        "trainable_params": sum(p.numel() for p in adapter.trained_parameters().values()),
        "total_params": sum(p.numel() for p in adapter.module.parameters()),
        "gradient_checkpointing": checkpointing,
    }
    return _one_step(engine, AdapterStep(adapter, cond, cfg.objective), data, 0), info


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
    from davae_training.config import TrainLoopConfig
    from davae_training.runtime import make_accelerator

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

    accelerator = make_accelerator(TrainLoopConfig(report_to="none", mixed_precision="bf16" if gpu else "no"), cpu=not gpu)
    steps, setups = {}, {}
    if "stage1" in args.stages:
        steps["stage1"], setups["stage1"] = fit_batch(
            lambda b: stage1_step(device, accelerator, s1_size, b, gpu, args.seed), s1_batch, device, "stage1"
        )
        setups["stage1"]["full_size"] = s1_size == 1024
    if "stage2" in args.stages:
        steps["stage2"], setups["stage2"] = fit_batch(
            lambda b: stage2_step(device, accelerator, s2_layers, b, args.text_tokens, args.rank, args.gradient_checkpointing, args.seed),
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
            "optimizer": "the configs' AdamW, fp32 master weights",
            "step": "the trainers' own step objects through the loop kit's engine (davae_training.loop)",
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
