"""DAVAELoader: a DA-VAE file from models/davae/ as a VAE the stock VAE nodes accept."""

from __future__ import annotations

import folder_paths
import torch
from comfy_api.latest import io

from . import da_files
from .comfy_davae import build_comfy_davae, holds_base_encoder, stock_base_encoder
from .errors import node_error
from .vae_adapter import DAComfyVAE, is_da_vae

NODE = "DA-VAE Loader"
DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16}  # no fp16: the DA-VAE overflows in it


def check_base_vae(vae) -> None:
    """The optional VAE must be a stock SD3 VAE (16 channels, f8) to make the base channels."""
    if is_da_vae(vae):
        raise node_error(
            NODE, "vae", "the stock SD3 / SD3.5 VAE", "a DA-VAE",
            "Connect the VAE output of the SD3.5 'Load Checkpoint' (or 'Load VAE' with the SD3 VAE).",
        )
    channels, ratio = getattr(vae, "latent_channels", None), getattr(vae, "downscale_ratio", None)
    if channels != 16 or ratio != 8:
        raise node_error(
            NODE, "vae", "the stock SD3 / SD3.5 VAE (16 latent channels, f8)", f"a VAE with {channels} channels at f{ratio}",
            "Connect the VAE of an SD3 / SD3.5 checkpoint.",
        )


def load_da_vae(path: str, base_vae=None, dtype: torch.dtype | None = None) -> DAComfyVAE:
    """The DA-VAE file at ``path`` as a ComfyUI VAE; ``base_vae`` (the stock SD3 VAE) gives the base
    encoder of a file saved without one, and is ignored otherwise (the file's own frozen copy is used)."""
    if dtype is not None and dtype not in DTYPES.values():
        raise node_error(
            NODE, "dtype", "fp32 or bf16 (or default)", "fp16" if dtype == torch.float16 else str(dtype),
            "The DA-VAE overflows in fp16 (black or NaN images): use bf16 on cards that have it, else fp32.",
        )
    config, state = da_files.tokenizer_state(path)
    base_encoder = None
    if not holds_base_encoder(state):
        if base_vae is None or getattr(base_vae, "first_stage_model", 1) is None:
            raise node_error(
                NODE, "vae", "the stock SD3 VAE, because this DA-VAE file holds no base encoder",
                "nothing" if base_vae is None else "a checkpoint VAE slot that holds no VAE",
                "Connect the VAE output of the SD3.5 'Load Checkpoint' (or 'Load VAE' with the SD3 VAE) to the "
                "loader's 'vae' input, or use a DA-VAE file saved with its base encoder.",
            )
        check_base_vae(base_vae)
        base_encoder = stock_base_encoder(base_vae.first_stage_model)
    return DAComfyVAE(build_comfy_davae(config, state, path, base_encoder), dtype)


class DAVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAVAELoader",
            display_name=NODE,
            category="DA-VAE",
            is_experimental=True,
            description=(
                "Loads a DA-VAE from models/davae/ (our .safetensors format, or the authors' checkpoint through the "
                "importer). The VAE it outputs works with the stock VAE Encode / Decode nodes and their tiled versions: "
                "32-channel structured latents at 16x downscale (1024x1024 -> 64x64), base channels = the SD3 VAE latent of the "
                "half-resolution image."
            ),
            inputs=[
                io.Combo.Input(
                    "davae_name", options=da_files.list_files(da_files.KIND_DAVAE),
                    tooltip="DA-VAE file in models/davae/ (or a path added as 'davae' in extra_model_paths.yaml).",
                ),
                io.Combo.Input(
                    "dtype", options=list(DTYPES), default="default",
                    tooltip="Weight dtype; 'default' lets ComfyUI choose as for the SD3 VAE (bf16 on recent GPUs, else fp32). "
                    "No fp16: the DA-VAE overflows in it (and ignores --fp16-vae).",
                ),
                io.Vae.Input(
                    "vae", optional=True,
                    tooltip="The stock SD3 VAE (the checkpoint's). Only needed when the DA-VAE file holds no base encoder: "
                    "it then encodes the base channels from the 2x bicubic-downsampled image.",
                ),
            ],
            outputs=[io.Vae.Output(tooltip="DA-VAE: encodes images to 32-channel DA latents and decodes them back.")],
        )

    @classmethod
    def execute(cls, davae_name, dtype="default", vae=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(da_files.FOLDER, davae_name)
        return io.NodeOutput(load_da_vae(path, vae, DTYPES[dtype]))
