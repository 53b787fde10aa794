"""Tiny random-weight files in the real key layouts of the ImageNet line.

    python -m davae_training.imagenet.fixtures OUT_DIR [--seed 0]

No public checkpoint can be downloaded here, so the importers and loaders are tested on these:

===============================  ======================================================
``vavae.pt``                     VA-VAE as hustvl publishes it: LDM keys under
                                 ``state_dict``, plus ``foundation_model.*``, ``loss.*``,
                                 ``linear_proj.weight`` (5 levels, f16, attention at the
                                 deepest level; toy widths)
``latents_stats.pt``             LightningDiT's ``{"mean", "std"}``, each ``(1, C, 1, 1)``
``lightningdit.pt``              LightningDiT ``{"model", "ema"}`` (different weights in
                                 each), RoPE tables included, as train.py saves it
``authors_davae.ckpt``           the DA authors' ImageNet tokenizer ("detail" mode:
                                 ``base_encoder``, ``da.encoder/decoder``, ``da.da_down``
                                 with ``shortcut_proj``, ``da.da_up``, ``loss.*``)
``authors_latents_stats.pt``     their statistics over all C+D channels
``authors_dit.pt``               their merged DiT: LightningDiT with C+D input channels
``vavae_config.json``            the tiny VA-VAE's diffusers config (``model.vae_config``)
``davae_vavae.safetensors``      our DA-VAE file on the tiny VA-VAE (``tokenizer.path``)
``train/<wnid>/<n>.png``         a two-class folder in ImageNet's train layout (``data.root``)
===============================  ======================================================

The last three make the trainers' CPU runs need nothing else (docs/TRAINING_IMAGENET.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from davae_core.davae_config import tiny_vavae_config
from davae_core.ldm_vae_keys import diffusers_to_ldm

from .lightningdit import LightningDiT, LightningDiTConfig
from .lightningdit_checkpoint import checkpoint_state

TINY_BASE_CHANNELS = 4
TINY_DETAIL_CHANNELS = 12  # 3 per base channel as D = 96 for C = 32; 24 moments do not divide 4 x 32 features
TINY_DIT = dict(input_size=4, patch_size=1, hidden_size=64, depth=2, num_heads=4, ffn_hidden_size=170, num_classes=1000)


@torch.no_grad()
def randomize(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Small random values everywhere (zero-initialised layers too), so every path is observable."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + torch.randn(p.shape, generator=gen) * std)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def tiny_vavae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**tiny_vavae_config(TINY_BASE_CHANNELS)).eval()


def _levels(vae_config: dict[str, Any]) -> int:
    return len(vae_config["block_out_channels"])


def _training_only_extras(gen: torch.Generator, latent_channels: int) -> dict[str, torch.Tensor]:
    """What VA-VAE's checkpoint carries besides the autoencoder (DINOv2, its projection, the losses)."""
    return {
        "foundation_model.model.patch_embed.proj.weight": torch.randn(16, 3, 14, 14, generator=gen),
        "foundation_model.model.blocks.0.attn.qkv.weight": torch.randn(48, 16, generator=gen),
        "linear_proj.weight": torch.randn(16, latent_channels, 1, 1, generator=gen),
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4, generator=gen),
        "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 8, 1, 1, generator=gen),
    }


def vavae_checkpoint(vae, seed: int = 0) -> dict[str, Any]:
    """``vae`` (diffusers AutoencoderKL) as the VA-VAE ``.pt`` holds it."""
    state = diffusers_to_ldm({k: v.contiguous() for k, v in vae.state_dict().items()}, _levels(vae.config))
    extras = _training_only_extras(torch.Generator().manual_seed(seed + 11), vae.config.latent_channels)
    return {"state_dict": {**state, **extras}}


def latent_stats(channels: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 5)
    return {
        "mean": (torch.randn(channels, generator=gen) * 0.3).view(1, -1, 1, 1),
        "std": (0.5 + torch.rand(channels, generator=gen)).view(1, -1, 1, 1),
    }


def tiny_dit(in_channels: int = TINY_BASE_CHANNELS, seed: int = 0, **fields: Any) -> LightningDiT:
    return randomize(LightningDiT(LightningDiTConfig(**{**TINY_DIT, "in_channels": in_channels, **fields})), seed).eval()


def with_rope_tables(model: LightningDiT) -> dict[str, torch.Tensor]:
    """The model's state dict as LightningDiT saves it (its RoPE tables are persistent buffers there)."""
    return checkpoint_state(model.state_dict(), model)


def lightningdit_checkpoint(model: LightningDiT, ema: LightningDiT) -> dict[str, Any]:
    return {"model": with_rope_tables(model), "ema": with_rope_tables(ema)}


def authors_imagenet_tokenizer_checkpoint(davae, seed: int = 0) -> dict[str, Any]:
    """Our VA-VAE-based DA-VAE (decoder reading the raw base) under the authors' ImageNet keys."""
    vae = davae.config.base_vae
    levels = _levels(vae)
    state = {k: v.contiguous() for k, v in davae.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 13)
    out: dict[str, torch.Tensor] = {}
    for ours, (ldm_trunk, theirs) in {"base_encoder.": ("encoder.", "base_encoder."), "detail_trunk.": ("encoder.", "da.encoder."),
                                      "decoder_trunk.": ("decoder.", "da.decoder.")}.items():
        part = {ldm_trunk + k[len(ours):]: v for k, v in state.items() if k.startswith(ours)}
        out.update({theirs + k[len(ldm_trunk):]: v for k, v in diffusers_to_ldm(part, levels).items()})
    renames = {"base_quant_conv.": "base_quant_conv.", "detail_down.": "da.da_down.", "decoder_up.": "da.da_up."}
    for key, value in state.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix is not None:
            out[renames[prefix] + key[len(prefix):]] = value
    features, base = vae["block_out_channels"][-1], vae["latent_channels"]
    # stored by their Lightning module although the DA path never uses them
    out["da.encoder.conv_out.weight"] = torch.randn(2 * base, features, 3, 3, generator=gen) * 0.02
    out["da.encoder.conv_out.bias"] = torch.zeros(2 * base)
    out["da.decoder.conv_in.weight"] = torch.randn(features, base, 3, 3, generator=gen) * 0.02
    out["da.decoder.conv_in.bias"] = torch.zeros(features)
    out["loss.logvar"] = torch.zeros(())
    out["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=gen)
    return {"state_dict": out, "global_step": 5000}


def tiny_vavae_davae(seed: int = 0):
    """A DA-VAE on the tiny VA-VAE, as the ImageNet line builds it (D = 3C, decoder reads the raw base)."""
    from davae_core.davae_model import DAVAE

    vae = tiny_vavae(seed)
    stats = latent_stats(TINY_BASE_CHANNELS, seed)
    vae.register_to_config(latents_mean=stats["mean"].flatten().tolist(), latents_std=stats["std"].flatten().tolist(),
                           scaling_factor=1.0)
    torch.manual_seed(seed + 1)
    model = DAVAE.from_base_vae(vae, TINY_DETAIL_CHANNELS, base_name="vavae", decoder_base_space="raw")
    with torch.no_grad():  # a trained shortcut is not zero: make its path observable
        model.detail_down.shortcut_proj.weight.normal_(0.0, 0.02)
    return model.eval()


TINY_CLASSES = ("n01440764", "n01443537")  # two ImageNet wnids: labels 0 and 1 once sorted


def write_class_folder(root: str | Path, classes: tuple[str, ...] = TINY_CLASSES, per_class: int = 4, seed: int = 0) -> tuple[str, ...]:
    """``root/<class>/<n>.png``: random images of a few sizes (none square, none the training resolution)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = 136 + 20 * c, 150 + 10 * i
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(Path(root) / name / f"{i}.png")
    return classes


def write_fixtures(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}

    vae = randomize(tiny_vavae(seed), seed)
    torch.save(vavae_checkpoint(vae, seed), out / "vavae.pt")
    torch.save(latent_stats(TINY_BASE_CHANNELS, seed), out / "latents_stats.pt")
    files["vavae.pt"] = {"config": dict(vae.config), "layout": "LDM keys under state_dict, plus training-only keys"}

    torch.save(lightningdit_checkpoint(tiny_dit(seed=seed), tiny_dit(seed=seed + 1)), out / "lightningdit.pt")
    files["lightningdit.pt"] = {**TINY_DIT, "in_channels": TINY_BASE_CHANNELS}

    davae = tiny_vavae_davae(seed)
    torch.save(authors_imagenet_tokenizer_checkpoint(davae, seed), out / "authors_davae.ckpt")
    channels = TINY_BASE_CHANNELS + TINY_DETAIL_CHANNELS
    torch.save(latent_stats(channels, seed + 3), out / "authors_latents_stats.pt")
    merged = tiny_dit(channels, seed=seed + 2)
    torch.save(lightningdit_checkpoint(merged, merged), out / "authors_dit.pt")
    files["authors_davae.ckpt"] = {"base_channels": TINY_BASE_CHANNELS, "detail_channels": TINY_DETAIL_CHANNELS}
    files["authors_dit.pt"] = {**TINY_DIT, "in_channels": channels}

    (out / "vavae_config.json").write_text(json.dumps(dict(vae.config), default=list))
    from davae_core.checkpoint import save_davae

    save_davae(davae, out / "davae_vavae.safetensors")
    files["davae_vavae.safetensors"] = {"base_channels": TINY_BASE_CHANNELS, "detail_channels": TINY_DETAIL_CHANNELS}
    files["train"] = {"classes": list(write_class_folder(out / "train", seed=seed))}

    manifest = {"seed": seed, "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m davae_training.imagenet.fixtures", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in write_fixtures(args.out_dir, args.seed)["files"]:
        print(f"wrote {Path(args.out_dir) / name}")


if __name__ == "__main__":
    main()
