"""A DA-VAE dressed as a ``comfy.sd.VAE`` so the stock VAE Encode/Decode (and tiled) nodes take it.

``first_stage_model`` follows ComfyUI's contract: ``encode(x in [-1, 1]) -> LATENT`` and
``decode(LATENT) -> [-1, 1]``, in the pack's latent convention (:mod:`davae_core.comfy_latent`).
The model is :class:`.comfy_davae.ComfyDAVAE` (ComfyUI's own trunks); tiled encode/decode use
:mod:`davae_core.tiling`, the same tiling as ``DAVAE.encode_tiled`` / ``decode_tiled``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import torch
from torch import nn

from ..davae_core.comfy_latent import from_comfy_latent, to_comfy_latent
from ..davae_core.tiling import tile_starts, tiled_decode, tiled_encode
from .comfy_davae import ComfyDAVAE

# ComfyUI's measured cost of an AutoencoderKL trunk, bytes per pixel per byte of dtype, divided by
# the trunk's width at full resolution (SD3: 128): about 14 (encode) and 17 (decode) live
# activations of that width per pixel.  Our estimates scale them by the real widths.
_ENCODE_LIVE = 1767.0 / 128
_DECODE_LIVE = 2178.0 / 128
WORKING_DTYPES = (torch.bfloat16, torch.float32)  # the SD3 VAE's; fp16 overflows in its decoder, and in ours


class DAFirstStage(nn.Module):
    """Encode/decode in ComfyUI's raw latent space (:mod:`davae_core.comfy_latent`) around a :class:`ComfyDAVAE`."""

    def __init__(self, davae: ComfyDAVAE):
        super().__init__()
        self.davae = davae

    def encode(self, image_pm: torch.Tensor) -> torch.Tensor:
        image_pm = image_pm.contiguous()  # ComfyUI hands a channels-last view; CPU convs are far slower on it
        return to_comfy_latent(self.davae.encode_raw_pm(image_pm), self.davae.normalizer)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.davae.decode_raw(from_comfy_latent(latent, self.davae.normalizer))


def memory_estimates(davae: ComfyDAVAE):
    """ComfyUI's ``memory_used_encode`` / ``memory_used_decode`` for this DA-VAE's structure.

    Encode: the detail trunk runs at full resolution (its first level is the widest per pixel);
    the base encoder runs after it at half resolution, so it adds only its latent.  Decode: the
    decoder trunk's last level runs at full resolution, ``factor`` x ``factor`` pixels per cell.
    Per image, as ComfyUI divides free memory by them to pick the batch it runs at once.
    """
    widths = davae.config.base_vae["block_out_channels"]
    per_pixel = max(w / 4**i for i, w in enumerate(widths))  # widest activation per full-res pixel
    factor = davae.layout.factor

    def encode(shape, dtype) -> float:  # shape (B, 3, H, W)
        return _ENCODE_LIVE * per_pixel * shape[2] * shape[3] * mm.dtype_size(dtype)

    def decode(shape, dtype) -> float:  # shape (B, C, h, w)
        pixels = shape[2] * shape[3] * factor * factor
        return _DECODE_LIVE * per_pixel * pixels * mm.dtype_size(dtype)

    return encode, decode


def default_dtype(device) -> torch.dtype:
    """ComfyUI's choice for a VAE that works in bf16 or fp32 (bf16 where the card has it), never fp16.

    ``--fp16-vae`` makes ComfyUI's choice fp16 for every VAE; the DA-VAE overflows there, like
    the SD3 VAE's decoder, so it takes the next working dtype instead and says so.
    """
    dtype = mm.vae_dtype(device, WORKING_DTYPES)
    if dtype not in WORKING_DTYPES:
        dtype = torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
        logging.getLogger(__name__).warning(
            "DA-VAE: --fp16-vae is not followed, the DA-VAE overflows in fp16 (black or NaN images); running it in %s",
            str(dtype).removeprefix("torch."),
        )
    return dtype


@contextmanager
def _quiet_logging():
    """``VAE.__init__`` with no weights logs a warning about it; that is expected here."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class DAComfyVAE(comfy.sd.VAE):
    """The VAE output of ``DAVAELoader``: 32 channels at f16, tiled through :mod:`davae_core.tiling`.

    ``VAE.__init__`` is run without weights only to set the defaults this ComfyUI version
    expects (it returns early); the model, ratios, memory estimates and devices are set here.
    """

    def __init__(self, davae: ComfyDAVAE, dtype: torch.dtype | None = None):
        with _quiet_logging():
            super().__init__(sd={})
        self.davae = davae
        self.first_stage_model = DAFirstStage(davae).eval()
        self.latent_channels = davae.layout.channels
        self.downscale_ratio = self.upscale_ratio = davae.layout.factor
        self.working_dtypes = list(WORKING_DTYPES)
        self.memory_used_encode, self.memory_used_decode = memory_estimates(davae)
        self.device = mm.vae_device()
        self.vae_dtype = dtype or default_dtype(self.device)
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.first_stage_model, load_device=self.device, offload_device=mm.vae_offload_device()
        )
        self.size = None

    def _progress(self, length_y: int, length_x: int, tile: int, overlap: int, align: int = 1):
        steps = len(tile_starts(length_y, tile, overlap, align)) * len(tile_starts(length_x, tile, overlap, align))
        return comfy.utils.ProgressBar(steps)

    def decode_tiled_(self, samples, tile_x=64, tile_y=64, overlap=16):
        """ComfyUI's 2-D tiled decode (latent cells), done by the pack's one tiling implementation."""
        tile = min(tile_x, tile_y)
        bar = self._progress(samples.shape[2], samples.shape[3], tile, overlap)

        def decode(piece):
            out = self.first_stage_model.decode(piece.to(self.vae_dtype).to(self.device)).float()
            bar.update(1)
            return out.to(self.output_device)

        return self.process_output(tiled_decode(decode, samples, self.upscale_ratio, tile, overlap))

    def encode_tiled_(self, pixel_samples, tile_x=512, tile_y=512, overlap=64):
        """ComfyUI's 2-D tiled encode (pixels), done by the pack's one tiling implementation."""
        f = self.downscale_ratio
        tile = max(f, min(tile_x, tile_y) // f * f)
        bar = self._progress(pixel_samples.shape[2], pixel_samples.shape[3], tile, overlap // f * f, f)

        def encode(piece):
            out = self.first_stage_model.encode(self.process_input(piece).to(self.vae_dtype).to(self.device)).float()
            bar.update(1)
            return out.to(self.output_device)

        return tiled_encode(encode, pixel_samples, f, tile, overlap)


def is_da_vae(vae) -> bool:
    return isinstance(getattr(vae, "first_stage_model", None), DAFirstStage)
