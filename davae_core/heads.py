"""DA heads for an MMDiT (paper Sec. 3.2): P' reads the detail channels, O' writes them.

Both start at zero, so a patched model is exactly the pretrained one on the base channels
and predicts zero detail.  The wrappers take the stock layers as they are, which lets the
same code patch diffusers' ``SD3Transformer2DModel`` (``pos_embed.proj``, ``proj_out``) and
ComfyUI's MMDiT (``x_embedder.proj``, ``final_layer.linear``), whose per-patch channel order
is the same: ``(p, p, c)`` with channels fastest.
"""

from __future__ import annotations

import weakref
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


# ------------------------------------------------------------------ fused for inference
def fuse_embed_weights(
    stock_weight: torch.Tensor, stock_bias: torch.Tensor, detail_weight: torch.Tensor, detail_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """P and P' as one conv over C+D channels: ``[W_P | W_P']`` on the input channels, ``b_P + b_P'``."""
    return torch.cat([stock_weight, detail_weight], dim=1), stock_bias + detail_bias


def fuse_output_weights(
    stock_weight: torch.Tensor, stock_bias: torch.Tensor, detail_weight: torch.Tensor, detail_bias: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """O and O' as one linear whose rows are in per-patch latent order ``(p, p, C+D)``."""
    pp = patch_size * patch_size

    def per_patch(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(0, (pp, t.shape[0] // pp))

    weight = torch.cat([per_patch(stock_weight), per_patch(detail_weight)], dim=1).flatten(0, 1)
    bias = torch.cat([per_patch(stock_bias), per_patch(detail_bias)], dim=1).flatten()
    return weight, bias


class FusedWeightCache:
    """One fused (weight, bias), kept while the weights it was built from are the same objects and
    ``state`` (what else says the weights changed) is equal.

    ``state`` None means "do not cache": the states below are None while torch.compile traces,
    so the fusion becomes part of the graph, which reads the weights as inputs and depends on
    no Python-side cache (no graph break, nothing stale).
    """

    def __init__(self):
        self._sources: tuple = ()  # weak references: a cache keeps no replaced weight alive
        self._state: Any = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, sources: tuple, state: Any, build: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        if state is None:
            return build()
        hit = (
            self._value is not None
            and len(sources) == len(self._sources)
            and all(ref() is t for ref, t in zip(self._sources, sources))
            and self._state == state
        )
        if not hit:
            with torch.no_grad():
                self._value = build()
            self._sources, self._state = tuple(weakref.ref(t) for t in sources), state
        return self._value


def _plain_float(t: torch.Tensor | None) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fusable(layers: tuple[nn.Module, ...]) -> bool:
    """Fusing gives the layers' own result: plain float weights, no per-call weight functions
    (ComfyUI low-VRAM LoRA), and no gradients wanted (P' trains on its own, from zero)."""
    for layer in layers:
        if getattr(layer, "weight_function", None) or getattr(layer, "bias_function", None):
            return False
        for t in (layer.weight, layer.bias):
            if not _plain_float(t) or (t.requires_grad and torch.is_grad_enabled()):
                return False
    return True


def _eager_state(tensors: tuple[torch.Tensor, ...], x: torch.Tensor) -> tuple | None:
    """Plain PyTorch, eager: the tensors' storage and versions (``.data`` swaps change the one,
    optimizers and in-place edits bump the other); None, so no caching, for tensors made under
    inference mode, which keep no version, and while torch.compile traces.  ComfyUI's loaders
    make inference tensors: the node pack keys its cache on ComfyUI's patch state instead."""
    if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
        return None
    return (x.device, x.dtype, *((t.data_ptr(), t._version) for t in tensors))


class FusedPatchEmbed(DetailPatchEmbed):
    """P and P' as one conv over C+D channels (:func:`fuse_embed_weights`).  Inference only (the
    fused weight is a copy: no gradients reach P').

    Equal to :class:`DetailPatchEmbed` up to the order of one sum: that adds two convolutions'
    outputs, this sums all C+D input channels in one reduction (a few fp32 ulps apart).
    """

    def __init__(self, stock: nn.Module, detail: nn.Module, base_channels: int):
        super().__init__(stock, detail, base_channels)
        self.fused_cache = FusedWeightCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.base_channels + self.detail.weight.shape[1] or not fusable((self.stock, self.detail)):
            return super().forward(x)  # the stock layer names a wrong channel count
        tensors = (self.stock.weight, self.stock.bias, self.detail.weight, self.detail.bias)
        weight, bias = self.fused_cache.get(tensors, _eager_state(tensors, x), lambda: fuse_embed_weights(*(t.to(x) for t in tensors)))
        return nn.functional.conv2d(x, weight, bias, stride=self.stock.stride, padding=self.stock.padding)


class FusedOutputLayer(DetailOutputLayer):
    """O and O' as one linear whose rows are already in per-patch latent order (:func:`fuse_output_weights`).

    Every output is the same dot product as in :class:`DetailOutputLayer`, only the rows are
    interleaved, so the result is the same and no split/concatenate runs per step.
    """

    def __init__(self, stock: nn.Module, detail: nn.Module, patch_size: int, base_channels: int, detail_channels: int):
        super().__init__(stock, detail, patch_size, base_channels, detail_channels)
        self.patch_size = patch_size
        self.fused_cache = FusedWeightCache()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not fusable((self.stock, self.detail)):
            return super().forward(h)
        tensors = (self.stock.weight, self.stock.bias, self.detail.weight, self.detail.bias)
        weight, bias = self.fused_cache.get(
            tensors, _eager_state(tensors, h), lambda: fuse_output_weights(*(t.to(h) for t in tensors), self.patch_size)
        )
        return nn.functional.linear(h, weight, bias)


def fused_heads(embed: DetailPatchEmbed, out: DetailOutputLayer) -> tuple[FusedPatchEmbed, FusedOutputLayer]:
    """Fused twins of attached heads, sharing their layers (no copy until the first call)."""
    return (
        FusedPatchEmbed(embed.stock, embed.detail, embed.base_channels),
        FusedOutputLayer(out.stock, out.detail, int(round(out.pp**0.5)), out.base_channels, out.detail_channels),
    )


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


def fuse_sd3_transformer_heads(transformer: nn.Module) -> nn.Module:
    """Inference: swap the attached P+P' and O+O' for one conv and one linear each (shared weights).

    Training keeps the unfused form (P' and O' train on their own, from zero); the fused layers
    fall back to it whenever gradients are on, so this is safe to call on a training model too.
    """
    embed, out = transformer.pos_embed.proj, transformer.proj_out
    if not isinstance(embed, DetailPatchEmbed) or not isinstance(out, DetailOutputLayer):
        raise ValueError("this transformer carries no DA heads; call attach_to_sd3_transformer first")
    transformer.pos_embed.proj, transformer.proj_out = fused_heads(embed, out)
    return transformer
