"""The transformer shapes stage 2 is configured for, as diffusers ``SD3Transformer2DModel`` kwargs.

Real weights carry their own config; these are for building the architecture without weights
(``preflight``, ``bench.plan``), named by ``model.architecture``.  Values are those of the
``transformer/config.json`` files of stabilityai/stable-diffusion-3.5-medium and -large.
``toy_width`` keeps an architecture's pattern (dual-attention blocks or not, qk-norm, patch
size) at a width a CPU test runs in seconds.
"""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,  # T5-XXL width (CLIP-L + CLIP-G padded to it)
    "pooled_projection_dim": 2048,  # CLIP-L 768 + CLIP-G 1280
    "qk_norm": "rms_norm",
}

TRANSFORMERS: dict[str, dict[str, Any]] = {
    # SD3.5-Medium (MMDiT-X): 24 blocks, 1536 wide, self-attention twice in blocks 0-12
    "sd35m": {**_COMMON, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
              "pos_embed_max_size": 384, "dual_attention_layers": list(range(13))},
    # SD3.5-Large: 38 blocks, 2432 wide, no dual attention
    "sd35l": {**_COMMON, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
              "pos_embed_max_size": 192, "dual_attention_layers": []},
}

CLIP_TOKENS = 77  # CLIP-L/G sequence, before the T5 tokens in SD3's joint text sequence


def transformer_config(name: str) -> dict[str, Any]:
    if name not in TRANSFORMERS:
        raise ValueError(f"model.architecture must be one of {sorted(TRANSFORMERS)}, got {name!r}")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in TRANSFORMERS[name].items()}


def toy_width(config: dict[str, Any], layers: int = 2) -> dict[str, Any]:
    """The same pattern, 2 heads wide, ``layers`` deep, small text widths."""
    dual = [0] if config["dual_attention_layers"] else []
    return {**config, "num_layers": layers, "num_attention_heads": 2, "caption_projection_dim": 2 * config["attention_head_dim"],
            "joint_attention_dim": 64, "pooled_projection_dim": 32, "pos_embed_max_size": 96, "dual_attention_layers": dual}


def hidden_size(config: dict[str, Any]) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]
