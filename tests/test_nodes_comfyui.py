"""The node pack inside a real ComfyUI (COMFYUI_PATH), in-process on CPU with the tiny fixtures.

Run against both supported versions:

    COMFYUI_PATH=/path/to/ComfyUI-0.8.0  python -m pytest tests/test_nodes_*.py
    COMFYUI_PATH=/path/to/ComfyUI-0.3.64 python -m pytest tests/test_nodes_*.py

What is substituted for files the tiny fixtures cannot provide is listed in comfyui_harness.
"""

from __future__ import annotations

import json
import logging
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

NODE_IDS = [
    "DAVAELoader", "DAEmptyStructuredLatent", "DAStructuredLatentEncode", "DAStructuredLatentDecode",
    "DASD3ModelPatch", "DALatentFromBase", "DABaseLatent",
]
# Output images per SaveImage/PreviewImage node of each shipped workflow, at the test's size
# (1/4 of the real one; 1/8 for 2048, which keeps its tiled decode: 128-pixel tiles, 16 overlap).
EXPECTED_SIZES = {
    "davae_t2i_1024": {"13": [(256, 256)]},
    "davae_t2i_2048": {"13": [(256, 256)]},
    "davae_img2img": {"13": [(256, 256)]},
    "davae_refine_512": {"13": [(128, 128)], "17": [(256, 256)], "20": [(128, 128)]},
    "davae_vs_stock_1024": {"13": [(256, 256)], "17": [(256, 256)]},
}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


@pytest.fixture(scope="module")
def comfy(fixtures_dir):
    harness.comfyui_path()  # skips, saying why, without COMFYUI_PATH
    return harness.boot(Path(fixtures_dir))


@pytest.fixture(scope="module")
def tiny_model(comfy, fixtures_dir):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(Path(fixtures_dir) / "checkpoints" / "sd3_tiny.safetensors"))


def _conds(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, 8, 64, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen)}]]
    neg = [[torch.randn(1, 8, 64, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen)}]]
    return pos, neg


def _sample(model, latent, noise, steps=3, callback=None):
    import comfy.sample

    pos, neg = _conds()
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 2.0, "euler", "simple", pos, neg, latent, callback=callback, seed=0)


def _patch(model, heads=None):
    return harness.pack_module("nodes.sd3_model_patch").patch_sd3_model(model, heads)


def _heads_file(fixtures_dir):
    return harness.pack_module("nodes.da_files").load_heads_file(str(Path(fixtures_dir) / "davae" / "da_heads_tiny.safetensors"))


# ------------------------------------------------------------------ loading
def test_pack_loads_and_registers_every_node(comfy):
    mapping = comfy["nodes"].NODE_CLASS_MAPPINGS
    assert [n for n in NODE_IDS if n not in mapping] == []
    assert not any(harness.PACK_NAME in str(f) for f in comfy["failed"] or [])
    for node_id in NODE_IDS:
        schema = mapping[node_id].define_schema()
        assert schema.description and schema.display_name, node_id
        assert all(i.tooltip for i in schema.inputs), f"{node_id}: every input needs a tooltip"


def test_davae_folder_lists_each_kind_in_its_loader(comfy):
    import folder_paths

    assert "davae" in folder_paths.folder_names_and_paths
    mapping = comfy["nodes"].NODE_CLASS_MAPPINGS
    loader = _options(mapping["DAVAELoader"].INPUT_TYPES()["required"]["davae_name"])
    heads = _options(mapping["DASD3ModelPatch"].INPUT_TYPES()["required"]["heads"])
    assert loader == ["davae_tiny.safetensors"]
    assert heads == ["zero-init (no file)", "da_heads_tiny.safetensors"]


def _options(spec) -> list:
    """Combo choices: V1 puts the list first, V3 passes ('COMBO', {'options': [...]})."""
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


# ------------------------------------------------------------------ shipped workflows, end to end
@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_api_workflow_runs_end_to_end(comfy, name):
    prompt = harness.to_fixture_prompt(harness.load_api_workflow(name), 8 if name.endswith("2048") else 4)
    outputs = harness.run_prompt(prompt)
    assert harness.saved_image_sizes(outputs) == EXPECTED_SIZES[name]


def _widget_count(spec) -> tuple[bool, int]:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    is_widget = (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) and not opts.get("forceInput")
    if not is_widget:
        return False, 0
    return True, 1 + bool(opts.get("control_after_generate")) + bool(opts.get("image_upload"))


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_ui_workflow_references_existing_nodes_and_widget_counts(comfy, name):
    mapping = comfy["nodes"].NODE_CLASS_MAPPINGS
    ui = json.loads((harness.WORKFLOWS / f"{name}.json").read_text())
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in mapping, f"{name}: node type {node['type']} does not exist in this ComfyUI"
        spec = mapping[node["type"]].INPUT_TYPES()
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        widgets = sum(_widget_count(s)[1] for s in inputs.values())
        assert len(node["widgets_values"]) == widgets, f"{name}: {node['type']} has {widgets} widgets"
        for slot in node["inputs"]:
            assert slot["name"] in inputs and not _widget_count(inputs[slot["name"]])[0], f"{name}: {node['type']}.{slot['name']}"
            assert inputs[slot["name"]][0] == slot["type"]
        outputs = mapping[node["type"]].RETURN_TYPES
        assert [o["type"] for o in node["outputs"]] == list(outputs)


# ------------------------------------------------------------------ the model patch
def test_zero_heads_reproduce_stock_base_channels_exactly(tiny_model):
    gen = torch.Generator().manual_seed(3)
    base, noise_base, noise_detail = (torch.randn(1, 16, 16, 16, generator=gen) for _ in range(3))
    stock = _sample(tiny_model, base, noise_base)
    patched = _patch(tiny_model)
    da = _sample(patched, torch.cat([base, torch.zeros_like(base)], 1), torch.cat([noise_base, noise_detail], 1))
    assert da.shape == (1, 32, 16, 16)
    assert torch.equal(da[:, :16], stock)
    # zero O' predicts zero velocity: the detail channels keep what the flow made of them, not the model
    assert not torch.equal(da[:, 16:], torch.zeros_like(da[:, 16:]))


def test_odd_latent_sides_are_padded_to_whole_patches_and_keep_their_shape(tiny_model, fixtures_dir):
    """A DA latent of a size that is a multiple of 16 but not of 32 has odd sides (240x208 px -> 15x13
    cells).  ComfyUI's SD3 pads it circularly to whole 2x2 patches and crops the output back, before
    and after the patched P+P' / O+O', so it samples at its own shape; zero heads still reproduce
    the stock model's base channels on that grid exactly."""
    gen = torch.Generator().manual_seed(9)
    base, noise_base, noise_detail = (torch.randn(1, 16, 15, 13, generator=gen) for _ in range(3))
    stock = _sample(tiny_model, base, noise_base)
    assert stock.shape == (1, 16, 15, 13)
    da = _sample(_patch(tiny_model), torch.cat([base, torch.zeros_like(base)], 1), torch.cat([noise_base, noise_detail], 1))
    assert da.shape == (1, 32, 15, 13) and torch.equal(da[:, :16], stock)
    heads = _sample(_patch(tiny_model, _heads_file(fixtures_dir)), torch.zeros(1, 32, 15, 13), torch.cat([noise_base, noise_detail], 1))
    assert heads.shape == (1, 32, 15, 13) and torch.isfinite(heads).all()
    # through the nodes: Empty Structured Latent at 208x240 -> KSampler on the patched model -> a 208x240 image
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3_tiny.safetensors"}},
        "2": {"class_type": "DASD3ModelPatch", "inputs": {"model": ["1", 0], "heads": "da_heads_tiny.safetensors"}},
        "3": {"class_type": "DATestConditioning", "inputs": {"text": "a fox"}},
        "4": {"class_type": "DAEmptyStructuredLatent", "inputs": {"width": 208, "height": 240, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "DAVAELoader", "inputs": {"davae_name": "davae_tiny.safetensors", "dtype": "default"}},
        "7": {"class_type": "DAStructuredLatentDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0], "tile_size": 0, "overlap": 0}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    assert harness.saved_image_sizes(harness.run_prompt(prompt)) == {"8": [(208, 240)]}


def test_heads_file_and_lora_change_output_and_unload_cleanly(tiny_model, fixtures_dir):
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    gen = torch.Generator().manual_seed(4)
    latent, noise = torch.randn(1, 32, 16, 16, generator=gen), torch.randn(1, 32, 16, 16, generator=gen)
    stock_before = _sample(tiny_model, latent[:, :16], noise[:, :16])
    zero = _sample(_patch(tiny_model), latent, noise)
    with_heads = _sample(_patch(tiny_model, _heads_file(fixtures_dir)), latent, noise)
    lora = comfy.utils.load_torch_file(str(Path(fixtures_dir) / "loras" / "lora_tiny.safetensors"))
    lora_model, _ = comfy.sd.load_lora_for_models(tiny_model, None, lora, 1.0, 0.0)
    both = _sample(_patch(lora_model, _heads_file(fixtures_dir)), latent, noise)
    assert not torch.allclose(with_heads, zero, atol=1e-4)
    assert not torch.allclose(both, with_heads, atol=1e-4)
    comfy.model_management.unload_all_models()
    diffusion = tiny_model.model.diffusion_model
    assert type(diffusion.x_embedder.proj).__name__ == "Conv2d" and diffusion.out_channels == 16
    assert tiny_model.model.latent_format.latent_channels == 16
    assert torch.equal(_sample(tiny_model, latent[:, :16], noise[:, :16]), stock_before)



@pytest.mark.parametrize("lora_name", ["lora_tiny.safetensors", "lora_tiny_all_blocks.safetensors"])
def test_stage2_lora_on_either_target_set_loads_every_key_after_the_patch(tiny_model, fixtures_dir, caplog, lora_name):
    """The authors' targets and the paper's (every block linear: context stream and ff.net.0.proj too)
    both load through ComfyUI's stock loader onto a DA-patched model, with no "lora key not loaded"."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(Path(fixtures_dir) / "loras" / lora_name))
    patched = _patch(tiny_model, _heads_file(fixtures_dir))
    with caplog.at_level(logging.WARNING):
        lora_model, _ = comfy.sd.load_lora_for_models(patched, None, lora, 1.0, 0.0)
    assert not [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    layers = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    assert sum(len(v) for v in lora_model.patches.values()) == len(layers)  # one patch per LoRA layer
    context = {k for k in layers if any(n in k for n in (".add_q_proj", ".to_add_out", ".ff_context.", ".norm1_context."))}
    assert bool(context) == ("all_blocks" in lora_name)
    gen = torch.Generator().manual_seed(7)
    latent, noise = torch.randn(1, 32, 16, 16, generator=gen), torch.randn(1, 32, 16, 16, generator=gen)
    assert not torch.allclose(_sample(lora_model, latent, noise), _sample(patched, latent, noise), atol=1e-4)
    comfy.model_management.unload_all_models()

def test_patching_twice_does_not_stack_heads(tiny_model, fixtures_dir):
    gen = torch.Generator().manual_seed(5)
    latent, noise = torch.randn(1, 32, 16, 16, generator=gen), torch.randn(1, 32, 16, 16, generator=gen)
    once = _sample(_patch(tiny_model, _heads_file(fixtures_dir)), latent, noise)
    twice = _sample(_patch(_patch(tiny_model), _heads_file(fixtures_dir)), latent, noise)
    assert torch.equal(once, twice)
    import comfy.model_management

    comfy.model_management.unload_all_models()  # sampling leaves the last patched clone applied
    patched = _patch(_patch(tiny_model, _heads_file(fixtures_dir)))
    embed = patched.object_patches[harness.pack_module("nodes.sd3_model_patch").EMBED_FORWARD_KEY]
    assert embed.layer is tiny_model.model.diffusion_model.x_embedder.proj


def test_patch_uses_fused_heads_equal_to_the_unfused_sum(tiny_model, fixtures_dir, monkeypatch):
    """The node's P+P' / O+O' are one conv / one linear; sampling matches the unfused forwards
    (the stock layers' own forward beside P', O') to fp32 rounding (the fused conv sums 32
    channels in one reduction, not 16 + 16)."""
    patch = harness.pack_module("nodes.sd3_model_patch")
    da_forward = harness.pack_module("nodes.da_forward")
    fused = _patch(tiny_model, _heads_file(fixtures_dir))
    embed, out = fused.object_patches[patch.EMBED_FORWARD_KEY], fused.object_patches[patch.OUTPUT_FORWARD_KEY]
    assert isinstance(embed, da_forward.DAEmbedForward) and isinstance(out, da_forward.DAOutputForward)
    gen = torch.Generator().manual_seed(8)
    latent, noise = torch.randn(1, 32, 16, 16, generator=gen), torch.randn(1, 32, 16, 16, generator=gen)
    a = _sample(fused, latent, noise)
    assert embed.fused_cache._value is not None and out.fused_cache._value is not None  # the fused path ran
    monkeypatch.setattr(da_forward, "fusable", lambda layers: False)
    b = _sample(fused, latent, noise)
    assert not torch.equal(a[:, 16:], torch.zeros_like(a[:, 16:]))
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_nan_latent_or_diverging_model_is_an_error_naming_its_source(tiny_model, fixtures_dir):
    patched = _patch(tiny_model, _heads_file(fixtures_dir))
    latent, noise = torch.zeros(1, 32, 8, 8), torch.randn(1, 32, 8, 8)
    bad = latent.clone()
    bad[0, 20, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"input 'latent_image' must be finite.*1 NaN/Inf.*came from the node that made the latent"):
        _sample(patched, bad, noise)
    heads = _heads_file(fixtures_dir)
    with torch.no_grad():
        heads.detail_out.bias.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"input 'model'.*NaN/Inf values .* in the sampled latent.*DA-patched model produced"):
        _sample(_patch(tiny_model, heads), latent, noise)


def test_patch_refuses_non_sd3_models_and_wrong_width_heads(tiny_model):
    from types import SimpleNamespace

    patch = harness.pack_module("nodes.sd3_model_patch")
    core = harness.pack_module("davae_core.heads")
    with pytest.raises(ValueError, match=r"DA-SD3 Model Patch: input 'model' must be an SD3 / SD3.5 model.*a Linear model"):
        patch.patch_sd3_model(SimpleNamespace(model=torch.nn.Linear(1, 1)))
    wrong = core.DAHeads(core.HeadsConfig(hidden_size=1536))
    with pytest.raises(ValueError, match=r"input 'heads'.*hidden 128.*hidden 1536"):
        patch.patch_sd3_model(tiny_model, wrong, "sd35m_heads.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patched_model_samples_in_half_precision(comfy, fixtures_dir, dtype):
    import comfy.sd

    path = str(Path(fixtures_dir) / "checkpoints" / "sd3_tiny.safetensors")
    model = comfy.sd.load_diffusion_model(path, model_options={"dtype": dtype})
    patched = _patch(model, _heads_file(fixtures_dir))
    embed = patched.object_patches[harness.pack_module("nodes.sd3_model_patch").EMBED_FORWARD_KEY]
    assert embed.detail.weight.dtype == dtype
    gen = torch.Generator().manual_seed(6)
    out = _sample(patched, torch.zeros(1, 32, 8, 8), torch.randn(1, 32, 8, 8, generator=gen), steps=2)
    assert out.shape == (1, 32, 8, 8) and torch.isfinite(out).all()


def test_stock_samplers_lora_after_patch_previews_and_denoised_output(comfy):
    """KSamplerAdvanced and SamplerCustomAdvanced on a patched model, LoRA after the patch,
    live previews on (Latent2RGB): previews see base channels, denoised_output keeps all 32."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3_tiny.safetensors"}},
        "2": {"class_type": "DASD3ModelPatch", "inputs": {"model": ["1", 0], "heads": "da_heads_tiny.safetensors"}},
        "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["2", 0], "lora_name": "lora_tiny.safetensors", "strength_model": 1.0}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["3", 0], "shift": 3.0}},
        "5": {"class_type": "DATestConditioning", "inputs": {"text": "a fox"}},
        "6": {"class_type": "DAEmptyStructuredLatent", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "7": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["4", 0], "add_noise": "enable", "noise_seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "disable"}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 2}},
        "9": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["5", 0], "negative": ["5", 0], "cfg": 2.0}},
        "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "11": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "simple", "steps": 2, "denoise": 1.0}},
        "12": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["8", 0], "guider": ["9", 0], "sampler": ["10", 0], "sigmas": ["11", 0], "latent_image": ["6", 0]}},
        "13": {"class_type": "DAVAELoader", "inputs": {"davae_name": "davae_tiny.safetensors", "dtype": "default"}},
        "14": {"class_type": "DAStructuredLatentDecode", "inputs": {"samples": ["7", 0], "vae": ["13", 0], "tile_size": 0, "overlap": 0}},
        "15": {"class_type": "DAStructuredLatentDecode", "inputs": {"samples": ["12", 1], "vae": ["13", 0], "tile_size": 0, "overlap": 0}},
        "16": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["12", 0], "vae": ["13", 0], "tile_size": 64, "overlap": 16,
                                                          "temporal_size": 64, "temporal_overlap": 8}},
        "17": {"class_type": "PreviewImage", "inputs": {"images": ["14", 0]}},
        "18": {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}},
        "19": {"class_type": "PreviewImage", "inputs": {"images": ["16", 0]}},
    }
    previews: list = []
    sizes = harness.saved_image_sizes(harness.run_prompt(prompt, preview_method="latent2rgb", on_preview=previews.append))
    # two samplers x 2 steps; each preview is (format, image, max size) at the base channels' grid (8x8 cells)
    assert len(previews) == 4 and all(p[1].size == (8, 8) for p in previews)
    assert sizes == {"17": [(128, 128)], "18": [(128, 128)], "19": [(128, 128)]}


def _preview_prompt(seed: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3_tiny.safetensors"}},
        "2": {"class_type": "DASD3ModelPatch", "inputs": {"model": ["1", 0], "heads": "da_heads_tiny.safetensors"}},
        "3": {"class_type": "DATestConditioning", "inputs": {"text": "a fox"}},
        "4": {"class_type": "DAEmptyStructuredLatent", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": seed, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "DAVAELoader", "inputs": {"davae_name": "davae_tiny.safetensors", "dtype": "default"}},
        "7": {"class_type": "DAStructuredLatentDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0], "tile_size": 0, "overlap": 0}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }


def _write_sd3_taesd_decoder(path: Path) -> None:
    """A random-weight taesd3 decoder in ComfyUI's layout (decoder state dict, 16 latent channels)."""
    from comfy.taesd.taesd import Decoder
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in Decoder(latent_channels=16).state_dict().items()}
    save_file({k: torch.randn(shape, generator=gen) * 0.05 for k, shape in shapes.items()}, str(path))


@pytest.fixture
def vae_approx_dir(comfy, tmp_path):
    """A temporary models/vae_approx folder, taken out of ComfyUI's search paths afterwards."""
    import folder_paths

    folder = tmp_path / "vae_approx"
    folder.mkdir()
    folder_paths.add_model_folder_path("vae_approx", str(folder))
    yield folder
    folder_paths.folder_names_and_paths["vae_approx"][0].remove(str(folder))
    folder_paths.filename_list_cache.pop("vae_approx", None)


def _taesd_warnings(caplog) -> list:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "TAESD" in r.getMessage()]


def test_taesd_previews_of_base_channels_use_sd3_taesd(comfy, vae_approx_dir, caplog, monkeypatch):
    """Preview method 'taesd' with a taesd3 decoder: previews decode the 16 base channels through
    SD3's TAESD (8x upscale of the 8x8 base grid), no warning."""
    import latent_preview

    _write_sd3_taesd_decoder(vae_approx_dir / "taesd3_decoder.safetensors")
    decoded: list = []
    original = latent_preview.TAESDPreviewerImpl.decode_latent_to_preview
    monkeypatch.setattr(latent_preview.TAESDPreviewerImpl, "decode_latent_to_preview",
                        lambda self, x0: decoded.append(x0.shape) or original(self, x0))
    previews: list = []
    with caplog.at_level(logging.WARNING):
        harness.run_prompt(_preview_prompt(3), preview_method="taesd", on_preview=previews.append)
    assert decoded == [torch.Size([1, 16, 8, 8])] * 3
    assert len(previews) == 3 and all(p[1].size == (64, 64) for p in previews)
    assert _taesd_warnings(caplog) == []


def test_taesd_previews_without_the_decoder_fall_back_with_no_warning_per_step(comfy, vae_approx_dir, caplog):
    """Preview method 'taesd', no taesd3 file: Latent2RGB previews of the base channels (8x8) and at
    most ComfyUI's own one warning per sampler run, never one per step."""
    previews: list = []
    with caplog.at_level(logging.WARNING):
        harness.run_prompt(_preview_prompt(4), preview_method="taesd", on_preview=previews.append)
    assert len(previews) == 3 and all(p[1].size == (8, 8) for p in previews)
    assert len(_taesd_warnings(caplog)) <= 1


# ------------------------------------------------------------------ VAE and latent nodes
def test_stock_vae_nodes_take_the_da_vae(comfy, fixtures_dir):
    mapping = comfy["nodes"].NODE_CLASS_MAPPINGS
    (vae,) = _call(mapping["DAVAELoader"], davae_name="davae_tiny.safetensors", dtype="default")
    image = torch.rand(1, 64, 96, 3)
    with torch.inference_mode():
        (latent,) = mapping["VAEEncode"]().encode(vae, image)
        (tiled,) = mapping["VAEEncodeTiled"]().encode(vae, image, 64, 16)
        (decoded,) = mapping["VAEDecode"]().decode(vae, latent)
    (node_tiled,) = _call(mapping["DAStructuredLatentEncode"], pixels=image, vae=vae, tile_size=64, overlap=16)
    assert latent["samples"].shape == (1, 32, 4, 6) and tiled["samples"].shape == (1, 32, 4, 6)
    assert node_tiled["samples"].shape == (1, 32, 4, 6)
    with pytest.raises(ValueError, match=r"Structured Latent Encode: input 'tile_size/overlap'"):
        _call(mapping["DAStructuredLatentEncode"], pixels=image, vae=vae, tile_size=100, overlap=16)
    with pytest.raises(ValueError, match=r"Structured Latent Encode: input 'pixels'.*90x64.*80x64"):
        _call(mapping["DAStructuredLatentEncode"], pixels=image[:, :, :90], vae=vae, tile_size=0, overlap=0)
    assert decoded.shape == (1, 64, 96, 3)
    assert vae.latent_channels == 32 and vae.downscale_ratio == 16


def test_base_encoder_from_the_vae_input(comfy, fixtures_dir, tmp_path):
    """A DA-VAE file without its base encoder uses the stock SD3 VAE input (here the fixtures' tiny one)."""
    from safetensors.torch import save_file

    from davae_core.checkpoint import load_tensors, read_header

    loader = harness.pack_module("nodes.davae_loader")
    full = Path(fixtures_dir) / "davae" / "davae_tiny.safetensors"
    slim = tmp_path / "davae_slim.safetensors"  # what save_davae(..., include_base_encoder=False) writes
    kept = {k: v for k, v in load_tensors(full).items() if not k.startswith(("base_encoder.", "base_quant_conv."))}
    save_file(kept, str(slim), metadata=read_header(full))
    stock = harness.tiny_stock_vae(Path(fixtures_dir))
    image = torch.rand(1, 64, 64, 3)
    with torch.inference_mode():
        reference = loader.load_da_vae(str(full), dtype=torch.float32).encode(image)
        via_input = loader.load_da_vae(str(slim), stock, dtype=torch.float32).encode(image)
    assert torch.allclose(via_input, reference, atol=1e-4)
    with pytest.raises(ValueError, match=r"DA-VAE Loader: input 'vae' must be the stock SD3 VAE.*got nothing"):
        loader.load_da_vae(str(slim), None)
    with pytest.raises(ValueError, match=r"input 'vae' must be the stock SD3 / SD3.5 VAE.*got a DA-VAE"):
        loader.load_da_vae(str(slim), loader.load_da_vae(str(full)))


def test_latent_nodes_refuse_wrong_inputs_with_the_fix(comfy):
    mapping = comfy["nodes"].NODE_CLASS_MAPPINGS
    with pytest.raises(ValueError, match=r"Structured Latent Decode: input 'samples'.*DALatentFromBase"):
        _call(mapping["DAStructuredLatentDecode"], samples={"samples": torch.zeros(1, 16, 8, 8)}, vae=None, tile_size=0, overlap=0)
    with pytest.raises(ValueError, match=r"Empty Structured Latent: input 'width/height'.*992 or 1008"):
        _call(mapping["DAEmptyStructuredLatent"], width=1000, height=1024, batch_size=1)
    (out,) = _call(mapping["DAEmptyStructuredLatent"], width=1024, height=512, batch_size=2)
    assert out["samples"].shape == (2, 32, 32, 64)
    (da,) = _call(mapping["DALatentFromBase"], samples={"samples": torch.ones(1, 16, 8, 8)})
    (base,) = _call(mapping["DABaseLatent"], samples=da)
    assert da["samples"].shape == (1, 32, 8, 8) and torch.equal(base["samples"], torch.ones(1, 16, 8, 8))


def test_encode_and_decode_refuse_grey_images_and_nan_latents(comfy):
    mapping = comfy["nodes"].NODE_CLASS_MAPPINGS
    (vae,) = _call(mapping["DAVAELoader"], davae_name="davae_tiny.safetensors", dtype="default")
    for channels in (1, 2):
        with pytest.raises(ValueError, match=rf"Structured Latent Encode: input 'pixels' must be an RGB image.*{channels} channel"):
            _call(mapping["DAStructuredLatentEncode"], pixels=torch.rand(1, 64, 64, channels), vae=vae, tile_size=0, overlap=0)
    latent = torch.zeros(1, 32, 4, 4)
    latent[0, 3, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"Structured Latent Decode: input 'samples' must be a finite DA latent.*1 NaN/Inf"):
        _call(mapping["DAStructuredLatentDecode"], samples={"samples": latent}, vae=vae, tile_size=0, overlap=0)


def test_empty_structured_latent_refuses_a_size_beyond_free_memory(comfy):
    import comfy.model_management as mm

    node = comfy["nodes"].NODE_CLASS_MAPPINGS["DAEmptyStructuredLatent"]
    side, batch = 16384, 4096  # 4096 x 32 x 1024 x 1024 fp32 = 512 GiB per latent, more than any test machine frees
    assert 4 * batch * 32 * (side // 16) ** 2 * 4 > mm.get_free_memory(mm.intermediate_device())
    with pytest.raises(ValueError, match=r"Empty Structured Latent: input 'width/height/batch_size'.*GiB free.*512\.0 GiB per latent.*Lower batch_size"):
        _call(node, width=side, height=side, batch_size=batch)
    (ok,) = _call(node, width=64, height=32, batch_size=2)
    assert ok["samples"].shape == (2, 32, 2, 4)


def _call(node_cls, **inputs):
    """Run a V3 node's execute directly (what ComfyUI does after validation)."""
    with torch.inference_mode():
        out = node_cls.execute(**inputs)
    return tuple(out.result) if hasattr(out, "result") else out
