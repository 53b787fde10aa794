"""ComfyUI as a custom-node host with this pack (``COMFYUI_PATH``), and the models the ComfyUI legs share.

The MMDiT is built the way a user's file reaches ComfyUI: a state dict (shapes from ComfyUI's own
MMDiT built on the meta device, values drawn on the device) handed to
``comfy.sd.load_diffusion_model_state_dict``, which detects SD3.5-Medium from the shapes, as it
does for ``models/diffusion_models/sd3.5_medium.safetensors``.  ``--toy``: the same with the tiny
SD3 ComfyUI detects from a tiny file (depth 2), on ComfyUI's ``--cpu`` path.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

from ..sd3_models import reduced_layers
from .settings import Sizes

# ComfyUI's unet_config for SD3.5-Medium (what model detection reads off the checkpoint's shapes)
SD35M_UNET = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    "pos_embed_max_size": 384, "num_patches": 384 * 384, "pos_embed_scaling_factor": None, "qk_norm": "rms",
    "x_block_self_attn_layers": reduced_layers(24)[1],
}
# the tiny SD3 of shared/COMFYUI.md: depth 2 (hidden 128), text 64 wide, pooled 32
TOY_UNET = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "adm_in_channels": 32,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
    "pos_embed_max_size": 64, "num_patches": 64 * 64, "pos_embed_scaling_factor": None, "qk_norm": "rms",
    "x_block_self_attn_layers": [0],
}
WEIGHT_STD = 0.02


def start(device: torch.device) -> dict[str, Any]:
    """Boot ComfyUI once: ``--cpu`` on a CPU, its normal GPU mode on a GPU; the pack loaded as a custom node."""
    from davae_testing.comfyui_runner import PACK_NAME, start_comfyui

    state = start_comfyui(cpu=device.type != "cuda")
    if "DASD3ModelPatch" not in state["nodes"].NODE_CLASS_MAPPINGS:  # ComfyUI logs a pack that fails and goes on
        raise RuntimeError(f"ComfyUI booted without the pack {PACK_NAME}: see its log above")
    return state


def pack(sub: str):
    """A module of the pack as ComfyUI loaded it."""
    from davae_testing.comfyui_runner import pack_module

    return pack_module(sub)


def unet_config(sizes: Sizes) -> dict[str, Any]:
    return dict(TOY_UNET if sizes.toy else SD35M_UNET)


def meta_state_dict(sizes: Sizes) -> dict[str, torch.Tensor]:
    """The MMDiT's tensors under a file's keys, on the meta device (shapes only, nothing allocated)."""
    import comfy.supported_models

    with torch.device("meta"):
        return comfy.supported_models.SD3(unet_config(sizes)).get_model({}).diffusion_model.state_dict()


def random_state_dict(sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """:func:`meta_state_dict` filled on ``device`` with N(0, 0.02) (no uninitialised memory, no all-zero layer)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {k: torch.empty(v.shape, device=device, dtype=dtype).normal_(0.0, WEIGHT_STD, generator=gen)
            for k, v in meta_state_dict(sizes).items()}


def load_mmdit(sizes: Sizes, device: torch.device, weight_dtype: torch.dtype, seed: int = 0):
    """A ModelPatcher from ``comfy.sd.load_diffusion_model_state_dict`` (the loader takes the tensors:
    it pops them from the dict); ``weight_dtype`` is the stored dtype ComfyUI is told (fp8 casts on load)."""
    import comfy.sd

    sd = random_state_dict(sizes, device, torch.bfloat16, seed)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": weight_dtype})
    if model is None:
        raise RuntimeError("ComfyUI did not detect the MMDiT state dict as a diffusion model")
    return model


def describe(model) -> dict[str, Any]:
    base = model.model
    return {"model_class": type(base).__name__, "weight_dtype": str(base.get_dtype()).removeprefix("torch."),
            "compute_dtype": str(base.manual_cast_dtype or base.get_dtype()).removeprefix("torch."),
            "size_gib": round(model.model_size() / 2**30, 3)}


def model_sampling_sd3(model, shift: float = 3.0):
    """ComfyUI's ModelSamplingSD3 node (V1 ``patch`` or V3 ``execute``, whichever this ComfyUI has)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    if hasattr(ModelSamplingSD3, "patch"):
        return ModelSamplingSD3().patch(model, shift)[0]
    return ModelSamplingSD3.execute(model, shift)[0]


def random_heads(model, seed: int):
    """The pack's DA patch on ``model`` with random heads (trained heads are non-zero: zeros could be skipped)."""
    heads_mod = pack("davae_core.heads")
    patch = pack("nodes.sd3_model_patch")
    embed = model.get_model_object(patch.EMBED_KEY)
    heads = heads_mod.DAHeads(heads_mod.HeadsConfig(hidden_size=embed.out_channels, patch_size=embed.kernel_size[0]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, WEIGHT_STD, generator=gen)
    return patch.patch_sd3_model(model, heads, "random heads")


def conditioning(sizes: Sizes, seed: int) -> tuple[list, list]:
    """Positive and negative conditioning in ComfyUI's SD3 shapes: (1, tokens, 4096) and pooled (1, 2048)."""
    config = unet_config(sizes)
    width = config["context_embedder_config"]["params"]["in_features"]
    gen = torch.Generator().manual_seed(seed)

    def one():
        return [[torch.randn(1, sizes.text_tokens, width, generator=gen),
                 {"pooled_output": torch.randn(1, config["adm_in_channels"], generator=gen)}]]

    return one(), one()


def ksample(model, latent: torch.Tensor, positive, negative, sizes: Sizes, seed: int = 0) -> torch.Tensor:
    """What the KSampler node runs (``nodes.common_ksampler``: empty-latent fix, noise, ``comfy.sample.sample``),
    euler / sgm_uniform, under inference mode as nodes run."""
    nodes = sys.modules["nodes"]
    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, sizes.steps, sizes.cfg, "euler", "sgm_uniform", positive, negative,
                                    {"samples": latent})[0]["samples"]
    return out


def unload_all(device: torch.device) -> None:
    import comfy.model_management as mm

    from . import memory

    mm.unload_all_models()
    mm.soft_empty_cache()
    memory.release(device)


class LogWatch(logging.Handler):
    """The log lines (any level) holding one of ``words`` while the block runs: ComfyUI reports
    weights it did not fill and out-of-memory fallbacks in its log, never as errors."""

    def __init__(self, *words: str):
        super().__init__()
        self.words = words
        self.lines: list[str] = []

    def __enter__(self) -> "LogWatch":
        self.root_level = logging.root.level  # not self.level: that is this handler's own threshold
        logging.root.setLevel(logging.DEBUG)  # setLevel, not .level: loggers cache what they let through
        logging.root.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.root.removeHandler(self)
        logging.root.setLevel(self.root_level)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(word in message for word in self.words):
            self.lines.append(message[:300])
