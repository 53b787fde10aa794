"""A toy GenEval for the demo: a small CNN that reads shape, shape colour and background colour.

Trained in the demo on the real procedural images and their captions, it then judges generated
samples against the captions they were sampled from.  It looks at images downsampled to the
base resolution (and learns under blur and noise), so it scores layout and colour, which both
the baseline and the DA path should get right; the fine detail is scored separately
(``detail_energy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .procedural_images import BACKGROUNDS, COLOURS, SHAPES, caption_attributes

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
INPUT_SIZE = 64


def caption_labels(captions: list[str]) -> dict[str, torch.Tensor]:
    """Class indices per attribute for captions written by ``procedural_images.make_sample``."""
    parsed = [caption_attributes(c) for c in captions]
    return {name: torch.tensor([values.index(p[name]) for p in parsed]) for name, values in ATTRIBUTES.items()}


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, width, 2 * width, 2 * width):  # 64 -> 4 px
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.SiLU()]
            channels = out
        self.trunk = nn.Sequential(*layers)
        # flattened 4x4 map, not pooled: where the colour sits tells shape from background
        self.heads = nn.ModuleDict({name: nn.Linear(channels * 16, len(v)) for name, v in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.interpolate(images, size=INPUT_SIZE, mode="area") * 2 - 1 if images.shape[-1] != INPUT_SIZE else images * 2 - 1
        features = self.trunk(x).flatten(1)
        return {name: head(features) for name, head in self.heads.items()}


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (a down-up resample to a random size) and noise on half of the batch: generated
    samples are softer and noisier than the training images, the classifier must not care."""
    n = images.shape[0]
    size = int(torch.randint(16, INPUT_SIZE, (1,), generator=gen))
    soft = F.interpolate(F.interpolate(images, size=size, mode="area"), size=INPUT_SIZE, mode="bilinear", align_corners=False)
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * soft + (1 - pick) * images
    return (x + 0.05 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(0, 1)


@dataclass
class TrainedClassifier:
    model: AttributeClassifier
    losses: list[float]


def train_classifier(images: torch.Tensor, captions: list[str], steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
                     seed: int = 0, progress: bool = True) -> TrainedClassifier:
    """Fit on real images ``(N, 3, H, W)`` in [0, 1] with their captions (a few seconds on a CPU)."""
    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = caption_labels(captions)
    small = F.interpolate(images, size=INPUT_SIZE, mode="area") if images.shape[-1] != INPUT_SIZE else images
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="toy classifier", disable=not progress):
        idx = torch.randint(0, len(small), (batch_size,), generator=gen)
        logits = model(_augment(small[idx], gen))
        loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in ATTRIBUTES)
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
    outputs = [model(chunk) for chunk in images.split(64)]
    logits = {name: torch.cat([o[name] for o in outputs]) for name in ATTRIBUTES}
    right = {name: logits[name].argmax(1) == labels[name] for name in ATTRIBUTES}
    scores = {name: float(r.float().mean()) for name, r in right.items()}
    scores["mean"] = sum(scores.values()) / len(ATTRIBUTES)
    scores["all"] = float(torch.stack(list(right.values())).all(0).float().mean())
    return {k: round(v, 4) for k, v in scores.items()}
