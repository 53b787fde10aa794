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


# ------------------------------------------------------------------ fused heads (inference)
def _fused_pair(heads_seed: int | None):
    import copy

    from davae_core.heads import FusedOutputLayer, FusedPatchEmbed, fuse_sd3_transformer_heads

    unfused = tiny_transformer(seed=0)
    heads = random_heads(unfused, seed=heads_seed) if heads_seed is not None else DAHeads(heads_config_for_diffusers(unfused))
    attach_to_sd3_transformer(unfused, heads)
    fused = fuse_sd3_transformer_heads(copy.deepcopy(unfused))
    assert isinstance(fused.pos_embed.proj, FusedPatchEmbed) and isinstance(fused.proj_out, FusedOutputLayer)
    return unfused, fused


@torch.no_grad()
@pytest.mark.parametrize("seed", [1, 2])
def test_fused_output_layer_is_bit_identical_and_fused_embed_within_fp32_rounding(seed):
    unfused, fused = _fused_pair(seed)
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 16, 128, generator=gen)
    # O+O': the same dot products with the rows interleaved -> bit-identical
    assert torch.equal(fused.proj_out(h), unfused.proj_out(h))
    # P+P': one reduction over 32 channels instead of two sums added -> only the summation order differs.
    # Bound: a few ulps of the largest partial sum (fp32 eps 1.2e-7 times the magnitude, times a few).
    x = torch.randn(2, 32, 8, 8, generator=gen)
    a, b = unfused.pos_embed.proj(x), fused.pos_embed.proj(x)
    assert not torch.equal(a, torch.zeros_like(a))
    assert (a - b).abs().max() <= 8 * torch.finfo(torch.float32).eps * a.abs().max()
    args = _inputs(32, seed=seed)
    out_u, out_f = unfused(**args).sample, fused(**args).sample
    assert (out_u - out_f).abs().max() <= 1e-5 * out_u.abs().max()


@torch.no_grad()
def test_fused_zero_init_heads_reproduce_the_stock_model_exactly():
    stock = tiny_transformer(seed=0)
    _, fused = _fused_pair(None)
    args = _inputs(32)
    expected = stock(**{**args, "hidden_states": args["hidden_states"][:, :16]}).sample
    out = fused(**args).sample
    assert torch.equal(out[:, :16], expected)
    assert torch.equal(out[:, 16:], torch.zeros_like(out[:, 16:]))


def test_fused_heads_refit_after_an_in_place_weight_change_and_fall_back_when_training():
    unfused, fused = _fused_pair(1)
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        first = fused.pos_embed.proj(x)
        fused.pos_embed.proj.detail.weight.add_(1.0)  # as ComfyUI patches weights in place
        second = fused.pos_embed.proj(x)
        unfused.pos_embed.proj.detail.weight.add_(1.0)
        assert (second - unfused.pos_embed.proj(x)).abs().max() <= 1e-5 * second.abs().max()
        assert not torch.allclose(first, second)
    # gradients on: the unfused path runs, so P' trains
    fused.pos_embed.proj(x).sum().backward()
    assert fused.pos_embed.proj.detail.weight.grad is not None


def test_fused_heads_trace_whole_under_torch_compile():
    """While torch.compile traces, the fused-weight cache steps aside (no data_ptr/_version
    keys, no Python-side state in the graph): fullgraph tracing succeeds, results equal eager."""
    _, fused = _fused_pair(1)
    embed, out = fused.pos_embed.proj, fused.proj_out
    gen = torch.Generator().manual_seed(4)
    x, h = torch.randn(1, 32, 8, 8, generator=gen), torch.randn(1, 16, 128, generator=gen)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = (torch.compile(embed, backend="eager", fullgraph=True), torch.compile(out, backend="eager", fullgraph=True))
        assert torch.allclose(compiled[0](x), embed(x), atol=1e-6) and torch.allclose(compiled[1](h), out(h), atol=1e-6)
        embed.detail.weight.add_(1.0)  # the graph reads the weights as inputs: nothing stale
        assert torch.allclose(compiled[0](x), embed(x), atol=1e-5)
    torch._dynamo.reset()
