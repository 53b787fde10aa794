"""Procedural images for the demo: structure at the base resolution, detail only at full resolution.

Each image is a smooth two-colour background gradient with one large shape (what the base
latent of the half-resolution image can carry), overlaid with what a 2x downsample wipes out:
one-pixel stripes, a one-pixel grid or two-pixel dots inside the shape and a hard one-pixel
outline.  A caption names the parts ("red circle with stripes on teal background"), so a
text-conditioned toy DiT has something to follow.  Shape colours and background colours have
disjoint names: the toy text conditioner is a bag of words, and "red on teal" must not read
like "teal on red".
Everything is a pure function of ``(seed, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = {  # of the shape
    "red": (0.85, 0.15, 0.15),
    "green": (0.2, 0.7, 0.25),
    "blue": (0.15, 0.3, 0.85),
    "yellow": (0.95, 0.85, 0.2),
    "purple": (0.6, 0.25, 0.75),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUNDS = {  # distinct from every shape colour, in name and in value
    "black": (0.08, 0.08, 0.08),
    "grey": (0.5, 0.5, 0.5),
    "teal": (0.1, 0.45, 0.45),
    "orange": (0.95, 0.55, 0.1),
}
SHAPES = ("circle", "square", "triangle")
SHAPE_RADIUS = (0.26, 0.32)  # of the image size
SHAPE_CENTRE_JITTER = 0.08  # the centre moves this share of the size from the middle, per axis
TEXTURES = ("stripes", "grid", "dots")
# The texture repeats every 5 px.  Not 4 (nor 2 or 8): a pattern whose period divides the VAE's
# 8 px latent cell gives every cell inside the shape the same latent, and a decoder that
# upsamples by nearest neighbour (SD3's) can then only paint a flat colour there: the old
# 2 px stripes and checkers were unreachable by construction.  Not 3 either: reachable, but the toy
# decoder did not learn it in a CPU run.  One-pixel lines and two-pixel dots on a 5 px lattice:
# the toy decoder learns them, and a bicubic 2x down-up keeps only a faint blur of them.
TEXTURE_PERIOD = 5
TEXTURE_SHADE = 0.45  # the texture's pixels, dark on the shape's colour (1.0)


@dataclass(frozen=True)
class ProceduralSample:
    image: torch.Tensor  # (3, H, W) in [0, 1]
    caption: str


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    if shape == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    # upward triangle inscribed in the square of half-size r
    return (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)


def texture_mask(kind: str, size: int) -> np.ndarray:
    """(size, size) bool: where ``kind`` darkens the shape (horizontal lines, a grid of lines, or
    2x2 dots), on the image's own pixel lattice."""
    yy, xx = np.mgrid[0:size, 0:size] % TEXTURE_PERIOD
    if kind == "stripes":
        return yy == 0
    if kind == "grid":
        return (yy == 0) | (xx == 0)
    return (yy < 2) & (xx < 2)


def make_sample(index: int, size: int = 128, seed: int = 0) -> ProceduralSample:
    """The ``index``-th image of the stream ``seed`` (deterministic, no global RNG)."""
    rng = np.random.default_rng([seed, index])
    fg_name = list(COLOURS)[rng.integers(len(COLOURS))]
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # base-resolution structure: gradient background and a large shape
    bg_rgb = np.array(BACKGROUNDS[bg_name], dtype=np.float32)
    ramp = (0.75 + 0.25 * (yy / size))[..., None]
    img = bg_rgb[None, None, :] * ramp
    # a large shape near the centre: enough layout for a toy DiT to learn in a minute
    r = size * rng.uniform(*SHAPE_RADIUS)
    cy, cx = size / 2 + rng.uniform(-SHAPE_CENTRE_JITTER, SHAPE_CENTRE_JITTER, size=2) * size
    mask = _shape_mask(shape, yy, xx, cy, cx, r)
    fg_rgb = np.array(COLOURS[fg_name], dtype=np.float32)

    # full-resolution detail: the texture and a hard one-pixel outline (no random strokes: a
    # caption-conditioned model could not know where to draw them)
    tex = texture_mask(texture, size)
    shade = np.where(tex, TEXTURE_SHADE, 1.0)[..., None]
    img = np.where(mask[..., None], fg_rgb[None, None, :] * shade, img)
    outline = mask & ~_shape_mask(shape, yy, xx, cy, cx, r - 1.0)
    img[outline] = 0.05

    caption = f"{fg_name} {shape} with {texture} on {bg_name} background"
    return ProceduralSample(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)).clamp(0, 1), caption)


def background_frame(size: int, margin: int = 4) -> torch.Tensor:
    """(size, size) bool mask of the border no shape of ``make_sample`` reaches, less ``margin`` px
    more: background in every image whatever its caption, so generated samples can be checked
    there for detail that should not be (a texture leaking out of the shape)."""
    reach = size * (SHAPE_CENTRE_JITTER + SHAPE_RADIUS[1]) + 1 + margin
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return torch.maximum((yy - size / 2).abs(), (xx - size / 2).abs()) > reach


def caption_attributes(caption: str) -> dict[str, str]:
    """``{"shape", "colour", "texture", "background"}`` of a caption written by ``make_sample``."""
    words = caption.split()
    if len(words) != 7 or words[2] != "with" or words[4] != "on" or words[6] != "background":
        raise ValueError(f"not a procedural caption (expected 'COLOUR SHAPE with TEXTURE on COLOUR background'): {caption!r}")
    return {"colour": words[0], "shape": words[1], "texture": words[3], "background": words[5]}


def make_batch(start: int, count: int, size: int = 128, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    samples = [make_sample(start + i, size, seed) for i in range(count)]
    return torch.stack([s.image for s in samples]), [s.caption for s in samples]


def write_folder(out_dir: str | Path, count: int, size: int = 128, seed: int = 0) -> Path:
    """PNG + sidecar .txt caption per image: the folder layout the trainers read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sample = make_sample(i, size, seed)
        array = (sample.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(sample.caption)
    return out
