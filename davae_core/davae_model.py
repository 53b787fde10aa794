"""DA-VAE on top of the SD3 VAE (METHOD.md, "DA-VAE on SD3-VAE").

* base encoder: the frozen pretrained encoder, run on a bicubic 2x downsample;
* detail encoder: the pretrained encoder trunk (its ``conv_out`` dropped) + :class:`DetailDownsample`;
* joint decoder: :class:`JointUpsample` + the pretrained decoder trunk (its ``conv_in`` dropped).

All trunks are diffusers ``AutoencoderKL`` parts, so any AutoencoderKL config (the real SD3
one or a tiny one for tests) gives a matching DA-VAE.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from .da_blocks import DetailDownsample, JointUpsample, drop_detail, half_resolution
from .davae_config import SD3_VAE_CONFIG, DAVAEConfig, tiny_vae_config
from .structured_latent import LatentNormalizer, merge, split
from .tiling import tiled_decode, tiled_encode

__all__ = ["DAVAE", "DAVAEConfig", "DetailDownsample", "JointUpsample", "SD3_VAE_CONFIG", "tiny_vae_config"]

def _build_vae(cfg: dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(**cfg)


class DAVAE(nn.Module):
    """Tokenizer with a structured latent ``[base C | detail D]`` at twice the base factor.

    Public API takes images in [0, 1] and normalised latents (what a DiT sees); the ``*_raw``
    methods work in the autoencoders' own spaces (see :mod:`structured_latent`).
    """

    def __init__(self, config: DAVAEConfig, with_base_encoder: bool = True):
        super().__init__()
        self.config = config
        self.layout = config.layout
        features = config.base_vae["block_out_channels"][-1]
        trunk = _build_vae(config.base_vae)

        self.base_encoder: nn.Module | None = None
        self.base_quant_conv: nn.Module | None = None
        if with_base_encoder:
            base = _build_vae(config.base_vae)
            self.base_encoder = base.encoder
            self.base_quant_conv = base.quant_conv
            self.base_encoder.requires_grad_(False)
            if self.base_quant_conv is not None:
                self.base_quant_conv.requires_grad_(False)

        self.detail_trunk = trunk.encoder
        self.detail_trunk.conv_out = nn.Identity()  # the trunk ends at conv_act
        self.detail_down = DetailDownsample(features, 2 * config.detail_channels)
        self.decoder_up = JointUpsample(self.layout.channels, features)
        self.decoder_trunk = trunk.decoder
        self.decoder_trunk.conv_in = nn.Identity()  # JointUpsample feeds the mid block directly
        self.normalizer = LatentNormalizer(self.layout, config.base_shift, config.base_scale, *config.base_channel_stats)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_base_vae(
        cls, vae: AutoencoderKL, detail_channels: int = 16, with_base_encoder: bool = True, base_name: str = "sd3",
        decoder_base_space: str = "normalized",
    ) -> "DAVAE":
        """Initialise from a pretrained AutoencoderKL: base encoder copied and frozen,
        detail-encoder trunk and decoder trunk initialised from its encoder and decoder."""
        config = DAVAEConfig(
            base_vae=dict(vae.config), detail_channels=detail_channels, base_name=base_name, decoder_base_space=decoder_base_space
        )
        model = cls(config, with_base_encoder=with_base_encoder)
        enc = vae.encoder.state_dict()
        dec = vae.decoder.state_dict()
        if model.base_encoder is not None:
            model.base_encoder.load_state_dict(enc)
            if model.base_quant_conv is not None:
                model.base_quant_conv.load_state_dict(vae.quant_conv.state_dict())
        model.detail_trunk.load_state_dict({k: v for k, v in enc.items() if not k.startswith("conv_out.")})
        model.decoder_trunk.load_state_dict({k: v for k, v in dec.items() if not k.startswith("conv_in.")})
        return model.to(dtype=next(vae.parameters()).dtype)

    def train(self, mode: bool = True) -> "DAVAE":
        super().train(mode)
        if self.base_encoder is not None:  # frozen: keep it in eval whatever the caller does
            self.base_encoder.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for module in (self.detail_trunk, self.decoder_trunk):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = ckpt

    def trainable_modules(self, train_detail_trunk: bool = True, train_decoder_trunk: bool = True) -> list[nn.Module]:
        """The parts that train; the heads of both ends always do."""
        mods: list[nn.Module] = [self.detail_down, self.decoder_up]
        if train_detail_trunk:
            mods.append(self.detail_trunk)
        if train_decoder_trunk:
            mods.append(self.decoder_trunk)
        return mods

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

    def detail_posterior(self, image_pm: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.detail_down(self.detail_trunk(image_pm)))

    def _check_image(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
        self.layout.latent_size(image.shape[-2], image.shape[-1])

    def encode_raw(self, image: torch.Tensor, base_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Image in [0, 1] -> raw ``[z | z_d]`` (posterior means)."""
        self._check_image(image)
        image_pm = image * 2.0 - 1.0
        z = base_latent if base_latent is not None else self.encode_base_raw(image_pm)
        z_d = self.detail_posterior(image_pm).mode()
        return merge(z.to(z_d), z_d)

    def encode(self, image: torch.Tensor, base_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Image in [0, 1] -> normalised structured latent, e.g. 1024x1024 -> (B, 32, 64, 64)."""
        return self.normalizer.normalize(self.encode_raw(image, base_latent))

    # ----------------------------------------------------------------- decoding
    def decoder_base(self, z_norm: torch.Tensor) -> torch.Tensor:
        """The base latent as the joint decoder reads it (``config.decoder_base_space``)."""
        return self.normalizer.denormalize_base(z_norm) if self.config.decoder_base_space == "raw" else z_norm

    def _decode_model_space(self, z_norm: torch.Tensor, z_d_raw: torch.Tensor) -> torch.Tensor:
        """The decoder reads the normalised (or raw) base and the raw detail; returns [-1, 1]-ish pixels."""
        z_norm = self.decoder_base(z_norm)
        if self.config.decoder_input_order == "detail_base":
            return self.decoder_trunk(self.decoder_up(merge(z_d_raw, z_norm)))
        return self.decoder_trunk(self.decoder_up(merge(z_norm, z_d_raw)))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised structured latent -> image in [0, 1]."""
        self.layout.check(latent)
        z, z_d = split(latent, self.layout.base_channels)
        out = self._decode_model_space(z, self.normalizer.denormalize_detail(z_d))
        return ((out + 1.0) / 2.0).clamp(0.0, 1.0)

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw structured latent -> pixels in [-1, 1] (ComfyUI's first_stage_model contract)."""
        self.layout.check(raw, "raw latent")
        z, z_d = split(raw, self.layout.base_channels)
        return self._decode_model_space(self.normalizer.normalize_base(z), z_d).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------- bounded memory
    def encode_tiled(self, image: torch.Tensor, tile: int = 1024, overlap: int = 128, progress: bool = False) -> torch.Tensor:
        """:meth:`encode` in ``tile``-pixel tiles blended over ``overlap`` pixels."""
        self._check_image(image)
        return tiled_encode(self.encode, image, self.layout.factor, tile, overlap, progress)

    def decode_tiled(self, latent: torch.Tensor, tile: int = 64, overlap: int = 8, progress: bool = False) -> torch.Tensor:
        """:meth:`decode` in ``tile``-cell latent tiles blended over ``overlap`` cells."""
        self.layout.check(latent)
        return tiled_decode(self.decode, latent, self.layout.factor, tile, overlap, progress)

    # ----------------------------------------------------------------- training
    def forward(
        self, image: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None,
        detail_dropout: float = 0.0, detail_dropout_rescale: bool = True,
    ) -> dict[str, Any]:
        """One training pass: image in [0, 1] -> reconstruction in [-1, 1] plus what the losses need.

        ``detail_dropout`` zeroes each sample's detail latent with that probability before decoding
        (:func:`~davae_core.da_blocks.drop_detail`); ``detail`` and ``base`` (as the decoder reads
        it: the alignment target) are returned undropped.
        """
        self._check_image(image)
        image_pm = image * 2.0 - 1.0
        z = self.normalizer.normalize_base(self.encode_base_raw(image_pm))
        posterior = self.detail_posterior(image_pm)
        z_d = posterior.sample(generator) if sample_posterior else posterior.mode()
        return {
            "reconstruction": self._decode_model_space(z.to(z_d), drop_detail(z_d, detail_dropout, generator, detail_dropout_rescale)),
            "base": self.decoder_base(z),
            "detail": z_d,
            "posterior": posterior,
        }
