"""Importing the training package from a checkout that pip never installed (ComfyUI's environment,
a bare GPU machine): ``training/`` registered under its installed name, ``davae_training``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def register_davae_training() -> None:
    """Make ``import davae_training`` work; a no-op where it already does (an installed checkout)."""
    if importlib.util.find_spec("davae_training") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "davae_training", REPO / "training" / "__init__.py", submodule_search_locations=[str(REPO / "training")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["davae_training"] = module
    spec.loader.exec_module(module)
