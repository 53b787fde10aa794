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


# ------------------------------------------------------------------ small cards: tiles sized from free memory
GIB = 1024**3


def _memory():
    return harness.pack_module("nodes.vae_memory")


def _fake_vae(estimate, dtype):
    """What the tile choice reads of a ComfyUI VAE: its estimate, dtype and devices."""
    from types import SimpleNamespace

    return SimpleNamespace(memory_used_decode=estimate, memory_used_encode=estimate, vae_dtype=dtype, downscale_ratio=16,
                           device=torch.device("cuda", 0))


def test_comfyuis_fallback_tile_does_not_fit_an_8gb_card_and_ours_does(comfy, monkeypatch):
    """At SD3 width in fp32, ComfyUI's OOM fallback tile (64 cells = 1024 px of a f16 DA latent) is
    estimated at ~8.5 GiB; with 7 GiB reported free (an 8 GB card holding the DA-VAE) the DA-VAE
    takes the largest tile whose estimate fits 80% of it, and larger tiles in bf16."""
    import comfy.model_management as mm

    from davae_core.davae_config import DAVAEConfig

    mem = _memory()
    encode, decode = mem.memory_estimates(DAVAEConfig())  # the SD3 VAE's widths
    assert decode((1, 32, 64, 64), torch.float32) == pytest.approx(2178 * 1024 * 1024 * 4)
    assert decode((1, 32, 64, 64), torch.float32) > 8 * GIB
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 7 * GIB)
    tile, overlap = mem.decode_tiles(_fake_vae(decode, torch.float32), (1, 32, 128, 128))  # a 2048 image
    assert decode((1, 32, tile, tile), torch.float32) <= 0.8 * 7 * GIB < decode((1, 32, tile + 1, tile + 1), torch.float32)
    assert (tile, overlap) == (51, 12)  # 816 px tiles, 192 px overlap
    bf16_tile, _ = mem.decode_tiles(_fake_vae(decode, torch.bfloat16), (1, 32, 128, 128))
    assert bf16_tile == 64  # 2 bytes per value: ComfyUI's own tile fits, and is the largest the fallback takes
    pixels, pixel_overlap = mem.encode_tiles(_fake_vae(encode, torch.float32), (1, 3, 2048, 2048))
    assert (pixels, pixel_overlap) == (512, 64)  # ComfyUI's encode fallback tile fits (1.7 GiB)
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 1 * GIB)
    pixels, pixel_overlap = mem.encode_tiles(_fake_vae(encode, torch.float32), (1, 3, 2048, 2048))
    assert pixels % 16 == 0 and encode((1, 3, pixels, pixels), torch.float32) <= 0.8 * GIB
    assert encode((1, 3, pixels + 16, pixels + 16), torch.float32) > 0.8 * GIB and pixel_overlap == pixels // 8 // 16 * 16
    assert mem.encode_tiles(_fake_vae(encode, torch.float32), (1, 3, 48, 48)) == (16, 0)  # whole cells, even when tiny


class _SmallCard:
    """A card with ``free`` bytes: ComfyUI reports them, and a DA-VAE call whose estimate (per image,
    times the images it gets) exceeds them raises ComfyUI's out-of-memory error, as CUDA would."""

    def __init__(self, monkeypatch, vae, free: float):
        import comfy.model_management as mm

        self.free, self.calls = free, []
        monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: self.free)
        stage = vae.first_stage_model
        for name, estimate in (("decode", vae.memory_used_decode), ("encode", vae.memory_used_encode)):
            monkeypatch.setattr(stage, name, self._guard(getattr(stage, name), estimate, vae.vae_dtype))

    def _guard(self, run, estimate, dtype):
        import comfy.model_management as mm

        def guarded(x):
            need = estimate(x.shape, dtype) * x.shape[0]
            if need > self.free:
                raise mm.OOM_EXCEPTION(f"fake card: {need:.0f} bytes asked, {self.free:.0f} free")
            self.calls.append(tuple(x.shape))
            return run(x)

        return guarded


def _close_to_untiled(tiled: torch.Tensor, untiled: torch.Tensor, butted: torch.Tensor) -> None:
    """Tiles never match the whole image exactly (each tile's GroupNorm statistics and mid-block
    attention see only the tile); the blend keeps the error small, well under tiles that just touch."""
    err, seam = (tiled - untiled).abs(), (butted - untiled).abs()
    print(f"tiled vs untiled: mean {err.mean():.4f}, max {err.max():.3f}; tiles without overlap: max {seam.max():.3f}")
    assert err.mean() < 0.02 and err.max() < 0.3 and err.max() < 0.5 * seam.max()


def test_decode_fallback_on_a_small_card_uses_tiles_that_fit_and_matches_the_untiled_decode(comfy, da_file, monkeypatch):
    """VAE Decode of a batch of 2 at 640 px (40x40 cells) on a card with room for one 20x20-cell
    decode: ComfyUI's whole-image decode runs out of memory, its fallback calls our decode_tiled_,
    which decodes image by image in 17-cell tiles (80% of the room) and never runs out again."""
    vae = _loader().load_da_vae(str(da_file), dtype=torch.float32)
    latent = torch.randn(2, 32, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        untiled = vae.decode(latent)
        same_tiles = vae.decode_tiled(latent, tile_x=17, tile_y=17, overlap=4)
        butted = vae.decode_tiled(latent, tile_x=17, tile_y=17, overlap=0)
    card = _SmallCard(monkeypatch, vae, vae.memory_used_decode((1, 32, 20, 20), torch.float32))
    with torch.inference_mode():
        fallback = vae.decode(latent)
    assert set(card.calls) == {(1, 32, 17, 17)}
    assert len(card.calls) == 2 * 3 * 3  # per image: tiles start at 0, 13 and 23 cells on each side
    assert torch.equal(fallback, same_tiles)
    _close_to_untiled(fallback, untiled, butted)


def test_tiled_decode_and_encode_nodes_shrink_tiles_that_would_not_fit(comfy, da_file, monkeypatch):
    """'VAE Decode (Tiled)' asking for 512 px tiles and 'Structured Latent Encode' asking for 384 px
    tiles on that small card: both take the largest tile that fits instead of running out of memory."""
    mapping = comfy["nodes"].NODE_CLASS_MAPPINGS
    vae = _loader().load_da_vae(str(da_file), dtype=torch.float32)
    latent = torch.randn(1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    low = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    image = torch.nn.functional.interpolate(low, size=512, mode="bicubic").clamp(0, 1).movedim(1, -1)  # smooth, like a photo
    with torch.inference_mode():
        untiled_image, untiled_latent = vae.decode(latent), vae.encode(image)
        butted_image = vae.decode_tiled(latent, tile_x=17, tile_y=17, overlap=0)
        same_tiles = vae.encode_tiled(image, tile_x=272, tile_y=272, overlap=64)
        butted_latent = vae.encode_tiled(image, tile_x=272, tile_y=272, overlap=0)
    card = _SmallCard(monkeypatch, vae, vae.memory_used_decode((1, 32, 20, 20), torch.float32))
    with torch.inference_mode():
        (decoded,) = mapping["VAEDecodeTiled"]().decode(vae, {"samples": latent}, 512, 64, 64, 8)
    assert set(card.calls) == {(1, 32, 17, 17)}
    _close_to_untiled(decoded, untiled_image, butted_image)
    card.calls.clear()
    card.free = vae.memory_used_encode((1, 3, 320, 320), torch.float32)
    with torch.inference_mode():
        encoded = mapping["DAStructuredLatentEncode"].execute(pixels=image, vae=vae, tile_size=384, overlap=64).result[0]["samples"]
    assert set(card.calls) == {(1, 3, 272, 272)}  # 286 px fit 80% of the room; tiles are whole cells (16 px)
    assert torch.equal(encoded, same_tiles)
    # the tiny encoder's mid-block attention spans the whole image, which a 272 px tile does not see
    rel, rel_butted = ((x - untiled_latent).norm() / untiled_latent.norm() for x in (encoded, butted_latent))
    print(f"tiled encode vs untiled: relative {rel:.3f}; tiles without overlap {rel_butted:.3f}")
    assert rel < 0.2 and rel < rel_butted


def test_encode_fallback_on_a_small_card_uses_tiles_that_fit(comfy, da_file, monkeypatch):
    """VAE Encode of a 512 px image on a card with room for one 320 px encode: ComfyUI's fallback gets
    256 px tiles (half the image, which just ran out of memory; they fit), overlapping by 32 px."""
    vae = _loader().load_da_vae(str(da_file), dtype=torch.float32)
    image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        same_tiles = vae.encode_tiled(image, tile_x=256, tile_y=256, overlap=32)
    card = _SmallCard(monkeypatch, vae, vae.memory_used_encode((1, 3, 320, 320), torch.float32))
    with torch.inference_mode():
        fallback = vae.encode(image)
    assert card.calls == [(1, 3, 256, 256)] * 9
    assert torch.equal(fallback, same_tiles)
