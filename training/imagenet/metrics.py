"""FID and Inception Score of generated images, through torchmetrics.

    python -m davae_training.imagenet.metrics samples.npz --ref VIRTUAL_imagenet512.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --num 50000      # FID-50k (10000: FID-10k)

Images go in as uint8 ``(B, 3, H, W)``, as ADM's sample files hold them.  The feature network
is injectable: real runs name the local weights file of torch-fidelity's TF-Inception port
(torchmetrics' own ``NoTrainInceptionV3``; nothing is downloaded), tests pass a tiny module.
FID is taken against reference statistics ``mu`` / ``sigma`` from an ``.npz`` (ADM's
``VIRTUAL_imagenet*_labeled.npz`` layout): they are written into the metric's real-feature
state, so only the generated side is computed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

INCEPTION_WEIGHTS_HINT = (
    "name the local TF-Inception weights torchmetrics uses (torch-fidelity's pt_inception-2015-12-05-6726825d.pth) "
    "with --inception-weights / inception_weights=; they cannot be downloaded at run time"
)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> uint8, rounded as a PNG writer would."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def inception(feature: str, weights: str | os.PathLike | None) -> nn.Module:
    """torchmetrics' TF-Inception (``"2048"`` pool features or ``"logits_unbiased"``) from a local weights file."""
    if weights is None or not Path(weights).is_file():
        raise FileNotFoundError(f"no Inception weights at {weights!r}: {INCEPTION_WEIGHTS_HINT}")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError("torchmetrics' Inception needs torch-fidelity: pip install -e \".[eval]\"")
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[feature], feature_extractor_weights_path=str(weights))


def read_reference_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` (F,) and ``sigma`` (F, F) of a reference ``.npz`` (no pickles), checked."""
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: no 'mu' / 'sigma' arrays (found {', '.join(data.files)}); not FID reference statistics")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (F,) and (F, F)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: its statistics hold non-finite values")
    return mu, sigma


def set_reference_statistics(fid, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Make ``mu`` / ``sigma`` the real side of a torchmetrics FID (kept across ``reset()``).

    The metric keeps sums: with n = 2 samples, ``sum = 2 mu`` and ``cov_sum = sigma + 2 mu mu^T``
    give back exactly ``mu`` and ``sigma``.  Single process: every rank's real sums would add up.
    """
    features = fid.real_features_sum.shape[0]
    if mu.shape != (features,):
        raise ValueError(f"the reference statistics have {mu.shape[0]} features; the feature network gives {features}")
    mu_t, sigma_t = torch.from_numpy(mu), torch.from_numpy(sigma)
    fid.reset_real_features = False
    fid.real_features_sum = (2 * mu_t).to(fid.real_features_sum)
    fid.real_features_cov_sum = (sigma_t + 2 * torch.outer(mu_t, mu_t)).to(fid.real_features_cov_sum)
    fid.real_features_num_samples = torch.tensor(2, dtype=torch.long, device=fid.real_features_sum.device)


def make_fid(feature: nn.Module | None = None, inception_weights: str | os.PathLike | None = None,
             reference: str | os.PathLike | None = None):
    """FID on uint8 images; ``feature`` injects the network, else TF-Inception from ``inception_weights``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = feature if feature is not None else inception("2048", inception_weights)
    fid = FrechetInceptionDistance(feature=net, input_img_size=(3, 64, 64))
    if reference is not None:
        set_reference_statistics(fid, *read_reference_statistics(reference))
    return fid


def make_inception_score(feature: nn.Module | None = None, inception_weights: str | os.PathLike | None = None, splits: int = 10):
    """Inception Score on uint8 images; ``feature`` (returning class logits) injects the network."""
    from torchmetrics.image.inception import InceptionScore

    return InceptionScore(feature=feature if feature is not None else inception("logits_unbiased", inception_weights), splits=splits)


def images_from_npz(path: str | os.PathLike, batch: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """ADM's sample files: ``arr_0`` uint8 (N, H, W, 3) -> uint8 batches (B, 3, H, W)."""
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path}: no 'arr_0' array of images (found {', '.join(data.files)})")
        images = data["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 (N, H, W, 3)")
    images = images[:limit]
    for start in range(0, len(images), batch):
        yield torch.from_numpy(images[start:start + batch]).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate(batches: Iterable[torch.Tensor], fid=None, inception_score=None, progress: bool = False) -> dict[str, float]:
    """Feed uint8 image batches to the metrics; returns ``fid``, ``inception_score`` (mean, std) and ``num_images``."""
    count = 0
    for images in tqdm(batches, desc="scoring", disable=not progress):
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (B, 3, H, W) (use to_uint8), got {images.dtype}")
        if fid is not None:
            fid.update(images, real=False)
        if inception_score is not None:
            inception_score.update(images)
        count += images.shape[0]
    out: dict[str, float] = {"num_images": count}
    if fid is not None:
        out["fid"] = float(fid.compute())
    if inception_score is not None:
        mean, std = inception_score.compute()
        out.update(inception_score=float(mean), inception_score_std=float(std))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m davae_training.imagenet.metrics", description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", help="ADM-style .npz of generated images (arr_0: uint8 N x H x W x 3)")
    ap.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma), e.g. ADM's VIRTUAL_imagenet512_labeled.npz")
    ap.add_argument("--inception-weights", required=True, help="local pt_inception-2015-12-05-6726825d.pth")
    ap.add_argument("--num", type=int, default=None, help="score the first N images (10000: FID-10k, 50000: FID-50k)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--no-is", action="store_true", help="FID only")
    args = ap.parse_args(argv)
    fid = make_fid(inception_weights=args.inception_weights, reference=args.ref)
    score = None if args.no_is else make_inception_score(inception_weights=args.inception_weights)
    result = evaluate(images_from_npz(args.samples, args.batch, args.num), fid, score, progress=True)
    if args.num is not None and result["num_images"] < args.num:
        raise SystemExit(f"{args.samples} holds {result['num_images']} images, fewer than --num {args.num}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
