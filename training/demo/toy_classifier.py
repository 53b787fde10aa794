"""A toy GenEval for the demo: a small CNN that reads shape, shape colour, background colour and texture.

Trained in the demo on the real procedural images and their captions, it then judges generated
samples against the captions they were sampled from.  Two trunks: one looks at images
downsampled to the base resolution (and learns under blur and noise), so it scores layout and
colour, which both the baseline and the DA path should get right; the other reads the full
128 px image for the caption's one-pixel texture, the detail a half-resolution path cannot carry
(near chance on the baseline, the DA path's reason to exist).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .swd import laplacian_pyramid
from .procedural_images import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, caption_attributes

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
INPUT_SIZE = 64
# "none" is what a half-resolution path can hold: the texture's coarse aliases survive a 2x
# downsample (a bicubic down-up of a real image still reads as its texture without this class)
TEXTURE_CLASSES = (*TEXTURES, "none")
TEXTURE_INPUT_SIZE = 128  # the texture's one-pixel lines and two-pixel dots exist only at full resolution
DETAIL_GAIN = 4.0  # the finest band of the textures is about +-0.25: scaled to unit range
# the texture is read in the central window, which overlaps the shape's inside in every image (its
# radius is over a quarter of the image, its centre off the middle by under a tenth): a quarter of the cost
TEXTURE_WINDOW = 64
TEXTURE_JITTER = 8  # the window moves this many px in training, so the reader does not learn one place
WINDOW_MARGIN = 8  # even, so the band's 2x down-up keeps its pixel grid


def caption_labels(captions: list[str]) -> dict[str, torch.Tensor]:
    """Class indices per attribute for captions written by ``procedural_images.make_sample``."""
    parsed = [caption_attributes(c) for c in captions]
    return {name: torch.tensor([values.index(p[name]) for p in parsed]) for name, values in ATTRIBUTES.items()}


def texture_labels(captions: list[str]) -> torch.Tensor:
    return torch.tensor([TEXTURE_CLASSES.index(caption_attributes(c)["texture"]) for c in captions])


def _conv_trunk(widths: tuple[int, ...], in_channels: int, first_stride: int) -> nn.Sequential:
    layers, channels = [], in_channels
    for i, out in enumerate(widths):
        layers += [nn.Conv2d(channels, out, 3, stride=first_stride if i == 0 else 2, padding=1), nn.GroupNorm(4, out), nn.SiLU()]
        channels = out
    return nn.Sequential(*layers)


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 32, texture_width: int = 16):
        super().__init__()
        self.trunk = _conv_trunk((width, width, 2 * width, 2 * width), 3, first_stride=2)  # 64 -> 4 px
        # flattened 4x4 map, not pooled: where the colour sits tells shape from background
        self.heads = nn.ModuleDict({name: nn.Linear(2 * width * 16, len(v)) for name, v in ATTRIBUTES.items()})
        # reads the finest Laplacian band (what a 2x downsample loses; the texture's coarser
        # aliases survive in a 64 px image and must not count), pixel-unshuffled so the first
        # layer sees every pixel at a quarter of the cost; pooled over the window (mean and max),
        # since the texture is the same wherever it is
        self.texture_trunk = _conv_trunk((2 * texture_width, 2 * texture_width, 4 * texture_width), 12, first_stride=1)
        self.texture_head = nn.Linear(2 * 4 * texture_width, len(TEXTURE_CLASSES))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute of ``ATTRIBUTES`` and ``"texture"``; ``images`` (N, 3, H, W) in [0, 1]."""
        return {**self.read_layout(images), "texture": self.read_texture(images)}

    def read_layout(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        small = F.interpolate(images, size=INPUT_SIZE, mode="area") if images.shape[-1] != INPUT_SIZE else images
        features = self.trunk(small * 2 - 1).flatten(1)
        return {name: head(features) for name, head in self.heads.items()}

    def read_texture(self, images: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Texture logits from the central window of the finest band, moved by ``offset`` (y, x) px."""
        full = images if images.shape[-1] == TEXTURE_INPUT_SIZE else F.interpolate(
            images, size=TEXTURE_INPUT_SIZE, mode="bicubic", align_corners=False).clamp(0, 1)
        # the band of a window grown by a margin the blur reaches through: no window-edge effects
        top, left = ((TEXTURE_INPUT_SIZE - TEXTURE_WINDOW) // 2 - WINDOW_MARGIN + o for o in offset)
        size = TEXTURE_WINDOW + 2 * WINDOW_MARGIN
        band = laplacian_pyramid(full[..., top:top + size, left:left + size], 2)[0] * DETAIL_GAIN
        window = band[..., WINDOW_MARGIN:-WINDOW_MARGIN, WINDOW_MARGIN:-WINDOW_MARGIN]
        maps = self.texture_trunk(F.pixel_unshuffle(window, 2))
        return self.texture_head(torch.cat([maps.mean((2, 3)), maps.amax((2, 3))], 1))


def half_resolution(images: torch.Tensor) -> torch.Tensor:
    """What a perfect 64 px path shows of a 128 px image: a bicubic down-up (the downsample the
    demo's base models were trained on, without antialiasing)."""
    low = F.interpolate(images, scale_factor=0.5, mode="bicubic", align_corners=False)
    return F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)


def _add_noise(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    return (images + 0.05 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(images.shape, generator=gen)).clamp(0, 1)


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (a down-up resample to a random size) and noise on half of the batch: generated
    samples are softer and noisier than the training images, the layout reader must not care.
    (The texture reader gets noise only: blur removes what it reads.)"""
    n = images.shape[0]
    size = int(torch.randint(16, INPUT_SIZE, (1,), generator=gen))
    soft = F.interpolate(F.interpolate(images, size=size, mode="area"), size=INPUT_SIZE, mode="bilinear", align_corners=False)
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    return _add_noise(pick * soft + (1 - pick) * images, gen)


@dataclass
class TrainedClassifier:
    model: AttributeClassifier
    losses: list[float]


def train_classifier(images: torch.Tensor, captions: list[str], steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
                     seed: int = 0, progress: bool = True) -> TrainedClassifier:
    """Fit on real images ``(N, 3, 128, 128)`` in [0, 1] with their captions (seconds on a CPU)."""
    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    if images.shape[-1] != TEXTURE_INPUT_SIZE:
        raise ValueError(f"train on {TEXTURE_INPUT_SIZE} px images (the texture exists only there), got {images.shape[-1]} px")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels, textures = caption_labels(captions), texture_labels(captions)
    small = F.interpolate(images, size=INPUT_SIZE, mode="area")
    halved = half_resolution(images)
    none = torch.full((batch_size // 2,), TEXTURE_CLASSES.index("none"))
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="toy classifier", disable=not progress):
        idx = torch.randint(0, len(small), (batch_size,), generator=gen)
        logits = model.read_layout(_augment(small[idx], gen))
        loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in ATTRIBUTES)
        offset = tuple(int(o) for o in torch.randint(-TEXTURE_JITTER, TEXTURE_JITTER + 1, (2,), generator=gen))
        texture_in = _add_noise(torch.cat([images[idx], halved[idx[: len(none)]]]), gen)
        loss = loss + F.cross_entropy(model.read_texture(texture_in, offset), torch.cat([textures[idx], none]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return TrainedClassifier(model.eval(), losses)


@torch.no_grad()
def attribute_scores(model: AttributeClassifier, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Accuracy per attribute, their mean (``mean``) and the share of images with all three right
    (``all``, GenEval's per-prompt rule), judging each image against its own caption."""
    labels = caption_labels(captions)
    outputs = [model.read_layout(chunk) for chunk in images.split(64)]
    logits = {name: torch.cat([o[name] for o in outputs]) for name in ATTRIBUTES}
    right = {name: logits[name].argmax(1) == labels[name] for name in ATTRIBUTES}
    scores = {name: float(r.float().mean()) for name, r in right.items()}
    scores["mean"] = sum(scores.values()) / len(ATTRIBUTES)
    scores["all"] = float(torch.stack(list(right.values())).all(0).float().mean())
    return {k: round(v, 4) for k, v in scores.items()}


@torch.no_grad()
def texture_accuracy(model: AttributeClassifier, images: torch.Tensor, captions: list[str]) -> float:
    """Share of ``images`` whose texture reads as the one their caption names (a guess among the
    three scores 1/3; an image without full-resolution texture reads as "none" and scores 0)."""
    predicted = torch.cat([model.read_texture(chunk).argmax(1) for chunk in images.split(64)])
    return round(float((predicted == texture_labels(captions)).float().mean()), 4)
