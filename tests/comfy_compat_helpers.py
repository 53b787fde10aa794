"""What the compatibility tests (``tests/test_nodes_compat.py``) build beside a real ComfyUI.

* the third-party packs, unpacked from ``../shared/comfyui/packs/*.tar.gz`` (or
  ``$DAVAE_SHARED/comfyui/packs``) into a ``custom_nodes`` folder and loaded by ComfyUI's own
  custom-node loader, as a restart after installing them does;
* tiny quantised copies of the fixtures' MMDiT: GGUF (written with the ``gguf`` library, by
  the rules ComfyUI-GGUF's ``tools/convert.py`` and its llama.cpp patch follow for SD3), 0.3.64's
  scaled fp8 (``scale_weight``) and 0.8.0's quantised layers (``comfy_quant`` + ``weight_scale``);
* a LoRA on the patch embedder P and output layer O, which the fixtures' block LoRA leaves out.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

import comfyui_harness as harness

REPO = Path(__file__).resolve().parents[1]
PREFIX = "model.diffusion_model."
FP8_MAX = 448.0  # largest float8_e4m3fn
# ComfyUI-GGUF keeps these SD3 tensors in the source precision when it quantises (its llama.cpp
# patch): the embedders, the final layer and the positional table.
GGUF_UNQUANTISED = ("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.", "x_embedder.", "pos_embed")
GGUF_SMALL = 1024  # tensors this small, and 1-D ones, stay F32 (convert.py)


# ------------------------------------------------------------------ third-party packs
def packs_dir() -> Path:
    return Path(os.environ.get("DAVAE_SHARED", REPO.parent / "shared")) / "comfyui" / "packs"


_installed: dict[str, Path] = {}


def install_pack(prefix: str, needs: tuple[str, ...] = ()) -> Path:
    """Unpack the pack named ``prefix`` into a custom_nodes folder and load it with ComfyUI's own
    loader, once per process; its nodes join ``nodes.NODE_CLASS_MAPPINGS``."""
    if prefix in _installed:
        return _installed[prefix]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        harness.unavailable(f"the {prefix} pack needs {missing} in this Python (pip install {' '.join(missing)})")
    tarballs = sorted(packs_dir().glob(f"{prefix}-*.tar.gz"))
    if not tarballs:
        harness.unavailable(f"no {prefix}-*.tar.gz in {packs_dir()} (set DAVAE_SHARED to the folder holding comfyui/packs)")
    custom_nodes = Path(tempfile.mkdtemp(prefix="davae_packs_")) / "custom_nodes"
    with tarfile.open(tarballs[-1]) as tar:
        tar.extractall(custom_nodes, filter="data")
    (path,) = [p for p in custom_nodes.iterdir() if p.is_dir()]
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(path))):
        pytest.fail(f"ComfyUI could not load the {path.name} pack from {tarballs[-1].name} (its traceback is in the log)")
    _installed[prefix] = path
    return path


# ------------------------------------------------------------------ quantised copies of the fixture MMDiT
def mmdit_state_dict(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    """The fixtures' MMDiT under ComfyUI's keys, without the checkpoint prefix."""
    from safetensors.torch import load_file

    sd = load_file(str(fixtures_dir / "checkpoints" / "sd3_tiny.safetensors"))
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}


def write_gguf(path: Path, state_dict: dict[str, torch.Tensor], qtype: str, quantise_heads: bool = False) -> dict[str, str]:
    """An SD3 GGUF file of ``state_dict`` in ``qtype`` ("F16" or "Q8_0"); returns each tensor's type.

    ``quantise_heads`` also quantises the embedders and the final layer (tools other than
    ComfyUI-GGUF's do), so P and O reach the DA forwards as quantised tensors."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    target = getattr(kinds, qtype)
    writer = gguf.GGUFWriter(path=None, arch="sd3")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if target == kinds.Q8_0 else gguf.LlamaFileType.MOSTLY_F16)
    written = {}
    for key, tensor in state_dict.items():
        data = tensor.float().numpy()
        kind = target
        if data.ndim == 1 or data.size <= GGUF_SMALL:
            kind = kinds.F32
        elif target != kinds.F16 and key.startswith(GGUF_UNQUANTISED) and not (quantise_heads and key != "pos_embed"):
            kind = kinds.F16
        try:
            packed = gguf.quants.quantize(data, kind)
        except gguf.QuantError:  # rows shorter than a block (the 2x2 patch conv): F16, as convert.py falls back
            kind = kinds.F16
            packed = gguf.quants.quantize(data, kind)
        writer.add_tensor(key, packed, raw_dtype=kind)
        written[key] = kind.name
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def write_fp8_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], layout: str) -> None:
    """Every Linear weight (2-D) in float8_e4m3fn with a per-layer scale, in one of ComfyUI's layouts:

    * ``scaled_fp8``: ``<layer>.scale_weight`` and a ``scaled_fp8`` marker (0.3.64 reads it
      natively; 0.8.0 converts it to its quantised tensors on load);
    * ``comfy_quant``: ``<layer>.weight_scale`` and ``<layer>.comfy_quant`` (0.8.0's own format).
    """
    from safetensors.torch import save_file

    out = {}
    for key, tensor in state_dict.items():
        if not (key.endswith(".weight") and tensor.ndim == 2):
            out[PREFIX + key] = tensor
            continue
        layer = PREFIX + key[: -len(".weight")]
        scale = (tensor.abs().max().float() / FP8_MAX).reshape(())
        out[PREFIX + key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
        if layout == "scaled_fp8":
            out[f"{layer}.scale_weight"] = scale
        else:
            out[f"{layer}.weight_scale"] = scale
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    if layout == "scaled_fp8":
        out[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))


def write_embed_and_output_lora(path: Path, hidden: int, channels: int = 16, patch: int = 2, rank: int = 4, seed: int = 0) -> None:
    """A LoRA on P (``pos_embed.proj``, a conv) and O (``proj_out``) under diffusers' SD3 names,
    as ComfyUI's LoRA loaders read them (``transformer.`` prefix, no alpha: scale 1)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    save_file({
        "transformer.pos_embed.proj.lora_A.weight": rand(rank, channels, patch, patch),
        "transformer.pos_embed.proj.lora_B.weight": rand(hidden, rank, 1, 1),
        "transformer.proj_out.lora_A.weight": rand(rank, hidden),
        "transformer.proj_out.lora_B.weight": rand(patch * patch * channels, rank),
    }, str(path))
