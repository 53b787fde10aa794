"""The state-dict shapes of a :class:`~davae_core.davae_model.DAVAE`, from its config alone.

File checks need the shapes a config implies before anything is built, and inside ComfyUI
without diffusers.  These are the shapes of diffusers' ``AutoencoderKL`` encoder and decoder
(ResNet blocks, one-head attention in the mid block and in ``Attn*`` blocks, stride-2 down / nearest up convolutions) plus
the DA-VAE's own layers; tests compare them with a ``meta``-device build of the real model.
"""

from __future__ import annotations

from typing import Any

Shapes = dict[str, tuple[int, ...]]


def _conv(out: Shapes, name: str, cin: int, cout: int, k: int) -> None:
    out[f"{name}.weight"] = (cout, cin, k, k)
    out[f"{name}.bias"] = (cout,)


def _norm(out: Shapes, name: str, channels: int) -> None:
    out[f"{name}.weight"] = (channels,)
    out[f"{name}.bias"] = (channels,)


def _resnet(out: Shapes, name: str, cin: int, cout: int) -> None:
    _norm(out, f"{name}.norm1", cin)
    _conv(out, f"{name}.conv1", cin, cout, 3)
    _norm(out, f"{name}.norm2", cout)
    _conv(out, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(out, f"{name}.conv_shortcut", cin, cout, 1)


def _attention(out: Shapes, name: str, channels: int) -> None:
    """diffusers' one-head spatial self-attention (group norm, q/k/v/out as linears)."""
    _norm(out, f"{name}.group_norm", channels)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        out[f"{name}.{proj}.weight"] = (channels, channels)
        out[f"{name}.{proj}.bias"] = (channels,)


def _mid_block(out: Shapes, name: str, channels: int, attention: bool) -> None:
    _resnet(out, f"{name}.resnets.0", channels, channels)
    if attention:
        _attention(out, f"{name}.attentions.0", channels)
    _resnet(out, f"{name}.resnets.1", channels, channels)


def _with_attention(block_type: str) -> bool:
    """``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D`` (VA-VAE's deepest level) attend after each ResNet."""
    return block_type.startswith("Attn")


def encoder_shapes(vae: dict[str, Any], prefix: str, with_conv_out: bool) -> Shapes:
    widths, layers = vae["block_out_channels"], vae.get("layers_per_block", 1)
    out: Shapes = {}
    _conv(out, f"{prefix}conv_in", vae.get("in_channels", 3), widths[0], 3)
    cin = widths[0]
    types = vae.get("down_block_types", ["DownEncoderBlock2D"] * len(widths))
    for i, width in enumerate(widths):
        for j in range(layers):
            _resnet(out, f"{prefix}down_blocks.{i}.resnets.{j}", cin if j == 0 else width, width)
            if _with_attention(types[i]):
                _attention(out, f"{prefix}down_blocks.{i}.attentions.{j}", width)
        if i < len(widths) - 1:
            _conv(out, f"{prefix}down_blocks.{i}.downsamplers.0.conv", width, width, 3)
        cin = width
    _mid_block(out, f"{prefix}mid_block", widths[-1], vae.get("mid_block_add_attention", True))
    _norm(out, f"{prefix}conv_norm_out", widths[-1])
    if with_conv_out:
        _conv(out, f"{prefix}conv_out", widths[-1], 2 * vae.get("latent_channels", 4), 3)
    return out


def decoder_trunk_shapes(vae: dict[str, Any], prefix: str) -> Shapes:
    """The decoder without its ``conv_in`` (the DA-VAE's JointUpsample feeds the mid block)."""
    widths, layers = vae["block_out_channels"], vae.get("layers_per_block", 1)
    out: Shapes = {}
    _mid_block(out, f"{prefix}mid_block", widths[-1], vae.get("mid_block_add_attention", True))
    cin = widths[-1]
    types = vae.get("up_block_types", ["UpDecoderBlock2D"] * len(widths))
    for i, width in enumerate(reversed(widths)):
        for j in range(layers + 1):
            _resnet(out, f"{prefix}up_blocks.{i}.resnets.{j}", cin if j == 0 else width, width)
            if _with_attention(types[i]):
                _attention(out, f"{prefix}up_blocks.{i}.attentions.{j}", width)
        if i < len(widths) - 1:
            _conv(out, f"{prefix}up_blocks.{i}.upsamplers.0.conv", width, width, 3)
        cin = width
    _norm(out, f"{prefix}conv_norm_out", widths[0])
    _conv(out, f"{prefix}conv_out", widths[0], vae.get("out_channels", 3), 3)
    return out


def davae_state_shapes(config: dict[str, Any], with_base_encoder: bool) -> Shapes:
    """``{name: shape}`` of ``DAVAE(DAVAEConfig.from_dict(config), with_base_encoder).state_dict()``."""
    vae = config["base_vae"]
    base, detail = vae.get("latent_channels", 4), config.get("detail_channels", 16)
    features = vae["block_out_channels"][-1]
    out: Shapes = {}
    if with_base_encoder:
        out.update(encoder_shapes(vae, "base_encoder.", with_conv_out=True))
        if vae.get("use_quant_conv", True):
            _conv(out, "base_quant_conv", 2 * base, 2 * base, 1)
    out.update(encoder_shapes(vae, "detail_trunk.", with_conv_out=False))
    _conv(out, "detail_down.conv", features, 2 * detail // 4, 3)
    if (4 * features) % (2 * detail):  # no grouped mean fits: the learnable shortcut of DetailDownsample
        out["detail_down.shortcut_proj.weight"] = (2 * detail, 4 * features, 1, 1)
    _conv(out, "decoder_up.conv", base + detail, 4 * features, 3)
    out.update(decoder_trunk_shapes(vae, "decoder_trunk."))
    out["normalizer.detail_mean"] = (detail,)
    out["normalizer.detail_std"] = (detail,)
    return out
