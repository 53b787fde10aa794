"""How much memory the DA-VAE takes, and the largest tiles that fit in what ComfyUI reports free.

ComfyUI's ``VAE.decode`` / ``VAE.encode`` retry with the VAE's own ``decode_tiled_`` /
``encode_tiled_`` after running out of memory, asking for fixed tiles (64 latent cells,
512 pixels), and have no further fallback.  64 cells of a f16 DA latent are 1024 px: about
8.5 GiB in fp32 by the estimates below, more than an 8 GB card has free.  So every DA tile is
sized from ``comfy.model_management.get_free_memory``: the largest (up to the size asked for)
whose estimate fits :data:`HEADROOM` of it.
"""

from __future__ import annotations

from typing import Callable

import comfy.model_management as mm

from ..davae_core.davae_config import DAVAEConfig

# ComfyUI's measured cost of an AutoencoderKL trunk, bytes per pixel per byte of dtype, divided by
# the trunk's width at full resolution (SD3: 128): about 14 (encode) and 17 (decode) live
# activations of that width per pixel.  Our estimates scale them by the real widths.
_ENCODE_LIVE = 1767.0 / 128
_DECODE_LIVE = 2178.0 / 128
# ComfyUI 0.8.0 measured its KL trunks (ours) at 2.73x that on AMD cards
_AMD_RATIO = 2.73

# A tile may take this share of the reported free memory: the estimates are rules of thumb, and
# the blended output (64 MiB at 2048 px, on the card only with --gpu-only) lives beside the tile.
HEADROOM = 0.8
# What ComfyUI's out-of-memory fallback asks for (its decode_tiled_ / encode_tiled_ defaults),
# with overlaps in the same proportion (16 of 64 cells, 64 of 512 pixels).
FALLBACK_DECODE_TILE, DECODE_OVERLAP_SHARE = 64, 4
FALLBACK_ENCODE_TILE, ENCODE_OVERLAP_SHARE = 512, 8
MIN_TILE_CELLS = 4  # 64 px at f16: below that the overlap leaves nothing of a tile


def memory_estimates(config: DAVAEConfig):
    """ComfyUI's ``memory_used_encode`` / ``memory_used_decode`` for a DA-VAE of this config.

    Encode: the detail trunk runs at full resolution (its first level is the widest per pixel);
    the base encoder runs after it at half resolution, so it adds only its latent.  Decode: the
    decoder trunk's last level runs at full resolution, ``factor`` x ``factor`` pixels per cell.
    Per image, as ComfyUI divides free memory by them to pick the batch it runs at once.
    """
    widths = config.base_vae["block_out_channels"]
    per_pixel = max(w / 4**i for i, w in enumerate(widths))  # widest activation per full-res pixel
    per_pixel *= _AMD_RATIO if mm.is_amd() else 1.0
    factor = config.layout.factor

    def encode(shape, dtype) -> float:  # shape (B, 3, H, W)
        return _ENCODE_LIVE * per_pixel * shape[2] * shape[3] * mm.dtype_size(dtype)

    def decode(shape, dtype) -> float:  # shape (B, C, h, w)
        pixels = shape[2] * shape[3] * factor * factor
        return _DECODE_LIVE * per_pixel * pixels * mm.dtype_size(dtype)

    return encode, decode


def largest_fitting(cost: Callable[[int], float], budget: float, largest: int, smallest: int, step: int = 1) -> int:
    """The largest tile ``t`` (a multiple of ``step``, ``smallest <= t <= largest``) with ``cost(t) <= budget``;
    ``smallest`` when none fits."""
    tile = largest // step * step
    while tile > smallest and cost(tile) > budget:
        tile -= step
    return max(tile, smallest)


def _tiles(vae, side: int, asked: int | None, asked_overlap: int | None, fallback: int, share: int, step: int, cost):
    """(tile, overlap) along a side of ``side``: what was asked, or ComfyUI's fallback tile (at most
    half the side: the whole image just ran out of memory), shrunk until it fits the free memory."""
    largest = max(step, (min(fallback, side // 2) if asked is None else asked) // step * step)
    budget = HEADROOM * mm.get_free_memory(vae.device)
    tile = largest_fitting(cost, budget, largest, min(MIN_TILE_CELLS * step, largest), step)
    if asked is None or asked_overlap is None:
        overlap = tile // share
    else:
        overlap = asked_overlap if tile == asked else min(asked_overlap, tile // 4)
    return tile, overlap // step * step


def decode_tiles(vae, shape, tile: int | None = None, overlap: int | None = None) -> tuple[int, int]:
    """(tile, overlap) in latent cells for decoding, one image at a time, a latent of ``shape``."""
    cost = lambda t: vae.memory_used_decode((1, shape[1], t, t), vae.vae_dtype)  # noqa: E731
    return _tiles(vae, max(shape[-2:]), tile, overlap, FALLBACK_DECODE_TILE, DECODE_OVERLAP_SHARE, 1, cost)


def encode_tiles(vae, shape, tile: int | None = None, overlap: int | None = None) -> tuple[int, int]:
    """(tile, overlap) in pixels, whole latent cells, for encoding, one image at a time, pixels of ``shape``."""
    cost = lambda t: vae.memory_used_encode((1, 3, t, t), vae.vae_dtype)  # noqa: E731
    step = vae.downscale_ratio
    return _tiles(vae, max(shape[-2:]), tile, overlap, FALLBACK_ENCODE_TILE, ENCODE_OVERLAP_SHARE, step, cost)
