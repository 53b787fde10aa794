"""data.format (folder | webdataset | hf) and data.buckets: corrupt samples, one shape per batch, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from davae_training.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from davae_training.data.images import ImageDataConfig
from davae_training.data.loader import make_training_loader
from davae_training.data.streams import StreamingBatches
from image_samples import png_bytes, write_png_folder, write_tar_shards


# (height, width): two landscape, two portrait, two square shapes
SHAPES = [(64, 128), (64, 112), (128, 64), (112, 64), (80, 80), (96, 96)]


@pytest.fixture()
def shards(tmp_path):
    """shard-000.tar (plain) and shard-001.tar.gz (gzip), 8 samples each, one corrupt per shard."""
    write_tar_shards(tmp_path, SHAPES, np.random.default_rng(0))
    return tmp_path


def _keys(batches, n):
    return [tuple(b["key"]) for b in itertools.islice(batches, n)]


def test_bucket_shapes_are_multiples_of_16_near_the_training_area():
    buckets = make_buckets(256, max_aspect=2.0)
    assert (256, 256) in buckets
    assert any(w > h for w, h in buckets) and any(h > w for w, h in buckets)
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert max(w, h) / min(w, h) <= 2.0
        assert abs(w * h - 256 * 256) <= 16 * max(w, h)  # within one grid step of the area
    assert buckets[nearest_bucket(1920, 1080, buckets)][0] > buckets[nearest_bucket(1920, 1080, buckets)][1]
    with pytest.raises(ValueError, match="multiple of 16"):
        make_buckets(250)


def test_bucket_sampler_gives_one_bucket_per_batch_splits_ranks_and_resumes_exactly():
    bucket_of = [i % 3 for i in range(30)]
    full = BucketBatchSampler(bucket_of, 4, seed=1)
    first = list(itertools.islice(iter(full), 12))  # several epochs (6 batches per epoch)
    for batch in first:
        assert len(batch) == 4 and len({bucket_of[k % 30] for k in batch}) == 1
    assert [k % 30 for b in first[:6] for k in b] != [k % 30 for b in first[6:] for k in b]  # reshuffled per epoch
    resumed = list(itertools.islice(iter(BucketBatchSampler(bucket_of, 4, seed=1, start_micro_batch=5)), 7))
    assert resumed == first[5:]
    r0 = list(itertools.islice(iter(BucketBatchSampler(bucket_of, 4, seed=1, rank=0, world_size=2)), 3))
    r1 = list(itertools.islice(iter(BucketBatchSampler(bucket_of, 4, seed=1, rank=1, world_size=2)), 3))
    assert r0 == first[0:6:2] and r1 == first[1:6:2]
    with pytest.raises(ValueError, match="full micro-batch"):
        BucketBatchSampler([0, 1, 2], 2)


def test_bucket_folder_loader_batches_share_one_multiple_of_16_shape(tmp_path):
    folder = write_png_folder(tmp_path / "imgs", SHAPES, 12, np.random.default_rng(0))
    cfg = ImageDataConfig(sources=[str(folder)], resolution=64, buckets=True, index_cache=str(tmp_path / "index.json"))
    batches = list(itertools.islice(iter(make_training_loader(cfg, batch_size=2, seed=0)), 8))
    shapes = {tuple(b["pixels"].shape[-2:]) for b in batches}
    assert len(shapes) >= 2, shapes  # landscape and portrait images land in different buckets
    for h, w in shapes:
        assert h % 16 == 0 and w % 16 == 0 and abs(h * w - 64 * 64) <= 16 * 64 * 2
    resumed = _keys(iter(make_training_loader(cfg, batch_size=2, seed=0, start_micro_batch=3)), 5)
    assert resumed == [tuple(b["key"]) for b in batches[3:8]]


@pytest.mark.parametrize("grid", [16, 32], ids=["stage1_grid", "stage2_grid"])
def test_bucket_folder_index_keeps_images_that_cover_their_bucket_as_the_streams_do(tmp_path, grid):
    """With buckets, a wide image whose short side is below data.resolution is kept when it covers
    its bucket (the streamed formats' rule); square crops keep skipping it."""
    from davae_training.data.buckets import admit
    from davae_training.data.images import ImageDataset, build_index, load_or_build_index
    from davae_training.data.streams import sample_pixels

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"wide": (96, 192), "tall": (192, 96), "square": (128, 128), "small_square": (96, 96), "small_wide": (60, 100)}
    for name, (h, w) in sizes.items():
        (folder / f"{name}.png").write_bytes(png_bytes(rng, h, w))
    index = str(tmp_path / "index.json")
    cfg = ImageDataConfig(sources=[str(folder)], resolution=128, buckets=True, index_cache=index)
    records, report = load_or_build_index(cfg, bucket_grid=grid)
    assert sorted(r.key for r in records) == ["square", "tall", "wide"]
    assert report.skipped_too_small == 2 and report.kept == 3
    # the one rule: whatever the stream would crop, the index keeps, and nothing else
    buckets = make_buckets(128, grid=grid)
    for name, (h, w) in sizes.items():
        img = Image.new("RGB", (w, h))
        pixels, _, b = sample_pixels(img, cfg, buckets, np.random.default_rng(0))
        assert (pixels is not None) == (name in {"square", "tall", "wide"}) == (admit(w, h, buckets)[0] >= 0), name
    # the kept 96-px-tall image trains at its bucket's shape
    data = ImageDataset(records, cfg, bucket_grid=grid)
    wide = next(i for i, r in enumerate(records) if r.key == "wide")
    bw, bh = data.buckets[data.bucket_of_record[wide]]
    assert data[wide]["pixels"].shape == (3, bh, bw) and bh <= 96 and bw % grid == 0 and bh % grid == 0
    # square crops still need a short side of data.resolution; the cached index is not reused for them
    square = ImageDataConfig(sources=[str(folder)], resolution=128, index_cache=index)
    assert [r.key for r in load_or_build_index(square)[0]] == ["square"]
    # an explicit data.min_size still applies on top of the bucket rule
    strict = ImageDataConfig(sources=[str(folder)], resolution=128, buckets=True, min_size=128)
    assert [r.key for r in build_index(strict, grid)[0]] == ["square"]


def test_webdataset_reads_plain_and_gzip_shards_skips_and_counts_corrupt_samples(shards, caplog):
    cfg = ImageDataConfig(sources=[str(shards / "shard-000.tar"), str(shards / "shard-{001..001}.tar.gz")],
                          format="webdataset", resolution=64, shuffle_buffer=4)
    stream = StreamingBatches(cfg, batch_size=2, seed=0)
    with caplog.at_level("WARNING", logger="davae_training.data"):
        batches = list(itertools.islice(iter(stream), 7))  # one epoch: 14 good samples = 7 batches
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 14
    assert {k.split(":")[0] for k in keys} == {"shard-000.tar", "shard-001.tar.gz"}
    assert not any(k.endswith("_5") for k in keys)
    assert stream.report.skipped_corrupt == 2 and int(batches[-1]["skipped"]) == 2
    assert "skipping corrupt sample" in caplog.text
    b = batches[0]
    assert b["pixels"].shape == (2, 3, 64, 64) and 0.0 <= float(b["pixels"].min()) <= float(b["pixels"].max()) <= 1.0
    assert all(c.startswith("caption ") for c in b["caption"])


def test_webdataset_truncated_shard_is_counted_not_fatal(shards):
    data = (shards / "shard-000.tar").read_bytes()
    (shards / "shard-002.tar").write_bytes(data[: len(data) // 2])  # cut mid-archive
    cfg = ImageDataConfig(sources=[str(shards / "shard-000.tar"), str(shards / "shard-002.tar")], format="webdataset",
                          resolution=64, shuffle_buffer=1)
    stream = StreamingBatches(cfg, batch_size=2, seed=0)
    batches = list(itertools.islice(iter(stream), 10))
    assert len(batches) == 10 and stream.report.skipped_corrupt >= 2


def test_webdataset_resume_replays_the_exact_order_with_buckets_ranks_and_workers(shards):
    cfg = ImageDataConfig(sources=[str(shards / "shard-000.tar"), str(shards / "shard-001.tar.gz")],
                          format="webdataset", resolution=64, buckets=True, shuffle_buffer=3)
    full = _keys(iter(make_training_loader(cfg, 2, seed=3)), 9)
    assert _keys(iter(make_training_loader(cfg, 2, seed=3, start_micro_batch=4)), 5) == full[4:]
    loader = make_training_loader(cfg, 2, seed=3, num_workers=2)
    batches = list(itertools.islice(iter(loader), 6))
    for b in batches:  # one bucket per batch
        assert b["pixels"].shape[0] == 2 and b["pixels"].shape[-1] % 16 == 0 and b["pixels"].shape[-2] % 16 == 0
    with_workers = [tuple(b["key"]) for b in batches]
    assert _keys(iter(make_training_loader(cfg, 2, seed=3, num_workers=2, start_micro_batch=3)), 3) == with_workers[3:]
    square = ImageDataConfig(sources=cfg.sources, format="webdataset", resolution=64, shuffle_buffer=3)
    # 3 batches of 2 stay within the first epoch's shard of each rank (7 good samples per shard)
    r0 = {k.split(":")[0] for b in _keys(iter(make_training_loader(square, 2, seed=3, rank=0, world_size=2)), 3) for k in b}
    r1 = {k.split(":")[0] for b in _keys(iter(make_training_loader(square, 2, seed=3, rank=1, world_size=2)), 3) for k in b}
    assert len(r0) == len(r1) == 1 and r0 != r1  # ranks read different shards


def _hf_rows(rng, n=10, corrupt=(3,)):
    return {"img": [{"bytes": b"broken" if i in corrupt else png_bytes(rng, *SHAPES[i % len(SHAPES)]), "path": None}
                    for i in range(n)],
            "prompt": [f"row {i}" for i in range(n)]}


def test_hf_dataset_saved_to_disk_named_columns_corrupt_rows_and_resume(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(_hf_rows(rng), features=datasets.Features({"img": datasets.Image(), "prompt": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = ImageDataConfig(sources=[str(tmp_path / "saved")], format="hf", resolution=64,
                          hf_image_column="img", hf_caption_column="prompt")
    stream = StreamingBatches(cfg, batch_size=3, seed=0)
    batches = list(itertools.islice(iter(stream), 6))  # 9 good rows per epoch -> 3 batches per epoch
    first_epoch = [k for b in batches[:3] for k in b["key"]]
    assert sorted(first_epoch, key=int) == [str(i) for i in range(10) if i != 3]
    assert all(c == f"row {k}" for b in batches for k, c in zip(b["key"], b["caption"]))
    assert stream.report.skipped_corrupt == 2  # row 3, once per epoch
    assert _keys(iter(make_training_loader(cfg, 3, seed=0, start_micro_batch=2)), 4) == [tuple(b["key"]) for b in batches[2:6]]
    with pytest.raises(ValueError, match="no image column 'image'"):
        StreamingBatches(ImageDataConfig(sources=[str(tmp_path / "saved")], format="hf", resolution=64), 2)


def test_hf_dataset_imagefolder_streaming_with_captions_and_buckets(tmp_path):
    pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    lines = ["file_name,text"]
    for i in range(8):
        h, w = SHAPES[i % len(SHAPES)]
        (folder / f"{i}.png").write_bytes(b"truncated" if i == 6 else png_bytes(rng, h, w))
        lines.append(f"{i}.png,picture {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    cfg = ImageDataConfig(sources=[str(folder)], format="hf", resolution=64, streaming=True, buckets=True, shuffle_buffer=4)
    stream = StreamingBatches(cfg, batch_size=1, seed=0)
    batches = list(itertools.islice(iter(stream), 8))  # the 8th comes from the next epoch: all 8 files were read
    assert sorted(c for b in batches[:7] for c in b["caption"]) == sorted(f"picture {i}" for i in range(8) if i != 6)
    assert stream.report.skipped_corrupt == 1
    assert len({tuple(b["pixels"].shape[-2:]) for b in batches}) >= 2
    again = _keys(iter(make_training_loader(cfg, 1, seed=0, start_micro_batch=2)), 6)
    assert again == [tuple(b["key"]) for b in batches[2:8]]


def test_data_format_is_checked():
    with pytest.raises(ValueError, match="data.format"):
        ImageDataConfig(sources=["x"], format="parquet")
