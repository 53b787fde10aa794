"""Architecture config of a DA-VAE, free of any model library.

Both builders read it: :mod:`davae_core.davae_model` (diffusers trunks, for training) and
the node pack (ComfyUI's own trunks), so the file header alone says what to build.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .structured_latent import SD3_SCALE, SD3_SHIFT, LatentLayout, vae_shift_scale

# The diffusers config of the SD3 / SD3.5 VAE ("vae/config.json" of the official repos).
SD3_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": SD3_SCALE,
    "shift_factor": SD3_SHIFT,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

# Only these keys shape the modules; the rest of a diffusers config.json is ignored.
_ARCH_KEYS = tuple(SD3_VAE_CONFIG) + ("force_upcast", "latents_mean", "latents_std")


def tiny_vae_config(attention: bool = False) -> dict[str, Any]:
    """Four blocks like SD3 (so f8 -> f16 stays true) but narrow: for tests and the CPU demo."""
    return {
        **SD3_VAE_CONFIG,
        "block_out_channels": [8, 16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 64,
        "mid_block_add_attention": attention,
    }


@dataclass
class DAVAEConfig:
    base_vae: dict[str, Any] = field(default_factory=lambda: dict(SD3_VAE_CONFIG))
    detail_channels: int = 16
    base_name: str = "sd3"  # which pretrained VAE the base channels come from
    # Channel order the joint decoder's first conv was trained on.  Ours is base first; the
    # authors' SD3 checkpoints put detail first, and their up-block shortcut ties feature
    # channels to latent channels, so imported weights keep their order here.
    decoder_input_order: str = "base_detail"

    def __post_init__(self) -> None:
        if self.decoder_input_order not in ("base_detail", "detail_base"):
            raise ValueError(f"decoder_input_order must be 'base_detail' or 'detail_base', got {self.decoder_input_order!r}")
        self.base_vae = {k: v for k, v in dict(self.base_vae).items() if k in _ARCH_KEYS}
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            self.base_vae[k] = list(self.base_vae[k])

    @property
    def layout(self) -> LatentLayout:
        n_down = len(self.base_vae["block_out_channels"]) - 1
        return LatentLayout(self.base_vae["latent_channels"], self.detail_channels, factor=2 ** (n_down + 1))

    @property
    def base_shift(self) -> float:
        return vae_shift_scale(self.base_vae)[0]

    @property
    def base_scale(self) -> float:
        return vae_shift_scale(self.base_vae)[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DAVAEConfig":
        known = {k: d[k] for k in ("base_vae", "detail_channels", "base_name", "decoder_input_order") if k in d}
        return cls(**known)
