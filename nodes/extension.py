"""The node list ComfyUI gets from this pack."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import da_files
from .base_latent_nodes import DABaseLatent, DALatentFromBase
from .davae_loader import DAVAELoader
from .sd3_model_patch import DASD3ModelPatch
from .structured_latent_nodes import DAEmptyStructuredLatent, DAStructuredLatentDecode, DAStructuredLatentEncode

NODES: list[type[io.ComfyNode]] = [
    DAVAELoader,
    DAEmptyStructuredLatent,
    DAStructuredLatentEncode,
    DAStructuredLatentDecode,
    DASD3ModelPatch,
    DALatentFromBase,
    DABaseLatent,
]


class DAVAEExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


da_files.register_folder()
