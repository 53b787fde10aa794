"""Images <-> the normalised structured latent the DiT trains on, through a stage-1 DA-VAE on VA-VAE.

The base channels are VA-VAE's posterior mean of the bicubic half image, the detail channels the
DA-VAE's detail posterior mean; both normalised per channel.  By default with the DA-VAE file's
own normaliser (the base with ``latents_stats.pt``, imported into its config; the detail with
the statistics stage 1 measured); ``tokenizer.latent_stats`` names a ``{"mean", "std"}`` file
over all C+D channels instead (the DA authors' layout).
"""

from __future__ import annotations

import torch

from davae_core.dtypes import dtype_from_name


class LatentCodec:
    """``encode(pixels [0, 1]) -> latents`` (frozen, no gradient), ``decode(latents) -> images [0, 1]``."""

    def __init__(self, davae, stats: tuple[list[float], list[float]] | None = None, encode_batch_size: int = 16):
        self.davae = davae.requires_grad_(False).eval()
        self.layout = davae.layout
        self.encode_batch_size = max(1, int(encode_batch_size))
        self.mean = self.std = None
        if stats is not None:
            self.mean = torch.tensor(stats[0]).view(1, -1, 1, 1)
            self.std = torch.tensor(stats[1]).view(1, -1, 1, 1)

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
        stats = None
        if cfg.latent_stats:
            from davae_core.vavae_import import read_latent_stats

            stats = read_latent_stats(cfg.latent_stats, davae.layout.channels)
        return cls(davae, stats, encode_batch_size)

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
        """(B, 3, R, R) in [0, 1] -> (B, C+D, R/f, R/f) float32, in chunks of ``encode_batch_size``."""
        out = []
        for chunk in pixels.to(self.device, self.dtype).split(self.encode_batch_size):
            if self.mean is None:
                out.append(self.davae.encode(chunk).float())
            else:
                raw = self.davae.encode_raw(chunk).float()
                out.append((raw - self.mean.to(raw.device)) / self.std.to(raw.device))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [0, 1] (float32)."""
        latents = latents.to(self.device, torch.float32)
        if self.mean is not None:  # back to raw, then into the file's own normalisation, which decode reads
            latents = self.davae.normalizer.normalize(latents * self.std.to(latents.device) + self.mean.to(latents.device))
        return self.davae.decode(latents.to(self.dtype)).float()
