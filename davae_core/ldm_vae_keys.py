"""LDM KL-autoencoder key names <-> diffusers ``AutoencoderKL`` key names.

VA-VAE (and the DA authors' ImageNet tokenizer) store LDM's layout:
``encoder.down.{i}.block.{j}``, ``encoder.down.{i}.attn.{j}``, ``decoder.up.{i}...`` (``up``
counted from the shallowest level), ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``,
``nin_shortcut``, ``norm_out``, and attention projections as 1x1 convolutions.  diffusers'
single-file converter maps the mid-block attention but not attention inside the levels, which
VA-VAE has at its deepest one; this maps every key, both ways, and nothing else.
"""

from __future__ import annotations

import re

import torch

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
_SAME = ("conv_in.", "conv_out.")


def _invert(d: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


def _layer(kind: str, rest: str, to_diffusers: bool) -> str | None:
    """``norm1.weight`` (resnet) or ``q.weight`` (attention) in the other layout."""
    table = {"resnet": _RESNET, "attention": _ATTENTION}[kind]
    table = table if to_diffusers else _invert(table)
    name, _, param = rest.rpartition(".")
    return f"{table[name]}.{param}" if name in table else None


_LDM_LEVEL = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)")
_LDM_RESAMPLE = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)")
_LDM_MID = re.compile(r"(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.+)")
_DIF_LEVEL = re.compile(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_DIF_RESAMPLE = re.compile(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(weight|bias)")
_DIF_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets\.0|attentions\.0|resnets\.1)\.(.+)")


def _rename_unnested(key: str, to_diffusers: bool) -> str | None:
    """Keys outside the levels and the mid block: the KL convs, ``conv_in``/``conv_out``, the last norm."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    trunk, _, rest = key.partition(".")
    if trunk in ("encoder", "decoder"):
        if rest.startswith(_SAME):
            return key
        old, new = ("norm_out.", "conv_norm_out.") if to_diffusers else ("conv_norm_out.", "norm_out.")
        if rest.startswith(old):
            return f"{trunk}.{new}{rest[len(old):]}"
    return None


def ldm_key_to_diffusers(key: str, levels: int) -> str | None:
    """One LDM autoencoder key in diffusers' naming (``levels`` = number of resolution levels), or None."""
    if (renamed := _rename_unnested(key, True)) is not None:
        return renamed
    if m := _LDM_LEVEL.fullmatch(key):
        where, level, kind, j, tail = m.groups()
        level = int(level) if where == "encoder.down" else levels - 1 - int(level)
        block = "down_blocks" if where == "encoder.down" else "up_blocks"
        part, layer = ("resnets", _layer("resnet", tail, True)) if kind == "block" else ("attentions", _layer("attention", tail, True))
        return f"{where.split('.')[0]}.{block}.{level}.{part}.{j}.{layer}" if layer else None
    if m := _LDM_RESAMPLE.fullmatch(key):
        where, level, kind, param = m.groups()
        level = int(level) if where == "encoder.down" else levels - 1 - int(level)
        block = "down_blocks" if where == "encoder.down" else "up_blocks"
        return f"{where.split('.')[0]}.{block}.{level}.{kind}rs.0.conv.{param}"
    if m := _LDM_MID.fullmatch(key):
        trunk, part, tail = m.groups()
        layer = _layer("attention" if part == "attn_1" else "resnet", tail, True)
        return f"{trunk}.mid_block.{_MID[part]}.{layer}" if layer else None
    return None


def diffusers_key_to_ldm(key: str, levels: int) -> str | None:
    """Inverse of :func:`ldm_key_to_diffusers`."""
    if (renamed := _rename_unnested(key, False)) is not None:
        return renamed
    if m := _DIF_LEVEL.fullmatch(key):
        where, level, part, j, tail = m.groups()
        down = where == "encoder.down_blocks"
        level = int(level) if down else levels - 1 - int(level)
        kind, layer = ("block", _layer("resnet", tail, False)) if part == "resnets" else ("attn", _layer("attention", tail, False))
        return f"{'encoder.down' if down else 'decoder.up'}.{level}.{kind}.{j}.{layer}" if layer else None
    if m := _DIF_RESAMPLE.fullmatch(key):
        where, level, kind, param = m.groups()
        down = where == "encoder.down_blocks"
        level = int(level) if down else levels - 1 - int(level)
        return f"{'encoder.down' if down else 'decoder.up'}.{level}.{kind[:-2]}.conv.{param}"
    if m := _DIF_MID.fullmatch(key):
        trunk, part, tail = m.groups()
        layer = _layer("attention" if part == "attentions.0" else "resnet", tail, False)
        return f"{trunk}.mid.{_invert(_MID)[part]}.{layer}" if layer else None
    return None


def _is_attention_projection(diffusers_key: str) -> bool:
    return ".attentions." in diffusers_key and any(f".{p}.weight" in diffusers_key for p in ("to_q", "to_k", "to_v", "to_out.0"))


def ldm_to_diffusers(state: dict[str, torch.Tensor], levels: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An LDM autoencoder state dict in diffusers' naming, plus the keys that map to nothing.

    Attention projections go from 1x1 convolutions ``(c, c, 1, 1)`` to linears ``(c, c)``.
    """
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        new = ldm_key_to_diffusers(key, levels)
        if new is None:
            unmapped.append(key)
            continue
        if _is_attention_projection(new) and value.ndim == 4:
            value = value.flatten(1)
        out[new] = value
    return out, unmapped


def diffusers_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in LDM's naming (attention projections as 1x1 convs)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = diffusers_key_to_ldm(key, levels)
        if new is None:
            raise KeyError(f"{key!r} is not a diffusers AutoencoderKL key this map knows")
        out[new] = value[:, :, None, None] if _is_attention_projection(key) and value.ndim == 2 else value
    return out
