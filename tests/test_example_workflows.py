"""The shipped UI workflows read at a glance: nothing overlaps, data flows left to right, the
Note stands beside the graph and the saved view shows all of it in a 1600x1000 window.

Pure JSON, no ComfyUI: the geometry is the frontend's (LiteGraph draws a node's title bar
above its ``pos``; it draws graph point p at ``(p + ds.offset) * ds.scale`` on screen).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))

TITLE_H = 30            # LiteGraph.NODE_TITLE_HEIGHT in the ComfyUI frontend
GROUP_TITLE_H = 34      # a group's title strip (font 24 plus padding)
WINDOW = (1600, 1000)
# Frontend chrome over the canvas (0.8.0): left sidebar, tabs + workflow name + Run bar on top, bottom canvas controls.
CLEAR = (48, 95, WINDOW[0], WINDOW[1] - 40)
MINIMAP = (1340, 740, WINDOW[0], WINDOW[1])  # 0.8.0's frontend shows a minimap bottom right


def node_box(node: dict) -> tuple[float, float, float, float]:
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_H, x + w, y + h


def group_box(group: dict) -> tuple[float, float, float, float]:
    x, y, w, h = group["bounding"]
    return x, y, x + w, y + h


def _intersect(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def layout_problems(wf: dict) -> list[str]:
    """Everything that would make the graph hard to read; empty when it is clean."""
    problems = []
    nodes = wf["nodes"]
    label = {n["id"]: f"{n.get('title') or n['type']} #{n['id']}" for n in nodes}
    boxes = {n["id"]: node_box(n) for n in nodes}
    ids = list(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if _intersect(boxes[a], boxes[b]):
                problems.append(f"{label[a]} overlaps {label[b]}")
    groups = [group_box(g) for g in wf.get("groups", [])]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if _intersect(a, b):
                problems.append(f"groups {wf['groups'][groups.index(a)]['title']!r} and {wf['groups'][groups.index(b)]['title']!r} overlap")
    for n in nodes:
        for g, box in zip(wf.get("groups", []), groups):
            body = (box[0], box[1] + GROUP_TITLE_H, box[2], box[3])
            if _intersect(boxes[n["id"]], box) and not _inside(boxes[n["id"]], body):
                problems.append(f"{label[n['id']]} straddles the edge or title of group {g['title']!r}")
        if n["type"] == "Note" and any(_intersect(boxes[n["id"]], box) for box in groups):
            problems.append(f"the Note {label[n['id']]} lies over a group")
    # reading order: every link runs rightwards, or downwards inside one column
    by_id = {n["id"]: n for n in nodes}
    for _, origin, _, target, _, _ in wf["links"]:
        (sx, sy), (tx, ty) = by_id[origin]["pos"], by_id[target]["pos"]
        if not (tx > sx or (tx == sx and ty > sy)):
            problems.append(f"link {label[origin]} -> {label[target]} runs backwards")
    # the saved view
    ds = wf.get("extra", {}).get("ds")
    if not ds:
        return problems + ["no saved view (extra.ds)"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    for name, box in [(label[i], boxes[i]) for i in ids] + [(f"group {g['title']!r}", b) for g, b in zip(wf.get("groups", []), groups)]:
        screen = ((box[0] + ox) * scale, (box[1] + oy) * scale, (box[2] + ox) * scale, (box[3] + oy) * scale)
        if not _inside(screen, CLEAR):
            problems.append(f"{name} is off screen in the saved view: {tuple(round(v) for v in screen)}")
        elif _intersect(screen, MINIMAP):
            problems.append(f"{name} is under the minimap in the saved view: {tuple(round(v) for v in screen)}")
    if scale < 0.5:
        problems.append(f"saved view scale {scale} is too small to read")
    return problems


def test_every_workflow_ships_in_example_workflows():
    assert NAMES == ["davae_img2img", "davae_refine_512", "davae_t2i_1024", "davae_t2i_2048", "davae_vs_stock_1024"]
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_workflow_layout_is_clean(name):
    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    assert layout_problems(wf) == []
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    # beside the graph: left of every other node, or above/below none of them
    note = node_box(notes[0])
    assert all(note[2] <= node_box(n)[0] for n in wf["nodes"] if n["type"] != "Note" and node_box(n)[1] < note[3])


@pytest.mark.parametrize("name", NAMES)
def test_stock_loaders_say_where_to_download(name):
    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    widgets = {"CheckpointLoaderSimple": lambda n: n["widgets_values"][:1], "TripleCLIPLoader": lambda n: n["widgets_values"][:3]}
    for node in wf["nodes"]:
        if node["type"] in widgets:
            models = node["properties"]["models"]
            assert sorted(m["name"] for m in models) == sorted(widgets[node["type"]](node))
            for m in models:
                assert m["url"].startswith("https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main/")
                assert m["url"].endswith("/" + m["name"])
                assert m["directory"] == {"CheckpointLoaderSimple": "checkpoints", "TripleCLIPLoader": "text_encoders"}[node["type"]]


def test_layout_check_catches_overlap_and_a_view_that_cuts_the_graph():
    wf = json.loads((WORKFLOWS / "davae_t2i_1024.json").read_text())
    assert layout_problems(wf) == []
    moved = copy.deepcopy(wf)
    sampler = next(n for n in moved["nodes"] if n["type"] == "KSampler")
    latent = next(n for n in moved["nodes"] if n["type"] == "DAEmptyStructuredLatent")
    sampler["pos"] = [latent["pos"][0], latent["pos"][1] + latent["size"][1] + 10]  # its title bar over the latent node
    assert any("overlaps" in p for p in layout_problems(moved))
    zoomed = copy.deepcopy(wf)
    zoomed["extra"]["ds"]["scale"] *= 1.5
    assert any("off screen" in p for p in layout_problems(zoomed))
    wide = json.loads((WORKFLOWS / "davae_vs_stock_1024.json").read_text())
    wide["extra"]["ds"] = {"scale": 0.8, "offset": [87.5, 75.0]}  # its columns' bottom-right under the minimap
    assert any("minimap" in p for p in layout_problems(wide))
    backwards = copy.deepcopy(wf)
    save = next(n for n in backwards["nodes"] if n["type"] == "SaveImage")
    save["pos"] = [-600, 0]
    assert any("runs backwards" in p for p in layout_problems(backwards))
