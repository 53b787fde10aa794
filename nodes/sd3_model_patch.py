"""DASD3ModelPatch: an SD3 / SD3.5 MODEL that samples 32-channel DA latents.

Object patches on a clone (paper Sec. 3.2): the stock patch embedder P gets P' added on the
detail channels, the stock output layer O gets O' concatenated per patch, ``out_channels``
becomes 32 and the latent format the 32-channel one.  P' and O' are ``comfy.ops.manual_cast``
layers, so ComfyUI moves and casts them with the rest of the model under offloading.  The
stock blocks are untouched, so LoRA loaders compose before or after this node.
"""

from __future__ import annotations

import comfy.model_base
import comfy.ops
import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..davae_core.heads import DAHeads, FusedOutputLayer, FusedPatchEmbed, HeadsConfig
from . import da_files
from .errors import node_error
from .latent_format import DASD3LatentFormat
from .latent_ops import LAYOUT

NODE = "DA-SD3 Model Patch"
EMBED_KEY = "diffusion_model.x_embedder.proj"
OUTPUT_KEY = "diffusion_model.final_layer.linear"
PREVIEW_KEY = "davae_base_channel_preview"
FINITE_KEY = "davae_finite_latents"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _original(module):
    """The model's own layer behind a DA wrapper (so patching twice replaces, never stacks)."""
    return getattr(module, "davae_original", module)


def _tag(wrapper, original):
    object.__setattr__(wrapper, "davae_original", original)  # not a submodule: the model already owns it
    return wrapper


def _heads_dtype(model) -> torch.dtype:
    base = model.model
    dtype = base.get_dtype()
    if dtype in _FLOAT_DTYPES:
        return dtype
    return base.manual_cast_dtype if base.manual_cast_dtype in _FLOAT_DTYPES else torch.float32  # fp8 weights


def build_heads(model, heads: DAHeads | None, heads_name: str) -> DAHeads:
    """P', O' (and retrained P, O when the file has them) as manual_cast layers matching ``model``."""
    if not isinstance(model.model, comfy.model_base.SD3):
        raise node_error(
            NODE, "model", "an SD3 / SD3.5 model (MMDiT)", f"a {type(model.model).__name__} model",
            "Load SD3.5 Medium (or another SD3 / SD3.5 checkpoint) with 'Load Checkpoint' or 'Load Diffusion Model'.",
        )
    stock = _original(model.get_model_object(EMBED_KEY))
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


def _base_only_callback(callback):
    """Previewers know SD3's 16 channels: show them the base channels, keep the full x0 for outputs."""
    code, closure = getattr(callback, "__code__", None), getattr(callback, "__closure__", None) or ()
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in closure))) if code is not None else {}
    x0_output = cells.get("x0_output_dict")  # latent_preview.prepare_callback's dict for 'denoised_output'

    def callback_wrapper(step, x0, x, total_steps):
        callback(step, x0[:, : LAYOUT.base_channels], x[:, : LAYOUT.base_channels], total_steps)
        if isinstance(x0_output, dict):
            x0_output["x0"] = x0

    return callback_wrapper


def preview_base_channels(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: the sampling callback (the live preview) sees the base channels only."""
    if "callback" in kwargs and kwargs["callback"] is not None:
        kwargs["callback"] = _base_only_callback(kwargs["callback"])
    elif len(args) > 5 and args[5] is not None:  # outer_sample(noise, latent, sampler, sigmas, mask, callback, ...)
        args = (*args[:5], _base_only_callback(args[5]), *args[6:])
    return executor(*args, **kwargs)


def _non_finite(t) -> int:
    return int((~torch.isfinite(t)).sum()) if isinstance(t, torch.Tensor) and t.is_floating_point() else 0


def refuse_non_finite(executor, noise, latent_image, *args, **kwargs):
    """OUTER_SAMPLE wrapper: NaN/Inf in the latent fed to the patched model, or made by it, is an
    error naming where it came from (one check before and one after sampling: no per-step sync)."""
    for name, t, origin in (
        ("latent_image", latent_image, "the node that made the latent (a decode/encode or latent op upstream)"),
        ("noise", noise, "the noise source (a custom noise node)"),
    ):
        if bad := _non_finite(t):
            raise node_error(
                "DA-SD3 sampling", name, "finite before it reaches the DA-patched model",
                f"{bad} NaN/Inf values of {t.numel()}", f"They came from {origin}; fix or replace that input.",
            )
    out = executor(noise, latent_image, *args, **kwargs)
    if bad := _non_finite(out):
        raise node_error(
            "DA-SD3 sampling", "model", "a model whose samples stay finite",
            f"{bad} NaN/Inf values of {out.numel()} in the sampled latent (the inputs were finite, so the DA-patched "
            "model produced them)",
            "Usually fp16 overflow: load the model in bf16 or fp32, lower cfg, or check the heads file / LoRA strength.",
        )
    return out


def patch_sd3_model(model, heads: DAHeads | None = None, heads_name: str = da_files.ZERO_HEADS):
    """A clone of ``model`` that reads and writes DA latents; the input model is unchanged."""
    da = build_heads(model, heads, heads_name)
    cfg = da.config
    embed = _original(model.get_model_object(EMBED_KEY))
    out = _original(model.get_model_object(OUTPUT_KEY))
    patched = model.clone()
    # fused: P+P' one conv over 32 channels, O+O' one linear in per-patch order (built on first use
    # for the weights as loaded; fp8 weights or low-VRAM weight functions run the unfused sum)
    new_embed = FusedPatchEmbed(da.base_embed or embed, da.detail_embed, cfg.base_channels)
    new_out = FusedOutputLayer(da.base_out or out, da.detail_out, cfg.patch_size, cfg.base_channels, cfg.detail_channels)
    patched.add_object_patch(EMBED_KEY, _tag(new_embed, embed))
    patched.add_object_patch(OUTPUT_KEY, _tag(new_out, out))
    patched.add_object_patch("diffusion_model.out_channels", cfg.base_channels + cfg.detail_channels)
    patched.add_object_patch("latent_format", DASD3LatentFormat())
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    patched.remove_wrappers_with_key(outer, PREVIEW_KEY)
    patched.add_wrapper_with_key(outer, PREVIEW_KEY, preview_base_channels)
    patched.remove_wrappers_with_key(outer, FINITE_KEY)
    patched.add_wrapper_with_key(outer, FINITE_KEY, refuse_non_finite)
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
