"""The demo's ComfyUI step: run the shipped 1024 workflow headlessly on the tiny fixtures.

ComfyUI usually lives in its own Python environment, so the run happens in a child process
with ``COMFYUI_PYTHON`` (default: this interpreter), through ``davae_testing/comfyui_runner.py``,
the in-process runner the integration tests use too (ComfyUI's own ``validate_prompt`` and
``PromptExecutor``, the pack loaded as a custom node, text encoders and the stock SD3 VAE
replaced by the fixtures' stand-ins, sizes divided by 4).  The fixtures are written here,
in this environment; the child needs only ComfyUI's environment.  The runner is test
scaffolding that lives in the repository checkout only (not installed, not in the Comfy Registry
package): without it this step says so instead of running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # training/demo/ -> the repository (the node pack)
RUNNER = REPO / "davae_testing" / "comfyui_runner.py"
WORKFLOW = "davae_t2i_1024"

_CHILD = r"""
import importlib.util, json, shutil, sys
from pathlib import Path
out, fixtures = Path(sys.argv[2]), Path(sys.argv[4])
spec = importlib.util.spec_from_file_location("davae_comfyui_runner", sys.argv[1])
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
runner.boot(fixtures)
outputs = runner.run_prompt(runner.to_fixture_prompt(runner.load_api_workflow(sys.argv[3])))
folders = {"output": runner._state["folder_paths"].get_output_directory(),
           "temp": runner._state["folder_paths"].get_temp_directory()}
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
    from davae_core.fixtures import write_fixtures

    if not RUNNER.is_file():
        return {"workflow": WORKFLOW, "skipped": f"{RUNNER} is missing: the ComfyUI step needs the repository checkout "
                "(git clone), which holds the test runner"}
    out.mkdir(parents=True, exist_ok=True)
    fixtures = out / "fixtures"
    write_fixtures(fixtures)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    proc = subprocess.run([python, "-c", _CHILD, str(RUNNER), str(out), WORKFLOW, str(fixtures)], capture_output=True, text=True,
                          env=env, cwd=out, timeout=timeout)
    (out / "comfyui.log").write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("DEMO_COMFYUI_RESULT "):
            result = json.loads(line.split(" ", 1)[1])
            return {"workflow": WORKFLOW, "image": result["images"][0] if result["images"] else None, **result}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"workflow": WORKFLOW, "error": f"ComfyUI run failed (exit {proc.returncode}); see {out / 'comfyui.log'}",
            "last_lines": tail}
