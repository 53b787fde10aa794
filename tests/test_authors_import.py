"""The importer against a reference written from the authors' published description of their SD3
"diff" layout (detail first, dc_down/dc_up blocks, SD3 base normalised), on tiny random weights."""

import pytest
import torch
import torch.nn.functional as F

from davae_core import CheckpointError, load_davae, save_davae, tiny_vae_config
from davae_core.authors_import import import_heads, import_tokenizer, main as import_main
from davae_core.fixtures import random_heads, tiny_transformer, tiny_vae


def _trunk_features(encoder, x):
    h = encoder.conv_in(x)
    for block in encoder.down_blocks:
        h = block(h)
    return encoder.conv_act(encoder.conv_norm_out(encoder.mid_block(h)))


def _trunk_decode(decoder, h):
    h = decoder.mid_block(h)
    for block in decoder.up_blocks:
        h = block(h)
    return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))


class AuthorsReference:
    """Their forward, re-stated from the layout facts (not their code)."""

    def __init__(self, seed=0):
        self.vae = tiny_vae(seed)  # their `vae.*` (trained trunks)
        self.original = tiny_vae(seed + 1)  # their frozen `original_vae_model.vae.*`
        gen = torch.Generator().manual_seed(seed)
        self.down_w = torch.randn(8, 32, 3, 3, generator=gen) * 0.05
        self.down_b = torch.randn(8, generator=gen) * 0.05
        self.up_w = torch.randn(128, 32, 3, 3, generator=gen) * 0.05
        self.up_b = torch.randn(128, generator=gen) * 0.05

    def state_dict(self):
        sd = {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
        sd.update({f"original_vae_model.vae.{k}": v for k, v in self.original.state_dict().items()})
        sd.update({"dc_down.conv.weight": self.down_w, "dc_down.conv.bias": self.down_b})
        sd.update({"dc_up.conv.weight": self.up_w, "dc_up.conv.bias": self.up_b})
        return sd

    @torch.no_grad()
    def encode(self, image01):
        x = image01 * 2 - 1
        h = _trunk_features(self.vae.encoder, x)
        main = F.pixel_unshuffle(F.conv2d(h, self.down_w, self.down_b, padding=1), 2)
        short = F.pixel_unshuffle(h, 2).unflatten(1, (32, -1)).mean(2)
        detail = (main + short)[:, :16]  # [mean | logvar]: the mean half
        low = F.interpolate(x, scale_factor=0.5, mode="bicubic", align_corners=False).clamp(-1, 1)
        base = self.original.encode(low).latent_dist.mean
        base = (base - 0.0609) * 1.5305
        return torch.cat([detail, base], 1)  # their order: detail first

    @torch.no_grad()
    def decode(self, latent_detail_first):
        main = F.conv2d(latent_detail_first, self.up_w, self.up_b, padding=1)
        short = latent_detail_first.repeat_interleave(4, dim=1)
        h = F.pixel_shuffle(main + short, 2)
        return ((_trunk_decode(self.vae.decoder, h) + 1) / 2).clamp(0, 1)


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory):
    ref = AuthorsReference()
    path = tmp_path_factory.mktemp("authors") / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    return ref, path


@torch.no_grad()
def test_imported_tokenizer_matches_the_authors_forward(authors_file):
    ref, path = authors_file
    ours = import_tokenizer(path, vae_config=tiny_vae_config(attention=True))
    image = torch.rand(1, 3, 64, 64)
    theirs = ref.encode(image)
    latent = ours.encode(image)
    assert torch.allclose(latent[:, :16], theirs[:, 16:], atol=1e-5)  # base
    assert torch.allclose(latent[:, 16:], theirs[:, :16], atol=1e-5)  # detail
    assert torch.allclose(ours.decode(latent), ref.decode(theirs), atol=1e-5)


def test_imported_tokenizer_survives_our_format(authors_file, tmp_path):
    ref, path = authors_file
    ours = import_tokenizer(path, vae_config=tiny_vae_config(attention=True), stats={"mean": [0.1] * 16, "std": [2.0] * 16})
    out = save_davae(ours, tmp_path / "converted.safetensors")
    back = load_davae(out)
    assert back.config.decoder_input_order == "detail_base"
    assert torch.allclose(back.normalizer.detail_std, torch.full((16,), 2.0))
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back.encode(image), ours.encode(image), atol=1e-6)


def test_full_mode_checkpoints_are_refused(tmp_path):
    sd = {"dc_down.conv.weight": torch.zeros(8, 32, 3, 3), "dc_up.conv.weight": torch.zeros(128, 16, 3, 3)}
    path = tmp_path / "full.bin"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="'full' mode"):
        import_tokenizer(path, vae_config=tiny_vae_config())


def test_non_authors_file_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not an authors' SD3 DA-VAE checkpoint"):
        import_tokenizer(path)


def test_heads_import_from_model_and_ema_dicts(tmp_path):
    heads = random_heads(tiny_transformer(0), seed=5)
    model_sd = {
        "tokenizer_patch_embed.proj.extra_conv.weight": heads.detail_embed.weight,
        "tokenizer_patch_embed.proj.extra_conv.bias": heads.detail_embed.bias,
        "tokenizer_patch_embed.proj.base_conv.weight": torch.randn(128, 16, 2, 2),
        "tokenizer_patch_embed.proj.base_conv.bias": torch.randn(128),
        "tokenizer_patch_embed.pos_embed": torch.zeros(1, 4096, 128),
        "project_out.extra_linear.weight": heads.detail_out.weight,
        "project_out.extra_linear.bias": heads.detail_out.bias,
        "project_out.base_linear.weight": torch.randn(64, 128),
        "project_out.base_linear.bias": torch.randn(64),
    }
    ema_sd = {f"model.{k}": v * 2 for k, v in model_sd.items()}
    path = tmp_path / "step_100.pt"
    torch.save({"global_step": 100, "model_state_dict": model_sd, "ema_state_dict": ema_sd}, path)
    got = import_heads(path)
    assert got.config.hidden_size == 128 and got.config.detail_channels == 16
    assert torch.equal(got.detail_embed.weight, heads.detail_embed.weight)
    assert torch.equal(got.base_out.weight, model_sd["project_out.base_linear.weight"])
    ema = import_heads(path, use_ema=True)
    assert torch.equal(ema.detail_out.weight, heads.detail_out.weight * 2)


def test_cli_converts_heads(tmp_path, capsys):
    heads = random_heads(tiny_transformer(0), seed=6)
    sd = {
        "tokenizer_patch_embed.proj.extra_conv.weight": heads.detail_embed.weight,
        "tokenizer_patch_embed.proj.extra_conv.bias": heads.detail_embed.bias,
        "project_out.extra_linear.weight": heads.detail_out.weight,
        "project_out.extra_linear.bias": heads.detail_out.bias,
    }
    src = tmp_path / "latest.pt"
    torch.save({"model_state_dict": sd}, src)
    import_main([str(src), str(tmp_path / "heads.safetensors"), "--kind", "heads"])
    from davae_core import load_heads

    assert torch.equal(load_heads(tmp_path / "heads.safetensors").detail_out.bias, heads.detail_out.bias)


class _NotATensor:
    """Any Python object in a pickle: weights-only loading must refuse it."""


def test_heads_pickle_with_objects_is_refused_without_suggesting_unsafe_loading(tmp_path):
    path = tmp_path / "step_1.pt"
    torch.save({"model_state_dict": {"x": _NotATensor()}}, path)
    with pytest.raises(CheckpointError) as e:
        import_heads(path)
    msg = str(e.value)
    assert str(path) in msg and "refused by weights-only loading" in msg and ".safetensors" in msg
    assert "weights_only=False" not in msg and "weights_only" not in msg.replace("weights-only", "")
