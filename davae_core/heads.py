"""DA heads for an MMDiT (paper Sec. 3.2): P' reads the detail channels, O' writes them.

Both start at zero, so a patched model is exactly the pretrained one on the base channels
and predicts zero detail.  The wrappers take the stock layers as they are, which lets the
same code patch diffusers' ``SD3Transformer2DModel`` (``pos_embed.proj``, ``proj_out``) and
ComfyUI's MMDiT (``x_embedder.proj``, ``final_layer.linear``), whose per-patch channel order
is the same: ``(p, p, c)`` with channels fastest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class HeadsConfig:
    hidden_size: int
    patch_size: int = 2
    base_channels: int = 16
    detail_channels: int = 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadsConfig":
        return cls(**{k: int(d[k]) for k in ("hidden_size", "patch_size", "base_channels", "detail_channels")})


class DAHeads(nn.Module):
    """P' = Conv2d(D, hidden, p, p) and O' = Linear(hidden, p*p*D), zero-initialised.

    Optional ``base_embed`` / ``base_out`` hold retrained copies of the stock P and O (stage 2
    trains them in full); when present they replace the stock layers on patching.
    """

    def __init__(
        self,
        config: HeadsConfig,
        conv_cls: Callable[..., nn.Conv2d] = nn.Conv2d,
        linear_cls: Callable[..., nn.Linear] = nn.Linear,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.config = config
        p, d, hidden = config.patch_size, config.detail_channels, config.hidden_size
        kw = {"device": device, "dtype": dtype}
        self.detail_embed = conv_cls(d, hidden, kernel_size=p, stride=p, **kw)
        self.detail_out = linear_cls(hidden, p * p * d, **kw)
        self.base_embed: nn.Module | None = None
        self.base_out: nn.Module | None = None
        self.zero_()

    @torch.no_grad()
    def zero_(self) -> "DAHeads":
        for layer in (self.detail_embed, self.detail_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return self

    def set_base_layers(self, base_embed: nn.Module | None, base_out: nn.Module | None) -> None:
        self.base_embed, self.base_out = base_embed, base_out

    def add_base_layers(
        self,
        conv_cls: Callable[..., nn.Conv2d] = nn.Conv2d,
        linear_cls: Callable[..., nn.Linear] = nn.Linear,
        **kw: Any,
    ) -> "DAHeads":
        """Empty P and O of this config's shapes, for loading retrained ones into."""
        c, p, hidden = self.config.base_channels, self.config.patch_size, self.config.hidden_size
        self.set_base_layers(conv_cls(c, hidden, kernel_size=p, stride=p, **kw), linear_cls(hidden, p * p * c, **kw))
        return self


class DetailPatchEmbed(nn.Module):
    """``P(x[:, :C]) + P'(x[:, C:])``: the stock embedder keeps the base channels."""

    def __init__(self, stock: nn.Module, detail: nn.Module, base_channels: int):
        super().__init__()
        self.stock = stock
        self.detail = detail
        self.base_channels = base_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.base_channels
        base = self.stock(x[:, :c])
        return base + self.detail(x[:, c:]).to(base.dtype)


class DetailOutputLayer(nn.Module):
    """Per patch, ``[O(h) | O'(h)]`` in latent channel order: ``(p*p*C) + (p*p*D) -> p*p*(C+D)``."""

    def __init__(self, stock: nn.Module, detail: nn.Module, patch_size: int, base_channels: int, detail_channels: int):
        super().__init__()
        self.stock = stock
        self.detail = detail
        self.pp = patch_size * patch_size
        self.base_channels = base_channels
        self.detail_channels = detail_channels

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        base = self.stock(h).unflatten(-1, (self.pp, self.base_channels))
        detail = self.detail(h).to(base.dtype).unflatten(-1, (self.pp, self.detail_channels))
        return torch.cat([base, detail], dim=-1).flatten(-2)


def split_patch_output(out: torch.Tensor, config: HeadsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :class:`DetailOutputLayer` for tokens ``(..., p*p*(C+D))``."""
    pp = config.patch_size**2
    both = out.unflatten(-1, (pp, config.base_channels + config.detail_channels))
    c = config.base_channels
    return both[..., :c].flatten(-2), both[..., c:].flatten(-2)


# ------------------------------------------------------------------ diffusers SD3 transformer
def _stock(module: nn.Module) -> nn.Module:
    return module.stock if isinstance(module, (DetailPatchEmbed, DetailOutputLayer)) else module


def heads_config_for_diffusers(transformer: nn.Module, detail_channels: int = 16) -> HeadsConfig:
    proj = _stock(transformer.pos_embed.proj)
    return HeadsConfig(
        hidden_size=proj.out_channels,
        patch_size=proj.kernel_size[0],
        base_channels=proj.in_channels,
        detail_channels=detail_channels,
    )


def attach_to_sd3_transformer(transformer: nn.Module, heads: DAHeads) -> nn.Module:
    """Patch a diffusers ``SD3Transformer2DModel`` in place so it reads and writes C+D channels.

    Idempotent: patching again replaces the heads instead of stacking them.  When ``heads``
    carries ``base_embed`` / ``base_out`` those replace the stock P and O.
    """
    cfg = heads.config
    proj = _stock(transformer.pos_embed.proj)
    out = _stock(transformer.proj_out)
    expected = heads_config_for_diffusers(transformer, cfg.detail_channels)
    if expected != cfg:
        raise ValueError(f"DA heads were made for {cfg}, but the transformer needs {expected}")
    if heads.base_embed is not None:
        proj = heads.base_embed
    if heads.base_out is not None:
        out = heads.base_out
    transformer.pos_embed.proj = DetailPatchEmbed(proj, heads.detail_embed, cfg.base_channels)
    transformer.proj_out = DetailOutputLayer(out, heads.detail_out, cfg.patch_size, cfg.base_channels, cfg.detail_channels)
    channels = cfg.base_channels + cfg.detail_channels
    transformer.out_channels = channels
    transformer.register_to_config(in_channels=channels, out_channels=channels)
    return transformer


def heads_from_sd3_transformer(transformer: nn.Module, include_base: bool = False) -> DAHeads:
    """The DAHeads module living inside a patched transformer (shares its parameters)."""
    embed, out = transformer.pos_embed.proj, transformer.proj_out
    if not isinstance(embed, DetailPatchEmbed) or not isinstance(out, DetailOutputLayer):
        raise ValueError("this transformer carries no DA heads; call attach_to_sd3_transformer first")
    cfg = HeadsConfig(embed.stock.out_channels, embed.stock.kernel_size[0], embed.base_channels, out.detail_channels)
    heads = DAHeads(cfg, device="meta")  # placeholders, replaced by the live layers below
    heads.detail_embed, heads.detail_out = embed.detail, out.detail
    if include_base:
        heads.set_base_layers(embed.stock, out.stock)
    return heads
