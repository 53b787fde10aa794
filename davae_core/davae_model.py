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

from .da_wiring import DAWiring
from .davae_config import SD3_VAE_CONFIG, DAVAEConfig, tiny_vae_config
from .tiling import tiled_decode, tiled_encode

__all__ = ["DAVAE", "DAVAEConfig", "SD3_VAE_CONFIG", "tiny_vae_config"]

def _build_vae(cfg: dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(**cfg)


class DAVAE(DAWiring):
    """Tokenizer with a structured latent ``[base C | detail D]`` at twice the base factor.

    Public API takes images in [0, 1] and normalised latents (what a DiT sees); the ``*_raw``
    methods work in the autoencoders' own spaces (see :mod:`structured_latent`).
    """

    def __init__(self, config: DAVAEConfig, with_base_encoder: bool = True):
        super().__init__()
        trunk = _build_vae(config.base_vae)

        base_encoder = base_quant_conv = None
        if with_base_encoder:
            base = _build_vae(config.base_vae)
            base_encoder = base.encoder.requires_grad_(False)
            base_quant_conv = base.quant_conv
            if base_quant_conv is not None:
                base_quant_conv.requires_grad_(False)

        self.attach(config, trunk.encoder, trunk.decoder, base_encoder, base_quant_conv)

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
    def detail_posterior(self, image_pm: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.detail_moments(image_pm))

    def _check_image(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
        self.layout.latent_size(image.shape[-2], image.shape[-1])

    def encode_raw(self, image: torch.Tensor, base_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Image in [0, 1] -> raw ``[z | z_d]`` (posterior means)."""
        self._check_image(image)
        return self.encode_raw_pm(image * 2.0 - 1.0, base_latent)

    def encode(self, image: torch.Tensor, base_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Image in [0, 1] -> normalised structured latent, e.g. 1024x1024 -> (B, 32, 64, 64)."""
        return self.normalizer.normalize(self.encode_raw(image, base_latent))

    # ----------------------------------------------------------------- decoding
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised structured latent -> image in [0, 1]."""
        out = self._decode_model_space(*self.decoder_inputs(latent))
        return ((out + 1.0) / 2.0).clamp(0.0, 1.0)

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
        (:meth:`decode_for_training`); ``detail`` and ``base`` (as the decoder reads
        it: the alignment target) are returned undropped.
        """
        self._check_image(image)
        image_pm = image * 2.0 - 1.0
        z = self.normalizer.normalize_base(self.encode_base_raw(image_pm))
        posterior = self.detail_posterior(image_pm)
        z_d = posterior.sample(generator) if sample_posterior else posterior.mode()
        return {
            "reconstruction": self.decode_for_training(z, z_d, detail_dropout, generator, detail_dropout_rescale),
            "base": self.decoder_base(z),
            "detail": z_d,
            "posterior": posterior,
        }
