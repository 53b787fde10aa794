"""Image folders and WebDataset shards: skipping bad data, captions, determinism, resumable order."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from davae_training.data.images import (
    ImageDataConfig,
    ImageDataset,
    ResumableSampler,
    build_index,
    expand_braces,
    load_or_build_index,
    make_dataloader,
)


def _png_bytes(rng, h, w) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"good{i}.png").write_bytes(_png_bytes(rng, 48, 40 + 8 * i))
    (folder / "sub" / "nested.png").write_bytes(_png_bytes(rng, 40, 40))
    (folder / "good0.txt").write_text("a red square\n")
    (folder / "small.png").write_bytes(_png_bytes(rng, 20, 64))  # short side 20 < 32
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg" * 4)
    (folder / "notes.md").write_text("not an image, ignored")
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [
            ("s0.png", _png_bytes(rng, 36, 36)), ("s0.txt", b"caption zero"),
            ("s1.png", _png_bytes(rng, 16, 16)),  # too small
            ("s2.png", b"garbage bytes"),  # unreadable
            ("s3.png", _png_bytes(rng, 33, 50)), ("s3.json", b'{"caption": "from json"}'),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tmp_path


def test_corrupt_and_small_images_are_skipped_and_counted(data_dir):
    cfg = ImageDataConfig(sources=[str(data_dir / "images"), str(data_dir / "shard-{000..000}.tar")], resolution=32)
    records, report = build_index(cfg)
    keys = sorted(r.key for r in records)
    assert keys == ["good0", "good1", "good2", "shard-000.tar/s0", "shard-000.tar/s3", "sub/nested"]
    assert report.kept == 6
    assert report.skipped_too_small == 2 and report.skipped_unreadable == 2
    assert any("small.png" in n for n in report.too_small)
    assert any("corrupt.jpg" in n for n in report.unreadable) and any("s2.png" in n for n in report.unreadable)


def test_truncated_image_is_replaced_at_read_time(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        (tmp_path / f"ok{i}.png").write_bytes(_png_bytes(rng, 40, 40))
    (tmp_path / "trunc.png").write_bytes(_png_bytes(rng, 40, 40)[:120])  # header intact, data cut
    cfg = ImageDataConfig(sources=[str(tmp_path)], resolution=32, crop="center")
    records, report = build_index(cfg)
    assert report.kept == 3  # the header scan cannot tell
    ds = ImageDataset(records, cfg, seed=0)
    trunc = [i for i, r in enumerate(records) if r.key == "trunc"][0]
    item = ds[trunc]
    assert item["key"] != "trunc" and ds.read_failures == 1
    # verify_images catches it during the scan instead
    records, report = build_index(ImageDataConfig(sources=[str(tmp_path)], resolution=32, verify_images=True))
    assert report.kept == 2 and report.skipped_unreadable == 1


def test_items_captions_and_crop_determinism(data_dir):
    cfg = ImageDataConfig(sources=[str(data_dir / "images"), str(data_dir / "shard-000.tar")], resolution=32)
    records, _ = build_index(cfg)
    ds = ImageDataset(records, cfg, seed=3)
    by_key = {r.key: i for i, r in enumerate(records)}
    item = ds[by_key["good0"]]
    assert item["pixels"].shape == (3, 32, 32) and item["pixels"].dtype == torch.float32
    assert 0.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
    assert item["caption"] == "a red square"
    assert ds[by_key["shard-000.tar/s0"]]["caption"] == "caption zero"
    assert ds[by_key["shard-000.tar/s3"]]["caption"] == "from json"
    assert ds[by_key["good1"]]["caption"] == ""
    # same (seed, epoch, index) -> same crop; another epoch or seed -> another crop of a larger image
    k = by_key["good2"]  # 56 x 48 image, room to move
    assert torch.equal(ds[k]["pixels"], ImageDataset(records, cfg, seed=3)[k]["pixels"])
    crops = {ds[k + e * len(ds)]["pixels"].sum().item() for e in range(6)}
    assert len(crops) > 1


def test_sampler_resumes_exactly_and_splits_ranks():
    full = ResumableSampler(7, batch_size=2, seed=5)
    it = iter(full)
    stream = [next(it) for _ in range(40)]
    # restarting at micro-batch 6 continues the same stream
    it2 = iter(ResumableSampler(7, batch_size=2, seed=5, start_micro_batch=6))
    assert [next(it2) for _ in range(28)] == stream[12:]
    # each epoch is a permutation of all records
    assert sorted(k % 7 for k in stream[:7]) == list(range(7))
    assert all(k // 7 == 1 for k in stream[7:14])
    # two ranks interleave the single-process stream's micro-batches
    r0, r1 = iter(ResumableSampler(7, 2, seed=5, rank=0, world_size=2)), iter(ResumableSampler(7, 2, seed=5, rank=1, world_size=2))
    a, b = [next(r0) for _ in range(4)], [next(r1) for _ in range(4)]
    assert a == stream[0:2] + stream[4:6] and b == stream[2:4] + stream[6:8]
    # another seed, another order
    assert list(ResumableSampler(7, 7, seed=6)._permutation(0)) != list(full._permutation(0))


def test_dataloader_batches_and_index_cache(data_dir, tmp_path):
    cache = tmp_path / "cache" / "index.json"
    cfg = ImageDataConfig(sources=[str(data_dir / "images")], resolution=32, index_cache=str(cache))
    records, report = load_or_build_index(cfg)
    assert cache.is_file()
    # new files after the first scan do not change the cached index (a resumed run sees the same data)
    (data_dir / "images" / "late.png").write_bytes(_png_bytes(np.random.default_rng(9), 40, 40))
    again, _ = load_or_build_index(cfg)
    assert [r.key for r in again] == [r.key for r in records]
    loader = make_dataloader(ImageDataset(records, cfg, seed=0), ResumableSampler(len(records), 3, seed=0), num_workers=0)
    batch = next(iter(loader))
    assert batch["pixels"].shape == (3, 3, 32, 32) and len(batch["caption"]) == 3 and len(batch["key"]) == 3


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_index(ImageDataConfig(sources=[str(tmp_path / "missing")], resolution=32))
    (tmp_path / "tiny.png").write_bytes(_png_bytes(np.random.default_rng(0), 8, 8))
    with pytest.raises(ValueError, match="no usable images"):
        build_index(ImageDataConfig(sources=[str(tmp_path)], resolution=32))
    with pytest.raises(ValueError, match="crop"):
        ImageDataConfig(sources=[], crop="diagonal")


def test_expand_braces_keeps_padding():
    assert expand_braces("d/s-{008..011}.tar") == ["d/s-008.tar", "d/s-009.tar", "d/s-010.tar", "d/s-011.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_upscale_small_admits_and_scales_up_images_below_the_resolution(tmp_path):
    """ImageNet at 512: most images are smaller; with data.upscale_small they are scaled up, not skipped."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / "large.png")
    plain = ImageDataConfig(sources=[str(tmp_path)], resolution=64, resize_short_side=True)
    assert [r.key for r in build_index(plain)[0]] == ["large"]
    up = ImageDataConfig(sources=[str(tmp_path)], resolution=64, resize_short_side=True, upscale_small=True)
    records = build_index(up)[0]
    assert sorted(r.key for r in records) == ["large", "small"]
    small = ImageDataset(records, up)[[r.key for r in records].index("small")]
    assert small["pixels"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="resize_short_side"):
        ImageDataConfig(sources=[str(tmp_path)], resolution=64, upscale_small=True)
