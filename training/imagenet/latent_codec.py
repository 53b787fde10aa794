"""Images <-> the normalised structured latent the DiT trains on, through a stage-1 DA-VAE on VA-VAE.

The base channels are VA-VAE's posterior mean of the bicubic half image, the detail channels the
DA-VAE's detail posterior mean; both normalised per channel by the DA-VAE file's own normaliser:
the base with ``latents_stats.pt`` (in its config since stage 1 or the importer), the detail with
the statistics stage 1 measured (or, for the DA authors' tokenizer, the rest of their statistics
file, which :mod:`davae_core.authors_imagenet_import` writes in).  ``generate`` decodes with the
same file, so training and sampling agree on the latent space.
"""

from __future__ import annotations

import torch

from davae_core.dtypes import dtype_from_name


class LatentCodec:
    """``encode(pixels [0, 1]) -> latents`` (frozen, no gradient), ``decode(latents) -> images [0, 1]``."""

    def __init__(self, davae, encode_batch_size: int = 16):
        self.davae = davae.requires_grad_(False).eval()
        self.layout = davae.layout
        self.encode_batch_size = max(1, int(encode_batch_size))

    @classmethod
    def from_config(cls, cfg, encode_batch_size: int = 16, device: torch.device | str = "cpu") -> "LatentCodec":
        from davae_core.checkpoint import load_davae

        if not cfg.path:
            raise ValueError("tokenizer.path is empty: set it to the stage-1 DA-VAE file on VA-VAE "
                             "(python -m davae_training.train_tokenizer --config training/configs/imagenet/tokenizer_vavae.yaml)")
        davae = load_davae(cfg.path, device=device, dtype=dtype_from_name(cfg.dtype, "tokenizer.dtype"))
        if davae.base_encoder is None:
            raise ValueError(f"{cfg.path}: this DA-VAE file has no base encoder, so it cannot encode images; "
                             "export it with export.include_base_encoder=true")
        return cls(davae, encode_batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.davae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.davae.parameters()).dtype

    def latent_side(self, resolution: int) -> int:
        return self.layout.latent_size(resolution, resolution)[0]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [0, 1] -> (B, C+D, R/f, R/f) float32, in chunks of ``encode_batch_size``; in the
        DA-VAE's own dtype whatever autocast is around (the step's), so a step encodes as the latent cache did."""
        chunks = pixels.to(self.device, self.dtype).split(self.encode_batch_size)
        with torch.autocast(self.device.type, enabled=False):
            return torch.cat([self.davae.encode(chunk).float() for chunk in chunks])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [0, 1] (float32)."""
        return self.davae.decode(latents.to(self.device, self.dtype)).float()
