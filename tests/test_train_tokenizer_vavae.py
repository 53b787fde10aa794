"""Stage 1 on a VA-VAE base (CPU): the tiny VA-VAE in its public .pt layout, imported on the fly, trained
with the ImageNet recipe's parts (group-mean alignment with the adaptive weight, detail dropout, GAN), and
the exported DA-VAE read by the ImageNet stage-2 codec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "imagenet" / "tokenizer_vavae_tiny.yaml"


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    from davae_training.imagenet.fixtures import write_fixtures

    root = tmp_path_factory.mktemp("public")
    write_fixtures(root)  # vavae.pt, latents_stats.pt and vavae_config.json among them
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return root


def _config(public, out, *extra):
    from davae_training.config import load_config
    from davae_training.stage1.config import TokenizerTrainConfig

    return load_config(TokenizerTrainConfig, TINY, [
        f"model.pretrained_vae={public / 'vavae.pt'}", f"model.latent_stats={public / 'latents_stats.pt'}",
        f"model.vae_config={public / 'vavae_config.json'}",
        f"data.sources=[{public / 'images'}]", f"train.output_dir={out}", *extra])


def test_stage1_trains_a_davae_on_the_vavae_checkpoint(public, tmp_path, monkeypatch):
    from davae_core import load_davae
    from davae_core.vavae_import import read_latent_stats
    from davae_training.imagenet.latent_codec import LatentCodec
    from davae_training.stage1.trainer import train

    from davae_core.davae_model import DAVAE

    seen = []  # the DA-VAE's forward is what the step calls: record the detail dropout it passes

    original = DAVAE.forward

    def spy(self, image, *a, **k):
        seen.append(k.get("detail_dropout"))
        return original(self, image, *a, **k)

    monkeypatch.setattr(DAVAE, "forward", spy)
    path = train(_config(public, tmp_path / "run"))
    assert len(seen) >= 4 and all(p == 0.1 for p in seen[:4])

    davae = load_davae(path)
    assert davae.config.base_name == "vavae" and davae.config.decoder_base_space == "raw"
    assert davae.layout.base_channels == 4 and davae.layout.detail_channels == 12 and davae.layout.factor == 32
    assert "AttnDownEncoderBlock2D" in davae.config.base_vae["down_block_types"]
    mean, std = read_latent_stats(public / "latents_stats.pt", 4)
    assert torch.allclose(davae.normalizer.base_mean.flatten(), torch.tensor(mean))
    assert not davae.normalizer.detail_is_identity  # stage 1 measured the detail statistics
    summary = (tmp_path / "run" / "final" / "summary.json").read_text()
    assert '"step": 4' in summary
    # the file is what ImageNet stage 2 encodes with
    codec = LatentCodec(davae)
    latents = codec.encode(torch.rand(1, 3, 64, 64))
    assert latents.shape == (1, 16, 2, 2) and torch.isfinite(latents).all()


def test_base_vae_names_are_checked(public, tmp_path):
    from davae_training.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match="base_vae"):
        _config(public, tmp_path, "model.base_vae=flux")
