"""The stage-2 config (``AdapterTrainConfig``: the YAML files in ``training/configs/``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from davae_core.dtypes import dtype_from_name

from ..config import TrainLoopConfig
from ..data.images import ImageDataConfig
from .model import AdapterModelConfig
from .objective import FlowObjectiveConfig
from .text_conditioning import TextConfig


@dataclass
class CaptionDataConfig:
    """The ``data:`` section of a stage-2 config."""

    images: ImageDataConfig = field(default_factory=ImageDataConfig)
    cache_dir: str | None = None  # when set and complete, train from it
    cache_dtype: str = "bfloat16"  # "float32" | "float16" | "bfloat16"
    cache_shard_size: int = 256  # source positions per cache window; a window writes one shard per bucket
    cache_batch_size: int = 4  # images encoded at once while building the cache
    # without a cache: images per DA-VAE pass in each training step (in the autocast dtype); the
    # encode's transient memory grows with it (bench.plan, preflight)
    encode_batch_size: int = 4


@dataclass
class TokenizerConfig:
    """The stage-1 DA-VAE (our file format).  Needed unless training runs from a complete cache
    (then only for sample grids)."""

    path: str = ""
    dtype: str = "float32"


@dataclass
class SamplingConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photograph of a red fox in the snow", "a bowl of ramen, studio light"])
    # pixels, a multiple of the DA-VAE factor x the transformer's patch (16 x 2 = 32 for SD3): the
    # latent (resolution / 16 cells) must be whole 2x2 patches; checked when a run starts
    resolution: int = 1024
    steps: int = 30
    guidance: float = 2.5
    shift: float = 3.0
    seed: int = 0
    use_ema: bool = True

    def __post_init__(self) -> None:
        if self.resolution <= 0:
            raise ValueError(f"sampling.resolution must be positive, got {self.resolution}")


@dataclass
class ExportConfig:
    enabled: bool = True
    name: str = "da_sd35m"
    use_ema: bool = True
    alpha_keys: str = "auto"  # "auto" (only when alpha != rank) | "always"
    lora_dtype: str = "float32"  # "float16"/"bfloat16" halve the LoRA file


@dataclass
class AdapterTrainConfig:
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    model: AdapterModelConfig = field(default_factory=AdapterModelConfig)
    objective: FlowObjectiveConfig = field(default_factory=FlowObjectiveConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def load_davae_for_training(cfg: TokenizerConfig, device: torch.device | str = "cpu"):
    from davae_core.checkpoint import load_davae

    if not cfg.path:
        raise ValueError("tokenizer.path is empty: set it to the stage-1 DA-VAE file (or train from a complete data.cache_dir)")
    davae = load_davae(cfg.path, device=device, dtype=dtype_from_name(cfg.dtype, "tokenizer.dtype"))
    if davae.base_encoder is None:
        raise ValueError(f"{cfg.path}: this DA-VAE file has no base encoder, so it cannot encode images; export it with the base encoder")
    return davae.requires_grad_(False).eval()
