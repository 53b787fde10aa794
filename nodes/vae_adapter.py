"""A DA-VAE dressed as a ``comfy.sd.VAE`` so the stock VAE Encode/Decode (and tiled) nodes take it.

``first_stage_model`` follows ComfyUI's contract: ``encode(x in [-1, 1]) -> LATENT`` and
``decode(LATENT) -> [-1, 1]``, in the pack's latent convention (:mod:`davae_core.comfy_latent`).
The model is :class:`.comfy_davae.ComfyDAVAE` (ComfyUI's own trunks); tiled encode/decode use
:mod:`davae_core.tiling`, the same tiling as ``DAVAE.encode_tiled`` / ``decode_tiled``, one image
at a time in tiles that fit the free memory ComfyUI reports (:mod:`.vae_memory`), also when
ComfyUI falls back to them after running out of memory.
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
from .vae_memory import decode_tiles, encode_tiles, memory_estimates

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
        self.memory_used_encode, self.memory_used_decode = memory_estimates(davae.config)
        self.device = mm.vae_device()
        self.vae_dtype = dtype or default_dtype(self.device)
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.first_stage_model, load_device=self.device, offload_device=mm.vae_offload_device()
        )
        self.size = None

    def decode_tiled_(self, samples, tile_x=None, tile_y=None, overlap=None):
        """ComfyUI's 2-D tiled decode (latent cells), done by the pack's one tiling implementation.

        One image at a time, in tiles sized from the free memory (:mod:`.vae_memory`); no tile size
        is ComfyUI's out-of-memory fallback calling.
        """
        tile, overlap = decode_tiles(self, samples.shape, _asked(tile_x, tile_y), overlap)
        decode = lambda piece: self.first_stage_model.decode(self._on_device(piece))  # noqa: E731
        return self.process_output(self._tiled(decode, tiled_decode, samples, tile, overlap, align=1))

    def encode_tiled_(self, pixel_samples, tile_x=None, tile_y=None, overlap=None):
        """ComfyUI's 2-D tiled encode (pixels), done like :meth:`decode_tiled_`."""
        tile, overlap = encode_tiles(self, pixel_samples.shape, _asked(tile_x, tile_y), overlap)
        encode = lambda piece: self.first_stage_model.encode(self._on_device(self.process_input(piece)))  # noqa: E731
        return self._tiled(encode, tiled_encode, pixel_samples, tile, overlap, align=self.downscale_ratio)

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.vae_dtype).to(self.device)

    def _tiled(self, run, tiler, x: torch.Tensor, tile: int, overlap: int, align: int) -> torch.Tensor:
        """``tiler`` (:func:`tiled_decode` / :func:`tiled_encode`) over each image of ``x`` in turn, with a
        progress bar; ``align``: the cells tile starts fall on (pixels per cell for encode)."""
        per_image = len(tile_starts(x.shape[2], tile, overlap, align)) * len(tile_starts(x.shape[3], tile, overlap, align))
        bar = comfy.utils.ProgressBar(x.shape[0] * per_image)

        def step(piece):
            out = run(piece).float()
            bar.update(1)
            return out.to(self.output_device)

        return torch.cat([tiler(step, image, self.downscale_ratio, tile, overlap) for image in x.split(1)])


def _asked(tile_x: int | None, tile_y: int | None) -> int | None:
    """The square tile asked for (the DA tiling is square); ``None`` when nothing was."""
    asked = [t for t in (tile_x, tile_y) if t is not None]
    return min(asked) if asked else None


def is_da_vae(vae) -> bool:
    return isinstance(getattr(vae, "first_stage_model", None), DAFirstStage)
