"""Run the node pack inside a real ComfyUI, in-process on CPU, with the fixtures' tiny files.

Test scaffolding (see :mod:`davae_testing`): used by the integration tests (through
``tests/comfyui_harness.py``) and by the demo's ComfyUI step.  ComfyUI comes from
``COMFYUI_PATH``.  The pack is loaded the way ComfyUI loads any custom node (a
``custom_nodes`` folder holding a link to this repository), and prompts run through ComfyUI's
own ``validate_prompt`` and ``PromptExecutor``.  Needs only what ComfyUI's environment has
(no diffusers, peft, accelerate or pytest) and imports nothing of this repository but the
pack ComfyUI loaded, so it also runs as a plain file.

What the tiny fixtures cannot provide is substituted, and only that:

* text encoders: the tiny checkpoint has none, so ``TripleCLIPLoader`` is dropped and each
  ``CLIPTextEncode`` becomes ``DATestConditioning`` (seeded random context 64-wide and pooled
  32-wide, the tiny MMDiT's sizes);
* the stock SD3 VAE: ComfyUI infers it from its keys only at SD3 width, so the checkpoint
  loader's VAE output is replaced by ``DATestSD3VAELoader``: the fixtures' tiny SD3-layout VAE
  as ComfyUI's own ``comfy.sd.VAE``, built from a config;
* file names point at the fixtures, sizes are divided by 4 (8 for 2048) and samplers run 2 steps.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import os
import sys
import tempfile
import uuid
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# H10 renames workflows/ to example_workflows/ (ComfyUI's convention); either layout is read.
WORKFLOWS = next((p for p in (REPO / "example_workflows", REPO / "workflows") if p.is_dir()), REPO / "example_workflows")
PACK_NAME = "comfyui_davae"
SIZE_DIVISOR = 4
TEST_STEPS = 2
INPUT_IMAGE = "davae_example_input.png"

FIXTURE_FILES = {
    "CheckpointLoaderSimple": {"ckpt_name": "sd3_tiny.safetensors"},
    "LoraLoaderModelOnly": {"lora_name": "lora_tiny.safetensors"},
    "LoraLoader": {"lora_name": "lora_tiny.safetensors"},
    "DASD3ModelPatch": {"heads": "da_heads_tiny.safetensors"},
    "DAVAELoader": {"davae_name": "davae_tiny.safetensors"},
}
SIZE_INPUTS = {"width", "height", "tile_size", "overlap"}

_state: dict = {}


class ComfyUIUnavailable(RuntimeError):
    """``COMFYUI_PATH`` is unset or does not point at a ComfyUI checkout."""


def comfyui_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise ComfyUIUnavailable("COMFYUI_PATH is not set: point it at a ComfyUI checkout (0.8.0 or 0.3.64)")
    if not (Path(path) / "comfy").is_dir():
        raise ComfyUIUnavailable(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/ folder)")
    return Path(path)


def start_comfyui(cpu: bool = True, before_nodes=None) -> dict:
    """Import ComfyUI (``--cpu`` mode unless ``cpu`` is False: a GPU host) and load the pack as a
    custom node from a fresh ``custom_nodes`` folder; ComfyUI's own nodes are loaded too. Once per process.
    ``before_nodes(folder_paths, work_dir)`` runs before the nodes load (model folders, as a yaml would)."""
    if _state:
        return _state
    root = comfyui_path()
    sys.path.insert(0, str(root))
    if "nodes" in sys.modules and not hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS"):
        del sys.modules["nodes"]  # the repo's own nodes/ package, if something imported it by that name
    import utils.extra_config  # noqa: F401  (caches ComfyUI's top-level 'utils' before nodes.py shadows it)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401
    import execution
    import folder_paths
    import nodes

    work = Path(tempfile.mkdtemp(prefix="davae_comfy_"))
    custom = work / "custom_nodes"
    custom.mkdir()
    (custom / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    if before_nodes is not None:
        before_nodes(folder_paths, work)
    failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    _state.update(root=root, work=work, nodes=nodes, execution=execution, folder_paths=folder_paths, failed=failed)
    return _state


def boot(fixtures_dir: Path) -> dict:
    """Import ComfyUI on CPU, load the pack as a custom node, point model folders at the fixtures. Once per process."""
    if _state:
        return _state

    def fixture_folders(folder_paths, work: Path) -> None:
        for folder, sub in (("checkpoints", "checkpoints"), ("diffusion_models", "checkpoints"), ("loras", "loras"), ("davae", "davae")):
            if folder in folder_paths.folder_names_and_paths:
                folder_paths.add_model_folder_path(folder, str(fixtures_dir / sub))
            else:  # 'davae' before the pack registers it: what an extra_model_paths.yaml entry does
                folder_paths.folder_names_and_paths[folder] = ([str(fixtures_dir / sub)], {".safetensors"})
        for kind in ("output", "input", "temp"):
            (work / kind).mkdir()
        folder_paths.set_output_directory(str(work / "output"))
        folder_paths.set_input_directory(str(work / "input"))
        folder_paths.set_temp_directory(str(work / "temp"))
        _write_input_image(work / "input" / INPUT_IMAGE)

    start_comfyui(cpu=True, before_nodes=fixture_folders)
    _state["nodes"].NODE_CLASS_MAPPINGS.update(
        {"DATestConditioning": DATestConditioning, "DATestSD3VAELoader": _vae_loader_class(fixtures_dir)})
    return _state


def _write_input_image(path: Path) -> None:
    """A smooth colour gradient for LoadImage in the image-to-image workflow."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:192, 0:256]
    rgb = np.stack([x / 255.0, y / 191.0, 0.5 + 0.5 * np.sin(x / 17.0 + y / 23.0)], axis=-1)
    Image.fromarray((rgb * 255).astype("uint8")).save(path)


def pack_module(sub: str):
    """A module of the pack as ComfyUI loaded it (its name is the pack's path)."""
    for name, module in sys.modules.items():
        if name.endswith(f"{PACK_NAME}.{sub}") or name == f"{PACK_NAME}.{sub}":
            return module
    # the package itself is loaded; its submodules import on demand
    pack = next(n for n in sys.modules if n.endswith(PACK_NAME))
    return importlib.import_module(f"{pack}.{sub}")


# ------------------------------------------------------------------ stand-in nodes
class DATestConditioning:
    """Stand-in for text encoding: deterministic random conditioning at the tiny MMDiT's widths."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, text):
        import torch

        gen = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        context = torch.randn(1, 8, 64, generator=gen)
        pooled = torch.randn(1, 32, generator=gen)
        return ([[context, {"pooled_output": pooled}]],)


def _vae_loader_class(fixtures_dir: Path):
    class DATestSD3VAELoader:
        """Stand-in for the checkpoint's SD3 VAE: the fixtures' tiny SD3-layout VAE (16 channels, f8)."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("VAE",)
        FUNCTION = "load"
        CATEGORY = "testing"

        def load(self):
            return (tiny_stock_vae(fixtures_dir),)

    return DATestSD3VAELoader


def tiny_stock_vae(fixtures_dir: Path):
    """The fixtures' tiny SD3-layout VAE (a diffusers folder) as ComfyUI's own ``comfy.sd.VAE``.

    ComfyUI infers a VAE's shape from its keys only at SD3 width, so the tiny one is built
    through ``VAE``'s ``config`` argument (an ``AutoencoderKL`` with these trunk arguments and
    GroupNorm groups).  That model has 1x1 quant convs, which the SD3 VAE lacks: they load as
    identities and are then dropped, so the module tree and its keys are the SD3 VAE's
    (``encoder.*``, ``decoder.*``).  No diffusers is needed here.
    """
    from safetensors.torch import load_file

    folder = fixtures_dir / "sd3_vae"
    config = json.loads((folder / "config.json").read_text())
    return comfy_vae_from_config(config, load_file(str(folder / "diffusion_pytorch_model.safetensors")), str(folder))


def comfy_vae_from_config(config: dict, state: dict, source: str = "VAE", dtype=None):
    """An SD3-layout VAE of any width (diffusers ``config``; ``state`` in diffusers or ComfyUI keys) as
    ComfyUI's own ``comfy.sd.VAE``, built through ``VAE``'s ``config`` argument (see :func:`tiny_stock_vae`)."""
    import comfy.sd
    import torch

    if config.get("use_quant_conv") or config.get("use_post_quant_conv") or not config.get("mid_block_add_attention", True):
        raise ValueError(f"{source}: not an SD3-layout VAE (no quant convs, mid-block attention)")
    state = dict(state)
    channels = config["latent_channels"]
    identity = {"quant_conv": 2 * channels, "post_quant_conv": channels}
    for name, n in identity.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.eye(n)[:, :, None, None], torch.zeros(n)
    trunks = pack_module("nodes.comfy_davae")
    params = {"ddconfig": trunks.trunk_kwargs(config, source), "embed_dim": channels}
    with trunks.norm_groups(config["norm_num_groups"]):
        vae = comfy.sd.VAE(sd=state, config={"params": params}, dtype=dtype or torch.float32)
    vae.first_stage_model.quant_conv = vae.first_stage_model.post_quant_conv = torch.nn.Identity()
    vae.latent_channels = channels  # VAE keeps its SD1 default (4) when given a config
    return vae


# ------------------------------------------------------------------ workflows
def load_api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def to_fixture_prompt(prompt: dict, size_divisor: int = SIZE_DIVISOR) -> dict:
    """Rewrite a shipped API workflow to the tiny fixtures (see the module docstring)."""
    prompt = copy.deepcopy(prompt)
    vae_node = "davae_test_vae"
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        inputs.update(FIXTURE_FILES.get(kind, {}))
        if kind == "TripleCLIPLoader":
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            node["class_type"] = "DATestConditioning"
            inputs.pop("clip", None)
        elif kind in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = TEST_STEPS
            if "end_at_step" in inputs:
                inputs["end_at_step"] = min(inputs["end_at_step"], TEST_STEPS)
        elif kind == "LoadImage":
            inputs["image"] = INPUT_IMAGE
        for key in SIZE_INPUTS & set(inputs):
            if isinstance(inputs[key], int):
                inputs[key] //= size_divisor
    ckpts = {i for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple"}
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in ckpts and value[1] == 2:
                node["inputs"][key] = [vae_node, 0]
    prompt[vae_node] = {"class_type": "DATestSD3VAELoader", "inputs": {}}
    return prompt


class _Server:
    """What PromptExecutor needs of ComfyUI's server."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def run_prompt(prompt: dict, preview_method: str | None = None, on_preview=None) -> dict:
    """Validate and execute an API-format prompt; returns {node_id: ui output}.

    ``preview_method`` ("latent2rgb", "taesd") turns live previews on for this prompt: 0.8.0 reads
    it from the prompt's extra data, 0.3.64 from the command-line args.  ``on_preview`` gets
    each preview the progress bar hands on (what the server would send to the browser).
    """
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    previous = args.preview_method
    if preview_method:
        args.preview_method = LatentPreviewMethod(preview_method)
    if on_preview is not None:
        comfy.utils.set_progress_bar_global_hook(
            lambda value, total, preview, **kw: on_preview(preview) if preview is not None else None
        )
    try:
        return _run(prompt, {"client_id": None, **({"preview_method": preview_method} if preview_method else {})})
    finally:
        args.preview_method = previous
        comfy.utils.set_progress_bar_global_hook(None)


def _run(prompt: dict, extra_data: dict) -> dict:
    execution = _state["execution"]
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise AssertionError(f"prompt did not validate: {valid[1]} {json.dumps(valid[3], indent=1)[:3000]}")
    server = _Server()
    executor = execution.PromptExecutor(server, **_executor_cache_args())
    executor.execute(prompt, prompt_id, extra_data, valid[2])
    if not executor.success:
        errors = [m for m in server.messages if m[0] == "execution_error"]
        raise AssertionError(f"prompt failed: {json.dumps(errors, default=str)[:4000]}")
    return executor.history_result["outputs"]


def _executor_cache_args() -> dict:
    """0.8.0 takes cache_args (its RAM check reads 'ram'); 0.3.64 takes cache_size."""
    import inspect

    from comfy.cli_args import args

    params = inspect.signature(_state["execution"].PromptExecutor.__init__).parameters
    if "cache_args" in params:
        return {"cache_args": {"lru": args.cache_lru, "ram": args.cache_ram}}
    return {}


def saved_image_sizes(outputs: dict) -> dict[str, list[tuple[int, int]]]:
    """{node_id: [(width, height), ...]} of the images SaveImage / PreviewImage wrote."""
    from PIL import Image

    folder_paths = _state["folder_paths"]
    sizes = {}
    for node_id, ui in outputs.items():
        for image in ui.get("images", []):
            base = {"output": folder_paths.get_output_directory(), "temp": folder_paths.get_temp_directory()}[image["type"]]
            with Image.open(Path(base) / image["subfolder"] / image["filename"]) as im:
                sizes.setdefault(node_id, []).append(im.size)
    return sizes
