"""The DA-VAE's wiring around its autoencoder trunks, one home for both builds.

:class:`davae_core.davae_model.DAVAE` (diffusers trunks, training) and the node pack's
``ComfyDAVAE`` (ComfyUI's trunks) differ only in where their trunks come from: each builds
them and hands them to :meth:`DAWiring.attach`, and both inherit the same encode / decode:

* base: the frozen pretrained encoder (+ quant conv) on the bicubic 2x downsample, posterior mean;
* detail: the encoder trunk without its ``conv_out``, then :class:`DetailDownsample`;
* decode: :class:`JointUpsample`, then the decoder trunk without its ``conv_in``, reading the
  normalised base and the raw detail in the channel order the decoder was trained on.

Module names (``base_encoder``, ``detail_trunk``, ...) are the file format's key prefixes.
Pure PyTorch: no diffusers, no ComfyUI.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .da_blocks import DetailDownsample, JointUpsample, drop_detail, half_resolution
from .davae_config import DAVAEConfig
from .structured_latent import LatentNormalizer, merge, split


class DAWiring(nn.Module):
    """Base + detail encoders and the joint decoder around trunks a subclass builds."""

    def attach(
        self,
        config: DAVAEConfig,
        detail_trunk: nn.Module,
        decoder_trunk: nn.Module,
        base_encoder: nn.Module | None = None,
        base_quant_conv: nn.Module | None = None,
        conv_cls: Callable[..., nn.Module] = nn.Conv2d,
    ) -> None:
        """Wire the DA blocks to the trunks (an encoder and a decoder shaped like ``config.base_vae``)."""
        self.config = config
        self.layout = config.layout
        features = config.base_vae["block_out_channels"][-1]
        self.base_encoder = base_encoder
        self.base_quant_conv = base_quant_conv
        self.detail_trunk = detail_trunk
        self.detail_trunk.conv_out = nn.Identity()  # the trunk ends at its last activation
        self.detail_down = DetailDownsample(features, 2 * config.detail_channels, conv_cls=conv_cls)
        self.decoder_up = JointUpsample(self.layout.channels, features, conv_cls=conv_cls)
        self.decoder_trunk = decoder_trunk
        self.decoder_trunk.conv_in = nn.Identity()  # JointUpsample feeds the mid block directly
        self.normalizer = LatentNormalizer(self.layout, config.base_shift, config.base_scale, *config.base_channel_stats)

    @property
    def has_base_encoder(self) -> bool:
        return self.base_encoder is not None

    # ----------------------------------------------------------------- encoding
    @staticmethod
    def downsample(image_pm: torch.Tensor) -> torch.Tensor:
        """The half-resolution input of the base encoder: plain bicubic, as the authors trained."""
        return half_resolution(image_pm)

    def encode_base_raw(self, image_pm: torch.Tensor) -> torch.Tensor:
        """Posterior mean of the frozen base VAE on the 2x-downsampled image (raw space)."""
        if self.base_encoder is None:
            raise RuntimeError(
                "this DA-VAE was built without its base encoder; pass base_latent= (the stock "
                "VAE's raw latent of the half-resolution image) or load one that holds it"
            )
        with torch.no_grad():
            moments = self.base_encoder(self.downsample(image_pm))
            if self.base_quant_conv is not None:
                moments = self.base_quant_conv(moments)
        return moments[:, : self.layout.base_channels]

    def detail_moments(self, image_pm: torch.Tensor) -> torch.Tensor:
        """Mean and log-variance of the detail posterior, ``(B, 2D, H/16, W/16)``."""
        return self.detail_down(self.detail_trunk(image_pm))

    def encode_raw_pm(self, image_pm: torch.Tensor, base_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> raw ``[z | z_d]`` (posterior means); ``base_latent`` replaces the base encoder."""
        z = self.encode_base_raw(image_pm) if base_latent is None else base_latent
        z_d = self.detail_moments(image_pm)[:, : self.layout.detail_channels]
        return merge(z.to(z_d), z_d)

    # ----------------------------------------------------------------- decoding
    def decoder_base(self, z_norm: torch.Tensor) -> torch.Tensor:
        """The base latent as the joint decoder reads it (``config.decoder_base_space``)."""
        return self.normalizer.denormalize_base(z_norm) if self.config.decoder_base_space == "raw" else z_norm

    def _decode_model_space(self, z_norm: torch.Tensor, z_d_raw: torch.Tensor) -> torch.Tensor:
        """The decoder reads the normalised (or raw: VA-VAE) base and the raw detail; returns [-1, 1]-ish pixels."""
        z_norm = self.decoder_base(z_norm)
        if self.config.decoder_input_order == "detail_base":
            return self.decoder_trunk(self.decoder_up(merge(z_d_raw, z_norm)))
        return self.decoder_trunk(self.decoder_up(merge(z_norm, z_d_raw)))

    def decode_for_training(
        self, z_norm: torch.Tensor, z_d_raw: torch.Tensor, detail_dropout: float = 0.0,
        generator: torch.Generator | None = None, rescale: bool = True,
    ) -> torch.Tensor:
        """The training decode: each sample's detail is first dropped with probability ``detail_dropout``
        (:func:`~davae_core.da_blocks.drop_detail`), so the decoder also learns to work from the base alone."""
        return self._decode_model_space(z_norm.to(z_d_raw), drop_detail(z_d_raw, detail_dropout, generator, rescale))

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw structured latent -> pixels in [-1, 1] (ComfyUI's first_stage_model contract)."""
        self.layout.check(raw, "raw latent")
        z, z_d = split(raw, self.layout.base_channels)
        return self._decode_model_space(self.normalizer.normalize_base(z), z_d).clamp(-1.0, 1.0)

    def decoder_inputs(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A normalised structured latent -> (normalised base, raw detail): what the decoder reads."""
        self.layout.check(latent)
        z, z_d = split(latent, self.layout.base_channels)
        return z, self.normalizer.denormalize_detail(z_d)
