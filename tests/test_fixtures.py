import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from davae_core import load_davae, load_heads, read_metadata
from davae_core.fixtures import TINY_TRANSFORMER_CONFIG
from davae_core.mmdit_keys import SD3_LORA_TARGETS, SD3_LORA_TARGETS_ALL_BLOCKS, diffusers_to_mmdit


def test_fixture_files_load_in_their_real_formats(fixtures_dir):
    vae = AutoencoderKL.from_pretrained(fixtures_dir / "sd3_vae")
    assert vae.config.latent_channels == 16 and len(vae.config.block_out_channels) == 4
    transformer = SD3Transformer2DModel.from_pretrained(fixtures_dir / "sd3_transformer")
    assert transformer.config.num_layers == 2 and list(transformer.config.dual_attention_layers) == [0]

    davae = load_davae(fixtures_dir / "davae" / "davae_tiny.safetensors")
    assert davae.layout.channels == 32 and davae.base_encoder is not None
    heads = load_heads(fixtures_dir / "davae" / "da_heads_tiny.safetensors")
    assert heads.config.hidden_size == 128 and heads.detail_embed.weight.abs().sum() > 0
    assert read_metadata(fixtures_dir / "davae" / "da_heads_tiny.safetensors")["info"]["fixture"] is True

    manifest = json.loads((fixtures_dir / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"sd3_vae", "sd3_transformer", "loras/lora_tiny.safetensors"}


def test_single_file_checkpoint_has_the_mmdit_layout(fixtures_dir):
    sd = load_file(str(fixtures_dir / "checkpoints" / "sd3_tiny.safetensors"))
    assert all(k.startswith("model.diffusion_model.") for k in sd)
    hidden = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    assert sd["model.diffusion_model.x_embedder.proj.weight"].shape == (hidden, 16, 2, 2)
    assert sd["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape == (3 * hidden, hidden)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in sd  # SD3.5 dual attention
    assert "model.diffusion_model.joint_blocks.1.x_block.attn2.qkv.weight" not in sd
    # the fused qkv is q, k, v stacked
    transformer = SD3Transformer2DModel.from_pretrained(fixtures_dir / "sd3_transformer")
    q = transformer.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(sd["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"][:hidden], q)


def test_mmdit_conversion_refuses_unknown_keys():
    import pytest

    with pytest.raises(KeyError, match="no MMDiT name"):
        diffusers_to_mmdit({"transformer_blocks.0.mystery.weight": torch.zeros(1)})


@pytest.mark.parametrize("name,targets", [("lora_tiny", SD3_LORA_TARGETS), ("lora_tiny_all_blocks", SD3_LORA_TARGETS_ALL_BLOCKS)])
def test_lora_fixture_targets_every_layer_with_the_comfy_prefix(fixtures_dir, name, targets):
    with safe_open(str(fixtures_dir / "loras" / f"{name}.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    for target in targets:
        assert any(f".{target}.lora_A.weight" in k for k in keys), target
    assert any(".attn2.to_q.lora_B.weight" in k for k in keys)  # dual-attention layers are hit too
    context = any(".add_q_proj." in k or ".ff_context." in k or ".norm1_context." in k for k in keys)
    assert context == (name == "lora_tiny_all_blocks")


def test_fixtures_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "davae_core.fixtures", str(tmp_path / "fx"), "--seed", "3"],
        capture_output=True, text=True, check=True,
    )
    assert "davae_tiny.safetensors" in out.stdout
    assert (tmp_path / "fx" / "davae" / "davae_tiny.safetensors").is_file()
