"""Reconstruction quality of a DA-VAE against the stock VAE, on a folder of images.

    python -m davae_training.stage1.evaluate --davae runs/davae_sd3/davae.safetensors \\
        --vae /models/stable-diffusion-3.5-medium --subfolder vae --images /data/val --resolution 1024 \\
        --out runs/davae_sd3/eval

Three reconstructions of every centre crop:

* ``davae``: the DA-VAE (structured latent, H/16 grid);
* ``stock_full``: the stock VAE at full resolution (H/8 grid, 4x the tokens);
* ``stock_half_upsampled``: the stock VAE on the 2x-downsampled image (the same H/16 grid as the
  DA-VAE), bicubically upsampled back - what the base channels alone would give.

Metrics (torchmetrics): PSNR, SSIM, LPIPS (the real network when its weights load, otherwise
the stand-in, reported under another name) and rFID (needs torch-fidelity and Inception weights;
``null`` with the reason otherwise).  Writes ``report.json`` and ``grid.png`` (input | DA-VAE |
stock full | stock half upsampled, one row per image).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from davae_core import DAVAE, load_davae

from davae_core.atomic_files import write_json_atomic
from davae_core.dtypes import DTYPES

from ..images import save_image_grid
from ..runtime import setup_plain_logging
from ..data.images import ImageDataConfig, ImageDataset, ResumableSampler, build_index, make_dataloader
from .losses import TokenizerLossConfig, build_perceptual_loss
from .config import TokenizerModelConfig
from .trainer import load_pretrained_vae

logger = logging.getLogger("davae_training")
METHODS = ("davae", "stock_full", "stock_half_upsampled")


@torch.no_grad()
def reconstruct_all(davae: DAVAE, vae, image01: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three reconstructions of a batch in [0, 1]."""
    dtype = next(vae.parameters()).dtype
    pm = image01 * 2 - 1

    def stock(x_pm: torch.Tensor) -> torch.Tensor:
        latent = vae.encode(x_pm.to(dtype)).latent_dist.mode()
        return vae.decode(latent).sample.float().clamp(-1, 1)

    base_latent = None
    if davae.base_encoder is None:  # a file exported without it: the stock VAE supplies the base latent
        base_latent = vae.encode(DAVAE.downsample(pm).to(dtype)).latent_dist.mode()[:, : davae.layout.base_channels]
    ours = davae.decode(davae.encode(image01.to(next(davae.parameters()).dtype), base_latent=base_latent)).float()
    full = (stock(pm) + 1) / 2
    half = stock(DAVAE.downsample(pm))
    half_up = (F.interpolate(half, size=image01.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1) + 1) / 2
    return {"davae": ours.clamp(0, 1), "stock_full": full, "stock_half_upsampled": half_up}


def _fid(device) -> Any:
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, normalize=True).to(device)


def evaluate(davae: DAVAE, vae, images: list[str], resolution: int, out_dir: str | Path, max_images: int | None = None,
             batch_size: int = 4, rfid: bool = True, lpips_backend: str = "auto", grid_images: int = 8,
             perceptual_net=None) -> dict[str, Any]:
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from tqdm.auto import tqdm

    out = Path(out_dir)
    device = next(davae.parameters()).device
    data = ImageDataConfig(sources=list(images), resolution=resolution, crop="center", max_images=max_images)
    records, scan = build_index(data)
    loader = make_dataloader(ImageDataset(records, data), ResumableSampler(len(records), 1, shuffle=False), num_workers=0)

    perceptual = build_perceptual_loss(TokenizerLossConfig(lpips_backend=lpips_backend), perceptual_net).to(device)
    lpips_name = "lpips" if perceptual.backend in ("lpips", "torchmetrics") else f"lpips_standin ({perceptual.backend})"
    psnr = {m: PeakSignalNoiseRatio(data_range=1.0).to(device) for m in METHODS}
    ssim = {m: StructuralSimilarityIndexMeasure(data_range=1.0).to(device) for m in METHODS}
    lpips_sum = {m: 0.0 for m in METHODS}
    fid: dict[str, Any] = {}
    fid_error = None
    if rfid:
        try:
            fid = {m: _fid(device) for m in METHODS}
        except Exception as e:  # torch-fidelity missing or Inception weights not downloadable
            fid_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning("rFID skipped: %s", fid_error)
    else:
        fid_error = "disabled (--no-rfid)"

    grid_rows: list[torch.Tensor] = []
    it = iter(loader)
    n = 0
    for _ in tqdm(range(0, len(records), batch_size), desc="evaluate"):
        chunk = [next(it)["pixels"] for _ in range(min(batch_size, len(records) - n))]
        img = torch.cat(chunk).to(device)
        recs = reconstruct_all(davae, vae, img)
        for m, rec in recs.items():
            psnr[m].update(rec, img)
            ssim[m].update(rec, img)
            lpips_sum[m] += float(perceptual.net(rec * 2 - 1, img * 2 - 1).sum())
            if fid:
                try:
                    fid[m].update(img, real=True)
                    fid[m].update(rec, real=False)
                except Exception as e:
                    fid_error, fid = f"{type(e).__name__}: {e}", {}
                    logger.warning("rFID skipped: %s", fid_error)
        for j in range(img.shape[0]):
            if len(grid_rows) < grid_images:
                grid_rows.append(torch.stack([img[j], recs["davae"][j], recs["stock_full"][j], recs["stock_half_upsampled"][j]]).cpu())
        n += img.shape[0]

    tokens = {"davae": (resolution // davae.layout.factor) ** 2,
              "stock_full": (resolution // (davae.layout.factor // 2)) ** 2,
              "stock_half_upsampled": (resolution // davae.layout.factor) ** 2}
    methods: dict[str, Any] = {}
    for m in METHODS:
        entry = {"psnr": float(psnr[m].compute()), "ssim": float(ssim[m].compute()), lpips_name: lpips_sum[m] / n,
                 "latent_cells": tokens[m]}
        entry["rfid"] = float(fid[m].compute()) if fid and n > 1 else None
        methods[m] = entry
    report = {
        "images": n, "resolution": resolution, "scan": asdict(scan), "lpips_backend": perceptual.backend,
        "rfid_unavailable": fid_error if not fid else None, "methods": methods,
        "columns_of_grid": ["input", "davae", "stock_full", "stock_half_upsampled"],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report)
    if grid_rows:
        save_image_grid(grid_rows, out / "grid.png")
    for m in METHODS:
        logger.info("%-22s PSNR %.2f  SSIM %.4f  %s %.4f  rFID %s", m, methods[m]["psnr"], methods[m]["ssim"], lpips_name,
                    methods[m][lpips_name], methods[m]["rfid"])
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m davae_training.stage1.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--davae", required=True, help="exported DA-VAE .safetensors")
    ap.add_argument("--vae", required=True, help="the stock VAE: diffusers AutoencoderKL folder (or 'fixture:tiny')")
    ap.add_argument("--subfolder", default=None, help="e.g. 'vae' inside a full SD3 folder")
    ap.add_argument("--images", nargs="+", required=True, help="image folders / .tar shards")
    ap.add_argument("--resolution", type=int, default=1024, help="centre-crop side (multiple of 16)")
    ap.add_argument("--out", required=True, help="folder for report.json and grid.png")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-rfid", action="store_true", help="skip rFID (it needs Inception weights)")
    ap.add_argument("--lpips-backend", default="auto", choices=["auto", "lpips", "torchmetrics", "fallback"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = ap.parse_args(argv)
    setup_plain_logging()
    dtype = DTYPES[args.dtype]
    davae = load_davae(args.davae, device=args.device, dtype=dtype)
    vae = load_pretrained_vae(TokenizerModelConfig(pretrained_vae=args.vae, subfolder=args.subfolder)).to(args.device, dtype)
    report = evaluate(davae, vae, args.images, args.resolution, args.out, args.max_images, args.batch_size,
                      rfid=not args.no_rfid, lpips_backend=args.lpips_backend)
    print(json.dumps(report["methods"], indent=2))


if __name__ == "__main__":
    main()
