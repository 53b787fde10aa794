"""The DA-VAE built from ComfyUI's own autoencoder trunks, for use inside ComfyUI.

Encoder and decoder trunks are ``comfy.ldm.modules.diffusionmodules.model`` ``Encoder`` /
``Decoder`` (ComfyUI's attention backends, ``comfy.ops`` layers); the DA blocks and their
wiring are :mod:`davae_core.da_wiring`'s, with ``comfy.ops`` convs.  Our files store diffusers-layout trunk
keys; they are mapped to ComfyUI's layout at load time with ComfyUI's own VAE key converter.
Nothing here imports diffusers, peft or accelerate.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

import comfy.diffusers_convert
import comfy.ldm.modules.diffusionmodules.model as ldm_vae
import comfy.ops
import torch
from torch import nn

from ..davae_core.checkpoint import CheckpointError, check_state_dict
from ..davae_core.da_wiring import DAWiring
from ..davae_core.davae_config import DAVAEConfig

OPS = comfy.ops.disable_weight_init  # what comfy.sd.VAE builds its models from; ComfyUI casts the whole model
_LDM_GROUPS = 32  # ComfyUI's trunks hard-code 32 GroupNorm groups (the SD3 VAE's value)
_TRUNKS = {"base_encoder.": "encoder.", "detail_trunk.": "encoder.", "decoder_trunk.": "decoder."}
_BASE_PREFIXES = ("base_encoder.", "base_quant_conv.")
_build_lock = threading.Lock()


@contextmanager
def norm_groups(groups: int):
    """Build trunks with ``groups`` GroupNorm groups (narrow test/demo VAEs use fewer than 32).

    ComfyUI's ``Normalize`` reads the module's ``ops`` at call time, so a subclass of the same
    ops whose GroupNorm takes our group count is swapped in while the trunk is built.
    """
    if groups == _LDM_GROUPS:
        yield
        return
    base = ldm_vae.ops

    class GroupNorm(base.GroupNorm):
        def __init__(self, num_groups, num_channels, *args, **kwargs):
            super().__init__(groups, num_channels, *args, **kwargs)

    with _build_lock:
        ldm_vae.ops = type("DAGroupNormOps", (base,), {"GroupNorm": GroupNorm})
        try:
            yield
        finally:
            ldm_vae.ops = base


def trunk_kwargs(vae: dict[str, Any], source: str) -> dict[str, Any]:
    """ComfyUI's trunk arguments for a diffusers AutoencoderKL config (the base VAE of our files)."""
    widths = list(vae["block_out_channels"])
    ch = widths[0]
    plain = all(t == "DownEncoderBlock2D" for t in vae["down_block_types"]) and all(
        t == "UpDecoderBlock2D" for t in vae["up_block_types"]
    )
    if not plain or vae.get("act_fn", "silu") != "silu" or any(w % ch for w in widths):
        raise CheckpointError(
            f"{source}: its base VAE ({vae['down_block_types']}, widths {widths}, act {vae.get('act_fn')}) is not a "
            "plain AutoencoderKL that ComfyUI's VAE trunks can build; only SD3-style VAEs are supported"
        )
    return {
        "ch": ch, "out_ch": vae["out_channels"], "ch_mult": [w // ch for w in widths],
        "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0,
        "in_channels": vae["in_channels"], "resolution": 256, "z_channels": vae["latent_channels"], "double_z": True,
    }


def build_trunk(kind: str, vae: dict[str, Any], source: str = "DA-VAE") -> nn.Module:
    """ComfyUI ``Encoder`` or ``Decoder`` shaped like the diffusers trunk of ``vae``."""
    cls = {"encoder": ldm_vae.Encoder, "decoder": ldm_vae.Decoder}[kind]
    with norm_groups(int(vae.get("norm_num_groups", _LDM_GROUPS))):
        trunk = cls(**trunk_kwargs(vae, source))
    if not vae.get("mid_block_add_attention", True):
        trunk.mid.attn_1 = nn.Identity()
    return trunk


def comfy_trunk_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our file's keys (diffusers-layout trunks) -> the ComfyUI-built model's keys."""
    out: dict[str, torch.Tensor] = {}
    per_trunk: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in _TRUNKS}
    for key, value in state.items():
        prefix = next((p for p in _TRUNKS if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
        else:
            per_trunk[prefix][_TRUNKS[prefix] + key[len(prefix):]] = value
    for prefix, tensors in per_trunk.items():
        if tensors:
            role = _TRUNKS[prefix]
            converted = comfy.diffusers_convert.convert_vae_state_dict(tensors)
            out.update({prefix + k[len(role):]: v for k, v in converted.items()})
    return out


class ComfyDAVAE(DAWiring):
    """The DA-VAE with ComfyUI's trunks; the wiring (encode/decode) is :class:`DAWiring`'s.

    Module and parameter names outside the trunks are those of :class:`davae_core.davae_model.DAVAE`.
    """

    def __init__(self, config: DAVAEConfig, with_base_encoder: bool = True, source: str = "DA-VAE"):
        super().__init__()
        vae = config.base_vae
        base_encoder = base_quant_conv = None
        if with_base_encoder:
            base_encoder = build_trunk("encoder", vae, source)
            if vae.get("use_quant_conv", True):
                moments = 2 * vae["latent_channels"]
                base_quant_conv = OPS.Conv2d(moments, moments, 1)
        detail_trunk, decoder_trunk = build_trunk("encoder", vae, source), build_trunk("decoder", vae, source)
        self.attach(config, detail_trunk, decoder_trunk, base_encoder, base_quant_conv, conv_cls=OPS.Conv2d)


def holds_base_encoder(state: dict[str, torch.Tensor]) -> bool:
    """Whether a DA-VAE file's tensors include its frozen copy of the SD3 encoder."""
    return any(k.startswith("base_encoder.") for k in state)


def stock_base_encoder(first_stage: nn.Module) -> dict[str, torch.Tensor]:
    """A stock ComfyUI VAE model's encoder (+ quant conv) under the DA-VAE's base-encoder keys.

    Both sides are ComfyUI-built trunks, so only the prefixes change.  The DA-VAE takes its own
    copy: it then encodes the base channels under its own patcher, on its own device and dtype,
    and never asks ComfyUI to load the stock VAE in the middle of a DA encode.
    """
    rename = dict(zip(("encoder.", "quant_conv."), _BASE_PREFIXES))
    return {
        new + key[len(old):]: value
        for key, value in first_stage.state_dict().items()
        for old, new in rename.items()
        if key.startswith(old)
    }


def build_comfy_davae(
    config: DAVAEConfig, state: dict[str, torch.Tensor], source: str = "DA-VAE", base_encoder: dict[str, torch.Tensor] | None = None,
) -> ComfyDAVAE:
    """A :class:`ComfyDAVAE` holding ``state`` (our file's keys); refuses tensors that do not fit.

    ``base_encoder`` (from :func:`stock_base_encoder`) supplies the base encoder of a file saved without it.
    """
    try:
        model = ComfyDAVAE(config, with_base_encoder=base_encoder is not None or holds_base_encoder(state), source=source)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: its architecture config cannot be built ({e})") from e
    mapped = comfy_trunk_keys(state)
    if base_encoder is not None:
        _check_stock_encoder_fits(model, base_encoder, source)
        mapped.update(base_encoder)
    for key, value in model.normalizer.state_dict().items():  # files without statistics: identity affine
        mapped.setdefault(f"normalizer.{key}", value)
    check_state_dict(source, model, mapped)
    model.load_state_dict(mapped)
    return model.eval().requires_grad_(False)


def _check_stock_encoder_fits(model: ComfyDAVAE, base_encoder: dict[str, torch.Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(_BASE_PREFIXES)}
    found = {k: tuple(v.shape) for k, v in base_encoder.items()}
    off = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if off:
        raise CheckpointError(
            f"{source}: holds no base encoder, and the encoder of the VAE connected to 'vae' does not fit it "
            f"({len(off)} tensors missing, extra or of another shape, e.g. {', '.join(off[:3])}); connect the "
            f"{model.config.base_name.upper()} VAE this DA-VAE was trained with (the SD3 / SD3.5 checkpoint's VAE)"
        )
