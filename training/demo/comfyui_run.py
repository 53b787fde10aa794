"""The demo's ComfyUI step: run the shipped 1024 workflow headlessly on the tiny fixtures.

ComfyUI usually lives in its own Python environment, so the run happens in a child process
with ``COMFYUI_PYTHON`` (default: this interpreter), through the same in-process harness the
integration tests use (``tests/comfyui_harness.py``: ComfyUI's own ``validate_prompt`` and
``PromptExecutor``, the pack loaded as a custom node, text encoders and the stock SD3 VAE
replaced by the fixtures' stand-ins, sizes divided by 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = "davae_t2i_1024"

_CHILD = r"""
import json, shutil, sys
from pathlib import Path
repo, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.append(str(repo))            # davae_core; appended so ComfyUI's own 'nodes' module wins
sys.path.insert(0, str(repo / "tests"))
from davae_core.fixtures import write_fixtures
import comfyui_harness as harness
fixtures = out / "fixtures"
write_fixtures(fixtures)
harness.boot(fixtures)
outputs = harness.run_prompt(harness.to_fixture_prompt(harness.load_api_workflow(sys.argv[3])))
folders = {"output": harness._state["folder_paths"].get_output_directory(),
           "temp": harness._state["folder_paths"].get_temp_directory()}
saved = []
for ui in outputs.values():
    for image in ui.get("images", []):
        src = Path(folders[image["type"]]) / image["subfolder"] / image["filename"]
        dst = out / image["filename"]
        shutil.copyfile(src, dst)
        saved.append(str(dst))
print("DEMO_COMFYUI_RESULT " + json.dumps({"images": saved}))
"""


def run_shipped_workflow(comfyui: Path, out: Path, timeout: int = 900) -> dict[str, Any]:
    """Run ``example_workflows/api/davae_t2i_1024.json`` in ComfyUI at ``comfyui``; images land in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    proc = subprocess.run([python, "-c", _CHILD, str(REPO), str(out), WORKFLOW], capture_output=True, text=True,
                          env=env, cwd=out, timeout=timeout)
    (out / "comfyui.log").write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("DEMO_COMFYUI_RESULT "):
            result = json.loads(line.split(" ", 1)[1])
            return {"workflow": WORKFLOW, "image": result["images"][0] if result["images"] else None, **result}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"workflow": WORKFLOW, "error": f"ComfyUI run failed (exit {proc.returncode}); see {out / 'comfyui.log'}",
            "last_lines": tail}
