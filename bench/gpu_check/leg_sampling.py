"""Leg 1: end to end in ComfyUI: a KSampler run (euler / sgm_uniform, CFG) of stock 1024, DA 1024
(the pack's patch, random heads), stock 512, and DA 1024 on fp8_e4m3fn weights.

One warm-up round, then interleaved timed rounds (order rotated, medians, wall clock on a GPU);
peak memory per variant is the largest over its timed runs.  Stock and DA share one loaded model
(the DA model is the patch's clone), as in a user's graph; the fp8 model is a second load.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from .. import common
from . import comfy_host, memory
from .settings import Sizes

LATENT_CHANNELS = {"stock": 16, "da": 32}
FACTOR = {"stock": 8, "da": 16}


def variants(sizes: Sizes) -> dict[str, tuple[str, int, str]]:
    """name -> (model kind, image side, weight dtype)."""
    return {
        "stock_1024": ("stock", sizes.image, "bf16"),
        "da_1024": ("da", sizes.image, "bf16"),
        "stock_512": ("stock", sizes.small_image, "bf16"),
        "da_1024_fp8": ("da", sizes.image, "fp8_e4m3fn"),
    }


def empty_latent(kind: str, side: int) -> torch.Tensor:
    """An empty latent as the EmptySD3LatentImage / DA empty latent nodes make it (zeros, on the CPU)."""
    cells = side // FACTOR[kind]
    return torch.zeros(1, LATENT_CHANNELS[kind], cells, cells)


def models(sizes: Sizes, device: torch.device, seed: int) -> dict[str, Any]:
    bf16 = comfy_host.model_sampling_sd3(comfy_host.load_mmdit(sizes, device, torch.bfloat16, seed))
    fp8 = comfy_host.model_sampling_sd3(comfy_host.load_mmdit(sizes, device, torch.float8_e4m3fn, seed))
    return {("stock", "bf16"): bf16, ("da", "bf16"): comfy_host.random_heads(bf16, seed),
            ("da", "fp8_e4m3fn"): comfy_host.random_heads(fp8, seed)}


def run(sizes: Sizes, device: torch.device, seed: int = 0) -> dict[str, Any]:
    comfy_host.unload_all(device)
    loaded = models(sizes, device, seed)
    positive, negative = comfy_host.conditioning(sizes, seed)
    table = variants(sizes)
    peaks: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
    shapes: dict[str, list[int]] = {}
    finite: dict[str, bool] = {}

    def call(name: str):
        kind, side, dtype = table[name]

        def go() -> None:
            with memory.peak(device) as mem:
                out = comfy_host.ksample(loaded[(kind, dtype)], empty_latent(kind, side), positive, negative, sizes, seed)
            finite[name] = bool(torch.isfinite(out).all())  # random weights: recorded, cost does not depend on it
            shapes[name] = list(out.shape)
            peaks[name].append(mem)

        return go

    times = common.interleaved_timings({name: call(name) for name in table}, device, sizes.timed_rounds, warmup=1)
    clock = common.ratio_clock(device)
    med = common.medians(times, clock)
    out_variants = {}
    for name, (kind, side, dtype) in table.items():
        timed = peaks[name][1:]  # the warm-up's peak includes loading: the timed runs' is the variant's
        out_variants[name] = {
            "model": kind, "image_side": side, "latent": shapes[name], "finite": finite[name], "weight_dtype": dtype,
            "median_s": round(med[name], 4), "runs_s": [round(t, 4) for t in times[clock][name]],
            "peak_memory": memory.merge_peaks(timed or peaks[name]), "comfy": comfy_host.describe(loaded[(kind, dtype)]),
        }
    round_ratios = [a / b for a, b in zip(times[clock]["da_1024"], times[clock]["stock_512"])]
    result = {
        "setup": {
            "model": ("SD3.5-Medium MMDiT" if not sizes.toy else "tiny SD3 MMDiT (depth 2)") + ", random weights, "
                     "loaded by comfy.sd.load_diffusion_model_state_dict; ModelSamplingSD3 shift 3",
            "sampler": "euler / sgm_uniform (nodes.common_ksampler -> comfy.sample.sample)",
            "steps": sizes.steps, "cfg": sizes.cfg, "text_tokens": sizes.text_tokens, "timed_rounds": sizes.timed_rounds,
            "warmup_rounds": 1, "clock": clock,
            "heads": "the pack's patch (nodes.sd3_model_patch.patch_sd3_model) with random heads",
        },
        "variants": out_variants,
        "ratios": {
            "stock_1024_over_da_1024": round(med["stock_1024"] / med["da_1024"], 4),
            "da_1024_over_stock_512": round(med["da_1024"] / med["stock_512"], 4),
            "da_1024_over_stock_512_per_round_median": round(statistics.median(round_ratios), 4),
            "da_1024_fp8_over_bf16": round(med["da_1024_fp8"] / med["da_1024"], 4),
        },
    }
    del loaded
    comfy_host.unload_all(device)
    return result
