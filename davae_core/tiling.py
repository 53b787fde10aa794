"""Tiled encode / decode with overlap blending, so that 2048 and 4096 images fit in bounded memory.

Tiles overlap by ``overlap`` input cells; in the overlap, outputs are blended with linear
ramps, so seams fade instead of showing as lines.  Only one tile's activations exist at a
time; the accumulators hold the output and its weights.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable

import torch
from tqdm.auto import tqdm


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``tile`` that overlap by >= ``overlap``."""
    if tile >= length:
        return [0]
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile size {tile}")
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # last tile flush with the edge (length and tile are aligned)
    return sorted(set(starts))


def _ramp(n: int, ramp: int, left: bool, right: bool, like: torch.Tensor) -> torch.Tensor:
    w = torch.ones(n, dtype=like.dtype, device=like.device)
    ramp = min(ramp, n // 2)
    if ramp > 0:
        up = (torch.arange(ramp, dtype=like.dtype, device=like.device) + 0.5) / ramp
        if left:
            w[:ramp] = up
        if right:
            w[n - ramp :] = up.flip(0)
    return w


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: Fraction,
    align: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Apply a spatial map ``fn`` (output size = input size * ``scale``) tile by tile.

    ``tile``, ``overlap`` and ``align`` are in input cells; tile starts are multiples of ``align``.
    """
    h, w = x.shape[-2:]
    if h % align or w % align or tile % align:
        raise ValueError(f"input {h}x{w} and tile {tile} must be multiples of {align}")
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)
    out = weight = None
    ramp = int(overlap * scale)
    bar = tqdm(total=len(ys) * len(xs), desc="tiles", disable=not progress, leave=False)
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h - y0), min(tile, w - x0)
            piece = fn(x[..., y0 : y0 + th, x0 : x0 + tw])
            if out is None:
                shape = (*piece.shape[:-2], int(h * scale), int(w * scale))
                out = torch.zeros(shape, dtype=piece.dtype, device=piece.device)
                weight = torch.zeros(shape[-2:], dtype=piece.dtype, device=piece.device)
            oy, ox = int(y0 * scale), int(x0 * scale)
            ph, pw = piece.shape[-2:]
            wy = _ramp(ph, ramp, y0 > 0, y0 + th < h, piece)
            wx = _ramp(pw, ramp, x0 > 0, x0 + tw < w, piece)
            mask = wy[:, None] * wx[None, :]
            out[..., oy : oy + ph, ox : ox + pw] += piece * mask
            weight[oy : oy + ph, ox : ox + pw] += mask
            bar.update(1)
    bar.close()
    return out / weight


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latent: torch.Tensor,
    factor: int,
    tile: int = 64,
    overlap: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """Decode a latent in ``tile x tile`` latent-cell tiles (``factor`` pixels per cell)."""
    return tiled_apply(decode, latent, tile, overlap, Fraction(factor), 1, progress)


def tiled_encode(
    encode: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    factor: int,
    tile: int = 1024,
    overlap: int = 128,
    progress: bool = False,
) -> torch.Tensor:
    """Encode an image in ``tile x tile`` pixel tiles; tile and overlap are rounded to ``factor``."""
    tile = max(factor, tile // factor * factor)
    overlap = overlap // factor * factor
    return tiled_apply(encode, image, tile, overlap, Fraction(1, factor), factor, progress)
