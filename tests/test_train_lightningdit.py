"""ImageNet stage 2 on the tiny fixtures (CPU): LightningDiT in its public {model, ema} layout, a DA-VAE
on the tiny VA-VAE, a class folder; finite losses, heads moved off zero, export read by generate, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from davae_training.imagenet.fixtures import TINY_CLASSES as CLASSES

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "training" / "configs" / "imagenet" / "lightningdit_tiny.yaml"


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    """The tiny public-layout files, our DA-VAE file on the tiny VA-VAE and a two-class image folder."""
    from davae_training.imagenet.fixtures import write_fixtures

    root = tmp_path_factory.mktemp("inet")
    write_fixtures(root)
    return root


def _sets(inet, out, *extra):
    return [f"train.output_dir={out}", f"model.checkpoint={inet / 'lightningdit.pt'}",
            f"tokenizer.path={inet / 'davae_vavae.safetensors'}", f"data.root={inet / 'train'}", *extra]


@contextmanager
def one_thread():
    """Every run a resume test compares trains on one thread, as the killed subprocess does
    (OMP_NUM_THREADS=1): another thread count sums in another order, and bit-identity is lost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _config(inet, out, *extra):
    from davae_training.config import load_config
    from davae_training.imagenet.config import LightningDiTTrainConfig

    return load_config(LightningDiTTrainConfig, TINY_CONFIG, _sets(inet, out, *extra))


@pytest.fixture(scope="module")
def full_run(inet, tmp_path_factory):
    from davae_training.imagenet.train import train

    out = tmp_path_factory.mktemp("full")
    with one_thread():
        summary = train(_config(inet, out))
    return out, summary


def test_losses_are_finite_and_the_heads_left_zero(full_run):
    out, summary = full_run
    assert summary["step"] == 4 and summary["ranks_in_sync"]
    logged = summary["last_logged"]
    for key in ("loss", "loss/mse", "loss/cosine", "loss/base_mse", "loss/detail_mse"):
        assert np.isfinite(logged[key]), key
    from davae_core.loss_schedule import detail_weight

    assert logged["loss/cosine"] > 0
    assert logged["detail_weight"] == pytest.approx(detail_weight(3, 4))  # the last step (index 3) of the 4-step ramp
    ema = load_file(str(out / "final" / "dit_ema.safetensors"))
    raw = load_file(str(out / "final" / "dit.safetensors"))
    for name in ("x_embedder.proj.detail.weight", "final_layer.linear.detail.weight"):
        assert raw[name].abs().max() > 0, f"{name} is still zero after training"
        assert ema[name].abs().max() > 0, f"the EMA of {name} is still zero"
        assert not torch.equal(ema[name], raw[name])  # the EMA lags the raw weights
    assert (out / "samples" / "step-00000004.png").is_file()


def test_export_loads_into_generate_and_samples(full_run, inet):
    from davae_training.imagenet.generate import generate_images, load_models

    out, summary = full_run
    paths = summary["export"]
    davae, dit = load_models(str(inet / "davae_vavae.safetensors"), paths["dit"], paths["heads"])
    ema = load_file(str(out / "final" / "dit_ema.safetensors"))
    # the exported DiT + heads are the EMA weights, in LightningDiT's names
    assert torch.equal(dit.final_layer.linear.detail.weight, ema["final_layer.linear.detail.weight"])
    assert torch.equal(dit.x_embedder.proj.stock.weight, ema["x_embedder.proj.stock.weight"])
    assert torch.equal(dit.blocks[1].mlp.w3.weight, ema["blocks.1.mlp.w3.weight"])
    images = next(generate_images(davae, dit, 2, 2, torch.Generator().manual_seed(0), steps=3))
    assert images.shape == (2, 3, 128, 128) and images.dtype == torch.uint8
    raw = torch.load(paths["dit"], weights_only=True)
    assert set(raw) == {"model", "ema"} and "feat_rope.freqs_cos" in raw["model"]


def test_a_checkpoint_exports_what_the_run_exported(full_run, tmp_path):
    from davae_training.imagenet.export import export_run

    out, summary = full_run
    paths = export_run(out, str(out / "checkpoints" / "checkpoint-00000004"), out_dir=tmp_path, name="again")
    ours, theirs = torch.load(paths["dit"], weights_only=True), torch.load(summary["export"]["dit"], weights_only=True)
    for entry in ("model", "ema"):
        assert ours[entry].keys() == theirs[entry].keys()
        assert all(torch.equal(ours[entry][k], theirs[entry][k]) for k in ours[entry])
    heads, their_heads = load_file(str(paths["heads"])), load_file(summary["export"]["heads"])
    assert heads.keys() == their_heads.keys() and all(torch.equal(heads[k], their_heads[k]) for k in heads)
    with pytest.raises(FileNotFoundError, match="output_dir of an ImageNet"):
        export_run(tmp_path)


def test_kill_and_resume_equals_the_uninterrupted_run(full_run, inet, tmp_path):
    from davae_training.imagenet.train import train

    full, _ = full_run
    cut = tmp_path / "cut"
    env = {**{k: v for k, v in os.environ.items() if k != "DAVAE_FAULT_AFTER_STEP"}, "OMP_NUM_THREADS": "1",
           "DAVAE_FAULT_AFTER_STEP": "3"}
    args = [a for s in _sets(inet, cut) for a in ("--set", s)]
    r = subprocess.run([sys.executable, "-m", "davae_training.train_lightningdit", "--config", str(TINY_CONFIG), *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 17, r.stderr[-3000:]
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["checkpoint-00000002"]
    with one_thread():
        summary = train(_config(inet, cut), resume="latest")
    assert summary["step"] == 4
    for name in ("dit.safetensors", "dit_ema.safetensors"):
        a, b = load_file(str(full / "final" / name)), load_file(str(cut / "final" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"


def test_a_resolution_off_the_dit_grid_is_refused(inet, tmp_path):
    from davae_training.imagenet.train import train

    with pytest.raises(ValueError, match="data.resolution=128"):
        train(_config(inet, tmp_path / "run", "data.resolution=96"))


def test_labels_follow_the_sorted_class_folders(inet):
    from davae_training.imagenet.config import ClassDataConfig
    from davae_training.imagenet.data import make_class_loader

    loader = make_class_loader(ClassDataConfig(root=str(inet / "train"), resolution=32, index_cache=None), 8, seed=0)
    batch = next(iter(loader))
    assert batch["pixels"].shape == (8, 3, 32, 32)
    names = [loader.dataset.records[i].key.split("/")[0] for i in batch["index"].tolist()]
    assert batch["label"].tolist() == [CLASSES.index(n) for n in names]


@pytest.mark.parametrize("mode", ["zero", "random", "repeat_average"])
def test_head_init_and_qk_norm_reach_the_model(inet, mode):
    from davae_training.imagenet.config import DiTModelConfig
    from davae_training.imagenet.step import DiTModel

    cfg = DiTModelConfig(checkpoint=str(inet / "lightningdit.pt"), head_init=mode, enable_qknorm=True)
    dit = DiTModel.build(cfg, detail_channels=12, ema_decay=0.999).module
    assert dit.config.use_qknorm and dit.blocks[0].attn.q_norm.weight.requires_grad
    embed = dit.x_embedder.proj
    if mode == "zero":
        assert embed.detail.weight.abs().max() == 0 and dit.final_layer.linear.detail.weight.abs().max() == 0
    elif mode == "random":
        assert embed.detail.weight.abs().max() > 0 and dit.final_layer.linear.detail.weight.abs().max() > 0
    else:  # detail channel j reads base channel j mod 4, every column divided by ceil(16 / 4) = 4
        assert torch.allclose(embed.detail.weight[:, 5], embed.stock.weight[:, 1])
        assert torch.allclose(embed.stock.weight * 4, torch.load(inet / "lightningdit.pt",
                                                                  weights_only=True)["ema"]["x_embedder.proj.weight"])


def test_training_from_the_latent_cache_never_encodes(inet, tmp_path, monkeypatch):
    from davae_training.imagenet.latent_cache import LatentCache, write_latent_cache
    from davae_training.imagenet.latent_codec import LatentCodec
    from davae_training.imagenet.train import train

    cfg = _config(inet, tmp_path / "run")
    manifest = write_latent_cache(cfg, tmp_path / "cache", flips=True, shard_size=4, dtype="float32", batch_size=3)
    # batches of 3 against shards of 4: every shard whole
    assert manifest["count"] == 16 and [s["count"] for s in manifest["shards"]] == [4, 4, 4, 4] and manifest["side"] == 4
    cache = LatentCache(tmp_path / "cache")
    # sample 0 as the trainer would encode it, and its mirror in the second half
    from davae_training.imagenet.data import ClassImageFolder, class_names, index_class_folder

    records, labels = index_class_folder(str(inet / "train"), class_names(inet / "train"), None)
    pixels = ClassImageFolder(records, labels, 128, random_flip=False)[0]["pixels"][None]
    codec = LatentCodec.from_config(cfg.tokenizer)
    assert torch.allclose(cache[0]["latents"], codec.encode(pixels)[0], atol=1e-5)
    assert torch.allclose(cache[8]["latents"], codec.encode(pixels.flip(-1))[0], atol=1e-5)
    assert cache[0]["label"] == cache[8]["label"] == labels[0]

    def forbidden(*a, **k):
        raise AssertionError("the DA-VAE encoded images although a latent cache was given")

    monkeypatch.setattr(LatentCodec, "encode", forbidden)
    summary = train(_config(inet, tmp_path / "run", f"data.latent_cache={tmp_path / 'cache'}", "train.max_steps=2",
                            "train.image_every=0", "export.enabled=false"))
    assert summary["step"] == 2 and np.isfinite(summary["last_logged"]["loss"])


def test_a_cache_made_at_another_resolution_or_by_another_davae_is_refused(inet, tmp_path):
    from davae_core.checkpoint import save_davae
    from davae_training.imagenet.fixtures import tiny_vavae_davae
    from davae_training.imagenet.latent_cache import make_latent_loader, write_latent_cache

    write_latent_cache(_config(inet, tmp_path / "run"), tmp_path / "cache", flips=False)
    with pytest.raises(ValueError, match="data.resolution=128"):
        make_latent_loader(str(tmp_path / "cache"), 2, seed=0, expect_resolution=256)
    save_davae(tiny_vavae_davae(seed=5), tmp_path / "other_davae.safetensors")
    with pytest.raises(ValueError, match="another DA-VAE"):
        make_latent_loader(str(tmp_path / "cache"), 2, seed=0, tokenizer=str(tmp_path / "other_davae.safetensors"))
    assert len(make_latent_loader(str(tmp_path / "cache"), 2, seed=0, tokenizer=str(inet / "davae_vavae.safetensors")).dataset) == 8


def test_the_step_encodes_as_the_cache_does_whatever_the_autocast(inet):
    """The step's encode runs inside the loop's bf16 autocast; the cache's does not: both must give the same latents."""
    from davae_core import load_davae
    from davae_training.imagenet.latent_codec import LatentCodec

    codec = LatentCodec(load_davae(inet / "davae_vavae.safetensors"), encode_batch_size=1)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = codec.encode(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = codec.encode(pixels)
    assert autocast.dtype == torch.float32 and torch.equal(plain, autocast)


def test_loss_falls_on_a_fixed_batch_detail_channels_included(inet):
    """The same latents, noise and times every step: the DiT (and its zero-started O') fits them."""
    from davae_core import load_davae
    from davae_training.imagenet.config import DiTModelConfig
    from davae_training.imagenet.flow import LightningFlowConfig
    from davae_training.imagenet.latent_codec import LatentCodec
    from davae_training.imagenet.step import DiTModel, DiTStep

    codec = LatentCodec(load_davae(inet / "davae_vavae.safetensors"))
    model = DiTModel.build(DiTModelConfig(checkpoint=str(inet / "lightningdit.pt")), 12, ema_decay=0.0)
    step = DiTStep(model, codec, LightningFlowConfig(base_channels=4, detail_warmup_steps=0, label_dropout=0.0))
    batch = {"latents": codec.encode(torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))),
             "label": torch.tensor([0, 1, 2, 3])}
    opt = torch.optim.AdamW(model.network.parameters(), lr=3e-3)
    first = last = None
    for i in range(40):
        loss, logs = step(batch, 100, torch.Generator().manual_seed(7))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or {k: float(logs[k]) for k in ("loss/base_mse", "loss/detail_mse")}
        last = {k: float(logs[k]) for k in ("loss/base_mse", "loss/detail_mse")}
    assert last["loss/detail_mse"] < 0.5 * first["loss/detail_mse"] and last["loss/base_mse"] < 0.5 * first["loss/base_mse"], (first, last)


def test_a_checkpoint_written_before_a_config_key_existed_resumes_with_its_default(full_run, inet, tmp_path):
    """Configs grow keys (stage 1 got model.base_vae, model.detail_dropout, data.upscale_small...): a checkpoint whose
    config.yaml lacks one ran with its default, so a run that keeps the default resumes it."""
    import shutil

    import yaml

    from davae_training.checkpoints import CHECKSUM_FILE, ResumeConfigError, _checksums, plan_resume

    full, _ = full_run
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-00000004"
    shutil.copytree(full / "checkpoints" / "checkpoint-00000004", ckpt)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    del saved["model"]["head_init"], saved["data"]["latent_cache"]  # as an older version wrote it
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    (ckpt / CHECKSUM_FILE).write_text(json.dumps(_checksums(ckpt)))
    plan = plan_resume("latest", _config(inet, tmp_path / "run"))
    assert plan.path == ckpt and set(plan.changes) == {"train.output_dir", "data.index_cache"}  # where it writes
    with pytest.raises(ResumeConfigError, match="model.head_init"):  # a non-default value still differs
        plan_resume("latest", _config(inet, tmp_path / "run", "model.head_init=random"))
