"""SD3.5-Medium-shaped transformers with random weights, stock or with DA heads.

Two implementations: diffusers' ``SD3Transformer2DModel`` and ComfyUI's MMDiT (when
``COMFYUI_PATH`` points at a checkout and this interpreter can import it).  On a CPU the
depth is cut down; the width, heads, text widths and positional grid stay SD3.5M's.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from davae_core.heads import DAHeads, FusedOutputLayer, FusedPatchEmbed, HeadsConfig

REPO = Path(__file__).resolve().parents[1]
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


def build_comfy(num_layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """ComfyUI's SD3 model (BaseModel + MMDiT, the unet_config ComfyUI detects for SD3.5M;
    ``num_blocks`` cuts the depth, ``depth`` stays 24 because ComfyUI derives the width from it)
    behind a ModelPatcher, loaded as ComfyUI loads a model: weights made under inference mode
    (ComfyUI's loaders run inside node execution) and ``patch_model``, which records the patch state."""
    _import_comfy(device)
    import comfy.model_patcher
    import comfy.supported_models

    blocks, dual = reduced_layers(num_layers)
    config = comfy.supported_models.SD3({
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "num_blocks": blocks, "adm_in_channels": 2048,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": HIDDEN}},
        "pos_embed_max_size": 384, "num_patches": 384 * 384, "pos_embed_scaling_factor": None, "qk_norm": "rms",
        "x_block_self_attn_layers": dual,
    })
    config.set_inference_dtype(dtype, None)
    torch.manual_seed(seed)
    with torch.inference_mode():
        base = config.get_model({}, device=device)
        _randomize_(base.diffusion_model)  # ComfyUI leaves weights uninitialised until a checkpoint fills them
        base.diffusion_model.pos_embed.normal_(0.0, 0.02)  # a buffer ComfyUI fills from the checkpoint
    patcher = comfy.model_patcher.ModelPatcher(base.eval(), load_device=device, offload_device=device)
    patcher.patch_model(device)
    return patcher


def import_pack():
    """The node pack as ComfyUI imports it: this repository as a package (``comfyui_davae``, the
    name its custom_nodes folder has in the tests), so the benchmark runs the nodes' own code."""
    name = "comfyui_davae"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nodes.sd3_model_patch"), importlib.import_module(f"{name}.davae_core.heads")


class HeadSwitch:
    """Switches one transformer between stock (16 channels in/out) and DA (32) without a copy.

    diffusers: the DA wrappers of :mod:`davae_core.heads` hold the stock layers.  ComfyUI: the
    node pack's own patch (``patch_sd3_model``: DA forwards on P and O, object patches), applied
    and removed the way ModelPatcher applies object patches; the model was loaded through the
    patcher, so the fused-weight cache sees ComfyUI's patch state as it does in ComfyUI.
    """

    def __init__(self, model, kind: str, seed: int = 0):
        self.kind = kind
        if kind == "diffusers":
            stock_embed, stock_out = model.pos_embed.proj, model.proj_out
            config = HeadsConfig(hidden_size=stock_embed.out_channels, patch_size=stock_embed.kernel_size[0])
            self.heads = _random_heads(DAHeads(config, device=stock_embed.weight.device, dtype=stock_embed.weight.dtype), seed)
            self.stock = {"pos_embed.proj": stock_embed, "proj_out": stock_out, "out_channels": 16}
            self.patched = {
                "pos_embed.proj": FusedPatchEmbed(stock_embed, self.heads.detail_embed, config.base_channels),
                "proj_out": FusedOutputLayer(stock_out, self.heads.detail_out, config.patch_size, config.base_channels, config.detail_channels),
                "out_channels": 32,
            }
            self.root = model
        else:  # a ComfyUI ModelPatcher
            import comfy.utils

            patch, pack_heads = import_pack()
            embed = model.get_model_object(patch.EMBED_KEY)
            config = pack_heads.HeadsConfig(hidden_size=embed.out_channels, patch_size=embed.kernel_size[0])
            self.heads = _random_heads(pack_heads.DAHeads(config), seed)
            self.patched = patch.patch_sd3_model(model, self.heads, "random heads").object_patches
            self.stock = {k: comfy.utils.get_attr(model.model, k) for k in self.patched}
            self.root = model.model
        self._set = _set_attr

    def use(self, da: bool) -> None:
        for key, value in (self.patched if da else self.stock).items():
            self._set(self.root, key, value)


def _random_heads(heads, seed: int):
    torch.manual_seed(seed)
    _randomize_(heads)  # trained heads are non-zero; zeros could be special-cased by kernels
    return heads


def _set_attr(root, path: str, value) -> None:
    *parents, name = path.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, name, value)


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
    return model.model.diffusion_model(x, t, y=cond["pooled"], context=cond["context"])
