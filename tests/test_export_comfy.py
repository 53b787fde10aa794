"""Export of a stage-2 model: the LoRA covers every targeted layer, the heads file round-trips.

ComfyUI's side of the same files is checked in test_comfy_parity.py (needs COMFYUI_PATH).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from davae_core.checkpoint import load_heads
from davae_core.fixtures import TINY_TRANSFORMER_CONFIG, tiny_transformer
from davae_core.heads import attach_to_sd3_transformer
from davae_core.mmdit_keys import SD3_LORA_TARGETS, SD3_LORA_TARGETS_ALL_BLOCKS
from davae_training.stage2.model import (
    AdapterModelConfig,
    lora_target_names,
    prepare_adapter_model,
)
from davae_training.stage2.export import export_heads, export_lora

STOCK_HEADS = ("pos_embed.proj.", "proj_out.")


def _inputs(seed=0, channels=32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, channels, 8, 8, generator=g),
        timestep=torch.tensor([600.0, 90.0]),
        encoder_hidden_states=torch.randn(2, 5, TINY_TRANSFORMER_CONFIG["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(2, TINY_TRANSFORMER_CONFIG["pooled_projection_dim"], generator=g),
    )


def _moved_model(rank=4, alpha=4.0, move_base_heads=False, move_detail_heads=True, seed=0, targets=SD3_LORA_TARGETS):
    """An adapter model whose LoRA B (and detail heads) are nonzero, as after training."""
    model = prepare_adapter_model(tiny_transformer(0), AdapterModelConfig(lora_rank=rank, lora_alpha=alpha,
                                                                          lora_targets=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or (move_detail_heads and ".detail." in name) or (move_base_heads and ".stock." in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _stock_head_state():
    return {k: v.clone() for k, v in tiny_transformer(0).state_dict().items() if k.startswith(STOCK_HEADS)}


TARGET_SETS = pytest.mark.parametrize("targets", [SD3_LORA_TARGETS, SD3_LORA_TARGETS_ALL_BLOCKS], ids=["authors", "all_blocks"])


@TARGET_SETS
def test_exported_lora_keys_map_onto_every_targeted_layer(tmp_path, targets):
    layers = lora_target_names(tiny_transformer(0), targets)
    assert any(".attn2." in t for t in layers), "SD3.5M's attn2 layers must be LoRA targets"
    context = [t for t in layers if any(n in t for n in ("add_q_proj", "to_add_out", "ff_context", "norm1_context", "ff.net.0"))]
    assert bool(context) == (targets == SD3_LORA_TARGETS_ALL_BLOCKS)  # the authors' list leaves the context stream out
    model = _moved_model(targets=targets)
    path = export_lora(model, tmp_path / "lora.safetensors")
    keys = set(load_file(str(path)))
    expected = {f"transformer.{t}.lora_{ab}.weight" for t in layers for ab in "AB"}
    assert keys == expected, f"missing {sorted(expected - keys)[:3]}, unexpected {sorted(keys - expected)[:3]}"
    with safe_open(str(path), framework="pt") as f:
        assert '"r": 4' in f.metadata()["lora_adapter_metadata"]


@TARGET_SETS
def test_exported_lora_reloads_into_a_stock_transformer(tmp_path, targets):
    model = _moved_model(move_detail_heads=False, targets=targets)  # P' = 0: the base channels see the LoRA only
    path = export_lora(model, tmp_path / "lora.safetensors")
    fresh = tiny_transformer(0)
    fresh.load_lora_adapter(str(path), prefix="transformer", adapter_name="default")
    with torch.no_grad():
        ours = model(**_inputs()).sample[:, :16]
        base_inputs = _inputs()
        base_inputs["hidden_states"] = base_inputs["hidden_states"][:, :16]
        reloaded = fresh(**base_inputs).sample
        stock = tiny_transformer(0)(**base_inputs).sample
    assert (ours - stock).abs().max() > 1e-4, "the LoRA must change the prediction for this check to mean anything"
    torch.testing.assert_close(reloaded, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank,alpha,mode,expect_alpha", [
    (4, 4.0, "auto", False), (4, 8.0, "auto", True), (4, 4.0, "always", True),
])
def test_alpha_keys_are_written_when_comfyui_needs_them(tmp_path, rank, alpha, mode, expect_alpha):
    path = export_lora(_moved_model(rank, alpha), tmp_path / "lora.safetensors", alpha_keys=mode)
    state = load_file(str(path))
    alphas = {k: v for k, v in state.items() if k.endswith(".alpha")}
    layers = {k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k}
    if expect_alpha:  # ComfyUI scales by alpha / rank with these keys
        assert {k.removesuffix(".alpha") for k in alphas} == layers
        assert all(v.item() == alpha for v in alphas.values())
    else:  # without them ComfyUI scales by 1.0, which is alpha / rank here
        assert not alphas


@pytest.mark.parametrize("move_base_heads", [False, True])
def test_heads_file_holds_detail_heads_and_changed_stock_heads(tmp_path, move_base_heads):
    model = _moved_model(move_base_heads=move_base_heads)
    path = export_heads(model, tmp_path / "heads.safetensors", _stock_head_state())
    heads = load_heads(path)
    assert (heads.base_embed is not None) == move_base_heads
    assert (heads.base_out is not None) == move_base_heads
    assert torch.equal(heads.detail_embed.weight, model.pos_embed.proj.detail.weight)
    assert torch.equal(heads.detail_out.weight, model.proj_out.detail.weight)

    # LoRA off: the heads file alone turns a stock transformer into the trained one
    rebuilt = attach_to_sd3_transformer(tiny_transformer(0), heads).eval()
    with torch.no_grad():
        model.disable_adapters()
        ours = model(**_inputs()).sample
        model.enable_adapters()
        theirs = rebuilt(**_inputs()).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert ours[:, 16:].abs().max() > 0
