"""DASD3ModelPatch: an SD3 / SD3.5 MODEL that samples 32-channel DA latents.

Object patches on a clone (paper Sec. 3.2): the ``forward`` of the stock patch embedder P and
output layer O become DA forwards (:mod:`nodes.da_forward`: P' added on the detail channels,
O' concatenated per patch), ``out_channels`` becomes 32 and the latent format the 32-channel
one; sampling wrappers (:mod:`nodes.sampling_wrappers`) keep previews, step caches and
ControlNets on the channels they understand.  P and O stay the model's modules, so LoRA
loaders (before or after this node), low-VRAM loading and quantised weights work on them as on
the stock model.
"""

from __future__ import annotations

import comfy.model_base
import comfy.ops
import torch
from comfy_api.latest import io

from ..davae_core.heads import DAHeads, HeadsConfig
from . import da_files
from .da_forward import DAEmbedForward, DAOutputForward
from .errors import node_error
from .latent_format import DASD3LatentFormat
from .latent_ops import LAYOUT
from .sampling_wrappers import WRAPPERS

NODE = "DA-SD3 Model Patch"
EMBED_KEY = "diffusion_model.x_embedder.proj"
OUTPUT_KEY = "diffusion_model.final_layer.linear"
EMBED_FORWARD_KEY = f"{EMBED_KEY}.forward"
OUTPUT_FORWARD_KEY = f"{OUTPUT_KEY}.forward"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _heads_dtype(model) -> torch.dtype:
    base = model.model
    dtype = base.get_dtype()
    if dtype in _FLOAT_DTYPES:
        return dtype
    return base.manual_cast_dtype if base.manual_cast_dtype in _FLOAT_DTYPES else torch.float32  # fp8 / GGUF weights


def build_heads(model, heads: DAHeads | None, heads_name: str) -> DAHeads:
    """P', O' (and retrained P, O when the file has them) as manual_cast layers matching ``model``."""
    if not isinstance(model.model, comfy.model_base.SD3):
        raise node_error(
            NODE, "model", "an SD3 / SD3.5 model (MMDiT)", f"a {type(model.model).__name__} model",
            "Load SD3.5 Medium (or another SD3 / SD3.5 checkpoint) with 'Load Checkpoint' or 'Load Diffusion Model'.",
        )
    stock = model.get_model_object(EMBED_KEY)
    expected = HeadsConfig(stock.out_channels, stock.kernel_size[0], stock.in_channels, LAYOUT.detail_channels)
    if heads is not None and heads.config != expected:
        raise node_error(
            NODE, "heads", f"heads for this model (hidden {expected.hidden_size}, patch {expected.patch_size}, "
            f"{expected.base_channels}+{expected.detail_channels} channels)",
            f"'{heads_name}' made for hidden {heads.config.hidden_size}, patch {heads.config.patch_size}, "
            f"{heads.config.base_channels}+{heads.config.detail_channels} channels",
            "Pick the heads trained for this checkpoint (SD3.5 Medium: hidden 1536), or 'zero-init'.",
        )
    ops = comfy.ops.manual_cast
    kw = {"device": model.offload_device, "dtype": _heads_dtype(model)}
    da = DAHeads(expected, conv_cls=ops.Conv2d, linear_cls=ops.Linear, **kw)
    if heads is not None:
        if heads.base_embed is not None:
            da.add_base_layers(ops.Conv2d, ops.Linear, **kw)
        da.load_state_dict(heads.state_dict())
    return da.requires_grad_(False)


def patch_sd3_model(model, heads: DAHeads | None = None, heads_name: str = da_files.ZERO_HEADS):
    """A clone of ``model`` that reads and writes DA latents; the input model is unchanged.
    Patching a patched model replaces its heads: the DA forwards are built on the modules, which
    the patch never replaces."""
    da = build_heads(model, heads, heads_name)
    cfg = da.config
    base_model = model.model
    patched = model.clone()
    embed = DAEmbedForward(da.base_embed or model.get_model_object(EMBED_KEY), da.detail_embed, cfg.base_channels, base_model)
    out = DAOutputForward(da.base_out or model.get_model_object(OUTPUT_KEY), da.detail_out, cfg.patch_size, base_model)
    patched.add_object_patch(EMBED_FORWARD_KEY, embed)
    patched.add_object_patch(OUTPUT_FORWARD_KEY, out)
    patched.add_object_patch("diffusion_model.out_channels", cfg.base_channels + cfg.detail_channels)
    patched.add_object_patch("latent_format", DASD3LatentFormat())
    for kind, key, wrapper in WRAPPERS:
        patched.remove_wrappers_with_key(kind, key)
        patched.add_wrapper_with_key(kind, key, wrapper)
    return patched


class DASD3ModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DASD3ModelPatch",
            display_name=NODE,
            category="DA-VAE",
            is_experimental=True,
            description=(
                "Makes an SD3 / SD3.5 model sample 32-channel DA latents: adds the detail heads (a patch "
                "embedder that reads the detail channels and an output layer that writes them; from a heads file, or "
                "zero-initialised), sets 32 output channels and the DA latent "
                "format, and keeps live previews on the base channels. Use it with the DA LoRA (stock LoRA loaders, "
                "before or after this node) and a DA latent: 1024x1024 from 32x32 tokens."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD3 / SD3.5 model: SD3.5 Medium for the DA files this pack's trainers make."),
                io.Combo.Input(
                    "heads",
                    options=[da_files.ZERO_HEADS] + da_files.list_files(da_files.KIND_HEADS),
                    tooltip="DA heads file from models/davae/: the detail heads (and, if the file has them, retrained base heads). 'zero-init' gives "
                    "the stock model on the base channels and zero detail: for checks and training starts.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; sample it with DA latents (32 channels, 16x downscale).")],
        )

    @classmethod
    def execute(cls, model, heads) -> io.NodeOutput:
        loaded = None
        if heads != da_files.ZERO_HEADS:
            import folder_paths

            loaded = da_files.load_heads_file(folder_paths.get_full_path_or_raise(da_files.FOLDER, heads))
        return io.NodeOutput(patch_sd3_model(model, loaded, heads))
