"""SD3 text conditioning for stage 2: ``(B, T, joint_attention_dim)`` tokens + ``(B, pooled_dim)``.

Two implementations of one small interface (``encode(prompts) -> (embeds, pooled)``,
``joint_attention_dim``, ``pooled_dim``, ``name``, ``settings``: what decides their tensors, as
:func:`text_settings` reads it from a config):

* :class:`SD3TextConditioner` - the real one: CLIP-L, CLIP-G and T5 from the local diffusers
  SD3.5 folder, combined exactly as diffusers' ``StableDiffusion3Pipeline.encode_prompt``
  does (it is what runs; T5 may be absent, the pipeline then pads with zeros).
* :class:`HashingTextConditioner` - a **test stand-in**, not a text encoder: every word is
  hashed to a fixed random vector.  It exists because no CLIP/T5 weights (nor their
  tokenizers) can be had on the machines the tests run on.  Captions still change the
  conditioning deterministically, so data plumbing, caching and prompt dropout are exercised,
  but a model trained on it has learnt nothing about language.  Select it only with
  ``text.kind: hashing_standin``.

:func:`davae_testing.tiny_sd3_pipeline.write_tiny_sd3_pipeline` (test scaffolding, in the repository,
not installed) writes a whole tiny diffusers SD3 folder for :class:`SD3TextConditioner` to read.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from davae_core.dtypes import dtype_from_name

logger = logging.getLogger(__name__)

TEXT_KINDS = ("sd3", "hashing_standin")


@dataclass
class TextConfig:
    """The ``text:`` section of a stage-2 config."""

    kind: str = "sd3"
    pretrained: str = ""  # diffusers SD3.5 folder; empty = model.pretrained
    max_sequence_length: int = 256  # T5 tokens (SD3 default 256)
    dtype: str = "float32"  # "bfloat16" / "float16" on GPUs
    # stand-in only: shape of what it produces (the transformer's joint_attention_dim / pooled_projection_dim)
    standin_tokens: int = 16
    standin_joint_attention_dim: int = 4096
    standin_pooled_dim: int = 2048


def has_t5(folder: str | Path) -> bool:
    """Whether an SD3.5 folder holds T5 (without it the SD3 pipeline's T5 tokens are zeros)."""
    folder = Path(folder)
    return (folder / "text_encoder_3").is_dir() and (folder / "tokenizer_3").is_dir()


def text_settings(cfg: TextConfig, model_folder: str = "") -> dict:
    """What decides the text tensors a config's conditioner makes (the stage-2 cache records it);
    each conditioner's ``settings`` says the same of itself."""
    if cfg.kind == "hashing_standin":
        return {"text.kind": cfg.kind, "text.standin_tokens": int(cfg.standin_tokens),
                "text.standin_joint_attention_dim": int(cfg.standin_joint_attention_dim),
                "text.standin_pooled_dim": int(cfg.standin_pooled_dim)}
    dtype = dtype_from_name(cfg.dtype, "text.dtype")
    return {"text.kind": cfg.kind, "text.max_sequence_length": int(cfg.max_sequence_length),
            "text.dtype": str(dtype).removeprefix("torch."), "text.t5": has_t5(cfg.pretrained or model_folder)}


class HashingTextConditioner(nn.Module):
    """TEST STAND-IN for SD3's text encoders: words -> hashed fixed random vectors.

    ``embeds[b, i]`` is the vector of the i-th word (zeros past the caption, ``tokens`` slots);
    ``pooled[b]`` is a fixed random projection of their mean.  Deterministic across processes
    and machines (md5 of the word, a seeded table).  The empty prompt gives all zeros.
    """

    name = "hashing_standin"

    def __init__(self, joint_attention_dim: int, pooled_dim: int, tokens: int = 16, buckets: int = 4096, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(buckets, joint_attention_dim, generator=gen), persistent=False)
        self.register_buffer("pool", torch.randn(joint_attention_dim, pooled_dim, generator=gen) / joint_attention_dim**0.5, persistent=False)
        self.joint_attention_dim, self.pooled_dim, self.tokens, self.buckets = joint_attention_dim, pooled_dim, tokens, buckets

    def _ids(self, prompt: str) -> list[int]:
        words = re.findall(r"\w+", prompt.lower())[: self.tokens]
        return [int.from_bytes(hashlib.md5(w.encode()).digest()[:4], "little") % self.buckets for w in words]

    @property
    def settings(self) -> dict:
        return {"text.kind": self.name, "text.standin_tokens": self.tokens,
                "text.standin_joint_attention_dim": self.joint_attention_dim, "text.standin_pooled_dim": self.pooled_dim}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = torch.zeros(len(prompts), self.tokens, self.joint_attention_dim, device=self.table.device)
        for b, prompt in enumerate(prompts):
            ids = self._ids(prompt)
            if ids:
                embeds[b, : len(ids)] = self.table[torch.tensor(ids, device=self.table.device)]
        pooled = embeds.mean(1) @ self.pool
        return embeds, pooled


class SD3TextConditioner:
    """CLIP-L + CLIP-G + T5 of a local diffusers SD3.5 folder, through diffusers' own ``encode_prompt``."""

    name = "sd3"

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int = 256):
        from diffusers import StableDiffusion3Pipeline

        folder = Path(folder)
        missing = [d for d in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") if not (folder / d).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: no SD3 text encoders ({', '.join(missing)} missing). Point text.pretrained at a full "
                "diffusers SD3.5 folder, or cache text embeddings elsewhere (data.cache_dir) and train from the cache"
            )
        self.t5 = has_t5(folder)
        extra = {} if self.t5 else {"text_encoder_3": None, "tokenizer_3": None}
        if not self.t5:
            logger.warning("%s: no T5 (text_encoder_3); its tokens are zeros, as the SD3 pipeline does without it", folder)
        self.pipe = StableDiffusion3Pipeline.from_pretrained(
            str(folder), transformer=_config_only_transformer(folder), vae=None, torch_dtype=dtype, **extra)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(self.pipe, name)
            if encoder is not None:
                encoder.to(device).requires_grad_(False).eval()
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length
        self.dtype = dtype
        te2 = self.pipe.text_encoder_2.config
        self.pooled_dim = self.pipe.text_encoder.config.projection_dim + te2.projection_dim
        self.joint_attention_dim = self.pipe.transformer.config.joint_attention_dim

    @property
    def settings(self) -> dict:
        return {"text.kind": self.name, "text.max_sequence_length": self.max_sequence_length,
                "text.dtype": str(self.dtype).removeprefix("torch."), "text.t5": self.t5}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled


def _config_only_transformer(folder: Path):
    """The SD3 transformer on the meta device: ``encode_prompt`` reads its config, never its weights."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    config_dir = folder / "transformer"
    if not (config_dir / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no transformer/config.json; SD3's text conditioning is sized by it")
    with init_empty_weights():
        return SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(str(config_dir)))


def build_text_conditioner(cfg: TextConfig, model_folder: str = "", device: torch.device | str = "cpu"):
    if cfg.kind == "sd3":
        dtype = dtype_from_name(cfg.dtype, "text.dtype")
        return SD3TextConditioner(cfg.pretrained or model_folder, device, dtype, cfg.max_sequence_length)
    if cfg.kind == "hashing_standin":
        logger.warning("text.kind=hashing_standin: captions are hashed, not encoded - a TEST STAND-IN, not for real training")
        return HashingTextConditioner(cfg.standin_joint_attention_dim, cfg.standin_pooled_dim, cfg.standin_tokens).to(device)
    raise ValueError(f"text.kind must be one of {TEXT_KINDS}, got {cfg.kind!r}")
