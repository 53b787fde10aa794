"""The stage-1 config (``TokenizerTrainConfig``: the ``tokenizer_*.yaml`` files in ``training/configs/``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainLoopConfig
from ..data.images import ImageDataConfig
from .losses import TokenizerLossConfig
from .stats import DetailStatsConfig

FIXTURE_VAE = "fixture:tiny"  # a tiny random AutoencoderKL built in-process (demo without files)


@dataclass
class TokenizerModelConfig:
    pretrained_vae: str = ""  # diffusers AutoencoderKL folder (or a full SD3 repo folder + subfolder)
    subfolder: str | None = None  # e.g. "vae" for a full stable-diffusion-3.5 folder
    detail_channels: int = 16
    train_detail_trunk: bool = True  # the authors' recipe freezes it
    train_decoder_trunk: bool = True


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
