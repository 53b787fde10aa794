"""What SD3's patch embedder P and output layer O compute in a DA-patched model (paper Sec. 3.2).

A DA forward replaces the ``forward`` of P (``x_embedder.proj``) and O (``final_layer.linear``)
through an object patch; the modules themselves stay where they are.  ComfyUI addresses
weights by their path in the model (``diffusion_model.x_embedder.proj.bias``): LoRA patches,
low-VRAM weight functions, pinned memory (one set shared by all clones of a checkpoint) and the
SD3.5 ControlNet's copy of the embedder all use those paths, and a replaced module would rename
them for one clone only.  So P' and O' are held here, outside the module tree, as
``comfy.ops.manual_cast`` layers that cast to the input's device and dtype on every call, and
these objects are no ``nn.Module`` (one set as ``forward`` would join the tree).

P and O compute through their own class ``forward``: ComfyUI's cast path, which decodes fp8,
scaled fp8, quantised and GGUF weights and applies the loaders' LoRA patches.  When their
weights are plain floats with no weight functions, P+P' and O+O' run fused instead (one conv,
one linear), from a cache that ComfyUI's own record of patched weights invalidates.
"""

from __future__ import annotations

import weakref

import comfy.ops
import torch

from ..davae_core.heads import FusedWeightCache, fusable, fuse_embed_weights, fuse_output_weights


class _DAForward:
    def __init__(self, layer, detail, base_model):
        self.layer = layer  # the model's P or O, or retrained ones from a heads file
        self.detail = detail
        self._base_model = weakref.ref(base_model)  # this object lives inside base_model: no cycle
        self.fused_cache = FusedWeightCache()

    def layer_forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.layer).forward(self.layer, x)  # the class's: the instance's is this object

    def fused_weights(self, x: torch.Tensor, fuse):
        tensors = (self.layer.weight, self.layer.bias, self.detail.weight, self.detail.bias)
        return self.fused_cache.get(tensors, self._weights_state(x), lambda: fuse(*self._cast(self.layer, x), *self._cast(self.detail, x)))

    def _weights_state(self, x: torch.Tensor):
        """What changes when ComfyUI patches weights without replacing them: the patch set loaded
        into the model (LoRA, strengths; None while unpatched) and the hooks applied per step.
        None (no caching) while torch.compile traces: the fusion is then part of the graph."""
        if torch.compiler.is_compiling():
            return None
        model = self._base_model()
        patcher = getattr(model, "current_patcher", None)
        return (x.device, x.dtype, getattr(model, "current_weight_patches_uuid", None), getattr(patcher, "current_hooks", None))

    @staticmethod
    def _cast(layer, x: torch.Tensor):
        return comfy.ops.cast_bias_weight(layer, dtype=x.dtype, device=x.device, bias_dtype=x.dtype)


class DAEmbedForward(_DAForward):
    """``P(x[:, :C]) + P'(x[:, C:])``; fused: one conv with weight ``[W_P | W_P']``."""

    def __init__(self, layer, detail, base_channels: int, base_model):
        super().__init__(layer, detail, base_model)
        self.base_channels = base_channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.base_channels
        if x.shape[1] != c + self.detail.in_channels:
            return self.layer_forward(x)  # the stock layer names the wrong channel count
        if fusable((self.layer, self.detail)):
            weight, bias = self.fused_weights(x, fuse_embed_weights)
            return torch.nn.functional.conv2d(x, weight, bias, stride=self.layer.stride, padding=self.layer.padding)
        base = self.layer_forward(x[:, :c])
        return base + self.detail(x[:, c:]).to(base.dtype)


class DAOutputForward(_DAForward):
    """Per patch ``[O(h) | O'(h)]``; fused: one linear with the rows interleaved per patch."""

    def __init__(self, layer, detail, patch_size: int, base_model):
        super().__init__(layer, detail, base_model)
        self.patch_size = patch_size

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if fusable((self.layer, self.detail)):
            weight, bias = self.fused_weights(h, lambda *t: fuse_output_weights(*t, self.patch_size))
            return torch.nn.functional.linear(h, weight, bias)
        pp = self.patch_size * self.patch_size
        base = self.layer_forward(h).unflatten(-1, (pp, -1))
        detail = self.detail(h).to(base.dtype).unflatten(-1, (pp, -1))
        return torch.cat([base, detail], dim=-1).flatten(-2)
