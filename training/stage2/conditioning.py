"""What the stage-2 transformer reads: structured latents and text conditioning, per micro-batch.

From the latent cache (:mod:`davae_training.stage2.caption_cache`) a batch already holds them;
otherwise the frozen DA-VAE encodes the images every step, ``data.encode_batch_size`` at a time
and in the autocast dtype the step runs under (a micro-batch of 16 images at 1024 px in one fp32
pass would hold tens of GB of activations), and the text encoders encode the captions.  Building
the cache once (``python -m davae_training.stage2.caption_cache --config ...``) takes both off
the training step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .caption_cache import CachedConditioningDataset
from .config import AdapterTrainConfig, load_davae_for_training
from .text_conditioning import build_text_conditioner

logger = logging.getLogger("davae_training")


def dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class Conditioning:
    """Turns a data batch into (latents, embeds, pooled) and holds the empty prompt's and the sample prompts' conditioning."""

    def __init__(self, device: torch.device, davae=None, text=None, cached: CachedConditioningDataset | None = None,
                 sample_prompts: list[str] | tuple[str, ...] = (), encode_batch_size: int = 4, latent_factor: int | None = None):
        if encode_batch_size < 1:
            raise ValueError(f"data.encode_batch_size must be >= 1, got {encode_batch_size}")
        self.device, self.davae, self.text, self.cached = device, davae, text, cached
        self.encode_batch_size = encode_batch_size
        if cached is None:
            null_e, null_p = text.encode([""])
            self.null_embeds, self.null_pooled = null_e[0], null_p[0]
            self.sample_prompts = list(sample_prompts)
            self.sample_embeds, self.sample_pooled = text.encode(self.sample_prompts) if self.sample_prompts else (None, None)
        else:
            prompts = cached.prompts()
            self.null_embeds, self.null_pooled = prompts["null_embeds"], prompts["null_pooled"]
            self.sample_prompts = prompts["sample_prompts"]
            self.sample_embeds, self.sample_pooled = prompts.get("sample_embeds"), prompts.get("sample_pooled")
        self.null_embeds = self.null_embeds.to(device)
        self.null_pooled = self.null_pooled.to(device)
        # pixels per latent cell: of the DA-VAE that encodes (or decodes sample grids), else of the cache
        self.latent_factor = davae.layout.factor if davae is not None else cached.latent_factor if cached is not None else latent_factor
        if cached is not None and cached.latent_factor != self.latent_factor:
            raise ValueError(f"the cache {cached.root} holds latents at 1/{cached.latent_factor} of the image, the DA-VAE "
                             f"makes 1/{self.latent_factor}: use the DA-VAE the cache was built with")

    @classmethod
    def from_config(cls, cfg: AdapterTrainConfig, device: torch.device, cached: CachedConditioningDataset | None) -> "Conditioning":
        # from a cache the DA-VAE is only needed to decode sample grids
        davae = load_davae_for_training(cfg.tokenizer, device) if cached is None or cfg.tokenizer.path else None
        text = build_text_conditioner(cfg.text, cfg.model.pretrained, device) if cached is None else None
        if cached is None:
            logger.info("encoding images (%d per DA-VAE pass) and captions every step; a latent cache takes both off "
                        "the step: python -m davae_training.stage2.caption_cache --config <this config>",
                        cfg.data.encode_batch_size)
        return cls(device, davae, text, cached, cfg.sampling.prompts, cfg.data.encode_batch_size)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Structured latents, ``encode_batch_size`` images per DA-VAE pass (in the caller's autocast)."""
        pixels = pixels.to(self.device, dtype_of(self.davae), non_blocking=True)
        return torch.cat([self.davae.encode(chunk).float() for chunk in pixels.split(self.encode_batch_size)])

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "latents" in batch:
            return (batch["latents"].to(self.device, non_blocking=True), batch["embeds"].to(self.device, non_blocking=True),
                    batch["pooled"].to(self.device, non_blocking=True))
        embeds, pooled = self.text.encode(list(batch["caption"]))
        return self.encode_images(batch["pixels"]), embeds.float().to(self.device), pooled.float().to(self.device)
