"""Our file format: safetensors whose header metadata says everything a loader needs.

Header metadata (all strings, as safetensors requires):

* ``davae_format``: format version (``"1"``);
* ``davae_kind``: ``"davae"`` (tokenizer) or ``"da_heads"`` (P', O' and optionally P, O);
* ``davae_config``: JSON architecture config of that kind;
* ``davae_info``: JSON for people (base VAE, C, D, f, normalisation, training notes).

Loading refuses, with the file name and the fix, anything that is not ours, is truncated, or
whose tensors do not fit the config; the checks run on the header alone, before anything is
allocated (:mod:`file_validation`).  Pickles load only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_files import atomic_write
from torch import nn

from .davae_config import DAVAEConfig
from .file_validation import (
    MAX_CONFIG_BYTES,
    MAX_INFO_BYTES,
    CheckpointError,
    SafetensorsHeader,
    check_davae_file,
    check_heads_file,
    check_tensors_fit_storage,
    compare_shapes,
    load_weights_only_pickle,
    parse_metadata_json,
    read_safetensors_header,
)
from .heads import DAHeads, HeadsConfig  # noqa: F401  (HeadsConfig: re-exported as before)

if TYPE_CHECKING:  # the diffusers-built model; imported where it is built, so readers stay diffusers-free
    from .davae_model import DAVAE

FORMAT_VERSION = "1"
KIND_DAVAE = "davae"
KIND_HEADS = "da_heads"
_KIND_NAMES = {KIND_DAVAE: "a DA-VAE tokenizer", KIND_HEADS: "DA heads for an MMDiT"}

__all__ = [
    "CheckpointError", "FORMAT_VERSION", "KIND_DAVAE", "KIND_HEADS", "read_header", "read_metadata", "load_tensors",
    "check_state_dict", "load_pickled_state_dict", "save_davae", "load_davae", "save_heads", "load_heads",
]


# ------------------------------------------------------------------ reading
def _read_safetensors(path: str | os.PathLike) -> SafetensorsHeader:
    """The bounded header (see :mod:`file_validation`), with the fix for files of other formats."""
    try:
        return read_safetensors_header(path)
    except CheckpointError as e:
        if not Path(path).is_file():
            raise
        hint = "re-export or download it again" if Path(path).suffix == ".safetensors" else (
            "pickled checkpoints (.pt/.ckpt/.bin) go through load_pickled_state_dict or the authors' importer"
        )
        raise CheckpointError(f"{e}; so it is not a readable safetensors file: it may be truncated or of another format: {hint}") from e


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of ``path``; clear errors for missing, foreign, truncated or crafted files."""
    return _read_safetensors(path).metadata


def _parse_metadata(path: Any, header: dict[str, str], kind: str | None) -> dict[str, Any]:
    if "davae_format" not in header:
        raise CheckpointError(
            f"{path}: not a DA-VAE file (its header has no 'davae_format' entry). "
            "Authors' checkpoints must be converted first: python -m davae_core.authors_import IN OUT"
        )
    if header["davae_format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {header['davae_format'][:20]} is not supported (this code reads "
            f"{FORMAT_VERSION}); update the node pack"
        )
    found = header.get("davae_kind", "?")
    if kind is not None and found != kind:
        raise CheckpointError(
            f"{path}: holds {_KIND_NAMES.get(found, repr(found[:40]))}, not {_KIND_NAMES.get(kind, kind)}; "
            "pick the other file"
        )
    config = parse_metadata_json(path, header, "davae_config", MAX_CONFIG_BYTES)
    info = parse_metadata_json(path, header, "davae_info", MAX_INFO_BYTES)
    return {"kind": found, "version": header["davae_format"], "config": config, "info": info}


def read_metadata(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Parsed metadata of one of our files: ``{"kind", "version", "config", "info"}``.

    With ``kind`` given, the config is also checked the way the loaders check it (bounded
    fields, shapes of a meta-device build equal to the tensors in the header), so a model
    built from it allocates what the file holds.  Without ``kind`` only the format and the
    metadata JSON are checked: enough to tell what a file is.
    """
    header = _read_safetensors(path)
    meta = _parse_metadata(path, header.metadata, kind)
    if kind == KIND_DAVAE:
        check_davae_file(path, header, meta["config"])
    elif kind == KIND_HEADS:
        check_heads_file(path, header, meta["config"])
    return meta


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    _read_safetensors(path)  # bounded header, no duplicate keys, every tensor backed by file bytes
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: could not read its tensors ({e}); the file may be truncated") from e


def check_state_dict(path: Any, module: nn.Module, state: dict[str, torch.Tensor], optional_prefixes: tuple[str, ...] = ()) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, listing a few of each."""
    expected = {
        k: tuple(v.shape) for k, v in module.state_dict().items() if k in state or not k.startswith(optional_prefixes)
    }
    compare_shapes(path, expected, {k: tuple(v.shape) for k, v in state.items()})


def load_pickled_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.pt``/``.ckpt``/``.bin`` state dict, loaded safely (tensors only, no code, no zip bombs)."""
    obj = load_weights_only_pickle(path)
    for key in ("state_dict", "model", "module", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    check_tensors_fit_storage(path, obj)
    return obj


# ------------------------------------------------------------------ writing
def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str, config: dict, info: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "davae_format": FORMAT_VERSION,
        "davae_kind": kind,
        "davae_config": json.dumps(config, sort_keys=True),
        "davae_info": json.dumps(info, sort_keys=True),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def save_davae(
    model: "DAVAE", path: str | os.PathLike, include_base_encoder: bool = True, info: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    state = model.state_dict()
    if not include_base_encoder or model.base_encoder is None:
        state = {k: v for k, v in state.items() if not k.startswith(("base_encoder.", "base_quant_conv."))}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    layout = model.layout
    norm = model.normalizer
    about = {
        "base_vae": model.config.base_name,
        "base_channels": layout.base_channels,
        "detail_channels": layout.detail_channels,
        "factor": layout.factor,
        "normalization": {
            "base": {"shift": norm.base_shift, "scale": norm.base_scale} if norm.base_mean is None else
                    "per-channel (z - mean) / std * scale (config base_vae.latents_mean/std, scaling_factor)",
            "detail": "identity" if norm.detail_is_identity else "per-channel affine (normalizer.detail_mean/std)",
        },
        "has_base_encoder": any(k.startswith("base_encoder.") for k in state),
        **(info or {}),
    }
    return _write(path, state, KIND_DAVAE, model.config.to_dict(), about)


def load_davae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
) -> "DAVAE":
    """A DA-VAE from our file; built without a base encoder when the file holds none.

    The file is checked against its own config before anything is allocated for it.
    """
    from .davae_model import DAVAE

    header = _read_safetensors(path)
    meta = _parse_metadata(path, header.metadata, KIND_DAVAE)
    checked = check_davae_file(path, header, meta["config"])
    state = load_tensors(path)
    model = DAVAE(DAVAEConfig.from_dict(checked.config), with_base_encoder=checked.with_base_encoder)
    check_state_dict(path, model, state)  # the tensors read are the ones checked
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def save_heads(heads: DAHeads, path: str | os.PathLike, info: dict | None = None) -> Path:
    state = heads.state_dict()  # detail_embed.*, detail_out.*, and base_embed.*/base_out.* when set
    return _write(path, state, KIND_HEADS, heads.config.to_dict(), dict(info or {}))


def load_heads(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DAHeads:
    """DA heads from our file; ``base_embed``/``base_out`` are filled when the file holds them.

    The file is checked against its own config before anything is allocated for it.
    """
    header = _read_safetensors(path)
    meta = _parse_metadata(path, header.metadata, KIND_HEADS)
    checked = check_heads_file(path, header, meta["config"])
    state = load_tensors(path)
    heads = DAHeads(checked.config)
    if checked.with_base_layers:
        heads.add_base_layers()
    check_state_dict(path, heads, state)
    heads.load_state_dict(state)
    return heads.to(device=device, dtype=dtype)
