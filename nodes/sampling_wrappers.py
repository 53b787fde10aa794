"""Sampling wrappers of a DA-patched model: what ComfyUI's samplers and the nodes around them
need to see of a 32-channel latent.

Registered with keys by :func:`nodes.sd3_model_patch.patch_sd3_model`, so patching twice replaces them.
"""

from __future__ import annotations

import comfy.patcher_extension
import torch

from .errors import node_error
from .latent_ops import LAYOUT


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


def size_step_caches(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: ComfyUI 0.8.0's EasyCache and LazyCache slice the model input to the
    channel count their node read from ``model.model.latent_format`` when it ran: the shared base
    model's 16, since the DA format is an object patch applied only while sampling.  Their holder
    (a copy per clone of the model) is set to the DA latent's channels.  0.3.64's caches take the
    whole input and have no such field."""
    holder = executor.class_obj.model_options.get("transformer_options", {}).get("easycache")
    if getattr(holder, "output_channels", None) is not None:
        holder.output_channels = LAYOUT.channels
    return executor(*args, **kwargs)


class _BaseChannelControl:
    """A ControlNet chain fed the base channels of the DA latent: the SD3 latent of the half-size
    image, on the same grid, so the hint (encoded by the SD3 VAE at 8x the grid) is the half-size
    image and the control residuals land on the DA model's tokens."""

    def __init__(self, control):
        link = control
        while link is not None:
            vae = getattr(link, "vae", None)
            if vae is not None and getattr(vae, "latent_channels", LAYOUT.base_channels) != LAYOUT.base_channels:
                raise node_error(
                    "Apply ControlNet (on a DA-patched model)", "vae", "the stock SD3 / SD3.5 VAE",
                    f"a VAE with {vae.latent_channels} latent channels (the DA-VAE)",
                    "SD3 ControlNets read the base channels of the DA latent, the SD3 latent of the half-size image: "
                    "connect the checkpoint's SD3 VAE to the ControlNet node's vae input (the hint is encoded at half size).",
                )
            link = getattr(link, "previous_controlnet", None)
        self.control = control

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        return self.control.get_control(x_noisy[:, : LAYOUT.base_channels], t, cond, batched_number, transformer_options)


def controlnets_on_base_channels(executor, model, conds, *args, **kwargs):
    """CALC_COND_BATCH wrapper: the conds' ControlNets get the base channels (see _BaseChannelControl).
    One stand-in per chain, so the conds that share a chain still batch together."""
    stand_ins: dict[int, _BaseChannelControl] = {}

    def on_base(cond: dict) -> dict:
        control = cond.get("control")
        if control is None:
            return cond
        if id(control) not in stand_ins:
            stand_ins[id(control)] = _BaseChannelControl(control)
        return {**cond, "control": stand_ins[id(control)]}

    conds = [group if group is None else [on_base(c) for c in group] for group in conds]
    return executor(model, conds, *args, **kwargs)


WRAPPERS = (
    (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "davae_base_channel_preview", preview_base_channels),
    (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "davae_finite_latents", refuse_non_finite),
    (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "davae_step_cache_channels", size_step_caches),
    (comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "davae_controlnet_base_channels", controlnets_on_base_channels),
)
