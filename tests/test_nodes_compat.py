"""The DA patch beside what ComfyUI users run with SD3.5 (issue 21; the matrix in docs/NODES.md).

Each test is a cell of the compatibility matrix, run against the ComfyUI at ``COMFYUI_PATH``
(CI: 0.8.0 and 0.3.64) with the fixtures' tiny MMDiT.  Third-party packs are the real ones,
installed as custom nodes beside ours (:mod:`comfy_compat_helpers`).  Where a row composes
(a loader, a cache, a compiler placed after the patch), two things are checked:

* zero-init heads give the stock model's samples on the base channels, the stock model
  being run the same way (same loader, same cache node, same compile);
* the fixtures' random heads give finite samples of the DA latent's shape, different from
  the zero-init ones (the heads act).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_compat_helpers as compat  # noqa: E402
import comfyui_harness as harness  # noqa: E402

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH") and os.environ.get("DAVAE_REQUIRE_COMFYUI") != "1":
    pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout (0.8.0 or 0.3.64) to run these", allow_module_level=True)

CPU = torch.device("cpu")
HIDDEN = 128  # the tiny MMDiT's width


@pytest.fixture(scope="module")
def comfy(fixtures_dir):
    harness.comfyui_path()
    return harness.boot(Path(fixtures_dir))


@pytest.fixture(scope="module")
def mapping(comfy):
    return comfy["nodes"].NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def model_dir(comfy, tmp_path_factory):
    """A models folder for the files these tests write: diffusion models (GGUF, fp8) and LoRAs."""
    import folder_paths

    root = tmp_path_factory.mktemp("compat_models")
    for kind in ("diffusion_models", "loras"):
        (root / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(root / kind))
    compat.write_embed_and_output_lora(root / "loras" / "embed_output_lora.safetensors", HIDDEN)
    return root


def _refresh_file_lists():
    import folder_paths

    folder_paths.filename_list_cache.clear()


@pytest.fixture
def unload(comfy):
    """Nothing left loaded (sampling leaves the last clone's patches applied), before and after."""
    import comfy.model_management as mm

    mm.unload_all_models()
    yield
    mm.unload_all_models()


@pytest.fixture(scope="module")
def tiny_model(comfy, fixtures_dir):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(Path(fixtures_dir) / "checkpoints" / "sd3_tiny.safetensors"))


@pytest.fixture(scope="module")
def heads(comfy, fixtures_dir):
    return harness.pack_module("nodes.da_files").load_heads_file(str(Path(fixtures_dir) / "davae" / "da_heads_tiny.safetensors"))


def _patch(model, heads=None):
    return harness.pack_module("nodes.sd3_model_patch").patch_sd3_model(model, heads)


def _node(mapping, node_id, **inputs):
    """A node's output as the executor gets it: V3 ``execute`` or V1 ``FUNCTION``, first output."""
    cls = mapping[node_id]
    with torch.inference_mode():
        out = cls.execute(**inputs) if hasattr(cls, "define_schema") else getattr(cls(), cls.FUNCTION)(**inputs)
    return (out.result if hasattr(out, "result") else out)[0]


def _lora(mapping, model, name, strength):
    return _node(mapping, "LoraLoaderModelOnly", model=model, lora_name=name, strength_model=strength)


def _conds(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple([[torch.randn(1, 8, 64, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen)}]] for _ in range(2))


def _sample(model, latent, noise, steps=3, denoise=1.0, conds=None):
    import comfy.sample

    pos, neg = conds or _conds()
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 2.0, "euler", "simple", pos, neg, latent, denoise=denoise, seed=0)


def _inputs(batch=1, side=8, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 16, side, side, generator=gen) for _ in range(3))


def assert_composes(stock, zero, with_heads, batch=1, side=8, steps=3, exact=True, conds=None):
    """Zero-init heads = the stock model on the base channels; random heads finite and on the DA grid."""
    base, noise_base, noise_detail = _inputs(batch, side)
    noise = torch.cat([noise_base, noise_detail], 1)
    ref = _sample(stock, base, noise_base, steps, conds=conds)
    da = _sample(zero, torch.cat([base, torch.zeros_like(base)], 1), noise, steps, conds=conds)
    assert da.shape == (batch, 32, side, side)
    if exact:
        assert torch.equal(da[:, :16], ref), f"base channels differ from the stock model by {(da[:, :16] - ref).abs().max()}"
    else:
        assert (da[:, :16] - ref).abs().max() <= 1e-5 * ref.abs().max()
    out = _sample(with_heads, torch.zeros(batch, 32, side, side), noise, steps, conds=conds)
    assert out.shape == (batch, 32, side, side) and torch.isfinite(out).all()
    assert not torch.allclose(out, _sample(zero, torch.zeros(batch, 32, side, side), noise, steps, conds=conds), atol=1e-4)
    return ref, da, out


# ------------------------------------------------------------------ quantised base weights
def test_unet_loader_fp8_e4m3fn(mapping, heads, model_dir, unload):
    """UNETLoader with weight_dtype fp8_e4m3fn: P and O are fp8 and reach compute through
    ComfyUI's cast; a LoRA on P and O (after the patch) applies as on the stock model."""
    fp8 = _node(mapping, "UNETLoader", unet_name="sd3_tiny.safetensors", weight_dtype="fp8_e4m3fn")
    assert fp8.model.diffusion_model.final_layer.linear.weight.dtype == torch.float8_e4m3fn
    assert_composes(fp8, _patch(fp8), _patch(fp8, heads))
    lora = lambda m: _lora(mapping, m, "embed_output_lora.safetensors", 1.0)  # noqa: E731
    ref, _, _ = assert_composes(lora(fp8), lora(_patch(fp8)), lora(_patch(fp8, heads)))
    base, noise, _ = _inputs()
    assert not torch.allclose(ref, _sample(fp8, base, noise), atol=1e-3)  # the LoRA on P and O acts


def _quantised_layouts():
    import comfy.ops

    # 0.8.0 reads both (scaled fp8 is converted to its quantised tensors); 0.3.64 only its scaled fp8
    return ["scaled_fp8", "comfy_quant"] if hasattr(comfy.ops, "mixed_precision_ops") else ["scaled_fp8"]


def test_scaled_fp8_and_quantised_checkpoints(mapping, heads, model_dir, fixtures_dir, unload):
    """Per-layer scaled fp8 weights: 0.3.64 scales in the Linear's forward (``scale_weight``),
    0.8.0 dequantises its QuantizedTensor in the cast path; the DA forwards go through both,
    also with a LoRA on P and O."""
    sd = compat.mmdit_state_dict(Path(fixtures_dir))
    for layout in _quantised_layouts():
        compat.write_fp8_checkpoint(model_dir / "diffusion_models" / f"sd3_tiny_{layout}.safetensors", sd, layout)
        _refresh_file_lists()
        model = _node(mapping, "UNETLoader", unet_name=f"sd3_tiny_{layout}.safetensors", weight_dtype="default")
        out = model.model.diffusion_model.final_layer.linear
        assert getattr(out, "scale_weight", None) is not None or type(out.weight).__name__ == "QuantizedTensor", layout
        ref, _, _ = assert_composes(model, _patch(model), _patch(model, heads))
        plain = _sample(_plain_model(fixtures_dir), *_inputs()[:2])
        assert (ref - plain).abs().max() < 0.1 * plain.abs().max(), f"{layout}: far from the unquantised model"
        lora = lambda m: _lora(mapping, m, "embed_output_lora.safetensors", 1.0)  # noqa: E731
        with_lora, _, _ = assert_composes(lora(model), lora(_patch(model)), lora(_patch(model, heads)))
        assert not torch.allclose(with_lora, ref, atol=1e-3), f"{layout}: the LoRA on P and O did not act"


def _plain_model(fixtures_dir):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(Path(fixtures_dir) / "checkpoints" / "sd3_tiny.safetensors"))


@pytest.fixture(scope="module")
def gguf_pack(comfy):
    return compat.install_pack("ComfyUI-GGUF", needs=("gguf",))


@pytest.mark.parametrize("qtype,quantise_heads", [("F16", False), ("Q8_0", False), ("Q8_0", True)])
def test_gguf_unet_loader(mapping, gguf_pack, heads, model_dir, fixtures_dir, qtype, quantise_heads, unload):
    """city96's UnetLoaderGGUF: F16 and Q8_0 files as its tools write them (P and O kept F16),
    and a Q8_0 file with P's bias and O quantised too: the DA forwards dequantise through the
    pack's cast path, so DA samples stay close to the unquantised model's."""
    name = f"sd3_tiny_{qtype}{'_heads' if quantise_heads else ''}.gguf"
    kinds = compat.write_gguf(model_dir / "diffusion_models" / name, compat.mmdit_state_dict(Path(fixtures_dir)), qtype, quantise_heads)
    assert kinds["final_layer.linear.weight"] == (qtype if quantise_heads else "F16")
    _refresh_file_lists()
    model = _node(mapping, "UnetLoaderGGUF", unet_name=name)
    assert type(model.model.diffusion_model.final_layer.linear.weight).__name__ == "GGMLTensor"
    _, _, gguf_heads = assert_composes(model, _patch(model), _patch(model, heads))
    plain = _patch(_plain_model(fixtures_dir), heads)
    _, noise_base, noise_detail = _inputs()
    reference = _sample(plain, torch.zeros(1, 32, 8, 8), torch.cat([noise_base, noise_detail], 1))
    assert (gguf_heads - reference).abs().max() < 0.05 * reference.abs().max()


def test_lora_on_gguf_model(mapping, gguf_pack, heads, model_dir, fixtures_dir, unload):
    """Stock LoRA loaders on a GGUF model (Q8_0, P and O quantised): the block LoRA before the
    patch and the P/O LoRA after it both apply, on the DA model as on the stock one."""
    name = "sd3_tiny_lora_Q8_0.gguf"
    compat.write_gguf(model_dir / "diffusion_models" / name, compat.mmdit_state_dict(Path(fixtures_dir)), "Q8_0", True)
    _refresh_file_lists()
    model = _node(mapping, "UnetLoaderGGUF", unet_name=name)
    blocks = _lora(mapping, model, "lora_tiny.safetensors", 1.0)
    embed_output = lambda m: _lora(mapping, m, "embed_output_lora.safetensors", 1.0)  # noqa: E731
    ref, _, _ = assert_composes(embed_output(blocks), embed_output(_patch(blocks)), embed_output(_patch(blocks, heads)))
    base, noise, _ = _inputs()
    assert not torch.allclose(ref, _sample(blocks, base, noise), atol=1e-3)


# ------------------------------------------------------------------ low-VRAM partial loading
def _forward(patcher, x, lowvram: bool):
    """One denoiser call with ``patcher`` loaded fully, or partially (every layer offloaded, LoRA as weight functions)."""
    pos, _ = _conds()
    with torch.inference_mode():
        patcher.patch_model(CPU, lowvram_model_memory=1 if lowvram else 0)
        try:
            sigma = torch.full((x.shape[0],), 0.7)
            return patcher.model.apply_model(x, sigma, c_crossattn=pos[0][0], y=pos[0][1]["pooled_output"])
        finally:
            patcher.unpatch_model(CPU)


def test_partial_loading_with_pinned_memory_swaps_stock_and_da_clones(tiny_model, heads, monkeypatch, unload):
    """Issue 21.1: a stock and a DA clone of one checkpoint (same patches_uuid), swapped under
    partial loading with pinned memory, as ComfyUI on NVIDIA does it: pinning on (ComfyUI pins
    nothing with --cpu), the first clone partially unloaded (pinning its offloaded weights), then
    detached the way load_models_gpu detaches a clone of the model it loads next, the second
    partially loaded and unpatched.  Both orders; then both still sample what they did before."""
    import comfy.model_management as mm
    import comfy.model_patcher

    monkeypatch.setattr(mm, "pin_memory", lambda t: True, raising=False)  # 0.3.64 has no pinning
    monkeypatch.setattr(mm, "unpin_memory", lambda t: True, raising=False)
    pins = hasattr(comfy.model_patcher.ModelPatcher, "pin_weight_to_device")  # 0.8.0; 0.3.64 does not pin
    base, noise_base, noise_detail = _inputs()
    da_latent, da_noise = torch.cat([base, torch.zeros_like(base)], 1), torch.cat([noise_base, noise_detail], 1)
    stock_ref = _sample(tiny_model, base, noise_base)
    da_ref = _sample(_patch(tiny_model, heads), da_latent, da_noise)
    for first_is_stock in (True, False):
        mm.unload_all_models()
        stock, da = tiny_model.clone(), _patch(tiny_model, heads)
        assert stock.patches_uuid == da.patches_uuid
        first, second = (stock, da) if first_is_stock else (da, stock)
        first.patch_model(CPU, lowvram_model_memory=1)
        first.partially_unload(CPU, memory_to_free=1 << 40)
        assert bool(getattr(first, "pinned", ())) == pins
        first.detach(unpatch_all=False)
        second.partially_load(CPU, extra_memory=1 << 40)
        second.unpatch_model(CPU)
        assert not getattr(second, "pinned", ())
    mm.unload_all_models()
    assert torch.equal(_sample(tiny_model, base, noise_base), stock_ref)
    assert torch.equal(_sample(_patch(tiny_model, heads), da_latent, da_noise), da_ref)


def test_partial_loading_applies_lora_on_p_and_o_as_weight_functions(mapping, tiny_model, heads, model_dir, unload):
    """Partially loaded, ComfyUI applies a LoRA per call (weight functions on the offloaded
    layers): on P and O too, so the DA model gives what it gives fully loaded."""
    da = _lora(mapping, _patch(tiny_model, heads), "embed_output_lora.safetensors", 1.0)
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(5))
    full = _forward(da, x, lowvram=False)
    da.patch_model(CPU, lowvram_model_memory=1)
    try:
        proj = da.model.diffusion_model.x_embedder.proj
        assert proj.weight_function and da.model.diffusion_model.final_layer.linear.weight_function
    finally:
        da.unpatch_model(CPU)
    partial = _forward(da, x, lowvram=True)
    assert (partial - full).abs().max() <= 1e-5 * full.abs().max()
    no_lora = _forward(_patch(tiny_model, heads), x, lowvram=False)
    assert not torch.allclose(full, no_lora, atol=1e-4)


# ------------------------------------------------------------------ the fused-weight cache
def test_fused_weights_are_cached_under_inference_mode_and_follow_comfy_weight_patches(mapping, tiny_model, heads, model_dir, monkeypatch, unload):
    """Issue 21.4: the fused P+P' / O+O' weights are built once per set of weights ComfyUI loads
    (under its inference mode), and rebuilt when it patches them: a LoRA on P and O after the
    patch (the clones share the DA forwards), another strength, and back to none."""
    da_forward = harness.pack_module("nodes.da_forward")
    builds = []
    fuse = da_forward.fuse_embed_weights
    monkeypatch.setattr(da_forward, "fuse_embed_weights", lambda *t: builds.append(1) or fuse(*t))
    da = _patch(tiny_model, heads)
    _, noise_base, noise_detail = _inputs()
    latent, noise = torch.zeros(1, 32, 8, 8), torch.cat([noise_base, noise_detail], 1)

    def unfused(model):
        with monkeypatch.context() as m:
            m.setattr(da_forward, "fusable", lambda layers: False)
            return _sample(model, latent, noise)

    plain = _sample(da, latent, noise)  # 3 steps, cond and uncond batched: 3 calls of P
    assert len(builds) == 1
    results = [plain]
    for strength in (1.0, 0.5):
        lora = _lora(mapping, da, "embed_output_lora.safetensors", strength)
        before = len(builds)
        out = _sample(lora, latent, noise)
        assert len(builds) == before + 1  # rebuilt for the patched weights, then reused
        assert (out - unfused(lora)).abs().max() <= 1e-5 * out.abs().max()
        assert not any(torch.allclose(out, r, atol=1e-4) for r in results)
        results.append(out)
    assert torch.equal(_sample(da, latent, noise), plain)  # unpatched again: the first weights


# ------------------------------------------------------------------ step caches
def _cache_node(mapping, node_id):
    return lambda m: _node(mapping, node_id, model=m, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False)


def _skipped(caplog, name: str) -> list[int]:
    """Steps each sampler run skipped, from the caches' own log line ("<name> - skipped N/M steps")."""
    return [int(r.getMessage().split("skipped ")[1].split("/")[0]) for r in caplog.records if r.getMessage().startswith(f"{name} - skipped")]


def test_lazycache_after_the_patch(mapping, tiny_model, heads, caplog, unload):
    """Issue 21.3: ComfyUI's LazyCache after the patch caches all 32 channels (0.8.0 sizes it from
    the latent format when its node runs: the shared base model's 16 channels without the fix),
    skips steps, and the same ones for zero-init heads as for the stock model."""
    lazy = _cache_node(mapping, "LazyCache")
    with caplog.at_level(logging.INFO):
        ref, _, _ = assert_composes(lazy(tiny_model), lazy(_patch(tiny_model)), lazy(_patch(tiny_model, heads)), steps=8)
    skipped = _skipped(caplog, "LazyCache")
    assert len(skipped) == 4 and len(set(skipped[:2])) == 1 and min(skipped) > 0, skipped
    base, noise, _ = _inputs()
    assert not torch.equal(ref, _sample(tiny_model, base, noise, steps=8))  # the cache changed the result


def test_easycache_skips_nothing_on_sd3(mapping, tiny_model, heads, caplog, unload):
    """ComfyUI's EasyCache caches inside the DIFFUSION_MODEL wrapper, which ComfyUI's SD3 MMDiT
    (both versions) never calls: on SD3 it skips no step, for the stock model as for the DA one,
    and the DA model samples as without it (matrix: not supported, by ComfyUI, for SD3)."""
    easy = _cache_node(mapping, "EasyCache")
    da = easy(_patch(tiny_model))
    with caplog.at_level(logging.INFO):
        ref, _, _ = assert_composes(easy(tiny_model), da, easy(_patch(tiny_model, heads)), steps=8)
    assert _skipped(caplog, "EasyCache") == [0] * 4
    base, noise_base, _ = _inputs()
    assert torch.equal(ref, _sample(tiny_model, base, noise_base, steps=8))
    # sized for the DA latent all the same (0.8.0; 0.3.64's holder has no such field)
    assert getattr(da.model_options["transformer_options"]["easycache"], "output_channels", 32) == 32


@pytest.fixture(scope="module")
def wavespeed_pack(comfy):
    return compat.install_pack("Comfy-WaveSpeed")


def test_wavespeed_first_block_cache_after_the_patch(mapping, wavespeed_pack, tiny_model, heads, unload):
    """WaveSpeed's ApplyFBCacheOnModel (the real pack): it caches the blocks, not P or O."""
    fbcache = lambda m: _node(mapping, "ApplyFBCacheOnModel", model=m, object_to_patch="diffusion_model",  # noqa: E731
                              residual_diff_threshold=0.5, start=0.0, end=1.0, max_consecutive_cache_hits=-1)
    ref, _, _ = assert_composes(fbcache(tiny_model), fbcache(_patch(tiny_model)), fbcache(_patch(tiny_model, heads)), steps=6)
    base, noise, _ = _inputs()
    assert not torch.equal(ref, _sample(tiny_model, base, noise, steps=6))  # cached blocks were reused


# ------------------------------------------------------------------ torch.compile
def test_torch_compile_model_after_the_patch(mapping, tiny_model, heads, unload):
    """Issue 21.4: TorchCompileModel (inductor) on the patched model: the DA forwards trace
    without graph breaks of their own (the fused-weight cache steps aside while compiling)."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    compile_model = lambda m: _node(mapping, "TorchCompileModel", model=m, backend="inductor")  # noqa: E731
    stock = compile_model(tiny_model)
    base, noise, _ = _inputs()
    _sample(stock, base, noise, steps=2)
    stock_breaks = set(counters["graph_break"])  # ComfyUI's own (on a CPU: its memory queries)
    counters.clear()
    assert_composes(stock, compile_model(_patch(tiny_model)), compile_model(_patch(tiny_model, heads)), steps=2, exact=False)
    assert set(counters["graph_break"]) <= stock_breaks, set(counters["graph_break"]) - stock_breaks
    torch._dynamo.reset()


# ------------------------------------------------------------------ ControlNet
def test_sd3_controlnet_reads_the_base_channels_with_a_half_size_hint(mapping, comfy, tiny_model, heads, fixtures_dir, unload):
    """Issue 21.7: an SD3 ControlNet applied with the SD3 VAE (Apply ControlNet's vae input)
    reads the DA latent's base channels, whose hint ComfyUI encodes at 8x the grid: the half-size
    image.  Zero-init heads reproduce the stock model controlled the same way at half size; the
    DA-VAE on the ControlNet's vae input is refused, saying what to connect."""
    import comfy.controlnet

    control = comfy.controlnet.load_controlnet(str(Path(fixtures_dir) / "controlnet" / "sd3_controlnet_tiny.safetensors"))
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2))  # the DA image's size (8x8 DA cells)

    sd3_vae = harness.tiny_stock_vae(Path(fixtures_dir))
    pos, neg = _conds()
    cn = mapping["ControlNetApplyAdvanced"]()
    with torch.inference_mode():
        conds = cn.apply_controlnet(pos, neg, control, hint, 1.0, 0.0, 1.0, vae=sd3_vae)
    ref, _, _ = assert_composes(tiny_model, _patch(tiny_model), _patch(tiny_model, heads), conds=conds)
    base, noise, _ = _inputs()
    assert not torch.allclose(ref, _sample(tiny_model, base, noise), atol=1e-4)  # the ControlNet acts
    (da_vae,) = _davae(mapping)
    with torch.inference_mode():
        wrong = cn.apply_controlnet(pos, neg, control, hint, 1.0, 0.0, 1.0, vae=da_vae)
    with pytest.raises(ValueError, match=r"ControlNet.*input 'vae' must be the stock SD3 / SD3.5 VAE.*32 latent channels.*half-size"):
        _sample(_patch(tiny_model, heads), torch.zeros(1, 32, 8, 8), torch.randn(1, 32, 8, 8), conds=wrong)


def _davae(mapping):
    cls = mapping["DAVAELoader"]
    with torch.inference_mode():
        out = cls.execute(davae_name="davae_tiny.safetensors", dtype="default")
    return tuple(out.result)[:1]


# ------------------------------------------------------------------ batches, LoRAs, second passes
def test_batch_of_four(tiny_model, heads, unload):
    assert_composes(tiny_model, _patch(tiny_model), _patch(tiny_model, heads), batch=4)


def test_two_stacked_loras(mapping, tiny_model, heads, model_dir, unload):
    """The block LoRA before the patch and the P/O LoRA after it, at other strengths."""
    first = _lora(mapping, tiny_model, "lora_tiny.safetensors", 0.8)
    second = lambda m: _lora(mapping, m, "embed_output_lora.safetensors", 0.6)  # noqa: E731
    ref, _, _ = assert_composes(second(first), second(_patch(first)), second(_patch(first, heads)))
    base, noise, _ = _inputs()
    for fewer in (first, second(tiny_model)):
        assert not torch.allclose(ref, _sample(fewer, base, noise), atol=1e-4)


def test_second_sampler_pass_at_another_size(mapping, tiny_model, heads, unload):
    """Sample at 8x8 cells, LatentUpscaleBy 1.5 (12x12), sample again at denoise 0.5 with the same model."""

    def two_passes(model, latent, noise):
        first = _sample(model, latent, noise, steps=2)
        up = _node(mapping, "LatentUpscaleBy", samples={"samples": first}, upscale_method="bilinear", scale_by=1.5)["samples"]
        gen = torch.Generator().manual_seed(11)
        second_noise = torch.randn(up.shape[0], 16, *up.shape[2:], generator=gen)
        if up.shape[1] == 32:
            second_noise = torch.cat([second_noise, torch.randn(second_noise.shape, generator=gen)], 1)
        return _sample(model, up, second_noise, steps=3, denoise=0.5)

    base, noise_base, noise_detail = _inputs()
    ref = two_passes(tiny_model, base, noise_base)
    zero = two_passes(_patch(tiny_model), torch.cat([base, torch.zeros_like(base)], 1), torch.cat([noise_base, noise_detail], 1))
    assert ref.shape == (1, 16, 12, 12) and torch.equal(zero[:, :16], ref)
    out = two_passes(_patch(tiny_model, heads), torch.zeros(1, 32, 8, 8), torch.cat([noise_base, noise_detail], 1))
    assert out.shape == (1, 32, 12, 12) and torch.isfinite(out).all()
