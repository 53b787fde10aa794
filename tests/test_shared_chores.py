"""The small chores every part of the project shares, each with one home."""

from __future__ import annotations

import json

import pytest
import torch

from davae_core.atomic_files import atomic_write, write_json_atomic, write_text_atomic
from davae_core.dtypes import dtype_from_name
from davae_core.structured_latent import SD3_SCALE, SD3_SHIFT, vae_shift_scale
from davae_training.runtime import derive_seed


def test_dtype_names():
    assert dtype_from_name("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="export.dtype: unknown dtype 'fp8'"):
        dtype_from_name("fp8", "export.dtype")


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = write_text_atomic(tmp_path / "sub" / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]  # no leftover temporary file
    write_json_atomic(target, {"b": 1, "a": [2]})
    assert json.loads(target.read_text()) == {"a": [2], "b": 1}


def test_derive_seed_is_a_pure_function_of_its_parts():
    assert derive_seed(3, 10, 0, 1) == derive_seed(3, 10, 0, 1)
    seeds = {derive_seed(3, step, micro, rank) for step in range(4) for micro in range(2) for rank in range(2)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(3, "epoch", 1) != derive_seed(4, "epoch", 1)


def test_vae_shift_scale_reads_the_config_like_diffusers():
    from diffusers import AutoencoderKL

    from davae_core.davae_model import tiny_vae_config

    sd3_like = AutoencoderKL(**{**tiny_vae_config(), "shift_factor": SD3_SHIFT, "scaling_factor": SD3_SCALE})
    assert vae_shift_scale(sd3_like.config) == (SD3_SHIFT, SD3_SCALE)
    assert vae_shift_scale({"scaling_factor": 0.18215, "shift_factor": None}) == (0.0, 0.18215)  # SD1/SDXL style
