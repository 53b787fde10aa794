"""Check a model file against its own claims before anything is allocated for it.

A file's metadata says which architecture to build; a crafted file could claim a huge one
(``hidden_size`` 60,000,000 in a few kilobytes) and make a loader allocate gigabytes before
any check ran.  So every loader of our files goes through here first:

1. the safetensors header is parsed by hand with a size limit (no tensor data read, duplicate
   keys refused: the safetensors library silently keeps the last one);
2. the metadata JSON is size-limited and its config parsed into bounded values;
3. the parameter shapes the config implies (heads: a ``meta``-device build, no memory; DA-VAE:
   :mod:`davae_param_shapes`, equal to a meta build and free of diffusers) are compared with
   the tensor shapes in the header.

Only a file that passes is materialised, so what a load allocates follows what the file
holds, not what it claims.  Pickles cannot be inspected before loading; they are read only
from uncompressed zip archives (no zip bombs, no legacy format that sizes storages from the
stream) and their tensors must not claim more elements than their storage holds.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .davae_param_shapes import davae_state_shapes
from .heads import DAHeads, HeadsConfig


class CheckpointError(ValueError):
    """A file that cannot be loaded as asked; the message names the file and the fix."""


# Limits far above any real file (the SD3-size DA-VAE header is ~60 KB, its config < 1 KB).
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 64 * 1024
MAX_INFO_BYTES = 1024 * 1024

# Bytes per element of the safetensors dtypes we accept (floating point only: weights and statistics).
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_ALL_DTYPES = {**FLOAT_DTYPES, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2,
               "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}

# Allowed ranges of the architecture fields (SD3 uses the low end of each; 8x headroom or more).
HEADS_RANGES = {"hidden_size": (1, 16384), "patch_size": (1, 16), "base_channels": (1, 256), "detail_channels": (1, 256)}
VAE_INT_RANGES = {"in_channels": (1, 64), "out_channels": (1, 64), "layers_per_block": (1, 8),
                  "latent_channels": (1, 256), "norm_num_groups": (1, 1024)}
MAX_BLOCKS = 8
MAX_BLOCK_WIDTH = 4096
DETAIL_CHANNELS_RANGE = (1, 256)
ACTIVATIONS = {"silu", "swish", "relu", "gelu", "mish"}
# diffusers AutoencoderKL blocks: plain (SD3) or with attention after each ResNet (VA-VAE's deepest level)
BLOCK_TYPES = {"down": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"), "up": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")}


# ------------------------------------------------------------------ safetensors header
@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _reject_duplicates(where: str) -> Callable[[list[tuple[str, Any]]], dict]:
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{where} has the key {key!r} twice; a file written by safetensors never does")
            out[key] = value
        return out

    return hook


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def read_safetensors_header(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Tensor names, dtypes and shapes plus the metadata of a safetensors file, reading only its header.

    Refuses headers over ``max_header_bytes``, duplicate keys, and entries whose byte ranges do
    not fit the file, so every shape returned is backed by data really in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > max_header_bytes:
            raise CheckpointError(
                f"{path}: its safetensors header claims {n} bytes; allowed at most {max_header_bytes} "
                "(real model files need far less): the file is damaged or crafted"
            )
        if 8 + n > size:
            raise CheckpointError(f"{path}: its header claims {n} bytes but the file has {size}; it is truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates(f"{path}: the safetensors header"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: its safetensors header is not JSON ({e}); the file is damaged or of another format") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: its header metadata must map names to strings")
    data_size = size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: header entry {name!r} is not a tensor description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ALL_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(sorted(_ALL_DTYPES))}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(s) for s in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; allowed: up to 8 non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CheckpointError(f"{path}: tensor {name!r} has data offsets {offsets!r}; allowed: [begin, end] in bytes")
        begin, end = offsets
        claimed = math.prod(shape) * _ALL_DTYPES[dtype]
        if end < begin or end > data_size or end - begin != claimed:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype} {shape}) claims {claimed} bytes at {offsets}, but the file "
                f"holds {data_size} data bytes; the file is truncated or crafted"
            )
        tensors[name] = TensorEntry(dtype, tuple(shape))
    return SafetensorsHeader(tensors, dict(metadata))


# ------------------------------------------------------------------ metadata JSON
def parse_metadata_json(path: Any, metadata: dict[str, str], name: str, limit: int) -> dict[str, Any]:
    """One JSON object entry of the header metadata, size-limited, duplicate keys refused."""
    text = metadata.get(name, "{}")
    if len(text) > limit:
        raise CheckpointError(f"{path}: metadata '{name}' is {len(text)} characters; allowed at most {limit}")
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates(f"{path}: metadata '{name}'"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: metadata '{name}' is not JSON ({e}); re-export the file") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata '{name}' must be a JSON object, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------ bounded configs
def _field_error(path: Any, field: str, value: Any, allowed: str) -> CheckpointError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return CheckpointError(f"{path}: config field '{field}' is {shown}; allowed: {allowed}")


def _bounded_int(path: Any, field: str, value: Any, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _field_error(path, field, value, f"an integer from {lo} to {hi}")
    return value


def _bounded_number(path: Any, field: str, value: Any) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > 1e6:
        raise _field_error(path, field, value, "a finite number (|x| <= 1e6) or null")
    return value


def _bounded_bool(path: Any, field: str, value: Any) -> bool:
    if type(value) is not bool:
        raise _field_error(path, field, value, "true or false")
    return value


def bounded_heads_config(path: Any, config: Any) -> HeadsConfig:
    """A :class:`HeadsConfig` whose fields are integers within :data:`HEADS_RANGES`."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the heads config must be a JSON object")
    values = {}
    for name, (lo, hi) in HEADS_RANGES.items():
        if name not in config:
            raise _field_error(path, name, "missing", f"an integer from {lo} to {hi}")
        values[name] = _bounded_int(path, name, config[name], lo, hi)
    return HeadsConfig(**values)


def _bounded_base_vae(path: Any, vae: Any) -> dict[str, Any]:
    if not isinstance(vae, dict):
        raise _field_error(path, "base_vae", vae, "a JSON object (a diffusers AutoencoderKL config)")
    out: dict[str, Any] = {}
    widths = vae.get("block_out_channels")
    if not isinstance(widths, list) or not 1 <= len(widths) <= MAX_BLOCKS:
        raise _field_error(path, "base_vae.block_out_channels", widths, f"a list of 1 to {MAX_BLOCKS} integers")
    out["block_out_channels"] = [
        _bounded_int(path, f"base_vae.block_out_channels[{i}]", w, 1, MAX_BLOCK_WIDTH) for i, w in enumerate(widths)
    ]
    for name, allowed in (("down_block_types", BLOCK_TYPES["down"]), ("up_block_types", BLOCK_TYPES["up"])):
        types = vae.get(name)
        if not isinstance(types, list) or len(types) != len(widths) or any(t not in allowed for t in types):
            choices = " or ".join(repr(t) for t in allowed)
            raise _field_error(path, f"base_vae.{name}", types, f"a list of {len(widths)} entries, each {choices}")
        out[name] = list(types)
    if "latent_channels" not in vae:
        raise _field_error(path, "base_vae.latent_channels", "missing", "an integer from 1 to 256")
    for name, (lo, hi) in VAE_INT_RANGES.items():
        if name in vae:
            out[name] = _bounded_int(path, f"base_vae.{name}", vae[name], lo, hi)
    groups = out.get("norm_num_groups", 32)
    if any(w % groups for w in out["block_out_channels"]):
        raise _field_error(path, "base_vae.norm_num_groups", groups, f"a divisor of every block width {out['block_out_channels']}")
    if "act_fn" in vae:
        if vae["act_fn"] not in ACTIVATIONS:
            raise _field_error(path, "base_vae.act_fn", vae["act_fn"], ", ".join(sorted(ACTIVATIONS)))
        out["act_fn"] = vae["act_fn"]
    for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast"):
        if name in vae:
            out[name] = _bounded_bool(path, f"base_vae.{name}", vae[name])
    for name in ("scaling_factor", "shift_factor"):
        if name in vae:
            out[name] = _bounded_number(path, f"base_vae.{name}", vae[name])
    if "sample_size" in vae:
        s = vae["sample_size"]
        sizes = s if isinstance(s, list) and len(s) == 2 else [s]
        for v in sizes:
            _bounded_int(path, "base_vae.sample_size", v, 1, 65536)
        out["sample_size"] = s
    for name in ("latents_mean", "latents_std"):
        if name in vae:
            v = vae[name]
            if v is None:
                out[name] = None
                continue
            if not isinstance(v, list) or len(v) > 256:
                raise _field_error(path, f"base_vae.{name}", v, "null or a list of at most 256 numbers")
            out[name] = [_bounded_number(path, f"base_vae.{name}", x) for x in v]
    return out  # other keys of a diffusers config.json do not shape the modules


def bounded_davae_config(path: Any, config: Any) -> dict[str, Any]:
    """A DA-VAE config (``DAVAEConfig.from_dict`` input) whose widths, channels and block counts are
    within the ranges above and fit the DA-VAE's own layers."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the DA-VAE config must be a JSON object")
    vae = _bounded_base_vae(path, config.get("base_vae"))
    detail = _bounded_int(path, "detail_channels", config.get("detail_channels", 16), *DETAIL_CHANNELS_RANGE)
    base_name = config.get("base_name", "sd3")
    if not isinstance(base_name, str) or len(base_name) > 100:
        raise _field_error(path, "base_name", base_name, "a string of at most 100 characters")
    order = config.get("decoder_input_order", "base_detail")
    if order not in ("base_detail", "detail_base"):
        raise _field_error(path, "decoder_input_order", order, "'base_detail' or 'detail_base'")
    space = config.get("decoder_base_space", "normalized")
    if space not in ("normalized", "raw"):
        raise _field_error(path, "decoder_base_space", space, "'normalized' or 'raw'")
    features, base = vae["block_out_channels"][-1], vae["latent_channels"]
    if detail % 2:  # 2D moments, pixel-unshuffled by 2 from the detail conv
        raise _field_error(path, "detail_channels", detail, "an even number")
    if (4 * features) % (base + detail):
        raise _field_error(path, "base_vae.latent_channels", base, f"a count that with {detail} detail channels divides 4 x {features}")
    for name in ("latents_mean", "latents_std"):
        values = vae.get(name)
        if values is not None and (len(values) != base or None in values or (name == "latents_std" and min(values) <= 0)):
            kind = "positive numbers" if name == "latents_std" else "numbers"
            raise _field_error(path, f"base_vae.{name}", values, f"null or {base} {kind} (one per base channel)")
    return {"base_vae": vae, "detail_channels": detail, "base_name": base_name, "decoder_input_order": order,
            "decoder_base_space": space}


# ------------------------------------------------------------------ shapes on the meta device
def meta_shapes(build: Callable[[], nn.Module], source: Any) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the module ``build()`` makes, built on ``meta`` (no memory)."""
    try:
        with torch.device("meta"):
            module = build()
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{source}: its architecture config cannot be built ({e})") from e
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def compare_shapes(
    source: Any, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
    dtypes: dict[str, str] | None = None,
) -> None:
    """Refuse missing, unexpected, mis-shaped or non-float tensors, listing a few of each."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: file {found[k]} vs config {expected[k]}" for k in found if k in expected and found[k] != expected[k]]
    bad_dtype = [f"{k}: {d}" for k, d in (dtypes or {}).items() if d not in FLOAT_DTYPES]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors with wrong shapes ({'; '.join(wrong[:3])})")
    if missing:
        problems.append(f"{len(missing)} missing tensors ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:3])})")
    if bad_dtype:
        problems.append(f"{len(bad_dtype)} tensors not floating point ({'; '.join(bad_dtype[:3])}; allowed {', '.join(FLOAT_DTYPES)})")
    if problems:
        raise CheckpointError(
            f"{source}: tensors do not match the architecture in its own metadata: {'; '.join(problems)}. "
            "The file was edited or written by other code; export it again"
        )


def _header_shapes(header: SafetensorsHeader) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    return {k: e.shape for k, e in header.tensors.items()}, {k: e.dtype for k, e in header.tensors.items()}


@dataclass(frozen=True)
class CheckedDAVAEFile:
    config: dict[str, Any]  # bounded; DAVAEConfig.from_dict builds from it
    with_base_encoder: bool


@dataclass(frozen=True)
class CheckedHeadsFile:
    config: HeadsConfig
    with_base_layers: bool


def check_davae_tensors(source: Any, config: dict[str, Any], found: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None) -> bool:
    """Compare tensor shapes with those a bounded ``config`` implies; returns whether they hold a base encoder."""
    has_base = any(k.startswith("base_encoder.") for k in found)
    compare_shapes(source, davae_state_shapes(config, has_base), found, dtypes)
    return has_base


def check_heads_tensors(source: Any, config: HeadsConfig, found: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None) -> bool:
    """Compare tensor shapes with a meta build of ``config``; returns whether they hold P and O."""
    has_base = any(k.startswith(("base_embed.", "base_out.")) for k in found)

    def build() -> DAHeads:
        heads = DAHeads(config)
        return heads.add_base_layers() if has_base else heads

    compare_shapes(source, meta_shapes(build, source), found, dtypes)
    return has_base


def check_davae_file(path: str | os.PathLike, header: SafetensorsHeader, config: dict[str, Any]) -> CheckedDAVAEFile:
    bounded = bounded_davae_config(path, config)
    shapes, dtypes = _header_shapes(header)
    return CheckedDAVAEFile(bounded, check_davae_tensors(path, bounded, shapes, dtypes))


def check_heads_file(path: str | os.PathLike, header: SafetensorsHeader, config: dict[str, Any]) -> CheckedHeadsFile:
    bounded = bounded_heads_config(path, config)
    shapes, dtypes = _header_shapes(header)
    return CheckedHeadsFile(bounded, check_heads_tensors(path, bounded, shapes, dtypes))


# ------------------------------------------------------------------ pickles
def check_pickle_archive(path: str | os.PathLike) -> None:
    """Refuse pickles whose loading could allocate more than the file holds.

    ``torch.load`` sizes a legacy-format storage from a number in the stream and inflates
    compressed zip entries; so only zip archives with stored (uncompressed) entries that fit
    the file are accepted.  torch.save has written those since PyTorch 1.6.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a zip-format torch checkpoint (legacy pickles size their tensors from the stream and "
            "are not loaded); re-save it with a current torch.save or convert it to safetensors"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: damaged zip archive ({e})") from e
    compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(
            f"{path}: {len(compressed)} compressed entries ({', '.join(compressed[:3])}); torch.save never compresses, "
            "and inflating them could allocate far more than the file holds"
        )
    total = sum(e.file_size for e in entries)
    if total > size:
        raise CheckpointError(f"{path}: its entries claim {total} bytes, more than the file's {size}; it is damaged or crafted")


def check_tensors_fit_storage(source: Any, state: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that claim more elements than their storage (stride tricks make huge shapes cheap)."""
    for name, t in state.items():
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)} but its storage holds only "
                f"{t.untyped_storage().nbytes()} bytes (a strided view, not stored weights); the file is crafted"
            )


def load_weights_only_pickle(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` after :func:`check_pickle_archive`."""
    check_pickle_archive(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here
        raise CheckpointError(
            f"{path}: refused by weights-only loading: the file holds Python objects, not only tensors "
            f"({type(e).__name__}). Get the weights as .safetensors (python -m davae_core.authors_import on a "
            "trusted machine, or our export) and use that file"
        ) from None
