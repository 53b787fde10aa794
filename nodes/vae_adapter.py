"""A DA-VAE dressed as a ``comfy.sd.VAE`` so the stock VAE Encode/Decode (and tiled) nodes take it.

``first_stage_model`` follows ComfyUI's contract: ``encode(x in [-1, 1]) -> raw latent`` and
``decode(raw latent) -> [-1, 1]``.  Raw here means the pack's convention (see
:mod:`.latent_ops`): raw SD3 base channels, detail channels normalised by the file's affine.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import torch
from torch import nn

from ..davae_core.davae_model import DAVAE
from ..davae_core.structured_latent import merge, split


class DAFirstStage(nn.Module):
    """Encode/decode in ComfyUI's raw latent space around a :class:`DAVAE`.

    ``base_vae`` (a stock ComfyUI SD3 VAE) encodes the base channels when the DA-VAE file
    holds no base encoder.  It is kept as a plain attribute: its own patcher moves it.
    """

    def __init__(self, davae: DAVAE, base_vae=None):
        super().__init__()
        self.davae = davae
        self.base_vae = base_vae

    @property
    def base_channels(self) -> int:
        return self.davae.layout.base_channels

    def _stock_base_latent(self, image_pm: torch.Tensor) -> torch.Tensor:
        low = DAVAE.downsample(image_pm.float())  # the same bicubic 2x the DA-VAE was trained with
        pixels = ((low + 1.0) / 2.0).movedim(1, -1)  # stock VAE.encode takes (B, H, W, 3) in [0, 1]
        return self.base_vae.encode(pixels).to(image_pm)

    def encode(self, image_pm: torch.Tensor) -> torch.Tensor:
        image_pm = image_pm.contiguous()  # ComfyUI hands a channels-last view; CPU convs are far slower on it
        base = None if self.davae.base_encoder is not None else self._stock_base_latent(image_pm)
        raw = self.davae.encode_raw((image_pm + 1.0) / 2.0, base_latent=base)
        z, z_d = split(raw, self.base_channels)
        return merge(z, self.davae.normalizer.normalize_detail(z_d))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        z, z_d = split(latent, self.base_channels)
        return self.davae.decode_raw(merge(z, self.davae.normalizer.denormalize_detail(z_d)))


@contextmanager
def _quiet_logging():
    """``VAE.__init__`` with no weights logs a warning about it; that is expected here."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class WrappedVAE(comfy.sd.VAE):
    """A ``comfy.sd.VAE`` around any module with ComfyUI's ``encode``/``decode`` contract.

    ``VAE.__init__`` is run without weights only to set the defaults this ComfyUI version
    expects (it returns early); the model, ratios and devices are set here.
    """

    def __init__(
        self,
        first_stage: nn.Module,
        latent_channels: int,
        ratio: int,
        dtype: torch.dtype | None = None,
        encode_cost: float = 1767.0,
        decode_cost: float = 2178.0,
    ):
        with _quiet_logging():
            super().__init__(sd={})
        self.first_stage_model = first_stage.eval()
        self.latent_channels = latent_channels
        self.downscale_ratio = ratio
        self.upscale_ratio = ratio
        self.working_dtypes = [torch.bfloat16, torch.float32]  # the SD3 VAE's; fp16 overflows in its decoder
        # Bytes per pixel (encode) / per latent cell times pixels per cell (decode), as ComfyUI estimates.
        self.memory_used_encode = lambda shape, dt: encode_cost * shape[2] * shape[3] * mm.dtype_size(dt)
        self.memory_used_decode = lambda shape, dt: decode_cost * shape[2] * shape[3] * ratio * ratio * mm.dtype_size(dt)
        self.device = mm.vae_device()
        self.vae_dtype = dtype or mm.vae_dtype(self.device, self.working_dtypes)
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.first_stage_model, load_device=self.device, offload_device=mm.vae_offload_device()
        )
        self.size = None


class DAComfyVAE(WrappedVAE):
    """The VAE output of ``DAVAELoader``: 32 channels at f16."""

    def __init__(self, davae: DAVAE, base_vae=None, dtype: torch.dtype | None = None):
        # Encode runs the detail trunk at full and the base encoder at half resolution.
        super().__init__(DAFirstStage(davae, base_vae), davae.layout.channels, davae.layout.factor, dtype, encode_cost=1767.0 * 1.25)
        self.davae = davae


def is_da_vae(vae) -> bool:
    return isinstance(getattr(vae, "first_stage_model", None), DAFirstStage)
