"""Convert the DA authors' ImageNet tokenizer (caixin98/DA-VAE ``lightningdit/``, "detail" mode) to our format.

    python -m davae_core.authors_imagenet_import davae.ckpt OUT.safetensors --stats latents_stats.pt

Their checkpoint is a Lightning pickle whose ``state_dict`` holds LDM-layout trunks:

* ``base_encoder.*`` / ``base_quant_conv.*``: the frozen VA-VAE encoder (our base encoder);
* ``da.encoder.*`` (its ``conv_out`` stored but unused) and ``da.decoder.*`` (``conv_in`` unused):
  our detail trunk and decoder trunk;
* ``da.da_down.conv.*`` plus ``da.da_down.shortcut_proj.weight`` (the learnable shortcut, since
  192 moments do not divide 2048 unshuffled features) and ``da.da_up.conv.*``;
* ``loss.*`` (LPIPS, discriminator), and ``align_proj.*`` / ``pe_student.*`` in variants that
  train those: all discarded.

Their decoder reads ``[z_b | z_d]`` with ``z_b`` the VA-VAE's *raw* posterior mode, so the
imported config has ``decoder_input_order = "base_detail"`` and ``decoder_base_space = "raw"``.
Their DiT normalised all C+D channels with one ``latents_stats.pt``: its first C entries become
the base statistics of the config, the rest the detail affine of the normaliser.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .authors_import import davae_from_converted_state
from .checkpoint import save_davae
from .davae_config import VAVAE_CONFIG, DAVAEConfig
from .file_validation import CheckpointError, bounded_davae_config, load_weights_only_pickle
from .ldm_vae_keys import ldm_to_diffusers
from .vavae_import import read_latent_stats, unwrap_state_dict

if TYPE_CHECKING:
    from .davae_model import DAVAE

_MARKERS = ("da.da_down.conv.weight", "da.da_up.conv.weight")
_DISCARDED = ("loss.", "align_proj.", "pe_student.")
# their prefix -> (LDM trunk the key map knows, our prefix); conv_out / conv_in of the DA trunks are unused
_TRUNKS = {
    "base_encoder.": ("encoder.", "base_encoder."),
    "da.encoder.": ("encoder.", "detail_trunk."),
    "da.decoder.": ("decoder.", "decoder_trunk."),
}
_UNUSED = ("da.encoder.conv_out.", "da.decoder.conv_in.")
_PLAIN = {
    "base_quant_conv.": "base_quant_conv.",
    "da.da_down.conv.": "detail_down.conv.",
    "da.da_down.shortcut_proj.": "detail_down.shortcut_proj.",
    "da.da_up.conv.": "decoder_up.conv.",
}


def _trunk_levels(state: dict[str, torch.Tensor], source: Any) -> int:
    levels = {int(k.split(".")[3]) for k in state if k.startswith("da.encoder.down.") and k.split(".")[3].isdigit()}
    if not levels:
        raise CheckpointError(f"{source}: no da.encoder.down.N.* keys; not an authors' ImageNet DA-VAE")
    return max(levels) + 1


def convert_imagenet_tokenizer_state(
    state: dict[str, torch.Tensor], source: Any = "state dict", vae_config: dict | None = None,
    stats: tuple[list[float], list[float]] | None = None,
) -> tuple[DAVAEConfig, dict[str, torch.Tensor]]:
    """Their keys -> (our config, our state dict); ``stats``: their per-channel mean/std over all C+D channels."""
    if not all(k in state for k in _MARKERS):
        raise CheckpointError(f"{source}: not an authors' ImageNet DA-VAE checkpoint (no {' / '.join(_MARKERS)} keys)")
    down, up = state["da.da_down.conv.weight"], state["da.da_up.conv.weight"]
    if down.ndim != 4 or up.ndim != 4:
        raise CheckpointError(f"{source}: da_down/da_up weights must be 4-D convolutions, got {tuple(down.shape)} and {tuple(up.shape)}")
    detail = down.shape[0] * 4 // 2
    base = up.shape[1] - detail
    if base <= 0:
        raise CheckpointError(
            f"{source}: da_up reads {up.shape[1]} channels, no more than the {detail} detail channels: this is "
            "their 'full' mode; only their 'detail' mode (VA-VAE base + detail) is a DA-VAE structured latent"
        )
    levels = _trunk_levels(state, source)
    ours: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for theirs, (ldm_prefix, mine) in _TRUNKS.items():
        part = {ldm_prefix + k[len(theirs):]: v for k, v in state.items() if k.startswith(theirs) and not k.startswith(_UNUSED)}
        converted, unmapped = ldm_to_diffusers(part, levels)
        unknown += [theirs + k[len(ldm_prefix):] for k in unmapped]
        ours.update({mine + k[len(ldm_prefix):]: v for k, v in converted.items()})
    for key, value in state.items():
        prefix = next((p for p in _PLAIN if key.startswith(p)), None)
        if prefix is not None:
            ours[_PLAIN[prefix] + key[len(prefix):]] = value
        elif not key.startswith(_DISCARDED + _UNUSED + tuple(_TRUNKS)):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys this importer does not know ({', '.join(unknown[:4])})")

    vae = {**(vae_config or VAVAE_CONFIG), "latent_channels": base}
    if stats is not None:
        mean, std = stats
        if len(mean) != base + detail:
            raise CheckpointError(f"{source}: the latent statistics hold {len(mean)} channels; this tokenizer makes {base + detail}")
        vae.update(latents_mean=mean[:base], latents_std=std[:base], scaling_factor=1.0)
    # the architecture comes from tensor shapes: bound it like our files' metadata
    config = DAVAEConfig.from_dict(bounded_davae_config(source, {
        "base_vae": vae, "detail_channels": detail, "base_name": "vavae",
        "decoder_input_order": "base_detail", "decoder_base_space": "raw",
    }))
    return config, ours


def import_imagenet_tokenizer(
    path: str | os.PathLike, stats_path: str | os.PathLike | None = None, vae_config: dict | None = None,
) -> "DAVAE":
    """Load their tokenizer as a :class:`DAVAE` (base encoder included when present), statistics applied."""
    state = unwrap_state_dict(load_weights_only_pickle(path), path)
    down, up = state.get("da.da_down.conv.weight"), state.get("da.da_up.conv.weight")
    channels = up.shape[1] if isinstance(up, torch.Tensor) and up.ndim == 4 and isinstance(down, torch.Tensor) else None
    stats = read_latent_stats(stats_path, channels) if stats_path is not None and channels else None
    config, state = convert_imagenet_tokenizer_state(state, path, vae_config, stats)
    model = davae_from_converted_state(path, config, state)
    if stats is not None:
        base = config.layout.base_channels
        model.normalizer.set_detail_statistics(torch.tensor(stats[0][base:]), torch.tensor(stats[1][base:]))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m davae_core.authors_imagenet_import", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="their tokenizer checkpoint (.ckpt / .pt)")
    ap.add_argument("output", help="our .safetensors file to write")
    ap.add_argument("--stats", help="their latents_stats.pt over all C+D channels (from extract_features)")
    ap.add_argument("--vae-config", help="diffusers config.json of the base VAE (default: VA-VAE f16d32's)")
    ap.add_argument("--without-base-encoder", action="store_true", help="drop the VA-VAE encoder copy")
    args = ap.parse_args(argv)
    vae_config = json.loads(Path(args.vae_config).read_text()) if args.vae_config else None
    model = import_imagenet_tokenizer(args.source, args.stats, vae_config)
    save_davae(model, args.output, include_base_encoder=not args.without_base_encoder,
               info={"imported_from": "authors' ImageNet DA-VAE (detail mode)"})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
