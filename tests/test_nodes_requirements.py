"""Installing requirements.txt into ComfyUI's environment moves none of its libraries.

Runs ``pip install --dry-run --report`` with the interpreter that runs the tests (in CI: the
ComfyUI environment) and reads what pip would install.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST_CORE = {"torch", "transformers", "huggingface-hub", "huggingface_hub", "tokenizers", "safetensors", "numpy"}


@pytest.mark.comfyui
def test_installing_requirements_leaves_host_libraries_unchanged():
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "-r", str(REPO / "requirements.txt")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    would_install = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    moved = {name: v for name, v in would_install.items() if name in HOST_CORE or name.startswith(("diffusers", "peft", "accelerate"))}
    assert not moved, f"pip install -r requirements.txt would install/upgrade {moved}"
