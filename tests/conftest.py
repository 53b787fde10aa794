"""Shared fixtures: tiny random-weight models in the real architectures (no downloads here).

The ComfyUI integration tests also run in ComfyUI's own environment, which has no diffusers:
there ``DAVAE_FIXTURES_DIR`` names fixtures written beforehand (``python -m davae_core.fixtures
DIR``), and nothing here imports diffusers unless a test asks for a diffusers-built model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the test scaffolding (davae_testing) is not installed: importable from the checkout.  Appended,
# so ComfyUI's own top-level modules (``nodes``) win over this repository's folders of that name.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory):
    """The files `python -m davae_core.fixtures` writes, made once per test session."""
    given = os.environ.get("DAVAE_FIXTURES_DIR")
    if given:
        if not (Path(given) / "manifest.json").is_file():
            pytest.fail(f"DAVAE_FIXTURES_DIR={given} holds no fixtures; write them with python -m davae_core.fixtures {given}")
        return Path(given)
    from davae_core.fixtures import write_fixtures

    out = tmp_path_factory.mktemp("fixtures")
    write_fixtures(out, seed=0)
    return out


@pytest.fixture(scope="session")
def base_vae():
    from davae_core.fixtures import tiny_vae

    return tiny_vae(seed=0)


@pytest.fixture(scope="session")
def davae(base_vae):
    from davae_core import DAVAE

    torch.manual_seed(1)
    return DAVAE.from_base_vae(base_vae).eval()


@pytest.fixture(scope="session")
def flat_davae():
    """No mid-block attention: for large images, where attention over every cell is too slow on CPU."""
    from diffusers import AutoencoderKL

    from davae_core import DAVAE, tiny_vae_config

    torch.manual_seed(2)
    return DAVAE.from_base_vae(AutoencoderKL(**tiny_vae_config(attention=False))).eval()
