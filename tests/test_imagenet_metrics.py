"""FID and IS through torchmetrics with injected feature networks (the real Inception weights
cannot be downloaded here: these tiny networks stand in for it, as the module's design allows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from davae_training.imagenet.metrics import (
    evaluate,
    images_from_npz,
    main,
    make_fid,
    make_inception_score,
    read_reference_statistics,
    to_uint8,
)


class TinyFeatures(nn.Module):
    """A fixed random conv and global pooling: 8 features of a uint8 image."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=torch.Generator().manual_seed(0)))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x.float() / 255)).mean((2, 3))


class TinyLogits(TinyFeatures):
    """Class logits for the Inception Score: 8 classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20 * super().forward(x)


def _images(n: int, seed: int, brightness: float = 0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return to_uint8((torch.rand(n, 3, 16, 16, generator=gen) * brightness * 2).clamp(0, 1))


def _reference(tmp_path, images: torch.Tensor):
    with torch.no_grad():
        feats = TinyFeatures()(images).double().numpy()
    path = tmp_path / "ref.npz"
    np.savez(path, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    return path


def test_fid_against_reference_statistics_equals_fid_against_the_real_images(tmp_path):
    real, fake = _images(64, 0), _images(64, 1, brightness=0.4)
    direct = make_fid(TinyFeatures())
    direct.update(real, real=True)
    direct.update(fake, real=False)
    expected = float(direct.compute())
    fid = make_fid(TinyFeatures(), reference=_reference(tmp_path, real))
    result = evaluate([fake[:32], fake[32:]], fid)
    assert result["fid"] == pytest.approx(expected, rel=1e-6) and result["num_images"] == 64
    fid.reset()  # the reference stays; the generated side starts over
    assert evaluate([fake], fid)["fid"] == pytest.approx(expected, rel=1e-6)
    same = evaluate([_images(64, 2)], make_fid(TinyFeatures(), reference=_reference(tmp_path, _images(512, 3))))["fid"]
    assert same < expected  # a sample of the reference's own distribution scores better than a shifted one


def test_inception_score_of_varied_predictions_beats_identical_ones():
    flat = evaluate([_images(32, 4)], inception_score=make_inception_score(_ConstantLogits(), splits=1))
    assert flat["inception_score"] == pytest.approx(1.0, abs=1e-5)  # identical predictions: IS is 1
    varied = evaluate([_images(32, 4)], inception_score=make_inception_score(TinyLogits(), splits=1))
    assert varied["inception_score"] > 1.05


class _ConstantLogits(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[2.0, 0.0, 1.0]]).expand(x.shape[0], 3)


def test_adm_sample_files_are_read_in_uint8_batches(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    batches = list(images_from_npz(tmp_path / "samples.npz", batch=4, limit=9))
    assert [b.shape[0] for b in batches] == [4, 4, 1] and batches[0].shape == (4, 3, 16, 16)
    assert torch.equal(batches[0][1].permute(1, 2, 0), torch.from_numpy(images[1]))
    np.savez(tmp_path / "floats.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        next(images_from_npz(tmp_path / "floats.npz", 4))
    with pytest.raises(ValueError, match="must be uint8"):
        evaluate([torch.rand(2, 3, 8, 8)], make_fid(TinyFeatures()))


def test_reference_files_and_weights_are_checked(tmp_path):
    np.savez(tmp_path / "bad.npz", mu=np.zeros(4), sigma=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not \\(F,\\) and \\(F, F\\)"):
        read_reference_statistics(tmp_path / "bad.npz")
    np.savez(tmp_path / "wide.npz", mu=np.zeros(16), sigma=np.eye(16))
    with pytest.raises(ValueError, match="16 features; the feature network gives 8"):
        make_fid(TinyFeatures(), reference=tmp_path / "wide.npz")
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "wide.npz"), "--inception-weights", str(tmp_path / "none.pth")])


def test_generate_scores_class_balanced_samples_of_davae_and_lightningdit(tmp_path):
    from davae_core import save_davae, save_heads
    from davae_core.heads import DAHeads
    from davae_training.imagenet.da_heads import heads_config_for_lightningdit
    from davae_training.imagenet.fixtures import lightningdit_checkpoint, tiny_dit, tiny_vavae_davae
    from davae_training.imagenet.generate import class_balanced_labels, parser, run

    assert class_balanced_labels(2003).bincount().tolist() == [3, 3, 3] + [2] * 997
    save_davae(tiny_vavae_davae(0), tmp_path / "davae.safetensors")
    dit = tiny_dit()
    torch.save(lightningdit_checkpoint(dit, dit), tmp_path / "dit.pt")
    save_heads(DAHeads(heads_config_for_lightningdit(dit, 12)), tmp_path / "heads.safetensors")
    ref = _reference(tmp_path, _images(64, 0))
    args = parser().parse_args([
        "--davae", str(tmp_path / "davae.safetensors"), "--dit", str(tmp_path / "dit.pt"), "--heads", str(tmp_path / "heads.safetensors"),
        "--num", "5", "--batch", "2", "--steps", "3", "--device", "cpu", "--ref", str(ref), "--inception-weights", "unused.pth",
        "--save-npz", str(tmp_path / "samples.npz"),
    ])
    result = run(args, fid_feature=TinyFeatures(), is_feature=TinyLogits())
    assert result["num_images"] == 5 and np.isfinite(result["fid"]) and result["inception_score"] >= 1.0
    saved = np.load(tmp_path / "samples.npz")["arr_0"]
    assert saved.shape == (5, 128, 128, 3) and saved.dtype == np.uint8  # 4x4 tokens at f32
    again = run(args, fid_feature=TinyFeatures(), is_feature=TinyLogits())
    assert again["fid"] == result["fid"]  # the seed fixes every sample
