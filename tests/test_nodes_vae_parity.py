"""The ComfyUI-built DA-VAE (ComfyUI's trunks, no diffusers) against davae_core's (diffusers trunks).

The references are this repository's own outputs, written with the fixtures
(``davae_core.fixtures.write_parity_references``), so this runs in ComfyUI's environment
without diffusers.  Covered: encode and decode, plain and tiled (stock 'VAE Encode (Tiled)' /
'VAE Decode (Tiled)' go through the same path as the DA nodes), for our file and for the
authors' layout through the importer.

Tolerance: fp32, ``atol = rtol = 1e-4`` on values of order 1-3.  The two builds run the same
weights through different kernels (ComfyUI's attention backend and op order vs diffusers'),
so they agree to float rounding, not bit for bit; measured differences are about 1e-5.
A wrong key mapping, channel order or normalisation moves outputs by 1e-1 or more.
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

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH") and os.environ.get("DAVAE_REQUIRE_COMFYUI") != "1":
    pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout (0.8.0 or 0.3.64) to run these", allow_module_level=True)

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def comfy(fixtures_dir):
    harness.comfyui_path()
    return harness.boot(Path(fixtures_dir))


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    from safetensors.torch import load_file

    folder = Path(fixtures_dir) / "parity"
    return load_file(str(folder / "reference.safetensors")), json.loads((folder / "reference.json").read_text()), folder


def _vae(kind, fixtures_dir, reference):
    adapter = harness.pack_module("nodes.vae_adapter")
    _, info, folder = reference
    if kind == "ours":
        return harness.pack_module("nodes.davae_loader").load_da_vae(
            str(Path(fixtures_dir) / "davae" / "davae_tiny.safetensors"), dtype=torch.float32)
    authors = harness.pack_module("davae_core.authors_import")
    config, state = authors.read_tokenizer(folder / info["authors_file"], info["authors_vae_config"])
    model = harness.pack_module("nodes.comfy_davae").build_comfy_davae(config, state, info["authors_file"])
    return adapter.DAComfyVAE(model, dtype=torch.float32)


@pytest.mark.parametrize("kind", ["ours", "authors"])
def test_comfy_built_davae_matches_davae_core(comfy, fixtures_dir, reference, kind):
    tensors, info, _ = reference
    vae = _vae(kind, fixtures_dir, reference)
    image, latent = tensors["image"], tensors["latent"]
    with torch.inference_mode():
        got = {
            "encode": vae.encode(image),
            "decode": vae.decode(latent),
            "encode_tiled": vae.encode_tiled(image, tile_x=info["encode_tile"], tile_y=info["encode_tile"], overlap=info["encode_overlap"]),
            "decode_tiled": vae.decode_tiled(latent, tile_x=info["decode_tile"], tile_y=info["decode_tile"], overlap=info["decode_overlap"]),
        }
    for name, value in got.items():
        expected = tensors[f"{kind}_{name}"]
        assert value.shape == expected.shape, name
        print(f"{kind} {name}: max |ComfyUI - davae_core| = {(value.float() - expected).abs().max().item():.2e}")
        torch.testing.assert_close(value.float(), expected, **TOL, msg=lambda m: f"{kind} {name}: {m}")
    # the tiled paths really tiled: they differ from the untiled ones beyond the tolerance
    assert (got["decode_tiled"] - got["decode"]).abs().max() > 1e-3


def test_memory_estimates_follow_the_structure(comfy, fixtures_dir, reference):
    """Per image, linear in pixels, and decode of a latent = decode of its 16x16-pixel image."""
    vae = _vae("ours", fixtures_dir, reference)
    enc, dec = vae.memory_used_encode, vae.memory_used_decode
    assert enc((1, 3, 2048, 2048), torch.float32) == pytest.approx(4 * enc((1, 3, 1024, 1024), torch.float32))
    assert enc((4, 3, 512, 512), torch.float32) == enc((1, 3, 512, 512), torch.float32)  # ComfyUI divides memory by it
    assert enc((1, 3, 512, 512), torch.float32) == 2 * enc((1, 3, 512, 512), torch.bfloat16)
    assert dec((1, 32, 64, 64), torch.float32) == pytest.approx(dec((1, 32, 32, 32), torch.float32) * 4)
    # the tiny fixture is 16x narrower than SD3 (8 vs 128 channels at full resolution)
    widths = vae.davae.config.base_vae["block_out_channels"]
    assert dec((1, 32, 64, 64), torch.float32) == pytest.approx(2178.0 / 128 * widths[0] * 1024 * 1024 * 4)
