"""LightningDiT: the model's pieces, its checkpoint loader, DA heads at patch 1 and the authors' merged layout.

Checkpoints are tiny LightningDiTs in the public ``{"model", "ema"}`` layout (RoPE tables
included), written by :mod:`davae_training.imagenet.fixtures`.
"""

from __future__ import annotations

import math

import pytest
import torch

from davae_core import CheckpointError, load_heads, save_heads
from davae_core.heads import DAHeads, HeadsConfig
from davae_training.imagenet.da_heads import (
    attach_da_heads,
    heads_config_for_lightningdit,
    heads_from_lightningdit,
    import_authors_dit,
    merge_state,
    split_merged_state,
)
from davae_training.imagenet.fixtures import lightningdit_checkpoint, tiny_dit, with_rope_tables
from davae_training.imagenet.lightningdit import LightningDiT, LightningDiTConfig, RotaryEmbedding2D, lightningdit_config
from davae_training.imagenet.lightningdit_checkpoint import infer_config, load_lightningdit, load_lightningdit_state


def _inputs(channels: int = 4, batch: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, 4, 4, generator=gen), torch.rand(batch, generator=gen), torch.tensor([7, 999, 1000][:batch])


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "lightningdit.pt"
    torch.save(lightningdit_checkpoint(tiny_dit(seed=0), tiny_dit(seed=1)), path)
    return path


# ------------------------------------------------------------------ the model
def test_xl1_is_the_675m_parameter_model_with_a_null_class_row():
    with torch.device("meta"):
        model = LightningDiT(lightningdit_config("XL/1"))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 675
    assert model.y_embedder.embedding_table.weight.shape == (1001, 1152) and model.config.null_class == 1000
    assert model.blocks[0].mlp.w12.weight.shape == (6144, 1152) and len(model.blocks) == 28
    assert model.pos_embed.shape == (1, 256, 1152) and not model.pos_embed.requires_grad


def test_a_fresh_model_predicts_zero_and_checks_its_input():
    model = LightningDiT(lightningdit_config("B/1", input_size=4, depth=1, in_channels=4))
    x, t, y = _inputs()
    assert torch.count_nonzero(model(x, t, y)) == 0  # adaLN-Zero and a zero output layer
    with pytest.raises(ValueError, match=r"shape \(B, 4, 4, 4\)"):
        model(torch.randn(1, 4, 8, 8), t[:1], y[:1])


def test_rope_makes_attention_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding2D(head_dim=8, grid=4)
    q, k = torch.randn(8), torch.randn(8)

    def score(a: tuple[int, int], b: tuple[int, int]) -> float:
        tokens = torch.zeros(1, 1, 16, 8)
        tokens[0, 0, a[0] * 4 + a[1]], keys = q, torch.zeros(1, 1, 16, 8)
        keys[0, 0, b[0] * 4 + b[1]] = k
        return float(rope(tokens)[0, 0, a[0] * 4 + a[1]] @ rope(keys)[0, 0, b[0] * 4 + b[1]])

    assert score((0, 0), (1, 2)) == pytest.approx(score((2, 1), (3, 3)), abs=1e-5)
    assert score((0, 0), (1, 2)) != pytest.approx(score((0, 0), (2, 1)), abs=1e-3)  # rows and columns differ
    assert score((1, 1), (1, 1)) == pytest.approx(float(q @ k), abs=1e-5)


def test_position_table_is_the_2d_sin_cos_of_column_then_row():
    model = tiny_dit()
    dim, i, j = 64, 2, 3  # token at row 2, column 3 of the 4x4 grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    expected = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
    assert torch.allclose(model.pos_embed[0, i * 4 + j].double(), expected, atol=1e-6)


def test_timestep_embedding_is_dits_cos_then_sin():
    model = tiny_dit()
    t = torch.tensor([0.37])
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    expected = model.t_embedder.mlp(torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])[None])
    assert torch.allclose(model.t_embedder(t), expected, atol=1e-6)


def test_qk_norm_adds_rms_norms_on_queries_and_keys():
    model = tiny_dit(use_qknorm=True)
    assert model.blocks[0].attn.q_norm.weight.shape == (16,) and model.config.use_qknorm
    assert not hasattr(tiny_dit().blocks[0].attn.q_norm, "weight")


# ------------------------------------------------------------------ the loader
def test_loader_prefers_ema_and_infers_the_architecture(dit_file):
    ema, model = tiny_dit(seed=1), tiny_dit(seed=0)
    x, t, y = _inputs()
    loaded = load_lightningdit(dit_file)
    assert loaded.config == ema.config
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), ema(x, t, y))
        assert torch.equal(load_lightningdit(dit_file, prefer="model")(x, t, y), model(x, t, y))


def test_loader_checks_shapes_and_tables_before_use(tmp_path, dit_file):
    state = with_rope_tables(tiny_dit())
    with pytest.raises(CheckpointError, match=r"wrong shapes"):
        load_lightningdit_state(state, "given.pt", LightningDiTConfig(**{**infer_config(state).__dict__, "ffn_hidden_size": 64}))
    shifted = {**state, "pos_embed": state["pos_embed"].roll(1, dims=1)}
    with pytest.raises(CheckpointError, match=r"its 'pos_embed' differs"):
        load_lightningdit_state(shifted, "shifted.pt")
    no_rope = {k: v for k, v in state.items() if not k.startswith("feat_rope.")}
    with pytest.raises(CheckpointError, match="no RoPE tables"):
        load_lightningdit_state(no_rope, "norope.pt")
    huge = {**state, "x_embedder.proj.weight": torch.zeros(1, 1, 1, 1).expand(100_000, 4, 1, 1)}
    with pytest.raises(CheckpointError, match="hidden_size = 100000"):
        infer_config(huge, "huge.pt")
    torch.save({"model": "not weights"}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="odd.pt"):
        load_lightningdit(tmp_path / "odd.pt")


# ------------------------------------------------------------------ DA heads at patch 1
def test_zero_heads_keep_the_pretrained_prediction_and_then_learn(tmp_path):
    dit = tiny_dit()
    x, t, y = _inputs(channels=16)
    with torch.no_grad():
        stock = dit(x[:, :4], t, y)
    heads = DAHeads(heads_config_for_lightningdit(dit, 12))
    attach_da_heads(dit, heads)
    attach_da_heads(dit, heads)  # again: replaces, does not stack
    out = dit(x, t, y)
    assert out.shape == (3, 16, 4, 4)
    assert torch.allclose(out[:, :4], stock, atol=1e-6) and torch.count_nonzero(out[:, 4:]) == 0
    out[:, 4:].sum().backward()
    assert heads.detail_out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        heads.detail_embed.weight.normal_()
    path = save_heads(heads_from_lightningdit(dit), tmp_path / "heads.safetensors")
    assert torch.equal(load_heads(path).detail_embed.weight, heads.detail_embed.weight)
    with pytest.raises(ValueError, match="DA heads were made for"):
        attach_da_heads(tiny_dit(), DAHeads(HeadsConfig(hidden_size=32, patch_size=1, base_channels=4, detail_channels=12)))


def test_authors_merged_dit_imports_to_the_same_predictions(tmp_path):
    merged = tiny_dit(16, seed=2)
    torch.save(lightningdit_checkpoint(merged, merged), tmp_path / "merged.pt")
    dit, heads = import_authors_dit(tmp_path / "merged.pt", base_channels=4)
    x, t, y = _inputs(channels=16)
    with torch.no_grad():
        assert torch.allclose(dit(x, t, y), merged(x, t, y), atol=1e-5)
    assert heads.config.detail_channels == 12 and heads.config.patch_size == 1


def test_merge_and_split_are_inverse_at_patch_two():
    merged = tiny_dit(16, seed=3, patch_size=2)
    state = {k: v for k, v in merged.state_dict().items()}
    base, config, heads_state = split_merged_state(state, 4)
    heads = DAHeads(config)
    heads.load_state_dict(heads_state)
    again = merge_state(base, heads)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    split = tiny_dit(4, patch_size=2)
    split.load_state_dict(base)
    attach_da_heads(split, heads)
    x, t, y = _inputs(channels=16)
    with torch.no_grad():
        assert torch.allclose(split(x, t, y), merged(x, t, y), atol=1e-5)
    with pytest.raises(CheckpointError, match="reads base 16"):
        split_merged_state(state, 16)


def test_qk_norm_can_be_switched_on_over_a_checkpoint_trained_without_it(dit_file):
    plain = load_lightningdit(dit_file)
    normed = load_lightningdit(dit_file, enable_qknorm=True)
    assert normed.config.use_qknorm and not plain.config.use_qknorm
    assert torch.equal(normed.blocks[1].attn.k_norm.weight, torch.ones(16))
    assert torch.equal(normed.blocks[1].attn.qkv.weight, plain.blocks[1].attn.qkv.weight)
    h = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():  # the authors' reading: normalised q and k, so not an exact warm start
        a, b = normed.blocks[0].attn(h, normed.rope), plain.blocks[0].attn(h, plain.rope)
    assert (a - b).abs().max() > 1e-3 * b.abs().max()


def test_table5_head_inits():
    from davae_training.imagenet.da_heads import initialize_detail_heads

    x, t, y = _inputs()
    stock = tiny_dit()
    with torch.no_grad():
        expected = stock(x, t, y)
    source = torch.arange(4, 16) % 4

    repeat = tiny_dit()
    heads = initialize_detail_heads(DAHeads(heads_config_for_lightningdit(repeat, 12)), repeat, "repeat_average")
    attach_da_heads(repeat, heads)
    with torch.no_grad():
        out = repeat(torch.cat([x, x[:, source]], 1), t, y)
    assert torch.allclose(out[:, :4], expected, atol=1e-5)  # four copies of a quarter of P
    assert torch.allclose(out[:, 4:], expected[:, source], atol=1e-5)  # O' repeats O

    rand = tiny_dit()
    heads = initialize_detail_heads(DAHeads(heads_config_for_lightningdit(rand, 12)), rand, "random", torch.Generator().manual_seed(0))
    assert heads.base_embed is None and heads.detail_out.weight.abs().max() <= 64 ** -0.5
    attach_da_heads(rand, heads)
    with torch.no_grad():
        assert torch.count_nonzero(rand(torch.cat([x, x[:, source]], 1), t, y)[:, 4:]) > 0

    zero = initialize_detail_heads(heads, rand, "zero")
    assert torch.count_nonzero(zero.detail_embed.weight) == 0 and zero.base_embed is None
    with pytest.raises(ValueError, match="head init must be one of"):
        initialize_detail_heads(heads, rand, "ones")
