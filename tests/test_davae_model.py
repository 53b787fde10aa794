import pytest
import torch
import torch.nn.functional as F

from davae_core import DAVAE, DAVAEConfig, tiny_vae_config


def test_trunks_start_as_the_base_vae(base_vae, davae):
    enc, dec = base_vae.encoder.state_dict(), base_vae.decoder.state_dict()
    trunk = davae.detail_trunk.state_dict()
    assert set(trunk) == {k for k in enc if not k.startswith("conv_out.")}
    for k, v in trunk.items():
        assert torch.equal(v, enc[k]), k
    dec_trunk = davae.decoder_trunk.state_dict()
    assert set(dec_trunk) == {k for k in dec if not k.startswith("conv_in.")}
    for k, v in dec_trunk.items():
        assert torch.equal(v, dec[k]), k
    for k, v in davae.base_encoder.state_dict().items():
        assert torch.equal(v, enc[k]), k


def test_base_channels_are_the_stock_vae_latent_of_the_half_resolution_image(base_vae, davae):
    image = torch.rand(1, 3, 64, 64)
    latent = davae.encode(image)
    low = F.interpolate(image * 2 - 1, scale_factor=0.5, mode="bicubic", align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        stock = base_vae.encode(low).latent_dist.mean
    expected = (stock - base_vae.config.shift_factor) * base_vae.config.scaling_factor
    assert torch.allclose(latent[:, :16], expected, atol=1e-5)


@pytest.mark.parametrize("size,grid", [(1024, 64), (2048, 128)])
def test_encode_decode_shapes_at_1024_and_2048(flat_davae, size, grid):
    with torch.no_grad():
        latent = flat_davae.encode(torch.rand(1, 3, size, size))
        assert latent.shape == (1, 32, grid, grid)
        image = flat_davae.decode(latent)
    assert image.shape == (1, 3, size, size)
    assert image.min() >= 0 and image.max() <= 1


def test_encode_refuses_sizes_off_the_f16_grid(davae):
    with pytest.raises(ValueError, match="multiple of 16"):
        davae.encode(torch.rand(1, 3, 72, 64))


def test_encode_accepts_an_external_base_latent_when_built_without_base_encoder(davae):
    headless = DAVAE(davae.config, with_base_encoder=False)
    headless.load_state_dict({k: v for k, v in davae.state_dict().items() if not k.startswith("base_")})
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match="base_latent="):
        headless.encode(image)
    raw = davae.encode_raw(image)
    again = headless.encode_raw(image, base_latent=raw[:, :16])
    assert torch.allclose(again, raw, atol=1e-6)


def test_raw_and_normalised_paths_agree(davae):
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        raw = davae.encode_raw(image)
        via_raw = (davae.decode_raw(raw) + 1) / 2
        via_norm = davae.decode(davae.normalizer.normalize(raw))
    assert torch.allclose(via_raw, via_norm, atol=1e-5)


def test_training_pass_trains_only_detail_encoder_and_decoder(davae):
    model = DAVAE(davae.config)
    model.load_state_dict(davae.state_dict())
    model.train()
    assert not model.base_encoder.training  # frozen part stays in eval
    out = model(torch.rand(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert out["reconstruction"].shape == (2, 3, 64, 64)
    assert out["detail"].shape == out["base"].shape == (2, 16, 4, 4)
    loss = out["reconstruction"].abs().mean() + out["posterior"].kl().mean()
    loss.backward()
    assert all(p.grad is None for p in model.base_encoder.parameters())
    for module in model.trainable_modules():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_detail_downsample_shortcut_is_a_grouped_mean():
    from davae_core.da_blocks import DetailDownsample

    block = DetailDownsample(feature_channels=32, moment_channels=32)
    torch.nn.init.zeros_(block.conv.weight)
    torch.nn.init.zeros_(block.conv.bias)
    h = torch.randn(1, 32, 4, 4)
    unshuffled = F.pixel_unshuffle(h, 2)  # 128 channels -> 32 groups of 4
    expected = unshuffled.view(1, 32, 4, 2, 2).mean(2)
    assert torch.allclose(block(h), expected, atol=1e-6)


def test_joint_upsample_shortcut_repeats_each_latent_channel():
    from davae_core.da_blocks import JointUpsample

    block = JointUpsample(latent_channels=32, feature_channels=32)  # 4*32/32 = 4 repeats
    torch.nn.init.zeros_(block.conv.weight)
    torch.nn.init.zeros_(block.conv.bias)
    z = torch.randn(1, 32, 3, 3)
    out = block(z)
    assert out.shape == (1, 32, 6, 6)
    # pixel_shuffle of 4 copies of channel c gives channel c broadcast over each 2x2 block
    assert torch.allclose(out, z.repeat_interleave(2, -1).repeat_interleave(2, -2), atol=1e-6)


def test_config_refuses_unknown_decoder_order():
    with pytest.raises(ValueError, match="decoder_input_order"):
        DAVAEConfig(base_vae=tiny_vae_config(), decoder_input_order="sideways")


def test_layout_follows_base_vae_depth():
    cfg = DAVAEConfig(base_vae=tiny_vae_config(), detail_channels=32)
    assert cfg.layout.factor == 16 and cfg.layout.channels == 48
