"""DA-VAE on a VA-VAE base (the paper's ImageNet line): config, blocks, alignment, dropout, files.

The base is LDM's KL autoencoder with attention at its deepest level, D = 3C detail channels
(96 for C = 32) whose moments do not divide the unshuffled trunk features, a decoder reading
the raw base latent, and per-channel base statistics.  The SD3 path must stay as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from davae_core import CheckpointError, load_davae, save_davae
from davae_core.da_blocks import DetailDownsample, drop_detail
from davae_core.davae_config import VAVAE_CONFIG, DAVAEConfig, tiny_vavae_config
from davae_core.davae_param_shapes import davae_state_shapes
from davae_core.structured_latent import LatentLayout, LatentNormalizer, alignment_loss, grouped_mean_proj


@pytest.fixture(scope="module")
def vavae_davae():
    from davae_training.imagenet.fixtures import tiny_vavae_davae

    return tiny_vavae_davae(seed=0)


def test_vavae_config_builds_the_70m_parameter_ldm_autoencoder():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**VAVAE_CONFIG)
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 69.8
    assert len(vae.encoder.down_blocks[4].attentions) == 2 and len(vae.decoder.up_blocks[0].attentions) == 3
    assert not hasattr(vae.encoder.down_blocks[3], "attentions") or not vae.encoder.down_blocks[3].attentions
    assert vae.encoder.down_blocks[4].attentions[0].heads == 1  # LDM's single-head spatial attention


@pytest.mark.parametrize("vae, detail", [(VAVAE_CONFIG, 96), (tiny_vavae_config(4), 12)])
@pytest.mark.parametrize("with_base", [True, False])
def test_param_shapes_of_a_vavae_davae_equal_a_meta_build(vae, detail, with_base):
    from davae_core.davae_model import DAVAE

    config = DAVAEConfig(base_vae=vae, detail_channels=detail, decoder_base_space="raw")
    with torch.device("meta"):
        model = DAVAE(config, with_base_encoder=with_base)
    assert davae_state_shapes(config.to_dict(), with_base) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model.layout.channels == 4 * detail // 3 and model.layout.factor == 32


def test_detail_down_block_gets_a_zero_init_learnable_shortcut_when_moments_do_not_divide():
    with torch.device("meta"):
        real = DetailDownsample(512, 192)  # VA-VAE: 2048 unshuffled features into 192 moments (D = 96)
    assert tuple(real.shortcut_proj.weight.shape) == (192, 2048, 1, 1) and real.shortcut_proj.bias is None
    assert DetailDownsample(32, 32).shortcut_proj is None  # SD3-like widths keep the parameter-free mean

    block = DetailDownsample(32, 24)
    assert torch.count_nonzero(block.shortcut_proj.weight) == 0
    h = torch.randn(2, 32, 4, 4)
    assert torch.allclose(block(h), F.pixel_unshuffle(block.conv(h), 2))  # only the conv path at the start
    block(h).square().sum().backward()
    assert block.shortcut_proj.weight.grad.abs().sum() > 0  # and the shortcut learns


def test_alignment_averages_each_three_consecutive_detail_channels():
    detail = torch.randn(2, 96, 3, 3)
    base = torch.randn(2, 32, 3, 3)
    proj = grouped_mean_proj(detail, 32)
    for i in (0, 17, 31):
        assert torch.allclose(proj[:, i], detail[:, 3 * i: 3 * i + 3].mean(1), atol=1e-6)
    assert torch.allclose(alignment_loss(detail, base), ((proj - base) ** 2).mean())


def test_detail_dropout_zeroes_whole_samples_with_probability_p():
    z_d = torch.ones(4000, 3, 2, 2)
    gen = torch.Generator().manual_seed(0)
    out = drop_detail(z_d, 0.1, gen)
    per_sample = out.flatten(1)
    dropped = (per_sample == 0).all(1)
    assert 0.08 < dropped.float().mean() < 0.12
    assert torch.allclose(per_sample[~dropped], torch.full_like(per_sample[~dropped], 1 / 0.9))  # the authors' rescale
    assert torch.equal(drop_detail(z_d[:8], 0.1, torch.Generator().manual_seed(0), rescale=False).unique(), torch.tensor([0.0, 1.0]))
    assert drop_detail(z_d, 0.0) is z_d
    with pytest.raises(ValueError, match="detail dropout"):
        drop_detail(z_d, 1.0)


def test_per_channel_base_statistics_normalise_the_base_latent():
    layout = LatentLayout(4, 12, 32)
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 1.5]
    norm = LatentNormalizer(layout, 0.0, 1.0, mean, std)
    z = torch.randn(2, 4, 3, 3)
    expected = (z - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert torch.allclose(norm.normalize_base(z), expected, atol=1e-6)
    assert torch.allclose(norm.denormalize_base(norm.normalize_base(z)), z, atol=1e-6)
    assert "base_mean" not in norm.state_dict()  # config-borne: files keep their tensors
    with pytest.raises(ValueError, match="4 finite numbers"):
        LatentNormalizer(layout, 0.0, 1.0, mean[:3], std[:3])
    with pytest.raises(ValueError, match="positive"):
        LatentNormalizer(layout, 0.0, 1.0, mean, [0.0, 1.0, 1.0, 1.0])


def test_decoder_reads_the_raw_base_and_alignment_targets_it(vavae_davae):
    model = vavae_davae
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        raw = model.encode_base_raw(image * 2 - 1)
        out = model(image, sample_posterior=False)
        assert torch.allclose(out["base"], raw, atol=1e-5)  # the alignment target is the raw base
        latent = model.encode(image)
        z, z_d = latent[:, :4], latent[:, 4:]
        by_hand = model.decoder_trunk(model.decoder_up(torch.cat([raw, z_d], 1)))  # [raw base | detail]
        assert torch.allclose(((by_hand + 1) / 2).clamp(0, 1), model.decode(latent), atol=1e-5)
        assert torch.allclose(out["reconstruction"], by_hand, atol=1e-5)
        assert torch.allclose(z, model.normalizer.normalize_base(raw), atol=1e-6)


def test_forward_drops_the_detail_before_decoding_only(vavae_davae):
    model = vavae_davae
    image = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        plain = model(image, sample_posterior=False)
        dropped = model(image, sample_posterior=False, detail_dropout=0.5, generator=torch.Generator().manual_seed(3))
        zero_detail = model.decoder_trunk(model.decoder_up(torch.cat([plain["base"], torch.zeros_like(plain["detail"])], 1)))
    assert torch.equal(dropped["detail"], plain["detail"])  # alignment and KL see the undropped latent
    same = [torch.allclose(dropped["reconstruction"][i], zero_detail[i], atol=1e-5) for i in range(8)]
    assert 0 < sum(same) < 8, same  # some samples decoded from the base alone, others not


def test_sd3_forward_is_unchanged_without_dropout(davae):
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = davae(image, sample_posterior=False)
        b = davae(image, sample_posterior=False, detail_dropout=0.0)
    assert torch.equal(a["reconstruction"], b["reconstruction"]) and torch.equal(a["base"], b["base"])
    assert davae.config.decoder_base_space == "normalized" and davae.normalizer.base_mean is None


def test_vavae_davae_file_round_trip(tmp_path, vavae_davae):
    path = save_davae(vavae_davae, tmp_path / "vavae_davae.safetensors")
    loaded = load_davae(path)
    assert loaded.config == vavae_davae.config and loaded.config.base_vae["down_block_types"][-1] == "AttnDownEncoderBlock2D"
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode(image), vavae_davae.encode(image))
        assert torch.equal(loaded.decode(vavae_davae.encode(image)), vavae_davae.decode(vavae_davae.encode(image)))


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda v: {**v, "down_block_types": ["CrossAttnDownBlock2D"] * 5}, "base_vae.down_block_types"),
        (lambda v: {**v, "latents_mean": [0.0] * 3}, "base_vae.latents_mean"),
        (lambda v: {**v, "latents_std": [1.0, 1.0, 0.0, 1.0]}, "base_vae.latents_std"),
    ],
)
def test_vavae_davae_config_fields_are_bounded(tmp_path, vavae_davae, change, field):
    from davae_core.file_validation import bounded_davae_config

    config = vavae_davae.config.to_dict()
    assert bounded_davae_config("ok.safetensors", config)["decoder_base_space"] == "raw"
    with pytest.raises(CheckpointError, match=f"config field '{field}'"):
        bounded_davae_config("bad.safetensors", {**config, "base_vae": change(config["base_vae"])})
    with pytest.raises(CheckpointError, match="decoder_base_space"):
        bounded_davae_config("bad.safetensors", {**config, "decoder_base_space": "sideways"})
