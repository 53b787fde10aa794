"""Our file format: safetensors whose header metadata says everything a loader needs.

Header metadata (all strings, as safetensors requires):

* ``davae_format``: format version (``"1"``);
* ``davae_kind``: ``"davae"`` (tokenizer) or ``"da_heads"`` (P', O' and optionally P, O);
* ``davae_config``: JSON architecture config of that kind;
* ``davae_info``: JSON for people (base VAE, C, D, f, normalisation, training notes).

Loading refuses, with the file name and the fix, anything that is not ours, is truncated, or
whose tensors do not fit the config.  Pickles load only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .davae_config import DAVAEConfig
from .heads import DAHeads, HeadsConfig

if TYPE_CHECKING:  # the diffusers-built model; imported where it is built, so readers stay diffusers-free
    from .davae_model import DAVAE

FORMAT_VERSION = "1"
KIND_DAVAE = "davae"
KIND_HEADS = "da_heads"
_KIND_NAMES = {KIND_DAVAE: "a DA-VAE tokenizer", KIND_HEADS: "DA heads for an MMDiT"}


class CheckpointError(ValueError):
    """A file that cannot be loaded as asked; the message names the file and the fix."""


# ------------------------------------------------------------------ reading
def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of ``path``; clear errors for missing, foreign or truncated files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        hint = "re-export or download it again" if path.suffix == ".safetensors" else (
            "pickled checkpoints (.pt/.ckpt/.bin) go through load_pickled_state_dict or the authors' importer"
        )
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated or of another format: {hint}") from e


def read_metadata(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Parsed metadata of one of our files: ``{"kind", "version", "config", "info"}``."""
    header = read_header(path)
    if "davae_format" not in header:
        raise CheckpointError(
            f"{path}: not a DA-VAE file (its header has no 'davae_format' entry). "
            "Authors' checkpoints must be converted first: python -m davae_core.authors_import IN OUT"
        )
    if header["davae_format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {header['davae_format']} is not supported (this code reads "
            f"{FORMAT_VERSION}); update the node pack"
        )
    found = header.get("davae_kind", "?")
    if kind is not None and found != kind:
        raise CheckpointError(
            f"{path}: holds {_KIND_NAMES.get(found, repr(found))}, not {_KIND_NAMES.get(kind, kind)}; "
            "pick the other file"
        )
    try:
        config = json.loads(header.get("davae_config", "{}"))
        info = json.loads(header.get("davae_info", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged metadata ({e}); re-export the file") from e
    return {"kind": found, "version": header["davae_format"], "config": config, "info": info}


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    read_header(path)  # the clear error for foreign/truncated files
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: could not read its tensors ({e}); the file may be truncated") from e


def check_state_dict(path: Any, module: nn.Module, state: dict[str, torch.Tensor], optional_prefixes: tuple[str, ...] = ()) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, listing a few of each."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(optional_prefixes)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors with wrong shapes ({'; '.join(wrong[:3])})")
    if missing:
        problems.append(f"{len(missing)} missing tensors ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:3])})")
    if problems:
        raise CheckpointError(
            f"{path}: tensors do not match the architecture in its own metadata: {'; '.join(problems)}. "
            "The file was edited or written by other code; export it again"
        )


def load_pickled_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.pt``/``.ckpt``/``.bin`` state dict, loaded safely (tensors only, no code)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here
        raise CheckpointError(
            f"{path}: could not load as a weights-only pickle ({type(e).__name__}: {e}). "
            "Only plain tensors are accepted; convert the file to safetensors"
        ) from e
    for key in ("state_dict", "model", "module", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
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
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # never leave a half-written file under the real name
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
            "base": {"shift": norm.base_shift, "scale": norm.base_scale},
            "detail": "identity" if norm.detail_is_identity else "per-channel affine (normalizer.detail_mean/std)",
        },
        "has_base_encoder": any(k.startswith("base_encoder.") for k in state),
        **(info or {}),
    }
    return _write(path, state, KIND_DAVAE, model.config.to_dict(), about)


def load_davae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
) -> "DAVAE":
    """A DA-VAE from our file; built without a base encoder when the file holds none."""
    from .davae_model import DAVAE

    meta = read_metadata(path, KIND_DAVAE)
    try:
        config = DAVAEConfig.from_dict(meta["config"])
        state = load_tensors(path)
        has_base = any(k.startswith("base_encoder.") for k in state)
        model = DAVAE(config, with_base_encoder=has_base)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its architecture config cannot be built ({e})") from e
    check_state_dict(path, model, state)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def save_heads(heads: DAHeads, path: str | os.PathLike, info: dict | None = None) -> Path:
    state = heads.state_dict()  # detail_embed.*, detail_out.*, and base_embed.*/base_out.* when set
    return _write(path, state, KIND_HEADS, heads.config.to_dict(), dict(info or {}))


def load_heads(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DAHeads:
    """DA heads from our file; ``base_embed``/``base_out`` are filled when the file holds them."""
    meta = read_metadata(path, KIND_HEADS)
    try:
        config = HeadsConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its heads config cannot be read ({e})") from e
    state = load_tensors(path)
    heads = DAHeads(config)
    if any(k.startswith("base_embed.") for k in state):
        heads.add_base_layers()
    check_state_dict(path, heads, state)
    heads.load_state_dict(state)
    return heads.to(device=device, dtype=dtype)
