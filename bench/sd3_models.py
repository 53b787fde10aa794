"""SD3.5-Medium-shaped transformers with random weights, stock or with DA heads.

Two implementations: diffusers' ``SD3Transformer2DModel`` and ComfyUI's MMDiT (when
``COMFYUI_PATH`` points at a checkout and this interpreter can import it).  On a CPU the
depth is cut down; the width, heads, text widths and positional grid stay SD3.5M's.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

from davae_core.heads import DAHeads, FusedOutputLayer, FusedPatchEmbed, HeadsConfig

# diffusers' transformer/config.json of stabilityai/stable-diffusion-3.5-medium.
SD35M_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
HIDDEN = 1536
# SD3's text sequence in diffusers' pipeline: 77 CLIP-L/G tokens + 256 T5 tokens.
SD3_TEXT_TOKENS = 333


def reduced_layers(num_layers: int) -> tuple[int, list[int]]:
    """Depth and dual-attention layers keeping SD3.5M's share of dual-attention blocks (13/24)."""
    dual = round(num_layers * 13 / 24)
    return num_layers, list(range(dual))


def _randomize_(model: nn.Module, std: float = 0.02) -> None:
    """Small random weights everywhere: no uninitialised memory (denormals and NaNs slow
    CPUs down) and no zero output layers that could be skipped."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def build_diffusers(num_layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    depth, dual = reduced_layers(num_layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = SD3Transformer2DModel(**{**SD35M_CONFIG, "num_layers": depth, "dual_attention_layers": dual})
    _randomize_(model)
    if dtype != torch.float32:  # skip the no-op cast and its warning
        model = model.to(dtype=dtype)
    return model.eval()


def comfy_available() -> bool:
    return bool(os.environ.get("COMFYUI_PATH"))


def _import_comfy(device: torch.device):
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("--impl comfy needs COMFYUI_PATH set to a ComfyUI checkout")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        import comfy.cli_args

        if device.type == "cpu":  # before comfy.model_management is imported
            comfy.cli_args.args.cpu = True
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    except ImportError as error:
        raise SystemExit(
            f"COMFYUI_PATH={path} is set but ComfyUI's MMDiT does not import in {sys.executable} ({error}). "
            "Run this benchmark with ComfyUI's python (e.g. /work/comfyui/venv/bin/python), or unset COMFYUI_PATH "
            "to use diffusers' SD3Transformer2DModel."
        ) from error
    return comfy.ops, MMDiT


def build_comfy(num_layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """ComfyUI's MMDiT with the unet_config ComfyUI detects for SD3.5M; ``num_blocks`` cuts the depth
    (``depth`` stays 24 because ComfyUI derives the width from it)."""
    ops, MMDiT = _import_comfy(device)
    blocks, dual = reduced_layers(num_layers)
    torch.manual_seed(seed)
    model = MMDiT(
        input_size=None,
        patch_size=2,
        in_channels=16,
        depth=24,
        num_blocks=blocks,
        adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": HIDDEN}},
        pos_embed_max_size=384,
        num_patches=384 * 384,
        pos_embed_scaling_factor=None,
        qk_norm="rms",
        x_block_self_attn_layers=dual,
        out_channels=16,
        device=device,
        dtype=dtype,
        operations=ops.disable_weight_init,  # what ComfyUI uses; it leaves weights uninitialised
    )
    _randomize_(model)
    with torch.no_grad():
        model.pos_embed.normal_(0.0, 0.02)  # a buffer ComfyUI fills from the checkpoint
    return model.eval()


class HeadSwitch:
    """Switches one transformer between stock (16 channels in/out) and DA (32) without a copy.

    The DA wrappers hold the stock layers, so both variants share every weight.
    """

    def __init__(self, model: nn.Module, kind: str, seed: int = 0):
        self.model, self.kind = model, kind
        if kind == "diffusers":
            self.embed_owner, self.embed_name = model.pos_embed, "proj"
            self.out_owner, self.out_name = model, "proj_out"
        else:  # ComfyUI MMDiT
            self.embed_owner, self.embed_name = model.x_embedder, "proj"
            self.out_owner, self.out_name = model.final_layer, "linear"
        stock_embed = getattr(self.embed_owner, self.embed_name)
        stock_out = getattr(self.out_owner, self.out_name)
        param = next(stock_embed.parameters())
        config = HeadsConfig(hidden_size=stock_embed.out_channels, patch_size=stock_embed.kernel_size[0])
        self.heads = DAHeads(config, device=param.device, dtype=param.dtype)
        torch.manual_seed(seed)
        _randomize_(self.heads)  # trained heads are non-zero; zeros could be special-cased by kernels
        self.stock = (stock_embed, stock_out)
        self.patched = (
            FusedPatchEmbed(stock_embed, self.heads.detail_embed, config.base_channels),
            FusedOutputLayer(stock_out, self.heads.detail_out, config.patch_size, config.base_channels, config.detail_channels),
        )

    def use(self, da: bool) -> None:
        embed, out = self.patched if da else self.stock
        setattr(self.embed_owner, self.embed_name, embed)
        setattr(self.out_owner, self.out_name, out)
        self.model.out_channels = 32 if da else 16


def conditioning(batch: int, text_tokens: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random text embeddings of SD3's widths: (B, T, 4096) sequence and (B, 2048) pooled."""
    return {
        "context": torch.randn(batch, text_tokens, 4096, device=device, dtype=dtype),
        "pooled": torch.randn(batch, 2048, device=device, dtype=dtype),
    }


def forward(model: nn.Module, kind: str, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """One denoiser call; both implementations take the timestep on the 0-1000 scale."""
    t = sigma * 1000.0
    if kind == "diffusers":
        return model(
            hidden_states=x, encoder_hidden_states=cond["context"], pooled_projections=cond["pooled"], timestep=t, return_dict=False
        )[0]
    return model(x, t, y=cond["pooled"], context=cond["context"])
