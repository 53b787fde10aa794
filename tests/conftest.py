"""Shared fixtures: tiny random-weight models in the real architectures (no downloads here)."""

from __future__ import annotations

import pytest
import torch

from davae_core import DAVAE, tiny_vae_config
from davae_core.fixtures import tiny_vae, write_fixtures


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory):
    """The files `python -m davae_core.fixtures` writes, made once per test session."""
    out = tmp_path_factory.mktemp("fixtures")
    write_fixtures(out, seed=0)
    return out


@pytest.fixture(scope="session")
def base_vae():
    return tiny_vae(seed=0)


@pytest.fixture(scope="session")
def davae(base_vae):
    torch.manual_seed(1)
    return DAVAE.from_base_vae(base_vae).eval()


@pytest.fixture(scope="session")
def flat_davae():
    """No mid-block attention: for large images, where attention over every cell is too slow on CPU."""
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return DAVAE.from_base_vae(AutoencoderKL(**tiny_vae_config(attention=False))).eval()
