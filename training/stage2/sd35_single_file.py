"""Load an SD3/SD3.5 single-file checkpoint (``sd3.5_medium.safetensors``) as diffusers'
``SD3Transformer2DModel``, offline.

Most users have the single file ComfyUI loads, not a diffusers folder.  diffusers'
``from_single_file`` fetches its config from the Hub, so here the config is read off the
tensors themselves (depth, width, dual-attention blocks, qk-norm, text widths, positional
grid) and the keys are mapped back with the table of :mod:`davae_core.mmdit_keys` (the same
table the fixtures use to write the single-file layout, so the two stay each other's inverse).
Only ``model.diffusion_model.*`` is read; the VAE and text encoders a file may also hold are
left on disk.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from davae_core.mmdit_keys import mmdit_to_diffusers

PREFIX = "model.diffusion_model."
HEAD_DIM = 64  # every SD3/SD3.5 transformer uses 64-wide heads


def is_single_file(path: str | Path) -> bool:
    return Path(path).is_file() and str(path).endswith(".safetensors")


def read_mmdit_state(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The MMDiT tensors of a single file, without their ``model.diffusion_model.`` prefix."""
    with safe_open(str(path), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(PREFIX)]
        if not keys:
            raise ValueError(f"{path}: no '{PREFIX}*' tensors; is this an SD3/SD3.5 single-file checkpoint "
                             "(as ComfyUI loads it)? A diffusers folder goes in model.pretrained as a folder")
        state = {}
        for k in keys:
            t = f.get_tensor(k)
            state[k[len(PREFIX):]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


def infer_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """diffusers ``SD3Transformer2DModel`` kwargs that fit the MMDiT tensors."""
    try:
        embed = state["x_embedder.proj.weight"]  # (hidden, in_channels, p, p)
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.", k)))
        hidden, in_channels, patch = embed.shape[0], embed.shape[1], embed.shape[2]
        out_features = state["final_layer.linear.weight"].shape[0]
        pos = state["pos_embed"]
    except (KeyError, ValueError) as error:
        raise ValueError(f"{source}: not an SD3 MMDiT (missing {error}); expected x_embedder, joint_blocks, final_layer, pos_embed") from error
    dual = sorted(int(m.group(1)) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$", k)))
    return {
        "sample_size": 128,
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "out_channels": int(out_features // (patch * patch)),
        "num_layers": int(depth),
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": int(hidden // HEAD_DIM),
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(hidden),
        "pooled_projection_dim": int(state["y_embedder.mlp.0.weight"].shape[1]),
        "pos_embed_max_size": int(math.isqrt(pos.shape[1])),
        "dual_attention_layers": dual,
        "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in state else None,
    }



def load_single_file_transformer(path: str | Path, dtype: torch.dtype = torch.float32):
    """``SD3Transformer2DModel`` with the weights of a single-file SD3/SD3.5 checkpoint."""
    from diffusers import SD3Transformer2DModel

    state = read_mmdit_state(path, dtype)
    config = infer_config(state, str(path))
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    converted = mmdit_to_diffusers(state, config["num_layers"])
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or extra:
        raise ValueError(f"{path}: the tensors do not fit an SD3 transformer of the inferred config "
                         f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    model.load_state_dict(converted, assign=True, strict=True)
    return model
