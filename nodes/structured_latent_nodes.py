"""Empty / Encode / Decode for 32-channel DA latents, with tiling for large images."""

from __future__ import annotations

import comfy.model_management as mm
import torch
import nodes as comfy_nodes
from comfy_api.latest import io

from .errors import node_error
from .latent_ops import LAYOUT, check_da_latent, empty_structured_latent
from .vae_adapter import is_da_vae

F = LAYOUT.factor


def check_da_vae(node: str, vae) -> None:
    if not is_da_vae(vae):
        channels = getattr(vae, "latent_channels", "?")
        raise node_error(
            node, "vae", "a DA-VAE (from 'DA-VAE Loader')", f"a VAE with {channels} latent channels",
            "Load the DA-VAE file with 'DA-VAE Loader' and connect its VAE; the stock SD3 VAE decodes only the base "
            "channels (take them with 'DA Base Latent').",
        )


def _tile_inputs():
    return [
        io.Int.Input(
            "tile_size", default=0, min=0, max=8192, step=F * 4,
            tooltip="Tile edge in pixels; 0 = no tiling. For 2048x2048 and beyond on small GPUs (8 GB), start with 1024 and overlap 128.",
        ),
        io.Int.Input("overlap", default=128, min=0, max=1024, step=F, tooltip="Tile overlap in pixels (blended)."),
    ]


def _check_tiles(node: str, tile_size: int, overlap: int) -> None:
    if tile_size and (tile_size < 4 * F or overlap * 2 >= tile_size or tile_size % F or overlap % F):
        raise node_error(
            node, "tile_size/overlap", f"tile_size 0 or a multiple of {F} from {4 * F}, overlap a multiple of {F} below half the tile",
            f"tile_size {tile_size}, overlap {overlap}", "Use e.g. tile_size 1024, overlap 128.",
        )


class DAEmptyStructuredLatent(io.ComfyNode):
    NODE = "Empty Structured Latent"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAEmptyStructuredLatent",
            display_name=cls.NODE,
            category="DA-VAE",
            is_experimental=True,
            description="An empty DA latent (B, 32, H/16, W/16) for a DA-patched SD3 model: 1024x1024 -> 64x64 cells, "
            "32x32 tokens. Sample it only with a model that went through 'DA-SD3 Model Patch'.",
            inputs=[
                io.Int.Input("width", default=1024, min=F, max=comfy_nodes.MAX_RESOLUTION, step=F, tooltip="Image width in pixels, a multiple of 16."),
                io.Int.Input("height", default=1024, min=F, max=comfy_nodes.MAX_RESOLUTION, step=F, tooltip="Image height in pixels, a multiple of 16."),
                io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="Images per batch."),
            ],
            outputs=[io.Latent.Output(tooltip="Zero DA latent: 16 base + 16 detail channels at 16x downscale.")],
        )

    # A sampler keeps the latent, the noise, x and the denoised estimate alive at once, all of the
    # latent's shape and (at least) fp32 on the intermediate device: refuse what cannot hold even that.
    SAMPLING_COPIES = 4

    @classmethod
    def check_fits(cls, width: int, height: int, batch_size: int) -> None:
        device = mm.intermediate_device()
        latent_bytes = batch_size * LAYOUT.channels * (height // F) * (width // F) * 4
        needed, free = cls.SAMPLING_COPIES * latent_bytes, mm.get_free_memory(device)
        if needed > free:
            gib = 1024**3
            raise node_error(
                cls.NODE, "width/height/batch_size", f"a latent whose sampling fits in free memory ({free / gib:.1f} GiB free on {device})",
                f"{batch_size} x {width}x{height}: {latent_bytes / gib:.1f} GiB per latent, about {needed / gib:.1f} GiB to "
                f"sample ({cls.SAMPLING_COPIES} latent-sized fp32 tensors, before the model's own activations)",
                "Lower batch_size or the size (DA latents are 16x smaller per side than the image), or run batches in turn.",
            )

    @classmethod
    def execute(cls, width, height, batch_size=1) -> io.NodeOutput:
        cls.check_fits(width, height, batch_size)
        latent = empty_structured_latent(cls.NODE, width, height, batch_size, device=mm.intermediate_device())
        return io.NodeOutput({"samples": latent})


class DAStructuredLatentEncode(io.ComfyNode):
    NODE = "Structured Latent Encode"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAStructuredLatentEncode",
            display_name=cls.NODE,
            category="DA-VAE",
            is_experimental=True,
            description="Encodes an image with the DA-VAE into a DA latent (image-to-image, refinement). Width and height "
            "must be multiples of 16; set tile_size for large images on small GPUs.",
            inputs=[
                io.Image.Input("pixels", tooltip="Image to encode; width and height multiples of 16."),
                io.Vae.Input("vae", tooltip="The DA-VAE from 'DA-VAE Loader'."),
                *_tile_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="DA latent (B, 32, H/16, W/16).")],
        )

    @classmethod
    def execute(cls, pixels, vae, tile_size=0, overlap=128) -> io.NodeOutput:
        check_da_vae(cls.NODE, vae)
        _check_tiles(cls.NODE, tile_size, overlap)
        height, width = pixels.shape[1], pixels.shape[2]
        if height % F or width % F:
            raise node_error(
                cls.NODE, "pixels", f"an image whose sides are multiples of {F}", f"{width}x{height}",
                f"Scale or crop it first (e.g. 'Upscale Image' to {width // F * F or F}x{height // F * F or F}).",
            )
        if pixels.shape[-1] < 3:
            raise node_error(
                cls.NODE, "pixels", "an RGB image (3 channels; RGBA drops alpha)", f"an image with {pixels.shape[-1]} channel(s)",
                "Convert it to RGB first (e.g. load it with 'Load Image', which gives RGB, or repeat the grey channel).",
            )
        pixels = pixels[..., :3]
        if tile_size:
            samples = vae.encode_tiled(pixels, tile_x=tile_size, tile_y=tile_size, overlap=overlap)
        else:
            samples = vae.encode(pixels)
        return io.NodeOutput({"samples": samples})


class DAStructuredLatentDecode(io.ComfyNode):
    NODE = "Structured Latent Decode"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAStructuredLatentDecode",
            display_name=cls.NODE,
            category="DA-VAE",
            is_experimental=True,
            description="Decodes a DA latent with the DA-VAE into the full-resolution image (64x64 cells -> 1024x1024). "
            "Set tile_size for 2048 and beyond on small GPUs.",
            inputs=[
                io.Latent.Input("samples", tooltip="DA latent (32 channels) from a DA-patched sampler or the DA encode."),
                io.Vae.Input("vae", tooltip="The DA-VAE from 'DA-VAE Loader'."),
                *_tile_inputs(),
            ],
            outputs=[io.Image.Output(tooltip="Decoded image, 16x the latent grid.")],
        )

    @classmethod
    def execute(cls, samples, vae, tile_size=0, overlap=128) -> io.NodeOutput:
        latent = samples["samples"]
        check_da_latent(cls.NODE, "samples", latent)
        check_da_vae(cls.NODE, vae)
        _check_tiles(cls.NODE, tile_size, overlap)
        if not bool(torch.isfinite(latent).all()):
            raise node_error(
                cls.NODE, "samples", "a finite DA latent", f"{int((~torch.isfinite(latent)).sum())} NaN/Inf values",
                "The sampler that made it diverged (often fp16 overflow): sample in bf16/fp32, lower cfg, or check the "
                "model patch's heads file; decoding it would give a black image.",
            )
        if tile_size:
            images = vae.decode_tiled(latent, tile_x=tile_size // F, tile_y=tile_size // F, overlap=overlap // F)
        else:
            images = vae.decode(latent)
        return io.NodeOutput(images)
