"""The ImageNet stage-2 config (``LightningDiTTrainConfig``: ``training/configs/imagenet/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, TrainLoopConfig
from .da_heads import HEAD_INITS
from .flow import LightningFlowConfig


@dataclass
class ClassDataConfig:
    """``data:``: a class-labelled image folder (``root/<class>/<image>``, ImageNet's train layout), or a latent cache."""

    root: str = ""  # ImageNet's train folder: one sub-folder per class (wnid)
    # text file with one class folder name per line, in label order; default: the sorted sub-folders
    # (ImageNet's 1000 wnids sorted give the labels LightningDiT was trained with)
    class_names_file: str | None = None
    resolution: int = 512  # ADM's centre crop: short side resized to this (up or down), centre square
    random_flip: bool = True
    max_images: int | None = None  # the first N images (sorted) only
    index_cache: str | None = None  # default <output_dir>/data_index.json
    # a complete latent cache (python -m davae_training.imagenet.latent_cache) to train from instead of images
    latent_cache: str | None = None
    encode_batch_size: int = 16  # images per DA-VAE pass when encoding in the step

    def __post_init__(self) -> None:
        if self.resolution <= 0:
            raise ConfigError(f"data.resolution must be positive, got {self.resolution}")


@dataclass
class DiTModelConfig:
    """``model:``: the pretrained LightningDiT and how its DA heads start."""

    checkpoint: str = ""  # LightningDiT {"model", "ema"} file (hustvl/lightningdit-xl-imagenet256-800ep)
    prefer: str = "ema"  # which weights of that file to start from
    # switch RMS qk-norm on over weights trained without it (the DA authors' config; the paper is silent)
    enable_qknorm: bool = False
    head_init: str = "zero"  # P'/O' start (Table 5): "zero" | "random" | "repeat_average"
    head_init_seed: int = 0  # the "random" init's draws

    def __post_init__(self) -> None:
        if self.prefer not in ("ema", "model"):
            raise ConfigError(f"model.prefer must be 'ema' or 'model', got {self.prefer!r}")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"model.head_init must be one of {HEAD_INITS}, got {self.head_init!r}")


@dataclass
class ImageNetTokenizerConfig:
    """``tokenizer:``: the stage-1 DA-VAE on VA-VAE (our file format; its normaliser is the latent space)."""

    path: str = ""
    dtype: str = "float32"


@dataclass
class ClassSamplingConfig:
    classes: list[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    steps: int = 50  # grids only; FID uses 250 (python -m davae_training.imagenet.generate)
    shift: float = 0.3
    cfg_scale: float = 4.0
    cfg_interval_start: float = 0.2
    seed: int = 0
    use_ema: bool = True


@dataclass
class DiTExportConfig:
    enabled: bool = True
    name: str = "da_lightningdit"
    use_ema: bool = True  # the heads file (and the checkpoint's "ema" entry) from the EMA


@dataclass
class LightningDiTTrainConfig:
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    model: DiTModelConfig = field(default_factory=DiTModelConfig)
    objective: LightningFlowConfig = field(default_factory=LightningFlowConfig)
    ema_decay: float = 0.999
    data: ClassDataConfig = field(default_factory=ClassDataConfig)
    tokenizer: ImageNetTokenizerConfig = field(default_factory=ImageNetTokenizerConfig)
    sampling: ClassSamplingConfig = field(default_factory=ClassSamplingConfig)
    export: DiTExportConfig = field(default_factory=DiTExportConfig)
