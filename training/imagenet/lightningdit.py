"""LightningDiT (hustvl/LightningDiT), the class-conditional DiT of the paper's ImageNet line.

DiT with RMSNorm, a SwiGLU feed-forward, 2D rotary embeddings on q and k beside the frozen
sin-cos position embedding, optional RMS qk-norm, and adaLN-Zero modulation from the sum of
a timestep and a class embedding (1001 rows: class 1000 is the null class of classifier-free
guidance).  Time runs from 0 (noise) to 1 (data) and goes into the embedding unscaled.

Parameter names follow the public checkpoint (``x_embedder.proj``, ``t_embedder.mlp``,
``y_embedder.embedding_table``, ``blocks.N.{norm1,attn.qkv,attn.q_norm,attn.proj,norm2,
mlp.w12,mlp.w3,adaLN_modulation.1}``, ``final_layer.{norm_final,linear,adaLN_modulation.1}``,
``pos_embed``), so its state dict loads as it is.  The RoPE tables the checkpoint also stores
are recomputed here (:mod:`.lightningdit_checkpoint` checks they agree).

Label dropout lives in the objective (:func:`.flow.drop_labels`), not in ``forward``, so a
forward pass is deterministic and all randomness comes from the caller's generator.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding
from einops import rearrange
from torch import nn

NORM_EPS = 1e-6
FREQUENCY_EMBEDDING_SIZE = 256
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class LightningDiTConfig:
    input_size: int = 16  # latent grid side (ImageNet 256 at f16)
    patch_size: int = 1
    in_channels: int = 32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    ffn_hidden_size: int = 3072  # SwiGLU width: int(2/3 * int(hidden * mlp_ratio 4))
    num_classes: int = 1000
    use_qknorm: bool = False  # the public 800-epoch checkpoint was trained without it

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into {self.num_heads} heads whose width is a multiple "
                "of 4 (2D RoPE rotates pairs along two axes)"
            )
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def swiglu_width(hidden_size: int, mlp_ratio: float = 4.0) -> int:
    return int(2 / 3 * int(hidden_size * mlp_ratio))


def _preset(depth: int, hidden: int, heads: int, patch: int) -> dict[str, int]:
    return {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch, "ffn_hidden_size": swiglu_width(hidden)}


PRESETS: dict[str, dict[str, int]] = {
    "XL/1": _preset(28, 1152, 16, 1),
    "XL/2": _preset(28, 1152, 16, 2),
    "L/2": _preset(24, 1024, 16, 2),
    "B/1": _preset(12, 768, 12, 1),
    "B/2": _preset(12, 768, 12, 2),
}


def lightningdit_config(preset: str = "XL/1", **fields: Any) -> LightningDiTConfig:
    """A named size (``XL/1``: depth 28, width 1152, 16 heads, patch 1) with other fields set."""
    if preset not in PRESETS:
        raise ValueError(f"unknown LightningDiT size {preset!r}; known: {', '.join(PRESETS)}")
    return LightningDiTConfig(**{**PRESETS[preset], **fields})


# ------------------------------------------------------------------ pieces
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RotaryEmbedding2D(nn.Module):
    """2D RoPE over a ``grid x grid`` token grid (row-major tokens).

    The first half of each head's channels rotates with the token's row, the second half with
    its column; within a half, channel pairs ``(2i, 2i+1)`` turn by ``pos * theta^(-2i / half)``.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = ROPE_THETA):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
        angles = torch.outer(torch.arange(grid, dtype=torch.float32), freqs).repeat_interleave(2, dim=-1)  # (grid, half)
        rows = angles[:, None, :].expand(grid, grid, half)
        cols = angles[None, :, :].expand(grid, grid, half)
        table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
        self.register_buffer("cos", table.cos(), persistent=False)
        self.register_buffer("sin", table.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, heads, tokens, head_dim)."""
        pairs = rearrange(x, "... (d two) -> ... d two", two=2)
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * self.cos.to(x.dtype) + turned * self.sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``[a | b] = w12(x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def _ada_ln(dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))


class LightningDiTBlock(nn.Module):
    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, config.num_heads, config.use_qknorm)
        self.norm2 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.mlp = SwiGLU(dim, config.ffn_hidden_size)
        self.adaLN_modulation = _ada_ln(dim, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope)
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        dim, p = config.hidden_size, config.patch_size
        self.norm_final = nn.RMSNorm(dim, eps=NORM_EPS)
        self.linear = nn.Linear(dim, p * p * config.in_channels)
        self.adaLN_modulation = _ada_ln(dim, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # DiT's frequencies: [cos | sin] of t * 10000^(-i / 128)
        freq = get_timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # the last row: null class (CFG)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


# ------------------------------------------------------------------ the model
class LightningDiT(nn.Module):
    """``forward(x (B, C, H, W), t (B,) in [0, 1], y (B,) class ids) -> velocity (B, C, H, W)``."""

    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        self.config = config
        self.in_channels = self.out_channels = config.in_channels  # C+D once DA heads are attached
        dim = config.hidden_size
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(config.num_classes, dim)
        pos = get_2d_sincos_pos_embed(dim, config.grid, base_size=config.grid, output_type="pt")
        self.register_buffer("pos_embed", pos.float().unsqueeze(0))  # frozen, stored in the checkpoint
        self.rope = RotaryEmbedding2D(config.head_dim, config.grid)
        self.blocks = nn.ModuleList(LightningDiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.gradient_checkpointing = False
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, adaLN and output zeroed (the model starts at 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def _check_input(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        side = self.config.input_size
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (side, side):
            raise ValueError(
                f"LightningDiT input must have shape (B, {self.in_channels}, {side}, {side}) (its position "
                f"tables are fixed to that grid), got {tuple(x.shape)}"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        p, g = self.config.patch_size, self.config.grid
        return rearrange(tokens, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=g, gw=g, p=p, q=p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_input(x, t, y)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        run = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False) if (
            self.gradient_checkpointing and torch.is_grad_enabled()) else (lambda f, *a: f(*a))
        for block in self.blocks:
            h = run(block, h, c, self.rope)
        return self.unpatchify(self.final_layer(h, c))
