"""Parity: a tiny stage-2 model, exported, predicts the same in ComfyUI's MMDiT as in diffusers.

    COMFYUI_PATH=/path/to/ComfyUI-0.8.0 python -m pytest tests/test_comfy_parity.py

The tiny SD3.5-like transformer of the fixtures is trained for a few steps (LoRA, P, P', O, O'
all move), exported with :mod:`davae_training.stage2.export`, then loaded into ComfyUI the way
a user's graph does it: the stock weights through ``comfy.sd.load_diffusion_model_state_dict``,
the LoRA through ComfyUI's own ``comfy.sd.load_lora_for_models``, and the heads file through
the node pack's own patch (``patch_sd3_model``, the pack loaded as ComfyUI loads it).  Both
models then predict on the same 32-channel latent.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _comfy_root() -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    import comfyui_harness  # skips, or fails under DAVAE_REQUIRE_COMFYUI=1 (CI)

    return comfyui_harness.comfyui_path()


@pytest.fixture(scope="module")
def comfy(fixtures_dir):
    _comfy_root()
    import comfyui_harness

    comfyui_harness.boot(Path(fixtures_dir))  # ComfyUI on CPU with the node pack loaded
    import comfy.lora
    import comfy.model_management
    import comfy.sd

    return comfy


@pytest.fixture(scope="module", params=["authors", "all_blocks"])
def trained(tmp_path_factory, request):
    """A tiny transformer after 3 AdamW steps of the stage-2 objective, and its exported files; the LoRA on
    the authors' targets, or on every block linear as the paper's config has it (context stream included)."""
    import comfyui_harness  # noqa: F401  (importing it makes davae_training importable from the repo)
    from davae_core.fixtures import TINY_TRANSFORMER_CONFIG, tiny_transformer
    from davae_core.mmdit_keys import SD3_LORA_TARGETS, SD3_LORA_TARGETS_ALL_BLOCKS
    from davae_training.stage2.model import AdapterModelConfig, prepare_adapter_model, trained_parameters
    from davae_training.stage2.objective import FlowObjectiveConfig, flow_matching_loss
    from davae_training.stage2.export import export_for_comfy

    stock = tiny_transformer(seed=0)
    base_state = {k: v.clone() for k, v in stock.state_dict().items()}
    targets = {"authors": SD3_LORA_TARGETS, "all_blocks": SD3_LORA_TARGETS_ALL_BLOCKS}[request.param]
    model = prepare_adapter_model(tiny_transformer(seed=0), AdapterModelConfig(lora_rank=4, lora_alpha=8.0, lora_targets=list(targets)))
    params = trained_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 32, 8, 8, generator=gen)
    ctx = torch.randn(2, 6, TINY_TRANSFORMER_CONFIG["joint_attention_dim"], generator=gen)
    pooled = torch.randn(2, TINY_TRANSFORMER_CONFIG["pooled_projection_dim"], generator=gen)
    objective = FlowObjectiveConfig(detail_warmup_steps=0)
    for step in range(3):
        loss = flow_matching_loss(
            lambda x, t: model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample,
            x0, step, objective, gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    head = model.proj_out.detail.weight
    assert head.abs().max() > 0, "training did not move O'"
    out = tmp_path_factory.mktemp("parity")
    pos_base = {k: v for k, v in base_state.items() if k.startswith(("pos_embed.proj.", "proj_out."))}
    files = export_for_comfy(model, out, "tiny", pos_base)  # alpha 8 != rank 4: .alpha keys are written
    return {"model": model, "base_state": base_state, "files": files, "ctx": ctx, "pooled": pooled, "targets": request.param}


def _comfy_model_with_exports(comfy, trained, caplog):
    from safetensors.torch import load_file

    import comfyui_harness

    sd = {k: v.clone() for k, v in trained["base_state"].items()}  # ComfyUI's conversion edits what it is given
    patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    assert patcher is not None, "ComfyUI did not recognise the tiny SD3 transformer"
    lora = load_file(str(trained["files"]["lora"]))
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    assert not not_loaded, f"ComfyUI dropped LoRA keys: {not_loaded[:3]}"

    heads = comfyui_harness.pack_module("nodes.da_files").load_heads_file(str(trained["files"]["heads"]))
    assert heads.base_embed is not None and heads.base_out is not None, "trained P and O must be in the heads file"
    return comfyui_harness.pack_module("nodes.sd3_model_patch").patch_sd3_model(patched, heads, "trained heads"), lora


def test_every_exported_lora_key_is_applied_by_comfyui(comfy, trained, caplog):
    patched, lora = _comfy_model_with_exports(comfy, trained, caplog)
    key_map = comfy.lora.model_lora_keys_unet(patched.model, {})
    layers = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    unmapped = sorted(layer for layer in layers if layer not in key_map)
    assert not unmapped, f"ComfyUI has no target for {unmapped[:3]}"
    applied = sum(len(v) for v in patched.patches.values())
    assert applied == len(layers), f"{len(layers)} LoRA layers exported, ComfyUI queued {applied} patches"
    context = [k for k in layers if any(n in k for n in (".add_q_proj", ".to_add_out", ".ff_context.", ".norm1_context."))]
    assert bool(context) == (trained["targets"] == "all_blocks")
    assert any(k.endswith(".alpha") for k in lora), "alpha != rank must be written as .alpha keys"


def test_comfyui_prediction_matches_diffusers(comfy, trained, caplog):
    patched, _ = _comfy_model_with_exports(comfy, trained, caplog)
    comfy.model_management.load_models_gpu([patched])
    mmdit = patched.model.diffusion_model
    assert mmdit.out_channels == 32

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 8, 8, generator=gen)
    t = torch.tensor([700.0, 150.0])
    with torch.inference_mode():
        theirs = mmdit(x, t, context=trained["ctx"], y=trained["pooled"]).float()
        ours = trained["model"](hidden_states=x, timestep=t, encoder_hidden_states=trained["ctx"],
                                pooled_projections=trained["pooled"]).sample.float()
        assert ours[:, 16:].abs().max() > 1e-3, "the trained detail head must predict something"
    print(f"max |ComfyUI - diffusers| = {(theirs - ours).abs().max().item():.2e} (outputs up to {ours.abs().max().item():.2f})")
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
