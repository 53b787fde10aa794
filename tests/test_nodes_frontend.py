"""The UI workflows in ComfyUI's real frontend, served by a headless ComfyUI, in headless Chromium.

Needs ``COMFYUI_PATH``, the ``playwright`` Python package and a Chromium executable
(``CHROMIUM_PATH``, else ``chromium`` on PATH; Playwright's own browser download is not
used).  The server serves the frontend ComfyUI pins (``comfyui-frontend-package``); set
``COMFYUI_FRONTEND_ROOT`` to the ``static`` folder of another frontend build to use that.
Skipped, saying which of these is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_harness as harness  # noqa: E402

pytestmark = pytest.mark.comfyui


def _missing(reason: str):
    """Skip the module, or fail it in CI (DAVAE_REQUIRE_COMFYUI=1), where nothing may be skipped."""
    if harness.REQUIRED:
        raise RuntimeError(f"DAVAE_REQUIRE_COMFYUI=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)


if not os.environ.get("COMFYUI_PATH"):
    _missing("COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the frontend check")
try:
    import playwright.sync_api as sync_api
except ImportError:
    _missing("the frontend check needs the playwright package (pip install playwright)")
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    _missing("no Chromium found: install it (apt-get install chromium) or set CHROMIUM_PATH")

NAMES = sorted(p.stem for p in harness.WORKFLOWS.glob("*.json"))

# Loads one UI workflow and reports what the frontend made of it.
CHECK_JS = """
async (wf) => {
  const registered = window.LiteGraph.registered_node_types;
  const missing = [...new Set(wf.nodes.map(n => n.type).filter(t => !(t in registered)))];
  await window.app.loadGraphData(structuredClone(wf));
  await new Promise(r => setTimeout(r, 300));
  const saved = window.app.graph.serialize();
  const widgetProblems = [], sizeProblems = [];
  for (const node of wf.nodes) {
    const live = window.app.graph.getNodeById(node.id);
    if (!live) { widgetProblems.push(`node ${node.id} (${node.type}) was not created`); continue; }
    const out = saved.nodes.find(n => n.id === node.id);
    const expected = JSON.stringify(node.widgets_values || []);
    const got = JSON.stringify(out.widgets_values || []);
    if (expected !== got) widgetProblems.push(`${node.type} #${node.id}: loaded ${expected}, frontend has ${got}`);
    // a node the frontend grows past its saved size would cover its neighbours
    if (live.size[0] > node.size[0] + 1 || live.size[1] > node.size[1] + 1)
      sizeProblems.push(`${node.type} #${node.id}: saved ${node.size}, frontend needs ${[...live.size]}`);
    for (const slot of node.inputs || []) {
      if (slot.link != null && !(live.inputs || []).some(i => i.name === slot.name && i.link != null))
        widgetProblems.push(`${node.type} #${node.id}: input ${slot.name} lost its link`);
    }
  }
  const dialogs = [...document.querySelectorAll('.p-dialog, .comfy-modal')]
    .filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 3000));
  return {missing, widgetProblems, sizeProblems, dialogs, links: saved.links.length};
}
"""


MODELS_DIALOG = "d => d.offsetParent !== null && d.innerText.toLowerCase().includes('missing models')"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(fixtures_dir, tmp_path_factory):
    root = harness.comfyui_path()
    work = tmp_path_factory.mktemp("frontend")
    custom = work / "custom_nodes"
    custom.mkdir()
    (custom / harness.PACK_NAME).symlink_to(harness.REPO, target_is_directory=True)
    fixtures = Path(fixtures_dir)
    (work / "extra_model_paths.yaml").write_text(
        "davae_test:\n"
        f"  base_path: {fixtures}\n  checkpoints: checkpoints\n  loras: loras\n  davae: davae\n"
        f"  custom_nodes: {custom}\n"
    )
    port = _free_port()
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--extra-model-paths-config", str(work / "extra_model_paths.yaml")]
    for kind in ("output", "temp", "input", "user"):
        (work / kind).mkdir()
        cmd += [f"--{kind}-directory", str(work / kind)]
    # a returning user: no first-run templates dialog over the ones the checks read
    (work / "user" / "default").mkdir(parents=True)
    (work / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    if os.environ.get("COMFYUI_FRONTEND_ROOT"):
        cmd += ["--front-end-root", os.environ["COMFYUI_FRONTEND_ROOT"]]
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/object_info/DAVAELoader", timeout=5) as r:
                    if "DAVAELoader" in json.loads(r.read()):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ComfyUI server did not come up; log:\n{(work / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(server)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph && "
                               "'DAVAELoader' in window.LiteGraph.registered_node_types", timeout=120_000)
        page.console_errors = errors
        yield page
        browser.close()


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_opens_in_the_real_frontend(page, name):
    workflow = json.loads((harness.WORKFLOWS / f"{name}.json").read_text())
    result = page.evaluate(CHECK_JS, workflow)
    assert result["missing"] == [], f"{name}: the frontend does not know these node types"
    assert result["widgetProblems"] == []
    assert result["sizeProblems"] == []
    assert result["links"] == len(workflow["links"])
    assert not [d for d in result["dialogs"] if "missing node" in d.lower()], result["dialogs"]
    # The test's model folders lack the stock SD3.5 files: the frontend offers their download
    # from the workflow's properties.models (and lists nothing else: the DA files are there).
    stock = {m["name"] for node in workflow["nodes"] for m in node.get("properties", {}).get("models", [])}
    assert stock == {"sd3.5_medium.safetensors", "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"}
    page.wait_for_function(f"[...document.querySelectorAll('.p-dialog')].some({MODELS_DIALOG})", timeout=10_000)
    offered = page.evaluate(f"[...document.querySelectorAll('.p-dialog')].filter({MODELS_DIALOG}).map(d => d.innerText)")
    assert len(offered) == 1, offered
    assert all(f in offered[0] for f in stock), offered[0]
    page.keyboard.press("Escape")  # close it before the next workflow
    page.wait_for_function(f"![...document.querySelectorAll('.p-dialog')].some({MODELS_DIALOG})", timeout=10_000)


def test_frontend_check_reports_missing_nodes_and_widget_mismatch(page):
    """The check above can fail: an unknown node type and a short widget list are both reported."""
    workflow = json.loads((harness.WORKFLOWS / "davae_t2i_1024.json").read_text())
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    sampler["widgets_values"] = sampler["widgets_values"][:-1]
    note = next(n for n in workflow["nodes"] if n["type"] == "Note")
    note["type"] = "DANoSuchNode"
    result = page.evaluate(CHECK_JS, workflow)
    assert result["missing"] == ["DANoSuchNode"]
    assert any(p.startswith(f"KSampler #{sampler['id']}") for p in result["widgetProblems"])


def test_frontend_check_reports_a_node_saved_smaller_than_it_draws(page):
    workflow = json.loads((harness.WORKFLOWS / "davae_t2i_1024.json").read_text())
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    sampler["size"] = [sampler["size"][0], 40]
    result = page.evaluate(CHECK_JS, workflow)
    assert any(p.startswith(f"KSampler #{sampler['id']}") for p in result["sizeProblems"])
