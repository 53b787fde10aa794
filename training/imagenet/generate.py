"""Class-conditional samples of DA-VAE + LightningDiT, scored as they are made (FID-10k / FID-50k).

    python -m davae_training.imagenet.generate --davae davae_vavae.safetensors \\
        --dit lightningdit-xl.pt --heads da_heads.safetensors --num 50000 \\
        --ref VIRTUAL_imagenet512_labeled.npz --inception-weights pt_inception-2015-12-05-6726825d.pth

(``--merged-dit their_dit.pt`` instead of ``--dit``/``--heads`` reads the DA authors' merged
layout.)  Labels are class-balanced (``i mod 1000``), each image is sampled with the Euler
sampler (250 time points, time shift 0.3, CFG 4.0 from t = 0.2: the DA authors' settings)
and decoded by the DA-VAE; only Inception features are kept, so 50k images at 512 px never
sit in memory.  ``--save-npz`` also writes the images (ADM layout) for small runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from davae_core import load_davae, load_heads

from .da_heads import attach_da_heads, import_authors_dit
from .lightningdit import LightningDiT
from .lightningdit_checkpoint import load_lightningdit
from .metrics import evaluate, make_fid, make_inception_score, to_uint8
from .sampler import sample_euler


def class_balanced_labels(num: int, num_classes: int = 1000) -> torch.Tensor:
    return torch.arange(num) % num_classes


def load_models(davae_path: str, dit_path: str | None = None, heads_path: str | None = None,
                merged_dit_path: str | None = None, prefer: str = "ema"):
    """The DA-VAE and a LightningDiT reading its structured latent (heads attached)."""
    davae = load_davae(davae_path)
    if merged_dit_path is not None:
        dit, _ = import_authors_dit(merged_dit_path, davae.layout.base_channels, prefer)
    elif dit_path is not None and heads_path is not None:
        dit = attach_da_heads(load_lightningdit(dit_path, prefer), load_heads(heads_path))
    else:
        raise ValueError("give --merged-dit, or --dit with --heads")
    if dit.in_channels != davae.layout.channels:
        raise ValueError(f"the DiT reads {dit.in_channels} channels; the DA-VAE's latent has {davae.layout.channels}")
    return davae.eval(), dit.eval()


@torch.no_grad()
def generate_images(
    davae, dit: LightningDiT, num: int, batch: int, generator: torch.Generator, **sampling: Any,
) -> Iterator[torch.Tensor]:
    """uint8 image batches (B, 3, H, W) for class-balanced labels, ``sampling`` going to :func:`sample_euler`."""
    labels = class_balanced_labels(num, dit.config.num_classes)
    side = dit.config.input_size
    device = next(dit.parameters()).device
    for start in range(0, num, batch):
        y = labels[start:start + batch].to(device)
        latents = sample_euler(dit, y, (dit.in_channels, side, side), generator,
                               null_class=dit.config.null_class, **sampling)
        yield to_uint8(davae.decode(latents.to(next(davae.parameters()).dtype)).float().cpu())


def run(args: argparse.Namespace, fid_feature: nn.Module | None = None, is_feature: nn.Module | None = None) -> dict[str, Any]:
    davae, dit = load_models(args.davae, args.dit, args.heads, args.merged_dit, args.weights)
    device = torch.device(args.device)
    davae.to(device)
    dit.to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    sampling = dict(steps=args.steps, shift=args.shift, cfg_scale=args.cfg, cfg_interval_start=args.interval)
    kept: list[np.ndarray] = []

    def images() -> Iterator[torch.Tensor]:
        for batch in generate_images(davae, dit, args.num, args.batch, generator, **sampling):
            if args.save_npz:
                kept.append(batch.permute(0, 2, 3, 1).numpy())
            yield batch

    fid = make_fid(fid_feature, args.inception_weights, args.ref)
    score = make_inception_score(is_feature, args.inception_weights)
    result = {**evaluate(images(), fid, score, progress=True), **sampling, "seed": args.seed, "weights": args.weights}
    if args.save_npz:
        np.savez(args.save_npz, arr_0=np.concatenate(kept))
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m davae_training.imagenet.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--davae", required=True, help="our DA-VAE file (VA-VAE base)")
    ap.add_argument("--dit", help="LightningDiT {model, ema} checkpoint (base channels)")
    ap.add_argument("--heads", help="our DA heads file for that DiT")
    ap.add_argument("--merged-dit", help="the DA authors' merged DiT checkpoint instead of --dit/--heads")
    ap.add_argument("--weights", choices=["ema", "model"], default="ema")
    ap.add_argument("--num", type=int, default=50000, help="images (50000: FID-50k, 10000: FID-10k)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--shift", type=float, default=0.3)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--interval", type=float, default=0.2, help="CFG from this t on (t = 1 is data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma)")
    ap.add_argument("--inception-weights", required=True, help="local pt_inception-2015-12-05-6726825d.pth")
    ap.add_argument("--save-npz", help="also write the images here (ADM layout; small runs only)")
    ap.add_argument("--out", help="write the scores as JSON here")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
