"""The DA-VAE under ComfyUI's model management, in a real ComfyUI (COMFYUI_PATH), on CPU.

What only a GPU shows is reproduced by watching ComfyUI's own functions: which models
``load_models_gpu`` is asked to load during an encode, and, for small cards, the free memory
``get_free_memory`` reports (faked here) against the memory each DA-VAE call would take.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_harness as harness  # noqa: E402

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH") and os.environ.get("DAVAE_REQUIRE_COMFYUI") != "1":
    pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout (0.8.0 or 0.3.64) to run these", allow_module_level=True)


@pytest.fixture(scope="module")
def comfy(fixtures_dir):
    harness.comfyui_path()
    return harness.boot(Path(fixtures_dir))


@pytest.fixture(scope="module")
def da_file(fixtures_dir) -> Path:
    return Path(fixtures_dir) / "davae" / "davae_tiny.safetensors"


@pytest.fixture(scope="module")
def slim_file(comfy, da_file, tmp_path_factory) -> Path:
    """The fixture DA-VAE without its base encoder: what ``save_davae(..., include_base_encoder=False)`` writes."""
    from safetensors.torch import save_file

    checkpoint = harness.pack_module("davae_core.checkpoint")
    slim = tmp_path_factory.mktemp("slim") / "davae_slim.safetensors"
    kept = {k: v for k, v in checkpoint.load_tensors(da_file).items() if not k.startswith(("base_encoder.", "base_quant_conv."))}
    save_file(kept, str(slim), metadata=checkpoint.read_header(da_file))
    return slim


def _loader():
    return harness.pack_module("nodes.davae_loader")


# ------------------------------------------------------------------ files without their own base encoder
def test_base_encoder_from_the_vae_input_runs_under_the_da_vaes_own_load(comfy, fixtures_dir, da_file, slim_file, monkeypatch):
    """Every DA encode asks ComfyUI to load the DA-VAE alone, once: the stock VAE is never loaded in
    the middle of it (on a GPU that load could offload the DA-VAE under its own running encode, and
    each tile made a GPU -> CPU -> GPU round trip through the stock ``VAE.encode``)."""
    import comfy.model_management as mm

    stock = harness.tiny_stock_vae(Path(fixtures_dir))
    vae = _loader().load_da_vae(str(slim_file), stock, dtype=torch.float32)
    reference = _loader().load_da_vae(str(da_file), dtype=torch.float32)
    loads: list[list] = []
    load_models_gpu = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **k: loads.append(list(models)) or load_models_gpu(models, *a, **k))
    image = torch.rand(1, 128, 96, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = vae.encode(image)
        tiled = vae.encode_tiled(image, tile_x=64, tile_y=64, overlap=16)  # 6 tiles
    assert loads == [[vae.patcher], [vae.patcher]]
    with torch.inference_mode():
        torch.testing.assert_close(plain, reference.encode(image), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tiled, reference.encode_tiled(image, tile_x=64, tile_y=64, overlap=16), atol=1e-4, rtol=1e-4)


def test_a_vae_input_whose_encoder_does_not_fit_is_refused_naming_it(comfy, slim_file):
    from types import SimpleNamespace

    checkpoint = harness.pack_module("davae_core.checkpoint")
    not_sd3 = SimpleNamespace(first_stage_model=torch.nn.ModuleDict({"encoder": torch.nn.Conv2d(3, 32, 3)}),
                              latent_channels=16, downscale_ratio=8)
    with pytest.raises(checkpoint.CheckpointError, match=r"davae_slim.safetensors: holds no base encoder, and the encoder of the VAE connected to 'vae' does not fit it "
                       r"\(76 tensors .*connect the SD3 VAE this DA-VAE was trained with"):
        _loader().load_da_vae(str(slim_file), not_sd3)


# ------------------------------------------------------------------ dtype: never fp16
def test_loader_offers_no_fp16_and_refuses_it(comfy, da_file):
    """The DA-VAE overflows in fp16 (as the SD3 VAE's decoder does): the loader does not offer it."""
    options = comfy["nodes"].NODE_CLASS_MAPPINGS["DAVAELoader"].INPUT_TYPES()["required"]["dtype"]
    assert (options[0] if isinstance(options[0], list) else options[1]["options"]) == ["default", "fp32", "bf16"]
    with pytest.raises(ValueError, match=r"DA-VAE Loader: input 'dtype' must be fp32 or bf16.*got fp16"):
        _loader().load_da_vae(str(da_file), dtype=torch.float16)


def test_fp16_vae_flag_does_not_put_the_da_vae_in_fp16(comfy, da_file, monkeypatch, caplog):
    """``--fp16-vae`` makes ComfyUI's default VAE dtype fp16; the DA-VAE's default stays bf16/fp32 and says why."""
    import logging

    import comfy.model_management as mm
    from comfy.cli_args import args

    monkeypatch.setattr(args, "fp16_vae", True)
    assert mm.vae_dtype(mm.vae_device(), [torch.bfloat16, torch.float32]) == torch.float16  # what the flag does
    with caplog.at_level(logging.WARNING):
        vae = _loader().load_da_vae(str(da_file))
    assert vae.vae_dtype == torch.float32  # this CPU has no bf16 in ComfyUI's eyes
    assert next(vae.first_stage_model.parameters()).dtype == torch.float32
    assert any("--fp16-vae" in r.getMessage() and "overflows" in r.getMessage() for r in caplog.records)
