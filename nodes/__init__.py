"""ComfyUI adapters over :mod:`davae_core`, one feature per module.

Nothing here imports ComfyUI at import time: the pure helpers (``errors``, ``latent_ops``,
``da_files``) are unit-tested without it.  ComfyUI calls :func:`comfy_entrypoint`, which
imports the node modules.
"""


async def comfy_entrypoint():
    from .extension import DAVAEExtension

    return DAVAEExtension()
