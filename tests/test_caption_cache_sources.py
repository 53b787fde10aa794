"""The stage-2 latent+text cache from bucketed folders, WebDataset shards and Hugging Face datasets.

Tiny sizes: the fixtures' DA-VAE (davae_tiny.safetensors) and the hashing text stand-in.  Checks
that every sample is cached at its bucket's shape, that a trainer batch holds one shape and
resumes exactly, that streamed sources give the stream's samples and captions (corrupt ones
skipped and counted), that an interrupted build ends identical to an uninterrupted one, and
that a cache built for other settings is refused.  Stage-2 buckets sit on the transformer's patch
grid (DA-VAE factor 16 x patch 2 = 32 px), so the images here are sized for resolution 128.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from davae_training.data.buckets import BucketBatchSampler, crop_to_bucket, make_buckets
from davae_training.data.images import ImageDataConfig, build_index, load_rgb
from davae_training.data.streams import StreamingBatches
from davae_training.stage2.caption_cache import CachedConditioningDataset, build_cache
from davae_core.fixtures import TINY_TRANSFORMER_CONFIG
from davae_training.stage2.config import AdapterTrainConfig, CaptionDataConfig
from davae_training.stage2.latent_grid import LatentGrid
from davae_training.stage2.text_conditioning import HashingTextConditioner
from image_samples import png_bytes, write_png_folder, write_tar_shards

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "training" / "configs" / "adapter_tiny.yaml"
# (height, width): two landscape, two portrait, two square; every one covers its bucket at resolution 128
SHAPES = [(128, 256), (128, 224), (256, 128), (224, 128), (160, 160), (192, 192)]
RES = 128


@pytest.fixture(scope="module")
def davae(fixtures_dir):
    from davae_core.checkpoint import load_davae

    return load_davae(fixtures_dir / "davae" / "davae_tiny.safetensors").eval()


@pytest.fixture(scope="module")
def grid(davae):
    """The stage-2 grid of the fixtures: the DA-VAE's factor times the tiny transformer's patch."""
    return LatentGrid(davae.layout.factor, TINY_TRANSFORMER_CONFIG["patch_size"])


@pytest.fixture(scope="module")
def text():
    return HashingTextConditioner(64, 32, tokens=8)


class CountingEncoder:
    """``davae.encode`` that counts its calls and can fail after ``fail_after`` of them (an interruption)."""

    def __init__(self, davae, fail_after: int | None = None):
        self.davae, self.fail_after, self.calls = davae, fail_after, 0

    def __call__(self, pixels):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return self.davae.encode(pixels)


def _cache_cfg(images: ImageDataConfig, cache_dir, shard_size=4, batch_size=2) -> CaptionDataConfig:
    return CaptionDataConfig(images=images, cache_dir=str(cache_dir), cache_dtype="float32",
                             cache_shard_size=shard_size, cache_batch_size=batch_size)


def _tensors(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(cache.glob("*.safetensors"))}


def _assert_interrupted_build_resumes_identically(records, cfg_of, davae, text, tmp_path, grid):
    """An uninterrupted build, and a build interrupted at its last encoder call then rerun, end
    with the same index and tensors; the rerun encodes only what was missing."""
    full = CountingEncoder(davae)
    build_cache(records, cfg_of(tmp_path / "full"), full, text, sample_prompts=["a fox"], grid=grid)
    cut_cfg = cfg_of(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        build_cache(records, cut_cfg, CountingEncoder(davae, fail_after=full.calls - 1), text, sample_prompts=["a fox"], grid=grid)
    assert not (tmp_path / "cut" / "index.json").exists()
    assert list((tmp_path / "cut").glob("shard-*.safetensors")), "the interrupted build should have finished a window"
    rerun = CountingEncoder(davae)
    build_cache(records, cut_cfg, rerun, text, sample_prompts=["a fox"], grid=grid)
    assert 0 < rerun.calls < full.calls  # finished windows are read back, not encoded again
    assert (tmp_path / "cut" / "index.json").read_text() == (tmp_path / "full" / "index.json").read_text()
    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "cut")
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=0, atol=0)


def _loader(cache, images: ImageDataConfig, grid: LatentGrid, batch_size=2, start=0, seed=0, device="cpu"):
    from davae_training.stage2.trainer import build_dataloader, open_cache

    cfg = AdapterTrainConfig()
    cfg.data = CaptionDataConfig(images=images, cache_dir=str(cache))
    cfg.data.cache_dtype = "float32"  # what _cache_cfg builds, with the stand-in of the text fixture
    cfg.text.kind, cfg.text.standin_tokens, cfg.text.standin_joint_attention_dim, cfg.text.standin_pooled_dim = "hashing_standin", 8, 64, 32
    cfg.train.batch_size, cfg.train.seed, cfg.train.dataloader_num_workers = batch_size, seed, 0
    dataset = open_cache(cfg, grid.patch_size) if cache is not None else None
    accelerator = SimpleNamespace(process_index=0, num_processes=1, device=torch.device(device))
    return build_dataloader(cfg, accelerator, start, grid, dataset), dataset


# ---------------------------------------------------------------------------- bucketed folder
@pytest.fixture()
def bucket_folder(tmp_path):
    """12 images of six shapes with captions, plus one whose header reads but whose data is cut."""
    rng = np.random.default_rng(0)
    folder = write_png_folder(tmp_path / "imgs", SHAPES, 12, rng, captions=True)
    (folder / "99.png").write_bytes(png_bytes(rng, 192, 192)[:120])  # the size probe passes, decoding fails
    return folder


def test_bucket_folder_cache_holds_each_sample_at_its_bucket_shape_and_skips_a_corrupt_one(bucket_folder, tmp_path, davae, text, grid, caplog):
    images = ImageDataConfig(sources=[str(bucket_folder)], resolution=RES, buckets=True)
    records, _ = build_index(images, grid.pixels)
    assert len(records) == 13
    with caplog.at_level("WARNING", logger="davae_training.data"):
        build_cache(records, _cache_cfg(images, tmp_path / "cache"), davae.encode, text, grid=grid)
    assert "skipping corrupt sample 99" in caplog.text
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["version"] == 4 and index["skipped"] == {"corrupt": 1, "too_small": 0}
    buckets = make_buckets(RES, grid=grid.pixels)
    assert [tuple(b) for b in index["buckets"]] == buckets
    data = CachedConditioningDataset(tmp_path / "cache", expect=images)
    assert [s["key"] for s in data.samples] == [f"{i:02d}" for i in range(12)]  # folder order, corrupt one left out
    assert len(data.buckets_used) >= 3
    for i in range(len(data)):
        item = data[i]
        w, h = buckets[item["bucket"]]
        assert item["latents"].shape == (32, h // 16, w // 16)
        assert item["caption"] == f"picture number {int(item['key'])}"
        # the shard named for the sample's bucket holds it
        assert data.shards[data.samples[i]["shard"]].endswith(f"-b{item['bucket']:03d}.safetensors")
    item = data[1]  # 224x128: the same bucket crop as training, encoded once
    pixels = crop_to_bucket(load_rgb(records[1]), buckets[item["bucket"]], np.random.default_rng(0), "center")
    with torch.no_grad():
        torch.testing.assert_close(item["latents"], davae.encode(pixels[None])[0], atol=1e-5, rtol=1e-5)
    e, p = text.encode([item["caption"]])
    torch.testing.assert_close(item["embeds"], e[0])
    torch.testing.assert_close(item["pooled"], p[0])


def test_stage2_loaders_pin_memory_when_batches_go_to_a_gpu(bucket_folder, tmp_path, davae, text, grid):
    """Cache or images, bucketed or square: pinned for a CUDA device (constructing the loader needs no GPU)."""
    images = ImageDataConfig(sources=[str(bucket_folder)], resolution=RES, buckets=True)
    records, _ = build_index(images, grid.pixels)
    build_cache(records, _cache_cfg(images, tmp_path / "cache"), davae.encode, text, grid=grid)
    square = ImageDataConfig(sources=[str(bucket_folder)], resolution=RES, index_cache=str(tmp_path / "index.json"))
    for cache, imgs in [(tmp_path / "cache", images), (None, images), (None, square)]:
        assert _loader(cache, imgs, grid, device="cuda")[0].pin_memory, (cache, imgs.buckets)
        assert not _loader(cache, imgs, grid, device="cpu")[0].pin_memory


def test_bucket_cache_trainer_batches_hold_one_shape_and_resume_at_any_micro_batch(bucket_folder, tmp_path, davae, text, grid):
    images = ImageDataConfig(sources=[str(bucket_folder)], resolution=RES, buckets=True)
    records, _ = build_index(images, grid.pixels)
    build_cache(records, _cache_cfg(images, tmp_path / "cache", shard_size=5), davae.encode, text, grid=grid)
    loader, dataset = _loader(tmp_path / "cache", images, grid)
    assert isinstance(loader.batch_sampler, BucketBatchSampler)
    full = list(itertools.islice(iter(loader), 12))
    shapes = set()
    for batch in full:
        buckets = {dataset.bucket_of_sample[int(i)] for i in batch["index"]}
        assert len(buckets) == 1 and batch["latents"].shape[0] == 2
        w, h = dataset.buckets[buckets.pop()]
        assert batch["latents"].shape[1:] == (32, h // 16, w // 16)
        shapes.add(tuple(batch["latents"].shape))
    assert len(shapes) >= 3
    for k in (1, 5):
        resumed, _ = _loader(tmp_path / "cache", images, grid, start=k)
        again = list(itertools.islice(iter(resumed), 12 - k))
        assert [b["key"] for b in again] == [b["key"] for b in full[k:]]
        torch.testing.assert_close(again[0]["latents"], full[k]["latents"])


# ---------------------------------------------------------------------------- webdataset
@pytest.fixture()
def shards(tmp_path):
    """shard-000.tar (plain) and shard-001.tar.gz (gzip), 8 samples each, sample 5 corrupt in each."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar_shards(folder, SHAPES, np.random.default_rng(0))
    return [str(folder / "shard-000.tar"), str(folder / "shard-{001..001}.tar.gz")]


@pytest.mark.parametrize("buckets", [False, True], ids=["square", "bucket"])
def test_webdataset_cache_holds_the_streams_samples_skips_corrupt_ones_and_resumes_identically(
        shards, tmp_path, davae, text, grid, caplog, buckets):
    images = ImageDataConfig(sources=shards, format="webdataset", resolution=RES, buckets=buckets, shuffle_buffer=1)
    with caplog.at_level("WARNING", logger="davae_training.data"):
        build_cache(None, _cache_cfg(images, tmp_path / "cache", shard_size=3), davae.encode, text, grid=grid)
    assert "skipping corrupt sample shard-000.tar:s0_5" in caplog.text
    data = CachedConditioningDataset(tmp_path / "cache", expect=images)
    expected = [f"shard-000.tar:s0_{i}" for i in range(8) if i != 5] + [f"shard-001.tar.gz:s1_{i}" for i in range(8) if i != 5]
    assert [s["key"] for s in data.samples] == expected  # the shards' own order, no shuffle
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["skipped"]["corrupt"] == 2
    # the training stream (centre crops) yields the same samples, captions and pixels
    stream = StreamingBatches(ImageDataConfig(**{**images.__dict__, "crop": "center"}), batch_size=1, seed=0,
                              bucket_grid=grid.pixels)
    streamed = {b["key"][0]: b for b in itertools.islice(iter(stream), 14)}
    assert set(streamed) == set(expected)
    by_key = {data[i]["key"]: data[i] for i in range(len(data))}
    for key, b in streamed.items():
        assert by_key[key]["caption"] == b["caption"][0]
    with torch.no_grad():
        for key in (expected[0], expected[-1]):
            torch.testing.assert_close(by_key[key]["latents"], davae.encode(streamed[key]["pixels"])[0], atol=1e-5, rtol=1e-5)
    if buckets:
        assert len(data.buckets_used) >= 2
        for s, name in enumerate(data.shards):  # a shard holds one bucket: the one in its name, at its shape
            members = {data.samples[i]["bucket"] for i in range(len(data)) if data.samples[i]["shard"] == s}
            assert members == {int(name.split("-b")[1].split(".")[0])}
            w, h = data.buckets[members.pop()]
            assert load_file(str(tmp_path / "cache" / name))["latents"].shape[1:] == (32, h // 16, w // 16)
    _assert_interrupted_build_resumes_identically(None, lambda d: _cache_cfg(images, d, shard_size=3), davae, text, tmp_path, grid)


# ---------------------------------------------------------------------------- Hugging Face datasets
@pytest.mark.parametrize("kind", ["saved_to_disk", "imagefolder_streaming_bucket"])
def test_hf_dataset_cache_holds_the_rows_and_captions_skips_corrupt_rows_and_resumes_identically(tmp_path, davae, text, grid, kind):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    if kind == "saved_to_disk":
        rows = {"img": [{"bytes": b"broken" if i == 3 else png_bytes(rng, *SHAPES[i % len(SHAPES)]), "path": None} for i in range(10)],
                "prompt": [f"row {i}" for i in range(10)]}
        features = datasets.Features({"img": datasets.Image(), "prompt": datasets.Value("string")})
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
        images = ImageDataConfig(sources=[str(tmp_path / "saved")], format="hf", resolution=RES,
                                 hf_image_column="img", hf_caption_column="prompt")
        expected = [(str(i), f"row {i}") for i in range(10) if i != 3]
    else:
        folder = tmp_path / "imagefolder"
        folder.mkdir()
        lines = ["file_name,text"]
        for i in range(8):
            (folder / f"{i}.png").write_bytes(b"truncated" if i == 6 else png_bytes(rng, *SHAPES[i % len(SHAPES)]))
            lines.append(f"{i}.png,picture {i}")
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
        images = ImageDataConfig(sources=[str(folder)], format="hf", resolution=RES, streaming=True, buckets=True)
        expected = None  # the imagefolder loader's own row order; checked against the stream below
    build_cache(None, _cache_cfg(images, tmp_path / "cache", shard_size=4), davae.encode, text, grid=grid)
    data = CachedConditioningDataset(tmp_path / "cache", expect=images)
    got = [(s["key"], s["caption"]) for s in data.samples]
    if expected is not None:
        assert got == expected
    else:
        assert sorted(c for _, c in got) == sorted(f"picture {i}" for i in range(8) if i != 6)
        assert len(data.buckets_used) >= 2
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["skipped"]["corrupt"] == 1
    # the training stream yields the same rows over one epoch
    streamed = [(b["key"][0], b["caption"][0]) for b in itertools.islice(iter(StreamingBatches(images, 1, seed=0, bucket_grid=grid.pixels)), len(got))]
    if kind == "saved_to_disk":
        assert sorted(streamed) == sorted(got)
    else:  # a streamed dataset's training keys are positions in its shuffled order; the captions match
        assert sorted(c for _, c in streamed) == sorted(c for _, c in got)
    _assert_interrupted_build_resumes_identically(None, lambda d: _cache_cfg(images, d, shard_size=4), davae, text, tmp_path, grid)


# ---------------------------------------------------------------------------- refusals
def test_cache_built_with_other_bucket_or_resolution_settings_is_refused_naming_both_and_the_fix(bucket_folder, tmp_path, davae, text, grid):
    square = ImageDataConfig(sources=[str(bucket_folder)], resolution=RES)
    records, _ = build_index(square)
    build_cache(records, _cache_cfg(square, tmp_path / "cache"), davae.encode, text, grid=grid)
    bucketed = ImageDataConfig(sources=[str(bucket_folder)], resolution=RES, buckets=True)
    with pytest.raises(ValueError) as err:
        CachedConditioningDataset(tmp_path / "cache", expect=bucketed)
    msg = str(err.value)
    assert "data.images.buckets=false" in msg and "data.images.buckets=true" in msg and "Rebuild" in msg and "data.cache_dir" in msg
    with pytest.raises(ValueError, match=r"data.images.resolution=128.*data.images.resolution=256"):
        _loader(tmp_path / "cache", ImageDataConfig(sources=[str(bucket_folder)], resolution=256), grid)
    with pytest.raises(ValueError, match="data.images.buckets=true"):  # nor is it overwritten with other settings
        build_cache(build_index(bucketed, grid.pixels)[0], _cache_cfg(bucketed, tmp_path / "cache"), davae.encode, text, grid=grid)
    CachedConditioningDataset(tmp_path / "cache", expect=square)  # the settings it was built with are fine
    # a version-1 cache (one square shape, no settings recorded) is refused with the rebuild command
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    (tmp_path / "cache" / "index.json").write_text(json.dumps({**index, "version": 1}))
    with pytest.raises(ValueError, match=r"cache version 1.*rebuild it with python -m davae_training.stage2.caption_cache"):
        CachedConditioningDataset(tmp_path / "cache")
    # a rerun over shards written from other records (the folder changed) stops instead of mixing them
    (tmp_path / "cache" / "index.json").unlink()
    with pytest.raises(ValueError, match="the source changed since this shard was written"):
        build_cache(records[1:], _cache_cfg(square, tmp_path / "cache"), davae.encode, text, grid=grid)



def test_cache_made_by_other_text_settings_dtype_or_davae_is_refused_naming_the_setting_and_the_command(tmp_path, fixtures_dir, grid):
    """Every setting that changes a cached tensor is recorded; training from the cache refuses a config
    that asks for another (here the stand-in's token count plays T5's length; the real T5 length is
    checked in test_train_adapter.py)."""
    import davae_training.stage2.caption_cache as cc
    from davae_core.checkpoint import load_davae, save_davae
    from davae_training.config import load_config
    from davae_training.stage2.trainer import open_cache

    rng = np.random.default_rng(11)
    folder = write_png_folder(tmp_path / "imgs", [(128, 128)], 3, rng, captions=True)
    sets = [f"train.output_dir={tmp_path / 'run'}", f"model.pretrained={fixtures_dir / 'sd3_transformer'}",
            f"tokenizer.path={fixtures_dir / 'davae' / 'davae_tiny.safetensors'}", f"data.images.sources=[{folder}]",
            "data.images.resolution=128", f"data.cache_dir={tmp_path / 'cache'}", "data.cache_dtype=float32"]
    cc.main(["--config", str(TINY_CONFIG), "--device", "cpu", *[a for s in sets for a in ("--set", s)]])
    recorded = json.loads((tmp_path / "cache" / "index.json").read_text())["encoding"]
    assert recorded["text.standin_tokens"] == 8 and recorded["data.cache_dtype"] == "float32" and len(recorded["tokenizer.sha256"]) == 64

    def cfg(*more):
        return load_config(AdapterTrainConfig, TINY_CONFIG, [*sets, *more])

    assert len(open_cache(cfg(), grid.patch_size)) == 3  # the config it was built for
    assert len(open_cache(cfg("tokenizer.path=''"), grid.patch_size)) == 3  # no DA-VAE named: nothing to compare
    other_davae = load_davae(fixtures_dir / "davae" / "davae_tiny.safetensors")
    with torch.no_grad():
        next(other_davae.parameters()).add_(0.01)
    save_davae(other_davae, tmp_path / "other_davae.safetensors")
    for more, built, wanted in [
        (["text.standin_tokens=16"], "text.standin_tokens=8", "text.standin_tokens=16"),
        (["data.cache_dtype=bfloat16"], 'data.cache_dtype="float32"', 'data.cache_dtype="bfloat16"'),
        ([f"tokenizer.path={tmp_path / 'other_davae.safetensors'}"], "the DA-VAE file (tokenizer.path) with SHA-256",
         "the DA-VAE file (tokenizer.path) with SHA-256"),
    ]:
        with pytest.raises(ValueError) as err:
            open_cache(cfg(*more), grid.patch_size)
        msg = str(err.value)
        assert f"built with {built}" in msg and f"asks for {wanted}" in msg, msg
        assert "python -m davae_training.stage2.caption_cache --config CONFIG" in msg and "data.cache_dir" in msg
    # nor does a second build with other settings write over it
    with pytest.raises(ValueError, match="text.standin_tokens=16"):
        cc.main(["--config", str(TINY_CONFIG), "--device", "cpu", *[a for s in sets + ["text.standin_tokens=16"] for a in ("--set", s)]])


# ---------------------------------------------------------------------------- a run
def test_tiny_stage2_run_from_a_bucket_cache_trains_without_any_davae_encode(tmp_path, fixtures_dir, davae, text, grid, monkeypatch):
    import davae_training.stage2.conditioning as conditioning
    import davae_training.stage2.step as stage2_step
    import davae_training.stage2.trainer as ta
    from davae_core.davae_model import DAVAE
    from davae_training.config import load_config

    # into the 32-px buckets 160x96, 96x160, 128x128
    rng = np.random.default_rng(3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(9):
        h, w = [(128, 213), (213, 128), (128, 128)][i % 3]
        (folder / f"{i}.png").write_bytes(png_bytes(rng, h, w))
        (folder / f"{i}.txt").write_text(f"a picture {i}")
    images = ImageDataConfig(sources=[str(folder)], resolution=128, buckets=True)
    cache = tmp_path / "cache"
    build_cache(build_index(images, grid.pixels)[0], _cache_cfg(images, cache), davae.encode, text, sample_prompts=["a fox"], grid=grid)

    def forbidden(*a, **k):
        raise AssertionError("training from a complete cache must not load or run the DA-VAE or a text encoder")

    monkeypatch.setattr(conditioning, "load_davae_for_training", forbidden)
    monkeypatch.setattr(conditioning, "build_text_conditioner", forbidden)
    monkeypatch.setattr(DAVAE, "encode", forbidden)
    seen = []
    real_loss = stage2_step.flow_matching_loss

    def recording_loss(model_fn, latents, *a, **k):
        seen.append(tuple(latents.shape))
        return real_loss(model_fn, latents, *a, **k)

    monkeypatch.setattr(stage2_step, "flow_matching_loss", recording_loss)
    sets = [f"train.output_dir={tmp_path / 'run'}", f"model.pretrained={fixtures_dir / 'sd3_transformer'}", "tokenizer.path=''",
            f"data.images.sources=[{folder}]", "data.images.resolution=128", "data.images.buckets=true",
            "data.images.crop=center", f"data.cache_dir={cache}", "train.max_steps=4", "train.checkpoint_every=0",
            "train.image_every=0", "train.report_to=none", "train.log_every=1", "model.lora_rank=4", "model.lora_alpha=4",
            "export.enabled=false", "data.cache_dtype=float32"]
    cfg = load_config(AdapterTrainConfig, TINY_CONFIG, sets)
    try:
        summary = ta.train(cfg)
    finally:  # accelerate keeps process-wide state; leave none behind for other tests
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert summary["step"] == 4 and np.isfinite(summary["last_logged"]["loss"])
    assert len(seen) == 4 and len(set(seen)) >= 2, seen  # batches of different buckets, one shape each
    assert {s[2:] for s in seen} <= {(6, 10), (10, 6), (8, 8)}


# ---------------------------------------------------------------------------- the patch grid
def _run_settings(tmp_path, fixtures_dir, folder, *more):
    return [f"train.output_dir={tmp_path / 'run'}", f"model.pretrained={fixtures_dir / 'sd3_transformer'}",
            f"tokenizer.path={fixtures_dir / 'davae' / 'davae_tiny.safetensors'}", f"data.images.sources=[{folder}]",
            "data.images.resolution=128", "data.images.buckets=true", "train.max_steps=4", "train.checkpoint_every=0",
            "train.image_every=0", "train.report_to=none", "train.log_every=1", "model.lora_rank=4", "model.lora_alpha=4",
            "export.enabled=false", "data.cache_dtype=float32", *more]


def _train(cfg):
    import davae_training.stage2.trainer as ta

    try:
        return ta.train(cfg)
    finally:  # accelerate keeps process-wide state; leave none behind for other tests
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


# 180x140 and 140x180 land in the 16-px buckets 144x112 / 112x144 (latents 9x7 / 7x9: odd sides)
ODD_ON_16 = [(140, 180), (180, 140), (128, 213)]


@pytest.mark.parametrize("source", ["pixels", "cache"])
def test_bucket_stage2_run_where_16px_buckets_have_odd_latents_trains_on_even_latent_sides(
        tmp_path, fixtures_dir, davae, text, grid, monkeypatch, source):
    import davae_training.stage2.step as stage2_step
    from davae_training.config import load_config
    from davae_training.data.buckets import nearest_bucket

    on16 = make_buckets(128, grid=16)
    odd = [on16[nearest_bucket(w, h, on16)] for h, w in ODD_ON_16[:2]]
    assert all((w // 16) % 2 or (h // 16) % 2 for w, h in odd), odd  # the grid stage 1 uses would break stage 2 here
    rng = np.random.default_rng(5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(9):
        h, w = ODD_ON_16[i % 3]
        (folder / f"{i}.png").write_bytes(png_bytes(rng, h, w))
        (folder / f"{i}.txt").write_text(f"a picture {i}")
    more = ["data.images.crop=center"]
    if source == "cache":
        images = ImageDataConfig(sources=[str(folder)], resolution=128, buckets=True)
        build_cache(build_index(images, grid.pixels)[0], _cache_cfg(images, tmp_path / "cache"), davae.encode, text, grid=grid)
        more.append(f"data.cache_dir={tmp_path / 'cache'}")
    seen = []
    real_loss = stage2_step.flow_matching_loss

    def recording_loss(model_fn, latents, *a, **k):
        out = model_fn(latents, torch.full((latents.shape[0],), 500.0))
        seen.append((tuple(latents.shape), tuple(out.shape)))
        return real_loss(model_fn, latents, *a, **k)

    monkeypatch.setattr(stage2_step, "flow_matching_loss", recording_loss)
    summary = _train(load_config(AdapterTrainConfig, TINY_CONFIG, _run_settings(tmp_path, fixtures_dir, folder, *more)))
    assert summary["step"] == 4 and np.isfinite(summary["last_logged"]["loss"])
    assert len(seen) == 4 and len({s for s, _ in seen}) >= 2, seen  # batches of different buckets
    for shape, out in seen:
        assert shape[2] % 2 == 0 and shape[3] % 2 == 0, shape  # whole 2x2 patches
        assert out == shape  # the transformer gives back the latent's shape
    assert {s[2:] for s, _ in seen} <= {(8, 8), (6, 10)}  # buckets 128x128 and 160x96


def test_bucket_grid_latents_off_the_patch_grid_are_refused_naming_the_shape_and_the_fix(
        tmp_path, fixtures_dir, davae, text, grid):
    from diffusers import SD3Transformer2DModel

    from davae_training.config import load_config
    from davae_training.stage2.model import AdapterModelConfig, prepare_adapter_model
    from davae_training.stage2.sampler import sample_latents

    # what the checks prevent: diffusers' SD3 silently returns a smaller latent for odd sides
    stock = SD3Transformer2DModel(**TINY_TRANSFORMER_CONFIG).eval()
    odd = torch.randn(1, 16, 3, 6)
    args = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 8, 64), pooled_projections=torch.randn(1, 32))
    with torch.no_grad():
        assert stock(hidden_states=odd, **args, return_dict=False)[0].shape == (1, 16, 2, 6)
    # the stage-2 model refuses it
    model = prepare_adapter_model(SD3Transformer2DModel(**TINY_TRANSFORMER_CONFIG), AdapterModelConfig(lora_rank=2, lora_alpha=2))
    with pytest.raises(ValueError, match=r"\(1, 32, 3, 6\).*patch size 2.*height 2 or 4.*32 px for SD3"):
        model(hidden_states=torch.randn(1, 32, 3, 6), **args)
    assert model(hidden_states=torch.randn(1, 32, 4, 6), **args, return_dict=False)[0].shape == (1, 32, 4, 6)
    # so does the sampler, before drawing any noise
    with pytest.raises(ValueError, match=r"sample_latents\(latent_shape\).*\(32, 5, 5\)"):
        sample_latents(model, args["encoder_hidden_states"], args["pooled_projections"], torch.zeros(8, 64), torch.zeros(32),
                       (32, 5, 5), 2, 2.0, 3.0, torch.Generator().manual_seed(0))
    # a run whose sample grids or training crops would be off the grid stops before its first step
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(png_bytes(np.random.default_rng(0), 128, 128))
    for setting in ("sampling.resolution", "data.images.resolution"):
        cfg = load_config(AdapterTrainConfig, TINY_CONFIG, _run_settings(tmp_path, fixtures_dir, folder, "train.image_every=2",
                                                                         "data.images.buckets=false", f"{setting}=80"))
        with pytest.raises(ValueError, match=rf"{setting}=80 is not a multiple of 32 px.*Use 64 or 96"):
            _train(cfg)
        assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()
    # a cache on the 16-px grid (what stage 1's buckets would give) is refused when training opens it
    images = ImageDataConfig(sources=[str(folder)], resolution=128, buckets=True)
    for h, w in ODD_ON_16[:2]:
        (folder / f"{w}x{h}.png").write_bytes(png_bytes(np.random.default_rng(1), h, w))
    build_cache(build_index(images, 16)[0], _cache_cfg(images, tmp_path / "cache16"), davae.encode, text,
                grid=LatentGrid(davae.layout.factor, 1))
    with pytest.raises(ValueError, match=r"bucket 112x144: latent of shape \(32, 9, 7\).*patch size 2.*multiples of 32 px.*width 96 or 128, height 128 or 160"):
        CachedConditioningDataset(tmp_path / "cache16", patch_size=grid.patch_size)
    with pytest.raises(ValueError, match=r"multiples of 16 px.*but the config asks for.*multiples of 32 px.*Rebuild"):
        CachedConditioningDataset(tmp_path / "cache16", expect=images, patch_size=grid.patch_size)
    # and a cache cannot be built off the grid either
    with pytest.raises(ValueError, match=r"data.images.resolution=80 is not a multiple of 32 px"):
        build_cache([], _cache_cfg(ImageDataConfig(sources=[str(folder)], resolution=80), tmp_path / "c80"), davae.encode, text, grid=grid)


def test_bucket_cache_command_takes_its_grid_from_the_davae_and_the_transformer(tmp_path, fixtures_dir, grid):
    """``python -m davae_training.stage2.caption_cache``: the bucket grid is the DA-VAE file's factor
    times the patch size in model.pretrained (a diffusers folder or a single file), not a constant."""
    import davae_training.stage2.caption_cache as cc
    from davae_training.stage2.model import read_patch_size

    assert read_patch_size(fixtures_dir / "sd3_transformer") == 2
    assert read_patch_size(fixtures_dir / "checkpoints" / "sd3_tiny.safetensors") == 2
    rng = np.random.default_rng(7)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate(ODD_ON_16):
        (folder / f"{i}.png").write_bytes(png_bytes(rng, h, w))
    sets = [f"train.output_dir={tmp_path / 'run'}", f"model.pretrained={fixtures_dir / 'checkpoints' / 'sd3_tiny.safetensors'}",
            f"tokenizer.path={fixtures_dir / 'davae' / 'davae_tiny.safetensors'}", f"data.images.sources=[{folder}]",
            "data.images.resolution=128", "data.images.buckets=true", f"data.cache_dir={tmp_path / 'cache'}", "data.cache_dtype=float32"]
    cc.main(["--config", str(TINY_CONFIG), "--device", "cpu", *[a for s in sets for a in ("--set", s)]])
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["settings"]["bucket_grid"] == grid.pixels == 32 and (index["latent_factor"], index["patch_size"]) == (16, 2)
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in index["buckets"])
    assert all(shape[1] % 2 == 0 and shape[2] % 2 == 0 for shape in index["latent_shapes"].values())
    with pytest.raises(ValueError, match="model.pretrained is empty"):
        cc.main(["--config", str(TINY_CONFIG), "--device", "cpu", *[a for s in sets + ["model.pretrained=''"] for a in ("--set", s)]])
