"""Pure-PyTorch DA-VAE: structured latent, tokenizer, DiT heads, loss schedule and files.

Never imports ComfyUI.  Names load on first use (PEP 562), so that importing a diffusers-free
submodule (what the node pack does: config, blocks, heads, files, latent conversions) never
pulls in diffusers through this package's ``__init__``; only :mod:`.davae_model` and
:mod:`.fixtures` need diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "checkpoint": ("CheckpointError", "load_davae", "load_heads", "read_metadata", "save_davae", "save_heads"),
    "davae_config": ("SD3_VAE_CONFIG", "DAVAEConfig", "tiny_vae_config"),
    "davae_model": ("DAVAE",),
    "heads": ("DAHeads", "DetailOutputLayer", "DetailPatchEmbed", "HeadsConfig", "attach_to_sd3_transformer"),
    "loss_schedule": ("detail_weight", "scheduled_flow_loss"),
    "structured_latent": (
        "SD3_SCALE", "SD3_SHIFT", "LatentLayout", "LatentNormalizer", "alignment_loss", "grouped_mean_proj", "merge", "split",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'davae_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
