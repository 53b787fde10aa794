"""Importers of the ImageNet line's public and authors' files, on tiny files in their real layouts.

VA-VAE's ``.pt`` (LDM keys, extra training-only keys) -> a diffusers folder with its latent
statistics; the DA authors' ImageNet tokenizer -> our DA-VAE file.  Each round-trips: what
comes out computes what went in.
"""

from __future__ import annotations

import json

import pytest
import torch

from davae_core import CheckpointError, load_davae
from davae_core.ldm_vae_keys import diffusers_to_ldm, ldm_to_diffusers
from davae_core.vavae_import import import_vavae, main as vavae_main, read_latent_stats


@pytest.fixture(scope="module")
def imagenet_fixtures(tmp_path_factory):
    from davae_training.imagenet.fixtures import write_fixtures

    out = tmp_path_factory.mktemp("imagenet_fixtures")
    write_fixtures(out, seed=0)
    return out


@pytest.fixture(scope="module")
def source_vavae():
    from davae_training.imagenet.fixtures import randomize, tiny_vavae

    return randomize(tiny_vavae(0), 0)


# ------------------------------------------------------------------ the key map
def test_ldm_key_map_agrees_with_diffusers_converter_and_adds_the_level_attention(source_vavae):
    """diffusers' own converter is the independent reference for every key it maps; VA-VAE's
    level attention it leaves unmapped, and this map covers it both ways."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = source_vavae.state_dict()
    ldm = diffusers_to_ldm(state, 5)
    assert "encoder.down.4.attn.1.q.weight" in ldm and ldm["encoder.down.4.attn.1.q.weight"].shape == (32, 32, 1, 1)
    assert "decoder.up.4.attn.2.proj_out.weight" in ldm and "decoder.up.0.block.2.conv2.weight" in ldm
    back, unmapped = ldm_to_diffusers(ldm, 5)
    assert not unmapped and back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    reference = convert_ldm_vae_checkpoint(ldm, dict(source_vavae.config))
    shared = [k for k in back if k in reference]
    assert len(shared) == len(state) - 50  # all but 2 encoder + 3 decoder attention layers x 10 tensors
    assert all(torch.equal(reference[k], back[k]) for k in shared)
    assert not any(".attentions." in k for k in reference if "down_blocks.4" in k or "up_blocks.0" in k)


# ------------------------------------------------------------------ VA-VAE
def test_vavae_import_discards_training_only_keys_and_round_trips(imagenet_fixtures, source_vavae):
    vae = import_vavae(imagenet_fixtures / "vavae.pt", imagenet_fixtures / "latents_stats.pt",
                       vae_config=dict(source_vavae.config))
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in source_vavae.state_dict().items())
    stats = torch.load(imagenet_fixtures / "latents_stats.pt", weights_only=True)
    assert vae.config.latents_mean == pytest.approx(stats["mean"].flatten().tolist())
    assert vae.config.latents_std == pytest.approx(stats["std"].flatten().tolist())
    assert vae.config.scaling_factor == 1.0
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(x).latent_dist.mean, source_vavae.encode(x).latent_dist.mean)


def test_vavae_import_reads_a_flat_state_dict_and_refuses_unknown_keys(tmp_path, imagenet_fixtures, source_vavae):
    flat = torch.load(imagenet_fixtures / "vavae.pt", weights_only=True)["state_dict"]
    torch.save(flat, tmp_path / "flat.pt")
    assert import_vavae(tmp_path / "flat.pt", vae_config=dict(source_vavae.config)).config.latents_mean is None
    torch.save({**flat, "ema_model.encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd\.pt.*ema_model\.encoder\.conv_in\.weight"):
        import_vavae(tmp_path / "odd.pt", vae_config=dict(source_vavae.config))


def test_vavae_import_checks_shapes_against_the_architecture_before_building(imagenet_fixtures):
    with pytest.raises(CheckpointError, match=r"vavae\.pt: tensors do not match.*wrong shapes"):
        import_vavae(imagenet_fixtures / "vavae.pt")  # the tiny file is not VA-VAE f16d32's width


def test_latent_stats_must_have_one_value_per_channel(tmp_path, imagenet_fixtures):
    mean, std = read_latent_stats(imagenet_fixtures / "latents_stats.pt", 4)
    assert len(mean) == len(std) == 4 and min(std) > 0
    with pytest.raises(CheckpointError, match="expected 32 values"):
        read_latent_stats(imagenet_fixtures / "latents_stats.pt", 32)
    torch.save({"mean": torch.zeros(4), "std": torch.tensor([1.0, 0.0, 1.0, 1.0])}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="non-positive"):
        read_latent_stats(tmp_path / "bad.pt", 4)


def test_vavae_import_command_writes_a_diffusers_folder_a_davae_builds_on(tmp_path, imagenet_fixtures, source_vavae):
    from diffusers import AutoencoderKL

    from davae_core.davae_model import DAVAE

    (tmp_path / "config.json").write_text(json.dumps(dict(source_vavae.config)))
    vavae_main([str(imagenet_fixtures / "vavae.pt"), str(tmp_path / "vavae"), "--stats", str(imagenet_fixtures / "latents_stats.pt"),
                "--vae-config", str(tmp_path / "config.json")])
    vae = AutoencoderKL.from_pretrained(tmp_path / "vavae")
    davae = DAVAE.from_base_vae(vae, detail_channels=12, base_name="vavae", decoder_base_space="raw").eval()
    mean, std = read_latent_stats(imagenet_fixtures / "latents_stats.pt", 4)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        raw = davae.encode_base_raw(x * 2 - 1)
        expected = (raw - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        assert torch.allclose(davae.encode(x)[:, :4], expected, atol=1e-5)  # the DiT's view of the base


# ------------------------------------------------------------------ the authors' ImageNet tokenizer
def test_authors_imagenet_tokenizer_imports_to_the_same_model(tmp_path, imagenet_fixtures):
    from davae_core.authors_imagenet_import import import_imagenet_tokenizer, main
    from davae_training.imagenet.fixtures import TINY_BASE_CHANNELS, tiny_vavae_davae

    source = tiny_vavae_davae(seed=0)
    model = import_imagenet_tokenizer(imagenet_fixtures / "authors_davae.ckpt", imagenet_fixtures / "authors_latents_stats.pt",
                                      vae_config=source.config.base_vae)
    assert model.config.decoder_base_space == "raw" and model.config.decoder_input_order == "base_detail"
    assert model.layout.base_channels == TINY_BASE_CHANNELS and model.layout.detail_channels == 12
    stats = torch.load(imagenet_fixtures / "authors_latents_stats.pt", weights_only=True)
    mean, std = stats["mean"].flatten(), stats["std"].flatten()
    assert model.config.base_vae["latents_mean"] == pytest.approx(mean[:4].tolist())
    assert torch.allclose(model.normalizer.detail_std, std[4:])
    for key, value in source.state_dict().items():
        if not key.startswith("normalizer."):
            assert torch.equal(model.state_dict()[key], value), key
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        raw = model.encode_raw(image)
        assert torch.equal(raw, source.encode_raw(image))
        assert torch.allclose(model.decode_raw(raw), source.decode_raw(raw), atol=1e-5)
        # their DiT's space: every channel (z - mean) / std with their one statistics file
        assert torch.allclose(model.encode(image), (raw - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), atol=1e-5)

    (tmp_path / "vae.json").write_text(json.dumps(source.config.base_vae))
    main([str(imagenet_fixtures / "authors_davae.ckpt"), str(tmp_path / "ours.safetensors"), "--vae-config", str(tmp_path / "vae.json"),
          "--stats", str(imagenet_fixtures / "authors_latents_stats.pt")])
    with torch.no_grad():
        assert torch.equal(load_davae(tmp_path / "ours.safetensors").encode(image), model.encode(image))


def test_authors_imagenet_importer_refuses_other_layouts(tmp_path, imagenet_fixtures):
    from davae_core.authors_imagenet_import import import_imagenet_tokenizer

    with pytest.raises(CheckpointError, match="not an authors' ImageNet DA-VAE"):
        import_imagenet_tokenizer(imagenet_fixtures / "vavae.pt")
    ckpt = torch.load(imagenet_fixtures / "authors_davae.ckpt", weights_only=True)
    ckpt["state_dict"]["da.extra_head.weight"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match=r"extra\.ckpt: 1 keys this importer does not know \(da\.extra_head\.weight\)"):
        import_imagenet_tokenizer(tmp_path / "extra.ckpt")
