"""ComfyUI entry point of the DA-VAE node pack.

ComfyUI imports this directory as a package and calls ``comfy_entrypoint``.  Outside ComfyUI
(tests, the trainers, ``pip install -e .``) importing it must still work, so the nodes are
only loaded when ComfyUI's node API is importable.  Inside a ComfyUI too old for the V3 node
API the pack says so in the log instead of loading nothing silently.
"""

import importlib.util
import logging

MIN_COMFYUI = "0.3.64"  # the oldest release the pack is tested with; V3 API (comfy_api.latest)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


if _importable("comfy_api.latest"):
    from .nodes import comfy_entrypoint  # noqa: F401
elif _importable("comfy") and _importable("folder_paths"):  # inside a ComfyUI without the V3 API
    logging.getLogger(__name__).error(
        "DA-VAE nodes not loaded: they need ComfyUI %s or newer (the V3 node API, comfy_api.latest), "
        "which this ComfyUI does not have. Update ComfyUI (git pull, or the ComfyUI-Manager 'Update ComfyUI' "
        "button) and restart.", MIN_COMFYUI,
    )
