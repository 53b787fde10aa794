"""pytest face of :mod:`davae_testing.comfyui_runner` (the in-process ComfyUI runner).

Everything is the runner's; only "ComfyUI is not there" differs: a skip that says why, or a
failure when ``DAVAE_REQUIRE_COMFYUI=1`` (CI sets it, so no ComfyUI test is skipped there).
``davae_testing`` is importable from the checkout (``tests/conftest.py``).  ComfyUI's own
environment does not have this repository installed, so ``davae_training`` (which the MMDiT
parity test imports) is registered from ``training/`` when it cannot be imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from davae_testing import comfyui_runner as runner

REPO = Path(__file__).resolve().parents[1]


def _register_davae_training() -> None:
    if importlib.util.find_spec("davae_training") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "davae_training", REPO / "training" / "__init__.py", submodule_search_locations=[str(REPO / "training")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["davae_training"] = module
    spec.loader.exec_module(module)


_register_davae_training()
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
