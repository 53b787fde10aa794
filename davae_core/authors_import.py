"""Convert checkpoints in the authors' SD3 layout (caixin98/DA-VAE, "diff" mode) to our format.

Their tokenizer state dict (a flat ``pytorch_model.bin``):

* ``vae.encoder.*`` / ``vae.decoder.*``: diffusers AutoencoderKL trunks (``encoder.conv_out``
  and ``decoder.conv_in`` are stored but unused);
* ``dc_down.conv.*`` (512 -> 8) and ``dc_up.conv.*`` (32 -> 2048);
* ``original_vae_model.vae.*``: the frozen SD3 VAE, whose encoder is our base encoder.

Their latent is ``[detail | base]``; ours is ``[base | detail]``.  Because the up-block's
shortcut ties decoder features to latent channel positions, the decoder keeps their order
internally (``decoder_input_order = "detail_base"``) instead of permuting weights.

Their heads (``tokenizer_checkpoints/*.pt``, under ``model_state_dict``):
``tokenizer_patch_embed.proj.{base_conv,extra_conv}.*`` and
``project_out.{base_linear,extra_linear}.*``; the extra branches read and write the detail
channels, exactly our P' and O'.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointError, check_state_dict, load_pickled_state_dict, load_tensors, save_davae, save_heads
from .davae_config import SD3_VAE_CONFIG, DAVAEConfig
from .file_validation import (
    bounded_davae_config,
    bounded_heads_config,
    check_heads_tensors,
    check_tensors_fit_storage,
    compare_shapes,
    load_weights_only_pickle,
)
from .davae_param_shapes import davae_state_shapes
from .heads import DAHeads, HeadsConfig

if TYPE_CHECKING:  # diffusers-built; the converters above it stay diffusers-free for the node pack
    from .davae_model import DAVAE

_TOKENIZER_MARKERS = ("dc_down.conv.weight", "dc_up.conv.weight")
_HEAD_SUFFIXES = {
    "tokenizer_patch_embed.proj.extra_conv.": "detail_embed.",
    "project_out.extra_linear.": "detail_out.",
    "tokenizer_patch_embed.proj.base_conv.": "base_embed.",
    "project_out.base_linear.": "base_out.",
}


def _read_any(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    return load_pickled_state_dict(path)


def convert_tokenizer_state(
    state: dict[str, torch.Tensor], source: str = "state dict", vae_config: dict | None = None,
) -> tuple[DAVAEConfig, dict[str, torch.Tensor]]:
    """Authors' tokenizer keys -> (our config, our state dict)."""
    if not all(k in state for k in _TOKENIZER_MARKERS):
        raise CheckpointError(
            f"{source}: not an authors' SD3 DA-VAE checkpoint (no {' / '.join(_TOKENIZER_MARKERS)} keys)"
        )
    down, up = state["dc_down.conv.weight"], state["dc_up.conv.weight"]
    if down.ndim != 4 or up.ndim != 4:
        raise CheckpointError(f"{source}: dc_down/dc_up weights must be 4-D convolutions, got {tuple(down.shape)} and {tuple(up.shape)}")
    moments = down.shape[0] * 4
    detail = moments // 2
    latent_in = up.shape[1]
    base = latent_in - detail
    if base <= 0:
        raise CheckpointError(
            f"{source}: dc_up reads {latent_in} channels but dc_down makes a {detail}-channel detail "
            "latent with no room for base channels: this is the authors' 'full' mode; only their "
            "'diff' mode (detail + SD3 base) is a DA-VAE structured latent"
        )
    cfg = dict(vae_config or SD3_VAE_CONFIG)
    cfg["latent_channels"] = base
    # the architecture comes from tensor shapes (and a config.json): bound it like our files' metadata
    config = DAVAEConfig.from_dict(bounded_davae_config(
        source, {"base_vae": cfg, "detail_channels": detail, "base_name": "sd3", "decoder_input_order": "detail_base"}
    ))

    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("vae.encoder.") and not key.startswith("vae.encoder.conv_out."):
            ours["detail_trunk." + key[len("vae.encoder.") :]] = value
        elif key.startswith("vae.decoder.") and not key.startswith("vae.decoder.conv_in."):
            ours["decoder_trunk." + key[len("vae.decoder.") :]] = value
        elif key.startswith("dc_down.conv."):
            ours["detail_down.conv." + key[len("dc_down.conv.") :]] = value
        elif key.startswith("dc_up.conv."):
            ours["decoder_up.conv." + key[len("dc_up.conv.") :]] = value
        elif key.startswith("original_vae_model.vae.encoder."):
            ours["base_encoder." + key[len("original_vae_model.vae.encoder.") :]] = value
        elif key.startswith("original_vae_model.vae.quant_conv."):
            ours["base_quant_conv." + key[len("original_vae_model.vae.quant_conv.") :]] = value
    return config, ours


def read_tokenizer(path: str | os.PathLike, vae_config: dict | None = None) -> tuple[DAVAEConfig, dict[str, torch.Tensor]]:
    """An authors' tokenizer file as (our config, our state dict), without building a model."""
    return convert_tokenizer_state(_read_any(path), str(path), vae_config)


def davae_from_converted_state(path: str | os.PathLike, config: DAVAEConfig, state: dict[str, torch.Tensor]) -> "DAVAE":
    """A :class:`DAVAE` holding an imported ``state`` (base encoder included when present; the
    normaliser's own identity statistics filled in), its shapes checked before it is built."""
    from .davae_model import DAVAE

    has_base = any(k.startswith("base_encoder.") for k in state)
    # shapes first, on the meta device: the real model is built only for tensors that fit it
    expected = davae_state_shapes(config.to_dict(), has_base)
    found = {k: tuple(v.shape) for k, v in state.items()}
    found.update({k: s for k, s in expected.items() if k.startswith("normalizer.")})  # ours, not theirs
    compare_shapes(path, expected, found)
    model = DAVAE(config, with_base_encoder=has_base)
    state.update({f"normalizer.{k}": v for k, v in model.normalizer.state_dict().items()})
    check_state_dict(path, model, state)
    model.load_state_dict(state)
    return model


def import_tokenizer(
    path: str | os.PathLike, vae_config: dict | None = None, stats: dict | None = None,
) -> "DAVAE":
    """Load an authors' tokenizer file as a :class:`DAVAE` (base encoder included when present)."""
    config, state = read_tokenizer(path, vae_config)
    model = davae_from_converted_state(path, config, state)
    if stats is not None:  # their optional latent_norm_stats.json: {"mean": [...], "std": [...]}
        model.normalizer.set_detail_statistics(
            torch.tensor(stats["mean"], dtype=torch.float32), torch.tensor(stats["std"], dtype=torch.float32)
        )
    return model.eval()


def convert_heads_state(state: dict[str, torch.Tensor], source: str = "state dict") -> tuple[HeadsConfig, dict[str, torch.Tensor]]:
    """Authors' head keys (any prefix, e.g. from their EMA dict) -> (our config, our state dict)."""
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for theirs, mine in _HEAD_SUFFIXES.items():
            at = key.find(theirs)
            if at >= 0 and (at == 0 or key[at - 1] == "."):
                ours[mine + key[at + len(theirs) :]] = value
    if "detail_embed.weight" not in ours or "detail_out.weight" not in ours:
        raise CheckpointError(
            f"{source}: no authors' DA heads found (expected tokenizer_patch_embed.proj.extra_conv.* "
            "and project_out.extra_linear.*)"
        )
    if not all(isinstance(v, torch.Tensor) for v in ours.values()):
        raise CheckpointError(f"{source}: its DA head entries are not all tensors")
    embed = ours["detail_embed.weight"]
    if embed.ndim != 4 or ("base_embed.weight" in ours and ours["base_embed.weight"].ndim != 4):
        raise CheckpointError(f"{source}: the patch embedder weight must be a 4-D convolution, got {tuple(embed.shape)}")
    hidden, detail, p, _ = embed.shape
    base = ours["base_embed.weight"].shape[1] if "base_embed.weight" in ours else detail
    config = bounded_heads_config(
        source, {"hidden_size": hidden, "patch_size": p, "base_channels": base, "detail_channels": detail}
    )
    return config, ours


def import_heads(path: str | os.PathLike, use_ema: bool = False) -> DAHeads:
    raw = load_weights_only_pickle(path) if Path(path).suffix != ".safetensors" else load_tensors(path)
    if isinstance(raw, dict) and ("model_state_dict" in raw or "ema_state_dict" in raw):
        key = "ema_state_dict" if use_ema else "model_state_dict"
        if key not in raw:
            raise CheckpointError(f"{path}: has no {key}")
        raw = raw[key]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: does not hold a state dict")
    config, state = convert_heads_state(raw, str(path))
    check_tensors_fit_storage(path, state)
    # shapes first, on the meta device: the real heads are built only for tensors that fit them
    check_heads_tensors(path, config, {k: tuple(v.shape) for k, v in state.items()})
    heads = DAHeads(config)
    if "base_embed.weight" in state:
        heads.add_base_layers()
    check_state_dict(path, heads, state)
    heads.load_state_dict(state)
    return heads


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m davae_core.authors_import",
        description="Convert an authors' DA-VAE tokenizer (pytorch_model.bin) or heads checkpoint (step_N.pt) to our safetensors format.",
    )
    ap.add_argument("source", help="authors' checkpoint (.bin/.pt/.safetensors)")
    ap.add_argument("output", help="our .safetensors file to write")
    ap.add_argument("--kind", choices=["tokenizer", "heads"], default="tokenizer")
    ap.add_argument("--stats", help="their latent_norm_stats.json (detail mean/std), optional")
    ap.add_argument("--vae-config", help="diffusers config.json of the base VAE (default: the SD3 VAE's)")
    ap.add_argument("--ema", action="store_true", help="heads: take the EMA weights")
    ap.add_argument("--without-base-encoder", action="store_true", help="drop the SD3 encoder copy (ComfyUI then needs the checkpoint's VAE)")
    args = ap.parse_args(argv)
    if args.kind == "tokenizer":
        stats = json.loads(Path(args.stats).read_text()) if args.stats else None
        vae_config = json.loads(Path(args.vae_config).read_text()) if args.vae_config else None
        model = import_tokenizer(args.source, vae_config=vae_config, stats=stats)
        save_davae(model, args.output, include_base_encoder=not args.without_base_encoder, info={"imported_from": "authors' SD3 diff layout"})
    else:
        save_heads(import_heads(args.source, use_ema=args.ema), args.output, info={"imported_from": "authors' heads"})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
