"""ComfyUI entry point of the DA-VAE node pack.

ComfyUI imports this directory as a package and calls ``comfy_entrypoint``.  Outside ComfyUI
(tests, the trainers, ``pip install -e .``) importing it must still work, so the nodes are
only loaded when ComfyUI's node API is importable.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
