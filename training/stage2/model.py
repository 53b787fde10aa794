"""The warm-started SD3.5 transformer that stage 2 trains (paper Sec. 3.2).

diffusers' ``SD3Transformer2DModel`` from a local diffusers folder, with

* the DA heads of :mod:`davae_core.heads`: P' (detail patch embed) and O' (detail output),
  zero-initialised, so at step 0 the model is the pretrained one on the base channels and
  predicts zero detail;
* a peft LoRA on the blocks (rank 256, alpha 256, targets ``to_q, to_k, to_v, to_out.0,
  ff.net.2, norm1.linear``; peft matches by suffix, so ``attn2.*`` of SD3.5M's
  dual-attention blocks are hit too, ``add_*_proj``/``to_add_out``/``ff_context``/
  ``norm1_context`` are not);
* P and O (the stock ``pos_embed.proj`` and ``proj_out``) trained in full, as the authors do;
* everything else frozen, gradient checkpointing on request (``train.gradient_checkpointing``),
  and an EMA of exactly the trained parameters.

:class:`AdapterModel` is the model object the loop kit (:mod:`davae_training.loop`) trains: the
network, its trained parameters and EMA, the base P and O as loaded (the export ships them only
if training moved them), and what the export needs to know of the LoRA and the heads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from davae_core.heads import DAHeads, HeadsConfig, attach_to_sd3_transformer, heads_config_for_diffusers, heads_from_sd3_transformer
from davae_core.mmdit_keys import SD3_LORA_TARGETS

from ..loop import TrainedModel, unwrap
from ..sharding import load_whole_

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
# model.base_dtype -> the dtype the frozen base is loaded in (float8 is cast layer by layer after)
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float8": torch.bfloat16}
# layers never stored in float8: the trained heads, norms, LoRA, the patch embedding
FP8_SKIP = ("pos_embed", "norm", "proj_out", "lora_", "context_embedder", "time_text_embed")


@dataclass
class AdapterModelConfig:
    """How the trained model is built; the ``model:`` section of a stage-2 config."""

    pretrained: str = ""  # diffusers SD3.5 folder (with transformer/), a transformer folder or a single .safetensors
    detail_channels: int = 16
    lora_rank: int = 256
    lora_alpha: float = 256.0
    lora_targets: list[str] = field(default_factory=lambda: list(SD3_LORA_TARGETS))
    lora_init: str = "gaussian"  # peft init_lora_weights; B starts at zero either way
    train_base_heads: bool = True  # P and O in full (authors: yes)
    ema_decay: float = 0.999  # 0 disables the EMA
    # "zero": P', O' start at zero (the paper's warm start); "random": PyTorch's default init,
    # the "without zero-init" ablation of Table 5
    heads_init: str = "zero"
    # the frozen base's storage: "float32" | "bfloat16" | "float8" (e4m3 storage, bf16 compute);
    # trained tensors (LoRA, P, P', O, O') stay float32 either way
    base_dtype: str = "float32"
    # what preflight and bench.plan build when there are no weights: "sd35m" | "sd35l" (architectures.py)
    architecture: str = "sd35m"

    def __post_init__(self) -> None:
        if self.heads_init not in ("zero", "random"):
            raise ValueError(f"model.heads_init must be 'zero' or 'random', got {self.heads_init!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"model.base_dtype must be one of {sorted(BASE_DTYPES)}, got {self.base_dtype!r}")


def resolve_transformer_dir(path: str | Path) -> Path:
    """``path/transformer`` when ``path`` is a full diffusers pipeline folder, else ``path``."""
    path = Path(path)
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"{path}: no diffusers SD3 transformer here (looked for {path / 'transformer' / 'config.json'} "
        f"and {path / 'config.json'}); point model.pretrained at a diffusers-format SD3.5 folder, e.g. one "
        "saved with StableDiffusion3Pipeline.save_pretrained"
    )


def load_base_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> SD3Transformer2DModel:
    from .sd35_single_file import is_single_file, load_single_file_transformer

    if is_single_file(path):  # sd3.5_medium.safetensors, as ComfyUI loads it
        folder, model = Path(path), load_single_file_transformer(path, dtype)
    else:
        folder = resolve_transformer_dir(path)
        model = SD3Transformer2DModel.from_pretrained(str(folder), torch_dtype=dtype)
    if model.config.in_channels != model.config.out_channels or getattr(model.pos_embed, "proj", None) is None:
        raise ValueError(f"{folder}: expected a stock SD3 transformer, got in/out channels "
                         f"{model.config.in_channels}/{model.config.out_channels}")
    return model


def lora_target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Linear layers a peft ``target_modules`` list hits, by peft's suffix rule (model without LoRA)."""
    return sorted(
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    )


def lora_wrapped_names(model: nn.Module) -> list[str]:
    """Layers that carry a LoRA after injection."""
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer"))


def add_lora(transformer: SD3Transformer2DModel, cfg: AdapterModelConfig) -> None:
    from peft import LoraConfig

    init = cfg.lora_init
    init_arg: bool | str = {"true": True, "default": True, "kaiming": True}.get(str(init).lower(), init)
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
        init_lora_weights=init_arg,
    )
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)


def build_adapter_model(cfg: AdapterModelConfig, gradient_checkpointing: bool = False,
                        dtype: torch.dtype = torch.float32) -> SD3Transformer2DModel:
    """Stock transformer -> frozen, + LoRA, + zero-init DA heads, with P, P', O, O' trainable."""
    if cfg.base_dtype != "float32":
        dtype = BASE_DTYPES[cfg.base_dtype]
    transformer = load_base_transformer(cfg.pretrained, dtype)
    return prepare_adapter_model(transformer, cfg, gradient_checkpointing)


def prepare_adapter_model(transformer: SD3Transformer2DModel, cfg: AdapterModelConfig,
                          gradient_checkpointing: bool = False) -> SD3Transformer2DModel:
    transformer.requires_grad_(False)
    if cfg.lora_rank > 0:
        add_lora(transformer, cfg)
    heads_cfg = heads_config_for_diffusers(transformer, cfg.detail_channels)
    param = transformer.pos_embed.proj.weight
    heads = DAHeads(heads_cfg, device=param.device, dtype=param.dtype)
    if cfg.heads_init == "random":
        heads.detail_embed.reset_parameters()
        heads.detail_out.reset_parameters()
    attach_to_sd3_transformer(transformer, heads)
    heads.requires_grad_(True)
    if cfg.train_base_heads:
        transformer.pos_embed.proj.stock.requires_grad_(True)
        transformer.proj_out.stock.requires_grad_(True)
    for name, p in transformer.named_parameters():  # peft marks LoRA trainable; make sure
        if "lora_" in name:
            p.requires_grad_(True)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    store_frozen_base(transformer, cfg.base_dtype)
    refuse_latents_off_the_patch_grid(transformer)
    return transformer


def refuse_latents_off_the_patch_grid(transformer: nn.Module) -> None:
    """Make the transformer raise on a latent whose sides are not multiples of its patch size;
    diffusers' SD3 would drop the last row/column and return a smaller output without a word."""
    from .latent_grid import check_latent_sides, transformer_patch_size

    patch = transformer_patch_size(transformer)

    def check(module, args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        if latents is not None:
            check_latent_sides(latents.shape, patch, "the stage-2 transformer's input")

    transformer.register_forward_pre_hook(check, with_kwargs=True)


def read_patch_size(pretrained: str | Path) -> int:
    """The transformer's patch size from ``model.pretrained`` without loading its weights."""
    import json

    from .sd35_single_file import is_single_file

    if is_single_file(pretrained):
        from safetensors import safe_open

        from .sd35_single_file import PREFIX

        with safe_open(str(pretrained), framework="pt") as f:
            key = PREFIX + "x_embedder.proj.weight"
            if key not in f.keys():
                raise ValueError(f"{pretrained}: no {key}; is this an SD3/SD3.5 single-file checkpoint?")
            return int(f.get_slice(key).get_shape()[-1])
    return int(json.loads((resolve_transformer_dir(pretrained) / "config.json").read_text())["patch_size"])


def check_base_dtype(base_dtype: str, mixed_precision: str) -> None:
    """A bf16/fp8 base beside fp32 trained tensors only runs under autocast."""
    if base_dtype != "float32" and mixed_precision not in ("bf16", "fp16"):
        raise ValueError(f"model.base_dtype={base_dtype} needs train.mixed_precision=bf16 (autocast); "
                         f"got {mixed_precision!r}: set train.mixed_precision=bf16 or model.base_dtype=float32")


def store_frozen_base(transformer: nn.Module, base_dtype: str) -> None:
    """Trained tensors in float32 (master weights), the frozen rest in ``base_dtype``.

    Mixed dtypes need autocast (``train.mixed_precision: bf16``) for the forward pass.
    """
    if base_dtype == "float32":  # as loaded
        return
    for p in transformer.parameters():
        p.data = p.data.float() if p.requires_grad else p.data.to(BASE_DTYPES[base_dtype])
    if base_dtype == "float8":
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(transformer, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16,
                                skip_modules_pattern=FP8_SKIP)


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of everything stage 2 trains (LoRA, P, P', O, O'), in a fixed order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trained_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Put trained tensors back; refuses missing, extra or mis-shaped names."""
    load_whole_(trained_parameters(model), state, source, LOAD_HINT)


LOAD_HINT = "was it trained with another LoRA rank/targets or detail_channels? Use the run's own config"


def da_heads(model: nn.Module, include_base: bool = False) -> DAHeads:
    return heads_from_sd3_transformer(model, include_base=include_base)


def stock_head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current P and O (``pos_embed.proj``/``proj_out`` of the stock model) as CPU copies."""
    net = unwrap(model)
    layers = {"pos_embed.proj": net.pos_embed.proj.stock, "proj_out": net.proj_out.stock}
    return {f"{name}.{k}": v.detach().float().cpu().clone() for name, layer in layers.items() for k, v in layer.state_dict().items()}


@dataclass
class ExportLayout:
    """What the export needs to know of an adapter model beside its tensors."""

    heads_config: HeadsConfig
    lora_config: Any | None  # peft LoraConfig; None without LoRA
    lora_layers: list[str]

    @classmethod
    def of(cls, transformer: nn.Module) -> "ExportLayout":
        peft = getattr(transformer, "peft_config", {})
        return cls(da_heads(transformer).config, peft.get(ADAPTER_NAME), lora_wrapped_names(transformer))


class AdapterModel(TrainedModel):
    """The stage-2 model object: the patched SD3 transformer and what training, sampling and export need."""

    shard_classes = ("JointTransformerBlock",)  # FSDP2 shards each MMDiT block; P, P', O, O' go with the root
    weights_file = "adapter_trained.safetensors"  # only what stage 2 trains: the frozen base never goes to a run folder
    ema_file = "adapter_trained_ema.safetensors"
    load_hint = LOAD_HINT

    def __init__(self, network: nn.Module, cfg: AdapterModelConfig):
        super().__init__(network, ema_decay=cfg.ema_decay)
        self.config = cfg
        self.base_heads = stock_head_state(network)  # as loaded: the export ships P and O only if training moved them
        self.layout = ExportLayout.of(network)  # taken whole, before any engine shards the network

    @classmethod
    def build(cls, cfg: AdapterModelConfig, gradient_checkpointing: bool = False) -> "AdapterModel":
        return cls(build_adapter_model(cfg, gradient_checkpointing), cfg)

    @property
    def patch_size(self) -> int:
        from .latent_grid import transformer_patch_size

        return transformer_patch_size(self.module)

    def predictor(self, embeds: torch.Tensor, pooled: torch.Tensor):
        """``(x_t, t) -> output`` of the (prepared) network for this text conditioning."""
        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.network(hidden_states=x_t, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                                return_dict=False)[0]
        return predict
