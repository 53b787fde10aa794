import pytest
import torch

from davae_core import DAHeads, HeadsConfig, attach_to_sd3_transformer
from davae_core.fixtures import random_heads, tiny_transformer
from davae_core.heads import DetailOutputLayer, heads_config_for_diffusers, heads_from_sd3_transformer, split_patch_output


def _inputs(channels: int, grid: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, channels, grid, grid, generator=gen),
        "encoder_hidden_states": torch.randn(2, 7, 64, generator=gen),
        "pooled_projections": torch.randn(2, 32, generator=gen),
        "timestep": torch.tensor([250.0, 800.0]),
    }


@torch.no_grad()
def test_zero_init_heads_reproduce_the_stock_model_exactly():
    stock = tiny_transformer(seed=0)
    patched = tiny_transformer(seed=0)
    attach_to_sd3_transformer(patched, DAHeads(heads_config_for_diffusers(patched)))
    args = _inputs(32)
    expected = stock(**{**args, "hidden_states": args["hidden_states"][:, :16]}).sample
    out = patched(**args).sample
    assert out.shape == (2, 32, 8, 8)
    assert torch.equal(out[:, :16], expected)  # bit-exact on the base channels
    assert torch.equal(out[:, 16:], torch.zeros_like(out[:, 16:]))  # and zero detail


@torch.no_grad()
def test_patching_twice_replaces_instead_of_stacking():
    model = tiny_transformer(seed=0)
    first = random_heads(model, seed=1)
    second = random_heads(model, seed=2)
    attach_to_sd3_transformer(model, first)
    attach_to_sd3_transformer(model, second)
    assert model.pos_embed.proj.detail is second.detail_embed
    assert not hasattr(model.pos_embed.proj.stock, "stock")
    fresh = attach_to_sd3_transformer(tiny_transformer(seed=0), second)
    args = _inputs(32)
    assert torch.equal(model(**args).sample, fresh(**args).sample)


def test_wrong_width_heads_are_refused_naming_both():
    model = tiny_transformer(seed=0)
    with pytest.raises(ValueError, match="hidden_size=256.*hidden_size=128"):
        attach_to_sd3_transformer(model, DAHeads(HeadsConfig(hidden_size=256)))


@torch.no_grad()
def test_detail_heads_write_only_detail_channels_in_latent_order():
    cfg = HeadsConfig(hidden_size=8, patch_size=2, base_channels=3, detail_channels=2)
    stock = torch.nn.Linear(8, 4 * 3)
    heads = DAHeads(cfg)
    torch.nn.init.normal_(heads.detail_out.weight)
    layer = DetailOutputLayer(stock, heads.detail_out, 2, 3, 2)
    h = torch.randn(5, 8)
    out = layer(h)
    base, detail = split_patch_output(out, cfg)
    assert torch.equal(base, stock(h))
    assert torch.equal(detail, heads.detail_out(h))
    # per patch position the channels run [base..., detail...]
    assert torch.equal(out.view(5, 4, 5)[:, :, :3], stock(h).view(5, 4, 3))


@torch.no_grad()
def test_heads_can_be_taken_back_out_of_a_patched_transformer():
    model = tiny_transformer(seed=0)
    heads = random_heads(model, seed=3)
    attach_to_sd3_transformer(model, heads)
    back = heads_from_sd3_transformer(model, include_base=True)
    assert back.detail_embed is heads.detail_embed and back.detail_out is heads.detail_out
    assert back.base_embed is model.pos_embed.proj.stock
