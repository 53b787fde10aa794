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

# The VA-VAE of the paper's ImageNet line (hustvl/vavae-imagenet256-f16d32-dinov2): LDM's KL
# autoencoder at widths 128/128/256/256/512 (f16, 32 channels), 2 ResNet blocks per encoder level
# (3 per decoder level), attention after each ResNet block of the deepest level and in the middle.
# Its DiT reads ``(z - mean) / std`` per channel (``latents_stats.pt``): the importer fills
# ``latents_mean`` / ``latents_std`` from that file, with ``scaling_factor`` 1 as LightningDiT uses it.
VAVAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 128, 256, 256, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 32,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 1.0,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
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


def tiny_vavae_config(latent_channels: int = 4) -> dict[str, Any]:
    """VA-VAE's shape rules (five levels, f16, attention at the deepest level) at toy width."""
    return {
        **VAVAE_CONFIG,
        "block_out_channels": [8, 8, 16, 16, 32],
        "latent_channels": latent_channels,
        "norm_num_groups": 4,
        "sample_size": 64,
    }


DECODER_BASE_SPACES = ("normalized", "raw")


@dataclass
class DAVAEConfig:
    base_vae: dict[str, Any] = field(default_factory=lambda: dict(SD3_VAE_CONFIG))
    detail_channels: int = 16
    base_name: str = "sd3"  # which pretrained VAE the base channels come from
    # Channel order the joint decoder's first conv was trained on.  Ours is base first; the
    # authors' SD3 checkpoints put detail first, and their up-block shortcut ties feature
    # channels to latent channels, so imported weights keep their order here.
    decoder_input_order: str = "base_detail"
    # Which base latent the joint decoder reads (and detail alignment targets): the normalised one
    # (SD3, as the authors' SD3 code) or the base VAE's raw posterior mean (their ImageNet code).
    decoder_base_space: str = "normalized"

    def __post_init__(self) -> None:
        if self.decoder_input_order not in ("base_detail", "detail_base"):
            raise ValueError(f"decoder_input_order must be 'base_detail' or 'detail_base', got {self.decoder_input_order!r}")
        if self.decoder_base_space not in DECODER_BASE_SPACES:
            raise ValueError(f"decoder_base_space must be 'normalized' or 'raw', got {self.decoder_base_space!r}")
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

    @property
    def base_channel_stats(self) -> tuple[list[float] | None, list[float] | None]:
        """Per-channel ``(mean, std)`` of the base latent (diffusers' ``latents_mean`` / ``latents_std``), if set."""
        mean, std = self.base_vae.get("latents_mean"), self.base_vae.get("latents_std")
        return (list(mean), list(std)) if mean is not None and std is not None else (None, None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DAVAEConfig":
        fields = ("base_vae", "detail_channels", "base_name", "decoder_input_order", "decoder_base_space")
        return cls(**{k: d[k] for k in fields if k in d})
