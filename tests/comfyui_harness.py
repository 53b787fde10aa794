"""pytest face of :mod:`davae_testing.comfyui_runner` (the in-process ComfyUI runner).

Everything is the runner's; only "ComfyUI is not there" differs: a skip that says why, or a
failure when ``DAVAE_REQUIRE_COMFYUI=1`` (CI sets it, so no ComfyUI test is skipped there).
``davae_testing`` is importable from the checkout (``tests/conftest.py``).  ComfyUI's own
environment does not have this repository installed, so ``davae_training`` (which the MMDiT
parity test imports) is registered from ``training/`` when it cannot be imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from davae_testing import comfyui_runner as runner
from davae_testing.checkout import register_davae_training

REPO = Path(__file__).resolve().parents[1]
register_davae_training()
REQUIRED = os.environ.get("DAVAE_REQUIRE_COMFYUI") == "1"


def unavailable(reason: str):
    """Skip, or fail in CI (``DAVAE_REQUIRE_COMFYUI=1``), naming what is missing."""
    if REQUIRED:
        pytest.fail(f"DAVAE_REQUIRE_COMFYUI=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def comfyui_path() -> Path:
    try:
        return runner.comfyui_path()
    except runner.ComfyUIUnavailable as e:
        unavailable(f"{e}; the ComfyUI integration tests need it")


def __getattr__(name: str):
    return getattr(runner, name)  # boot, run_prompt, to_fixture_prompt, WORKFLOWS, PACK_NAME, ...
