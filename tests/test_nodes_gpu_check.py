"""bench.gpu_check's ComfyUI legs (issue 23) in a real ComfyUI (COMFYUI_PATH), on CPU: the --toy
run of the sampling, decode and low-VRAM legs through ComfyUI's own loaders and samplers, and that
the full-size models the GPU run builds are what ComfyUI detects (shapes only: nothing that size
runs here).  The training leg and the report's logic: tests/test_gpu_check.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_harness as harness  # noqa: E402
from test_gpu_check import assert_tables_are_whole  # noqa: E402

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH") and os.environ.get("DAVAE_REQUIRE_COMFYUI") != "1":
    pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout (0.8.0 or 0.3.64) to run these", allow_module_level=True)

COMFY_LEGS = ["sampling", "decode", "lowvram"]


@pytest.fixture(scope="module")
def comfy(fixtures_dir):
    harness.comfyui_path()
    return harness.boot(Path(fixtures_dir))  # the check's own start then finds ComfyUI booted


@pytest.fixture(scope="module")
def toy_run(comfy, tmp_path_factory):
    from bench.gpu_check import cli

    folder = tmp_path_factory.mktemp("gpu_check")
    with load_messages() as messages:
        result = cli.main(["--toy", "--legs", *COMFY_LEGS, "--out", str(folder), "--readme", str(folder / "README.md")])
    return result, folder, messages.lines


def load_messages():
    """What ComfyUI's loaders say about a weight they did not fill or did not take (logged, not raised)."""
    from bench.gpu_check.comfy_host import LogWatch

    return LogWatch("unet missing", "unet unexpected", "Missing VAE keys", "Leftover VAE keys", "left over keys")


def test_toy_comfy_legs_run_and_write_their_figures(toy_run):
    result, folder, loader_lines = toy_run
    assert loader_lines == []  # every MMDiT and VAE tensor ComfyUI built was filled from the state dicts given
    on_disk = json.loads((folder / "gpu_check.json").read_text())
    assert list(on_disk["legs"]) == COMFY_LEGS
    for leg in COMFY_LEGS:
        assert "error" not in on_disk["legs"][leg], on_disk["legs"][leg]["error"]

    sampling = on_disk["legs"]["sampling"]
    variants = sampling["variants"]
    assert list(variants) == ["stock_1024", "da_1024", "stock_512", "da_1024_fp8"]
    # the DA runs sample 32-channel latents at half the side: the stock-512 token count
    assert variants["da_1024"]["latent"][1] == 32 and variants["stock_1024"]["latent"][1] == 16
    assert variants["da_1024"]["latent"][2:] == variants["stock_512"]["latent"][2:]
    assert variants["stock_1024"]["latent"][2] == 2 * variants["stock_512"]["latent"][2]
    assert variants["da_1024_fp8"]["comfy"]["weight_dtype"] == "float8_e4m3fn"
    assert variants["da_1024"]["comfy"]["model_class"] == "SD3"
    assert all(v["median_s"] > 0 and v["peak_memory"]["measured"] is False for v in variants.values())
    assert set(sampling["ratios"]) >= {"stock_1024_over_da_1024", "da_1024_over_stock_512", "da_1024_fp8_over_bf16"}

    decode = on_disk["legs"]["decode"]
    for dtype in ("bf16", "fp32"):
        for name in ("stock_1024", "da_1024", "da_2048_untiled", "da_2048_tiled"):
            run = decode["runs"][f"{name}_{dtype}"]
            assert run["out_of_memory"] is False and run["finite"] is True and run["seconds"] > 0
        # the DA-VAE decodes an f16 latent to the same image size as the stock f8 one
        assert decode["runs"][f"da_1024_{dtype}"]["image"] == decode["runs"][f"stock_1024_{dtype}"]["image"]
        assert decode["runs"][f"da_2048_tiled_{dtype}"]["image"] == decode["runs"][f"da_2048_untiled_{dtype}"]["image"]
        assert decode["runs"][f"da_2048_tiled_{dtype}"]["tiles"] > 1  # the tiled decode does decode in tiles
    assert set(decode["ratios"]) == {"da_over_stock_1024_bf16", "da_over_stock_1024_fp32"}
    assert decode["cap"]["applied"] is False and set(decode["capped"]) == {"stock_1024", "da_1024", "da_2048", "da_2048_tiled"}
    assert not any(c["out_of_memory"] or c["comfy_fell_back_to_tiles"] for c in decode["capped"].values())

    lowvram = on_disk["legs"]["lowvram"]
    assert list(lowvram["steps"]) == ["stock_sampling_1024", "da_sampling_1024", "da_decode_1024", "unload_all"]
    assert not any(s["out_of_memory"] for s in lowvram["steps"].values())
    # ComfyUI's loader reports the MMDiT's load for the first sampling (whole, on a CPU)
    assert any(line.startswith("loaded completely") for line in lowvram["steps"]["stock_sampling_1024"]["comfy_loader"])


def test_toy_comfy_legs_fill_the_readme_section(toy_run):
    _, folder, _ = toy_run
    text = (folder / "README.md").read_text()
    for heading in ("**End to end in ComfyUI**", "**Decode**", "**Low VRAM**"):
        assert heading in text
    assert_tables_are_whole(text)
    assert "| da_2048_tiled_bf16 |" in text and "stock-1024 / DA-1024 = **" in text and "DA / stock decode time at 1024: bf16 **" in text


def test_the_full_size_mmdit_the_gpu_run_builds_is_detected_as_sd35_medium(comfy):
    """The GPU run hands ComfyUI a state dict of these shapes; its detection must make SD3.5-Medium of it."""
    import comfy.model_detection

    from bench.gpu_check import comfy_host
    from bench.gpu_check.settings import FULL

    sd = comfy_host.meta_state_dict(FULL)
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config).__name__ == "SD3"
    unet = config.unet_config
    assert unet["depth"] == 24 and unet["in_channels"] == 16 and unet["pos_embed_max_size"] == 384
    assert unet["x_block_self_attn_layers"] == list(range(13)) and unet["adm_in_channels"] == 2048
    assert sd["pos_embed"].shape == (1, 384 * 384, 1536)
    weights = sum(t.numel() for k, t in sd.items() if k != "pos_embed")
    assert weights == pytest.approx(2.24e9, rel=0.02)  # SD3.5-Medium's MMDiT, its positional table aside


def test_the_full_size_stock_vae_is_comfyuis_sd3_vae_detected_from_its_keys(comfy):
    from bench.gpu_check import leg_decode
    from bench.gpu_check.settings import FULL

    with load_messages() as messages:
        vae = leg_decode.stock_vae(FULL, torch.device("cpu"), torch.bfloat16, seed=0)
    assert messages.lines == []  # ComfyUI's inferred SD3 VAE took every tensor, and all it has were given
    assert vae.latent_channels == 16 and vae.downscale_ratio == 8
    assert sum(p.numel() for p in vae.first_stage_model.parameters()) == pytest.approx(83.7e6, rel=0.02)
