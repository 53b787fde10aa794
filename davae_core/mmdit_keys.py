"""diffusers ``SD3Transformer2DModel`` state dict -> the MMDiT key layout of SD3 single-file checkpoints.

SD3 checkpoints (and ComfyUI's MMDiT) fuse q/k/v into one ``qkv`` linear, name blocks
``joint_blocks.N.{x_block,context_block}`` and store adaLN modulations as (shift, scale)
where diffusers' continuous adaLN stores (scale, shift).  Used to write test fixtures in the
layout that real SD3.5 checkpoints have; no ComfyUI import.
"""

from __future__ import annotations

import re

import torch

# peft target_modules (diffusers names, matched by suffix) of the stage-2 LoRA.
# The authors' list (their stage-2 config's target_modules): image-stream attention q/k/v/out (attn and, by
# suffix, attn2), the image MLP's output and the image adaLN modulation.
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "norm1.linear")
# The paper's reading ("all blocks in the DiT backbone, except for the patch embedder and the output
# layer"): every linear layer of every transformer block, image and context streams.
SD3_LORA_TARGETS_ALL_BLOCKS = SD3_LORA_TARGETS + (
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
    "ff_context.net.0.proj", "ff_context.net.2", "norm1_context.linear",
)

# diffusers name -> MMDiT name, outside the blocks
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}

# inside transformer_blocks.N: diffusers suffix -> MMDiT suffix
_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}

# fused projections: MMDiT suffix <- diffusers (q, k, v) suffixes
_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_mmdit(state: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Convert every tensor; raises on a key it does not know so nothing is silently dropped."""
    out: dict[str, torch.Tensor] = {}
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    used: set[str] = set()

    for name, target in _TOP.items():
        for end in ("weight", "bias"):
            key = f"{name}.{end}"
            if key in state:
                value = state[key]
                out[f"{prefix}{target}.{end}"] = _swap_halves(value) if name == "norm_out.linear" else value
                used.add(key)
    if "pos_embed.pos_embed" in state:
        out[f"{prefix}pos_embed"] = state["pos_embed.pos_embed"]
        used.add("pos_embed.pos_embed")

    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"{prefix}joint_blocks.{i}."
        for name, target in _BLOCK.items():
            for end in ("weight", "bias"):
                key = f"{src}{name}.{end}"
                if key in state:
                    value = state[key]
                    # the last block's context adaLN is diffusers' continuous norm: (scale, shift)
                    if name == "norm1_context.linear" and i == depth - 1:
                        value = _swap_halves(value)
                    out[f"{dst}{target}.{end}"] = value
                    used.add(key)
        for target, parts in _FUSED.items():
            for end in ("weight", "bias"):
                keys = [f"{src}{p}.{end}" for p in parts]
                if all(k in state for k in keys):
                    out[f"{dst}{target}.{end}"] = torch.cat([state[k] for k in keys], dim=0)
                    used.update(keys)

    left = sorted(set(state) - used)
    if left:
        raise KeyError(f"no MMDiT name for {len(left)} diffusers keys, e.g. {left[:3]}")
    return out


def mmdit_to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`diffusers_to_mmdit` (keys without prefix)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, target in _TOP.items():
        for end in ("weight", "bias"):
            key = f"{target}.{end}"
            if key in state:
                out[f"{name}.{end}"] = _swap_halves(state[key]) if name == "norm_out.linear" else state[key]
                used.add(key)
    if "pos_embed" in state:
        out["pos_embed.pos_embed"] = state["pos_embed"]
        used.add("pos_embed")
    for i in range(depth):
        src, dst = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        for name, target in _BLOCK.items():
            for end in ("weight", "bias"):
                key = f"{src}{target}.{end}"
                if key in state:
                    value = state[key]
                    if name == "norm1_context.linear" and i == depth - 1:  # continuous adaLN: (scale, shift)
                        value = _swap_halves(value)
                    out[f"{dst}{name}.{end}"] = value
                    used.add(key)
        for target, parts in _FUSED.items():
            for end in ("weight", "bias"):
                key = f"{src}{target}.{end}"
                if key in state:
                    for part, chunk in zip(parts, state[key].chunk(3, dim=0)):
                        out[f"{dst}{part}.{end}"] = chunk
                    used.add(key)
    left = sorted(set(state) - used)
    if left:
        raise KeyError(f"no diffusers name for {len(left)} MMDiT keys, e.g. {left[:3]}")
    return out
