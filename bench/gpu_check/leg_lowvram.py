"""Leg 3: a small card's session under the 8 GB cap, in one sequence: stock sampling at 1024, DA
sampling (the pack's patch, no LoRA: a clone of the loaded model, which ComfyUI swaps in over the
same weights), a DA decode (ComfyUI makes room by partially unloading the MMDiT, pinning what it
moves to the CPU on NVIDIA/AMD), then unloading everything.

Each step records its peak memory or its out-of-memory, how much of the MMDiT sat on the device
after it, and ComfyUI's pinned-weight bookkeeping.  On a CPU (``--cpu``) ComfyUI neither
offloads partially nor pins: the toy run walks the same calls.
"""

from __future__ import annotations

from typing import Any

import torch

from . import comfy_host, leg_decode, leg_sampling, memory
from .settings import Sizes


# what ComfyUI's model patcher says as it loads a model whole or in part and unloads part of one
LOADER_LINES = ("loaded completely", "loaded partially", "Unloaded partially")


def _state(model) -> dict[str, Any]:
    """How much of ``model`` ComfyUI holds on the device, and what it pinned (keys of this model; bytes overall)."""
    import comfy.model_management as mm

    size, loaded = model.model_size(), model.loaded_size() if hasattr(model, "loaded_size") else None
    out: dict[str, Any] = {"loaded": None if loaded is None else f"{loaded / 2**20:.0f} of {size / 2**20:.0f} MiB"}
    pinned = getattr(model, "pinned", None)
    out["pinned"] = "-" if pinned is None else f"{len(pinned)} tensors, {getattr(mm, 'TOTAL_PINNED_MEMORY', 0) / 2**20:.0f} MiB"
    return out


def run(sizes: Sizes, device: torch.device, seed: int = 0) -> dict[str, Any]:
    import comfy.model_management as mm

    comfy_host.unload_all(device)
    steps: dict[str, Any] = {}
    with memory.small_card(device, sizes.cap_bytes) as cap:
        stock = comfy_host.model_sampling_sd3(comfy_host.load_mmdit(sizes, device, torch.bfloat16, seed))
        da = comfy_host.random_heads(stock, seed)
        vae = leg_decode.da_vae(sizes, torch.bfloat16, seed)
        positive, negative = comfy_host.conditioning(sizes, seed)
        sequence = {
            "stock_sampling_1024": lambda: comfy_host.ksample(stock, leg_sampling.empty_latent("stock", sizes.image),
                                                              positive, negative, sizes, seed),
            "da_sampling_1024": lambda: comfy_host.ksample(da, leg_sampling.empty_latent("da", sizes.image),
                                                           positive, negative, sizes, seed),
            "da_decode_1024": lambda: _decode(vae, sizes, seed),
        }
        for name, fn in sequence.items():
            print(f"gpu_check lowvram: {name}", flush=True)
            with comfy_host.LogWatch(*LOADER_LINES) as said:
                _, mem = memory.run_guarded(fn, device)
            steps[name] = {**mem, **_state(stock), "comfy_loader": said.lines}
        with memory.peak(device) as mem, comfy_host.LogWatch(*LOADER_LINES) as said:
            mm.unload_all_models()
            mm.soft_empty_cache()
        after = {"allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 3)} if device.type == "cuda" else {}
        steps["unload_all"] = {"out_of_memory": False, **mem, **after, **_state(stock), "comfy_loader": said.lines}
        del stock, da, vae
    return {"cap": cap, "steps": steps, "setup": {"model": "as the sampling leg (bf16)", "vae": "the pack's DA-VAE, bf16",
                                                  "steps": sizes.steps, "cfg": sizes.cfg}}


def _decode(vae, sizes: Sizes, seed: int) -> torch.Tensor:
    with torch.inference_mode():
        return vae.decode(leg_decode.latent(vae, sizes.image, seed))
