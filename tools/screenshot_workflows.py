"""Screenshots of the shipped UI workflows as ComfyUI's real frontend draws them, at 1600x1000.

    python tools/screenshot_workflows.py /path/to/ComfyUI OUT_DIR [--sizes]

Starts a headless ComfyUI (CPU) with this pack linked into a scratch ``custom_nodes`` folder and
empty placeholder files under the names the workflows use (so the file lists hold them and no
missing-model dialog opens), opens each workflow in headless Chromium with its saved view and
writes ``OUT_DIR/NAME.png``.  ``--sizes`` also prints the size the frontend gives each node, next
to the size the workflow saves, which is how the builder's node sizes were chosen.

Needs the ``playwright`` package, a Chromium (``CHROMIUM_PATH`` or ``chromium`` on PATH) and a
Python in which that ComfyUI starts (its requirements, torchvision included).  The thumbnails
in ``example_workflows/NAME.jpg`` are these screenshots at 1200x750.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_workflows  # noqa: E402

# Where each placeholder goes (folder name under the scratch models dir).
PLACEHOLDERS = {
    "checkpoints": [build_workflows.CKPT],
    "text_encoders": list(build_workflows.CLIPS),
    "loras": [build_workflows.LORA_1024, build_workflows.LORA_2048],
    "davae": [build_workflows.DA_VAE, build_workflows.HEADS_1024, build_workflows.HEADS_2048],
}

SIZES_JS = """
() => window.app.graph._nodes.map(n => ({id: n.id, type: n.type, pos: [...n.pos], size: [...n.size],
                                        min: [...n.computeSize()], title_h: window.LiteGraph.NODE_TITLE_HEIGHT}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_comfyui(comfyui: Path, work: Path) -> tuple[subprocess.Popen, str]:
    custom = work / "custom_nodes"
    custom.mkdir()
    (custom / "comfyui_davae").symlink_to(REPO, target_is_directory=True)
    models = work / "models"
    for folder, names in PLACEHOLDERS.items():
        (models / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (models / folder / name).touch()
    # ComfyUI's own input/ holds example.png, which the image-to-image workflow loads.
    (work / "input").mkdir()
    example = comfyui / "input" / "example.png"
    if example.exists():
        shutil.copy(example, work / "input" / "example.png")
    (work / "extra_model_paths.yaml").write_text(
        "screenshots:\n"
        f"  base_path: {models}\n  checkpoints: checkpoints\n  text_encoders: text_encoders\n"
        f"  loras: loras\n  davae: davae\n  custom_nodes: {custom}\n"
    )
    # a returning user: no first-run templates dialog over the graph
    settings = work / "user" / "default"
    settings.mkdir(parents=True)
    (settings / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    port = _free_port()
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--extra-model-paths-config", str(work / "extra_model_paths.yaml")]
    for kind in ("output", "temp", "input", "user"):
        (work / kind).mkdir(exist_ok=True)
        cmd += [f"--{kind}-directory", str(work / kind)]
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/object_info/DAVAELoader", timeout=5) as r:
                if "DAVAELoader" in json.loads(r.read()):
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.close()
            sys.exit(f"ComfyUI did not come up; its log ends:\n{(work / 'server.log').read_text()[-3000:]}")
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comfyui", type=Path, help="ComfyUI checkout (its main.py)")
    parser.add_argument("out", type=Path, help="folder for NAME.png")
    parser.add_argument("--sizes", action="store_true", help="print frontend vs saved node sizes")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("no Chromium found: install it (apt-get install chromium) or set CHROMIUM_PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start_comfyui(args.comfyui, Path(tmp))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(url)
                page.wait_for_function("window.app && window.app.graph && window.LiteGraph && "
                                       "'DAVAELoader' in window.LiteGraph.registered_node_types", timeout=120_000)
                page.wait_for_timeout(2000)
                page.keyboard.press("Escape")  # a first-run dialog, if any
                for path in sorted(WORKFLOWS.glob("*.json")):
                    workflow = json.loads(path.read_text())
                    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
                    page.wait_for_timeout(1500)
                    page.screenshot(path=str(args.out / f"{path.stem}.png"))
                    print(f"wrote {args.out / (path.stem + '.png')}")
                    if args.sizes:
                        saved = {n["id"]: n for n in workflow["nodes"]}
                        for n in page.evaluate(SIZES_JS):
                            print(f"  {n['type']:26s} #{n['id']:<3} frontend size {n['size']} min {n['min']} "
                                  f"saved {saved[n['id']]['size']}")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
