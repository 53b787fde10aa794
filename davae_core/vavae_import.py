"""Import the public VA-VAE (the base VAE of the paper's ImageNet line) into a diffusers folder.

    python -m davae_core.vavae_import vavae-imagenet256-f16d32-dinov2.pt OUT_DIR --stats latents_stats.pt

The checkpoint (``hustvl/vavae-imagenet256-f16d32-dinov2``) is a pickle of LDM's KL
autoencoder, optionally under ``state_dict``, that also carries what only its training used:
the DINOv2 it was aligned to (``foundation_model.*``), the projection to DINOv2's width
(``linear_proj*``) and the LPIPS / discriminator losses (``loss.*``).  Those are discarded,
every other key is mapped to diffusers' ``AutoencoderKL`` names (:mod:`ldm_vae_keys`), the
tensor shapes are compared with the architecture before anything is built, and the result
is written as a diffusers folder: what the stage-1 trainer's ``model.pretrained_vae`` reads.

``latents_stats.pt`` (LightningDiT's per-channel ``{"mean", "std"}`` of the latents, shaped
``(1, C, 1, 1)``) goes into the config as ``latents_mean`` / ``latents_std``, so the DA-VAE
built on this base normalises its base channels exactly as the pretrained DiT saw them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .davae_config import VAVAE_CONFIG
from .file_validation import (
    CheckpointError,
    _bounded_base_vae,
    check_tensors_fit_storage,
    compare_shapes,
    load_weights_only_pickle,
    meta_shapes,
)
from .ldm_vae_keys import ldm_to_diffusers

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

DISCARDED_PREFIXES = ("foundation_model.", "loss.", "linear_proj")
_WRAPPERS = ("module.", "_orig_mod.")


def unwrap_state_dict(obj: Any, source: Any, keys: tuple[str, ...] = ("state_dict",)) -> dict[str, torch.Tensor]:
    """The tensor dict of a checkpoint: under one of ``keys`` when present, DDP/compile prefixes dropped."""
    for key in keys:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: does not hold a state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {str(key)[:80]!r} is not a named tensor; not a weights file")
        for wrapper in _WRAPPERS:
            if key.startswith(wrapper):
                key = key[len(wrapper):]
        out[key] = value
    check_tensors_fit_storage(source, out)
    return out


def _levels(state: dict[str, torch.Tensor], source: Any) -> int:
    found = {int(k.split(".")[2]) for k in state if k.startswith("encoder.down.") and k.split(".")[2].isdigit()}
    if not found:
        raise CheckpointError(f"{source}: no LDM encoder keys (encoder.down.N.*); not an LDM KL autoencoder")
    return max(found) + 1


def convert_vavae_state(
    state: dict[str, torch.Tensor], source: Any = "state dict",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LDM keys -> diffusers keys; returns the converted dict and the discarded training-only keys."""
    discarded = [k for k in state if k.startswith(DISCARDED_PREFIXES)]
    kept = {k: v for k, v in state.items() if not k.startswith(DISCARDED_PREFIXES)}
    converted, unmapped = ldm_to_diffusers(kept, _levels(kept, source))
    if unmapped:
        raise CheckpointError(
            f"{source}: {len(unmapped)} keys are neither LDM autoencoder weights nor VA-VAE's training-only "
            f"parts ({', '.join(unmapped[:4])}); not a VA-VAE checkpoint"
        )
    return converted, discarded


def read_latent_stats(path: str | os.PathLike, channels: int) -> tuple[list[float], list[float]]:
    """LightningDiT's ``latents_stats.pt`` (``{"mean", "std"}``, each ``(1, C, 1, 1)`` or ``(C,)``) as lists."""
    obj = load_weights_only_pickle(path)
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), torch.Tensor) for k in ("mean", "std")):
        raise CheckpointError(f"{path}: not a latent-statistics file (expected a dict with 'mean' and 'std' tensors)")
    out = []
    for name in ("mean", "std"):
        t = obj[name]
        check_tensors_fit_storage(path, {name: t})
        if t.numel() != channels or t.squeeze().ndim > 1:
            raise CheckpointError(
                f"{path}: '{name}' has shape {tuple(t.shape)}; expected {channels} values, one per latent channel "
                "(LightningDiT writes (1, C, 1, 1))"
            )
        values = [float(v) for v in t.flatten().double()]
        if not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
            raise CheckpointError(f"{path}: '{name}' holds non-finite{' or non-positive' if name == 'std' else ''} values")
        out.append(values)
    return out[0], out[1]


def vavae_config(vae_config: dict[str, Any] | None = None, stats: tuple[list[float], list[float]] | None = None,
                 source: Any = "VA-VAE") -> dict[str, Any]:
    """The bounded diffusers config (VA-VAE's by default) with the latent statistics, when given."""
    cfg = {**VAVAE_CONFIG, **(vae_config or {})}
    bounded = _bounded_base_vae(source, cfg)
    if stats is not None:
        bounded.update(latents_mean=list(stats[0]), latents_std=list(stats[1]), scaling_factor=1.0)
    return bounded


def import_vavae(
    path: str | os.PathLike, stats_path: str | os.PathLike | None = None, vae_config: dict[str, Any] | None = None,
) -> "AutoencoderKL":
    """The VA-VAE checkpoint as a diffusers ``AutoencoderKL`` (eval mode), its statistics in the config."""
    from diffusers import AutoencoderKL

    state, _ = convert_vavae_state(unwrap_state_dict(load_weights_only_pickle(path), path), path)
    channels = vavae_config(vae_config, None, path)["latent_channels"]
    stats = read_latent_stats(stats_path, channels) if stats_path is not None else None
    cfg = vavae_config(vae_config, stats, path)
    # shapes first, on the meta device: the model is allocated only for tensors that fit it
    compare_shapes(path, meta_shapes(lambda: AutoencoderKL(**cfg), path), {k: tuple(v.shape) for k, v in state.items()})
    vae = AutoencoderKL(**cfg)
    vae.load_state_dict(state)
    return vae.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m davae_core.vavae_import", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="the VA-VAE checkpoint (.pt)")
    ap.add_argument("output", help="diffusers AutoencoderKL folder to write")
    ap.add_argument("--stats", help="LightningDiT's latents_stats.pt (per-channel mean/std of the latents)")
    ap.add_argument("--vae-config", help="diffusers config.json overriding VA-VAE f16d32's architecture")
    args = ap.parse_args(argv)
    vae_config = json.loads(Path(args.vae_config).read_text()) if args.vae_config else None
    vae = import_vavae(args.source, args.stats, vae_config)
    vae.save_pretrained(args.output, safe_serialization=True)
    print(f"wrote {args.output} ({sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters"
          f"{', latent statistics in its config' if args.stats else ''})")


if __name__ == "__main__":
    main()
