"""The stage-1 config (``TokenizerTrainConfig``: the ``tokenizer_*.yaml`` files in ``training/configs/``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainLoopConfig
from ..data.images import ImageDataConfig
from .losses import TokenizerLossConfig
from .stats import DetailStatsConfig

FIXTURE_VAE = "fixture:tiny"
BASE_VAES = {"sd3": "normalized", "vavae": "raw"}  # base VAE -> the base latent the joint decoder reads
PICKLED_VAE_SUFFIXES = (".pt", ".pth", ".ckpt")  # model.pretrained_vae as VA-VAE's own checkpoint  # a tiny random AutoencoderKL built in-process (demo without files)


@dataclass
class TokenizerModelConfig:
    # diffusers AutoencoderKL folder (or a full SD3 repo folder + subfolder), or VA-VAE's public .pt file
    # (hustvl/vavae-imagenet256-f16d32-dinov2), imported on the fly (davae_core.vavae_import)
    pretrained_vae: str = ""
    subfolder: str | None = None  # e.g. "vae" for a full stable-diffusion-3.5 folder
    # with a VA-VAE .pt: LightningDiT's latents_stats.pt, so the base channels are normalised as its DiT saw them
    latent_stats: str | None = None
    # with a VA-VAE .pt of another size than f16d32: its diffusers config.json (as vavae_import --vae-config)
    vae_config: str | None = None
    # "sd3": the decoder reads the normalised base (the authors' SD3 code); "vavae": it reads VA-VAE's raw
    # posterior mean (their ImageNet code), and the file says which base it was built on
    base_vae: str = "sd3"
    detail_channels: int = 16
    # each sample's detail latent zeroed with this probability before decoding (the authors' ImageNet recipe: 0.1),
    # the kept ones divided by 1 - p when detail_dropout_rescale (their inverted dropout)
    detail_dropout: float = 0.0
    detail_dropout_rescale: bool = True
    train_detail_trunk: bool = True  # the authors' recipe freezes it
    train_decoder_trunk: bool = True

    def __post_init__(self) -> None:
        if self.base_vae not in BASE_VAES:
            raise ValueError(f"model.base_vae must be one of {tuple(BASE_VAES)}, got {self.base_vae!r}")
        if not 0.0 <= self.detail_dropout < 1.0:
            raise ValueError(f"model.detail_dropout must be in [0, 1), got {self.detail_dropout}")

    @property
    def decoder_base_space(self) -> str:
        return BASE_VAES[self.base_vae]


@dataclass
class TokenizerExportConfig:
    path: str | None = None  # default <output_dir>/davae.safetensors
    dtype: str = "float32"  # "float32" | "float16" | "bfloat16"
    include_base_encoder: bool = True  # False: smaller file; ComfyUI then needs the stock VAE's latent


@dataclass
class TokenizerTrainConfig:
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    stats: DetailStatsConfig = field(default_factory=DetailStatsConfig)
    export: TokenizerExportConfig = field(default_factory=TokenizerExportConfig)

    @property
    def export_path(self) -> Path:
        return Path(self.export.path) if self.export.path else Path(self.train.output_dir) / "davae.safetensors"
