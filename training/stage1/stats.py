"""Per-channel statistics of the raw detail latent, measured on data after training.

The diffusion model sees ``(z_d - mean) / std`` per channel (METHOD.md, structured latent); the
statistics are written into the DA-VAE's normaliser buffers, so they travel inside the exported
file, and summarised in its metadata.  Disabled -> the identity affine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from davae_core import DAVAE
from davae_core.structured_latent import split

logger = logging.getLogger("davae_training.stats")


@dataclass
class DetailStatsConfig:
    enabled: bool = True
    num_images: int = 256  # images sampled from the training data
    batch_size: int = 4


class ChannelMoments:
    """Streaming per-channel mean and variance (Chan et al. pairwise merge, float64)."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """``x``: (B, C, H, W); every B*H*W position is one observation per channel."""
        flat = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1).cpu()
        n = flat.shape[1]
        if n == 0:
            return
        mean_b = flat.mean(1)
        m2_b = ((flat - mean_b[:, None]) ** 2).sum(1)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt()


@torch.no_grad()
def measure_detail_statistics(model: DAVAE, batches: Iterable[torch.Tensor], max_images: int, progress: bool = True) -> dict[str, Any]:
    """Raw detail posterior means of up to ``max_images`` images -> {"mean", "std", "images"}."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    dtype = next(p for p in model.parameters()).dtype
    moments = ChannelMoments(model.layout.detail_channels)
    seen = 0
    bar = tqdm(total=max_images, desc="detail statistics", disable=not progress)
    for pixels in batches:
        if seen >= max_images:
            break
        pixels = pixels[: max_images - seen].to(device=device, dtype=dtype)
        raw = model.encode_raw(pixels)
        _, z_d = split(raw, model.layout.base_channels)
        moments.update(z_d)
        seen += pixels.shape[0]
        bar.update(pixels.shape[0])
    bar.close()
    model.train(was_training)
    if seen == 0:
        raise ValueError("no images were available to measure the detail statistics")
    return {"mean": moments.mean.float(), "std": moments.std.float(), "images": seen}


def apply_detail_statistics(model: DAVAE, stats: dict[str, Any] | None) -> dict[str, Any]:
    """Write the statistics into the normaliser (identity when ``stats`` is None); returns the
    metadata entry for the exported file."""
    d = model.layout.detail_channels
    if stats is None:
        model.normalizer.set_detail_statistics(torch.zeros(d), torch.ones(d))
        return {"detail_statistics": "identity (disabled)"}
    model.normalizer.set_detail_statistics(stats["mean"].to(model.normalizer.detail_mean), stats["std"].to(model.normalizer.detail_std))
    logger.info("detail statistics over %d images: mean %s, std %s", stats["images"],
                [round(v, 4) for v in stats["mean"].tolist()], [round(v, 4) for v in stats["std"].tolist()])
    return {
        "detail_statistics": {
            "images": int(stats["images"]),
            "mean": [float(v) for v in stats["mean"].tolist()],
            "std": [float(v) for v in stats["std"].tolist()],
        }
    }
