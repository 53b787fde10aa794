"""The tokenizer objective (METHOD.md Eq. 5-6): L1, LPIPS, hinge PatchGAN, KL and detail alignment.

Every weight comes from :class:`TokenizerLossConfig`.  LPIPS is pluggable: the ``lpips`` package
or torchmetrics' LPIPS when their pretrained weights can be loaded, otherwise - explicitly, with a
logged warning - a fixed random-feature stand-in that still carries gradient.  A perceptual
weight is never silently dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from davae_core import alignment_loss

logger = logging.getLogger("davae_training.losses")

PerceptualFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ([-1,1], [-1,1]) -> per-sample (B,)


@dataclass
class TokenizerLossConfig:
    l1_weight: float = 2.0
    # pixels the L1 is measured on: "zero_one" as the authors' code does (half our [-1, 1] distance,
    # so weight 2 there is weight 1 here) or "minus_one_one" (our model's native range)
    l1_pixel_range: str = "minus_one_one"
    lpips_weight: float = 1.0
    lpips_backend: str = "auto"  # "auto" | "lpips" | "torchmetrics" | "fallback"
    lpips_net: str = "vgg"  # backbone for the real LPIPS: "vgg" | "alex" | "squeeze"
    lpips_allow_fallback: bool = True  # False: refuse to train without real LPIPS weights
    kl_weight: float = 1e-7
    # "sum": KL summed over latent elements, mean over the batch; "mean": mean over every element
    # (the authors' ImageNet code, pp_style), 1/(D*h*w) of the former
    kl_reduction: str = "sum"
    align_weight: float = 1.0
    # the authors' ImageNet recipe: align_weight times |grad nll| / |grad align| at the detail down conv
    align_adaptive: bool = False
    gan_weight: float = 0.0  # 0 disables the discriminator entirely
    # optimizer step from which D trains and the adversarial term counts: a random discriminator against
    # a pretrained decoder hurts early (the authors' ImageNet recipe starts at 5001)
    gan_start_step: int = 5001
    gan_adaptive_weight: bool = False  # VQGAN-style balance of the adversarial gradient
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "group"  # "group" (DDP-safe) | "batch" | "none"
    disc_learning_rate: float | None = None  # default: the generator's
    target: str = "image"  # "image" | "stock_vae_reconstruction" (the authors' recipe)

    def __post_init__(self) -> None:
        if self.lpips_backend not in ("auto", "lpips", "torchmetrics", "fallback"):
            raise ValueError(f"loss.lpips_backend must be auto, lpips, torchmetrics or fallback, got {self.lpips_backend!r}")
        if self.target not in ("image", "stock_vae_reconstruction"):
            raise ValueError(f"loss.target must be 'image' or 'stock_vae_reconstruction', got {self.target!r}")
        if self.l1_pixel_range not in ("zero_one", "minus_one_one"):
            raise ValueError(f"loss.l1_pixel_range must be 'zero_one' or 'minus_one_one', got {self.l1_pixel_range!r}")
        if self.gan_start_step < 0:
            raise ValueError(f"loss.gan_start_step must be >= 0, got {self.gan_start_step}")
        if self.disc_norm not in ("group", "batch", "none"):
            raise ValueError(f"loss.disc_norm must be group, batch or none, got {self.disc_norm!r}")
        if self.kl_reduction not in ("sum", "mean"):
            raise ValueError(f"loss.kl_reduction must be 'sum' or 'mean', got {self.kl_reduction!r}")

    @property
    def uses_gan(self) -> bool:
        return self.gan_weight > 0


# ---------------------------------------------------------------------------- perceptual
class RandomFeaturePerceptual(nn.Module):
    """LPIPS-shaped distance on a fixed, seeded, untrained conv stack.

    Only a stand-in for when no pretrained LPIPS can be loaded: it compares unit-normalised
    feature maps at three scales like LPIPS does, and it is differentiable, but its features are
    random, so it is a weaker perceptual signal than the real network.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        layers = []
        c_in = 3
        for i, c in enumerate(channels):
            conv = nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (c_in * 9)) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            c_in = c
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(x.shape[0])
        hx, hy = x, y
        for conv in self.layers:
            hx, hy = F.relu(conv(hx)), F.relu(conv(hy))
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (nx - ny).pow(2).sum(1).mean(dim=(1, 2))
        return total


def _require(module: str, why: str) -> None:
    """Fail fast (before slow imports) when an optional package is absent."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{module} is not installed ({why})")


def _lpips_package(net: str) -> PerceptualFn:
    _require("lpips", "pip install lpips")
    import lpips  # optional dependency

    model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
    return _Wrapped(model, lambda m, a, b: m(a, b).flatten())


def _torchmetrics_lpips(net: str) -> PerceptualFn:
    _require("torchvision", "torchmetrics' LPIPS needs torchvision")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=False)
    model = metric.net.eval().requires_grad_(False)  # the differentiable network inside the metric
    return _Wrapped(model, lambda m, a, b: m(a, b).flatten())


class _Wrapped(nn.Module):
    def __init__(self, model: nn.Module, call: Callable):
        super().__init__()
        self.model = model
        self._call = call

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._call(self.model, x, y)


class PerceptualLoss(nn.Module):
    """Mean perceptual distance between images in [-1, 1]; ``backend`` says which network it is."""

    def __init__(self, net: nn.Module | PerceptualFn, backend: str):
        super().__init__()
        self.net = net
        self.backend = backend
        if isinstance(net, nn.Module):
            net.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x.float(), y.float()).mean()


def build_perceptual_loss(config: TokenizerLossConfig, net: nn.Module | PerceptualFn | None = None) -> PerceptualLoss:
    """The configured LPIPS; ``net`` injects one (tests, custom networks)."""
    if net is not None:
        return PerceptualLoss(net, "injected")
    tries = {"auto": ("lpips", "torchmetrics"), "lpips": ("lpips",), "torchmetrics": ("torchmetrics",), "fallback": ()}[config.lpips_backend]
    reasons = []
    for name in tries:
        try:
            fn = _lpips_package(config.lpips_net) if name == "lpips" else _torchmetrics_lpips(config.lpips_net)
            logger.info("LPIPS: using the %s implementation (%s)", name, config.lpips_net)
            return PerceptualLoss(fn, name)
        except Exception as e:  # missing package, missing weights, no network access
            reasons.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if tries and not config.lpips_allow_fallback:
        raise RuntimeError(
            "real LPIPS could not be loaded (" + "; ".join(reasons) + "). Install `lpips` (pip install lpips) "
            "and put its backbone weights in the torch hub cache, or set loss.lpips_allow_fallback=true"
        )
    if config.lpips_backend == "fallback":
        logger.warning("LPIPS: the random-feature stand-in was requested (loss.lpips_backend=fallback)")
    else:
        logger.warning(
            "LPIPS weights unavailable (%s); using the random-feature stand-in instead. It carries "
            "gradient but is a weaker perceptual signal: install `lpips` with its weights for real training.",
            "; ".join(reasons),
        )
    return PerceptualLoss(RandomFeaturePerceptual(), "random-feature-fallback")


# ---------------------------------------------------------------------------- discriminator
def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs to a map of real/fake logits, one per overlapping patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "group"):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for i in range(1, layers + 1):
            c_next = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(c, c_next, 4, stride, 1, bias=norm == "none"), _norm(norm, c_next), nn.LeakyReLU(0.2, True)]
            c = c_next
        blocks.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def gradient_norm_ratio(reference: torch.Tensor, loss: torch.Tensor, layer: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """``|grad reference| / (|grad loss| + 1e-4)`` at ``layer``, clamped to ``[0, max_ratio]``, detached."""
    ref_grad = torch.autograd.grad(reference, layer, retain_graph=True)[0]
    loss_grad = torch.autograd.grad(loss, layer, retain_graph=True)[0]
    return (ref_grad.norm() / (loss_grad.norm() + 1e-4)).clamp(0.0, max_ratio).detach()


def adaptive_gan_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """``|grad nll| / |grad g_loss|`` at the decoder's last layer: keeps the adversarial push in scale."""
    return gradient_norm_ratio(nll, g_loss, last_layer, max_weight)


def adaptive_alignment_weight(
    nll: torch.Tensor, align: torch.Tensor, detail_layer: torch.Tensor, scale: float = 0.5, max_weight: float = 1e8,
) -> torch.Tensor:
    """``scale * |grad nll| / |grad align|`` at the detail down conv (the authors' ImageNet recipe, scale 0.5):
    the alignment pulls on the detail encoder as hard as reconstruction does, whatever their scales."""
    return scale * gradient_norm_ratio(nll, align, detail_layer, max_weight)


# ---------------------------------------------------------------------------- the objective
def kl_loss(posterior: Any, reduction: str = "sum") -> torch.Tensor:
    """KL of the detail posterior to N(0, I), summed over latent elements (``"mean"``: averaged
    over them), mean over the batch."""
    kl = posterior.kl().mean()
    return kl / posterior.mean[0].numel() if reduction == "mean" else kl


class TokenizerLoss(nn.Module):
    """Generator-side terms and the discriminator's hinge loss, each weighted by the config."""

    def __init__(self, config: TokenizerLossConfig, perceptual: PerceptualLoss | None = None):
        super().__init__()
        self.config = config
        self.perceptual = perceptual if perceptual is not None else (
            build_perceptual_loss(config) if config.lpips_weight > 0 else None
        )

    def gan_active(self, step: int) -> bool:
        return self.config.uses_gan and step >= self.config.gan_start_step

    def generator_loss(
        self, outputs: dict[str, Any], target: torch.Tensor, step: int,
        discriminator: nn.Module | None = None, last_layer: torch.Tensor | None = None,
        detail_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``outputs`` from ``DAVAE.forward``; ``target`` in [-1, 1]. Returns (total, detached logs).

        ``detail_layer`` (``model.detail_down.conv.weight``) is where ``align_adaptive`` measures gradients.
        """
        cfg = self.config
        rec = outputs["reconstruction"]
        logs: dict[str, torch.Tensor] = {}
        l1 = (rec.float() - target.float()).abs().mean()
        if cfg.l1_pixel_range == "zero_one":
            l1 = l1 * 0.5  # |a/2 - b/2|: the same distance on [0, 1] pixels
        nll = cfg.l1_weight * l1
        logs["l1"] = l1
        if self.perceptual is not None and cfg.lpips_weight > 0:
            lp = self.perceptual(rec, target)
            nll = nll + cfg.lpips_weight * lp
            logs["lpips"] = lp
        kl = kl_loss(outputs["posterior"], cfg.kl_reduction)
        align = alignment_loss(outputs["detail"].float(), outputs["base"].float())
        align_weight = torch.tensor(cfg.align_weight, device=rec.device)
        if cfg.align_adaptive and cfg.align_weight > 0 and torch.is_grad_enabled():
            if detail_layer is None:
                raise ValueError("loss.align_adaptive needs detail_layer= (the detail down conv's weight) to measure gradients at")
            align_weight = adaptive_alignment_weight(nll, align, detail_layer, cfg.align_weight)
        total = nll + cfg.kl_weight * kl + align_weight * align
        logs["kl"] = kl
        logs["align"] = align
        logs["align_weight"] = align_weight
        if discriminator is not None and self.gan_active(step):
            g = hinge_g_loss(discriminator(rec))
            weight = torch.tensor(cfg.gan_weight, device=rec.device)
            if cfg.gan_adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                weight = weight * adaptive_gan_weight(nll, g, last_layer)
            total = total + weight * g
            logs["gan_g"] = g
            logs["gan_weight"] = weight
        logs["total"] = total
        return total, {k: v.detach().float() for k, v in logs.items()}

    def discriminator_loss(self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Hinge loss of the discriminator on real images and (detached) reconstructions.

        One pass over both together: DDP expects a single forward per backward.
        """
        logits_real, logits_fake = discriminator(torch.cat([real.detach(), fake.detach()])).chunk(2)
        return hinge_d_loss(logits_real, logits_fake)
