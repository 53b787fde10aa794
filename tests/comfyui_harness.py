"""pytest face of :mod:`davae_training.comfyui_runner` (the in-process ComfyUI runner).

Everything is the runner's; only "ComfyUI is not there" differs: a skip that says why, or a
failure when ``DAVAE_REQUIRE_COMFYUI=1`` (CI sets it, so no ComfyUI test is skipped there).
ComfyUI's own environment may not have this repository installed, so ``davae_training`` is
registered from ``training/`` when it cannot be imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _import_davae_training():
    try:
        import davae_training  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "davae_training", REPO / "training" / "__init__.py", submodule_search_locations=[str(REPO / "training")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["davae_training"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("davae_training.comfyui_runner")


runner = _import_davae_training()
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
