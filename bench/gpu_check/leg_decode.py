"""Leg 2: decode.  The DA-VAE through the pack's VAE path (``DAComfyVAE``: what ``DAVAELoader``
returns) against ComfyUI's own stock SD3 VAE at 1024, in bf16 and fp32; the DA-VAE at 2048
untiled and tiled; then, under the 8 GB cap, the same decodes as a small card's user meets them
(``VAE.decode`` chooses tiling from the free memory ComfyUI sees): peak memory and no out-of-memory.

Each decode is ComfyUI's ``VAE.decode`` / ``decode_tiled`` (model loading by its model management
included), timed once after a warm-up of the same call.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import comfy_host, memory
from .settings import Sizes

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TILED_FALLBACK = "retrying with tiled VAE decoding"  # ComfyUI's VAE.decode after an out-of-memory


def vae_config(sizes: Sizes) -> dict[str, Any]:
    config = comfy_host.pack("davae_core.davae_config")
    return config.tiny_vae_config(attention=True) if sizes.toy else dict(config.SD3_VAE_CONFIG)


def stock_vae(sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int):
    """ComfyUI's SD3 VAE with random weights: at full size from the state dict alone (ComfyUI detects
    it from the keys, as for a checkpoint's VAE); the toy one through ``VAE``'s config argument."""
    import comfy.sd

    from davae_testing.comfyui_runner import comfy_vae_from_config

    config = vae_config(sizes)
    trunks = comfy_host.pack("nodes.comfy_davae")
    state = {}
    gen = torch.Generator(device=device).manual_seed(seed)
    for kind in ("encoder", "decoder"):
        with torch.device("meta"):
            trunk = trunks.build_trunk(kind, config, "SD3 VAE")
        for key, value in trunk.state_dict().items():
            state[f"{kind}.{key}"] = torch.empty(value.shape, device=device).normal_(0.0, comfy_host.WEIGHT_STD, generator=gen)
    if sizes.toy:
        return comfy_vae_from_config(config, state, "tiny SD3 VAE", dtype)
    return comfy.sd.VAE(sd=state, dtype=dtype)


def da_vae(sizes: Sizes, dtype: torch.dtype, seed: int):
    """The pack's DA-VAE as ComfyUI gets it from DAVAELoader (``DAComfyVAE`` over ``ComfyDAVAE``), random weights."""
    config = comfy_host.pack("davae_core.davae_config")
    model = comfy_host.pack("nodes.comfy_davae").ComfyDAVAE(config.DAVAEConfig(base_vae=vae_config(sizes)), with_base_encoder=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, comfy_host.WEIGHT_STD, generator=gen)
    return comfy_host.pack("nodes.vae_adapter").DAComfyVAE(model.eval(), dtype)


def latent(vae, side: int, seed: int) -> torch.Tensor:
    cells = side // vae.downscale_ratio
    return torch.randn(1, vae.latent_channels, cells, cells, generator=torch.Generator().manual_seed(seed))


def tile_cells(sizes: Sizes) -> dict[str, int]:
    """``decode_tiled``'s arguments, in latent cells as the VAE Decode (Tiled) node passes them (64 = 1024 px at f16)."""
    return {"tile_x": sizes.decode_tile, "tile_y": sizes.decode_tile, "overlap": sizes.decode_overlap}


def planned_tiles(vae, z: torch.Tensor, tile: dict[str, int]) -> dict[str, int]:
    """The tiles the pack's tiled decode will use for ``z`` (it may shrink the asked tile to the free memory)."""
    size, overlap = comfy_host.pack("nodes.vae_memory").decode_tiles(vae, z.shape, tile["tile_x"], tile["overlap"])
    starts = comfy_host.pack("davae_core.tiling").tile_starts
    return {"tile_cells": size, "overlap_cells": overlap,
            "tiles": len(starts(z.shape[2], size, overlap)) * len(starts(z.shape[3], size, overlap))}


def timed(fn, device: torch.device) -> dict[str, Any]:
    """One warm-up call, then one timed call with its peak memory (or its out-of-memory).  Other models
    are unloaded first, so the peak holds this VAE's weights and its decode only."""
    comfy_host.unload_all(device)
    _, warm = memory.run_guarded(fn, device)
    if warm["out_of_memory"]:
        return {"peak_memory": warm, "out_of_memory": True}
    start = time.perf_counter()
    image, mem = memory.run_guarded(fn, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    entry = {"seconds": round(time.perf_counter() - start, 4), "peak_memory": mem, "out_of_memory": mem["out_of_memory"]}
    if image is not None:
        entry["image"] = list(image.shape)
        entry["finite"] = bool(torch.isfinite(image).all())
    return entry


def run(sizes: Sizes, device: torch.device, seed: int = 0) -> dict[str, Any]:
    comfy_host.unload_all(device)
    runs: dict[str, Any] = {}
    tile = tile_cells(sizes)
    for dname, dtype in DTYPES.items():
        vaes = {"stock": stock_vae(sizes, device, dtype, seed), "da": da_vae(sizes, dtype, seed)}
        for kind, vae in vaes.items():
            z = latent(vae, sizes.image, seed)
            with torch.inference_mode():
                runs[f"{kind}_1024_{dname}"] = {"latent": list(z.shape), **timed(lambda: vae.decode(z), device)}
        da, z = vaes["da"], latent(vaes["da"], sizes.large_image, seed)
        with torch.inference_mode():
            runs[f"da_2048_untiled_{dname}"] = {"latent": list(z.shape), **timed(lambda: _untiled(da, z), device)}
            runs[f"da_2048_tiled_{dname}"] = {"latent": list(z.shape), **planned_tiles(da, z, tile),
                                             **timed(lambda: da.decode_tiled(z, **tile), device)}
        del vaes, da
        comfy_host.unload_all(device)
    ratios = {f"da_over_stock_1024_{d}": round(runs[f"da_1024_{d}"]["seconds"] / runs[f"stock_1024_{d}"]["seconds"], 4)
              for d in DTYPES if "seconds" in runs[f"da_1024_{d}"] and "seconds" in runs[f"stock_1024_{d}"]}
    out = {"setup": {"stock": "ComfyUI's comfy.sd.VAE (SD3 VAE architecture)", "da": "nodes.vae_adapter.DAComfyVAE",
                     "tile_cells": tile, "weights": "random", "timing": "one warm-up call, then one timed call each"},
           "runs": runs, "ratios": ratios}
    out["capped"], out["cap"] = capped(sizes, device, seed)
    return out


def _untiled(vae, z: torch.Tensor) -> torch.Tensor:
    """One decode of the whole latent, no tiles: ComfyUI's model loading, then the first stage on it."""
    import comfy.model_management as mm

    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode(z.shape, vae.vae_dtype))
    image = vae.process_output(vae.first_stage_model.decode(z.to(vae.vae_dtype).to(vae.device)).float())
    return image.to(vae.output_device).movedim(1, -1)  # (B, H, W, C), as VAE.decode hands images on


def capped(sizes: Sizes, device: torch.device, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The decodes a small card's user runs (bf16, as ComfyUI picks on a card with bf16), under the cap."""
    out: dict[str, Any] = {}
    with memory.small_card(device, sizes.cap_bytes) as cap:
        stock, da = stock_vae(sizes, device, torch.bfloat16, seed), da_vae(sizes, torch.bfloat16, seed)
        tile = tile_cells(sizes)
        cases = {"stock_1024": (stock, sizes.image, {}), "da_1024": (da, sizes.image, {}), "da_2048": (da, sizes.large_image, {}),
                 "da_2048_tiled": (da, sizes.large_image, tile)}
        for name, (vae, side, tiles) in cases.items():
            comfy_host.unload_all(device)  # a small card holds one VAE at a time
            z = latent(vae, side, seed)
            decode = (lambda: vae.decode_tiled(z, **tiles)) if tiles else (lambda: vae.decode(z))
            with torch.inference_mode(), comfy_host.LogWatch(TILED_FALLBACK) as fallback:
                image, mem = memory.run_guarded(decode, device)
            out[name] = {**mem, "latent": list(z.shape), **(planned_tiles(vae, z, tiles) if tiles else {}),
                         "comfy_fell_back_to_tiles": bool(fallback.lines)}
            if image is not None:
                out[name]["image"] = list(image.shape)
        del stock, da
    return out, cap
