"""Pure parts of the node pack, without ComfyUI: latent tensor work, error messages, workflow files."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def _pack():
    """The repository as the package ComfyUI would load (relative imports into davae_core)."""
    name = "davae_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return name


@pytest.fixture(scope="module")
def ops():
    return importlib.import_module(f"{_pack()}.nodes.latent_ops")


@pytest.fixture(scope="module")
def errors():
    return importlib.import_module(f"{_pack()}.nodes.errors")


# ------------------------------------------------------------------ latent tensor work
def test_empty_structured_latent_shape(ops):
    latent = ops.empty_structured_latent("Empty Structured Latent", 1024, 768, 2)
    assert latent.shape == (2, 32, 48, 64)
    assert not latent.any()


def test_empty_latent_refuses_off_grid_sizes_with_nearest(ops, errors):
    with pytest.raises(errors.DANodeError) as e:
        ops.empty_structured_latent("Empty Structured Latent", 1000, 1024, 1)
    msg = str(e.value)
    assert msg.startswith("Empty Structured Latent: input 'width/height'")
    assert "992 or 1008" in msg and "1000x1024" in msg


def test_latent_from_base_keeps_grid_and_zero_detail(ops):
    base = torch.randn(2, 16, 64, 64)
    da = ops.latent_from_base("DA Latent From Base", base)
    assert da.shape == (2, 32, 64, 64)
    assert torch.equal(da[:, :16], base) and not da[:, 16:].any()
    assert torch.equal(ops.base_latent("DA Base Latent", da), base)


@pytest.mark.parametrize("channels,hint", [(32, "already a DA latent"), (4, "stock SD3")])
def test_latent_from_base_refuses_non_sd3_latents(ops, errors, channels, hint):
    with pytest.raises(errors.DANodeError, match=hint):
        ops.latent_from_base("DA Latent From Base", torch.zeros(1, channels, 8, 8))


def test_sd3_latent_where_da_latent_expected_names_the_fix(ops, errors):
    with pytest.raises(errors.DANodeError) as e:
        ops.check_da_latent("Structured Latent Decode", "samples", torch.zeros(1, 16, 8, 8))
    msg = str(e.value)
    assert msg.startswith("Structured Latent Decode: input 'samples' must be a DA latent (B, 32")
    assert "DALatentFromBase" in msg and "DASD3ModelPatch" in msg and "(1, 16, 8, 8)" in msg


def test_da_latent_format_is_sd3_on_base_identity_on_detail(ops):
    from davae_core import SD3_SCALE, SD3_SHIFT

    x = torch.randn(1, 32, 4, 4)
    model_space = ops.da_process_in(x)
    assert torch.allclose(model_space[:, :16], (x[:, :16] - SD3_SHIFT) * SD3_SCALE)
    assert torch.equal(model_space[:, 16:], x[:, 16:])
    assert torch.allclose(ops.da_process_out(model_space), x, atol=1e-6)


def test_error_message_names_node_input_expectation_and_fix(errors):
    msg = str(errors.node_error("N", "inp", "an X", "a Y", "Do Z."))
    assert msg == "N: input 'inp' must be an X, got a Y. Do Z."


# ------------------------------------------------------------------ shipped workflows
def test_every_required_workflow_ships():
    assert set(NAMES) == {"davae_t2i_1024", "davae_t2i_2048", "davae_img2img", "davae_refine_512", "davae_vs_stock_1024"}


def test_workflow_files_are_what_the_builder_writes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("build_workflows_under_test", REPO / "tools" / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    monkeypatch.setattr(builder, "OUT", tmp_path)
    builder.main()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    assert written == sorted(p.relative_to(WORKFLOWS) for p in WORKFLOWS.rglob("*.json"))
    for rel in written:
        assert json.loads((tmp_path / rel).read_text()) == json.loads((WORKFLOWS / rel).read_text()), f"{rel} is stale: run python tools/build_workflows.py"


CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def _ui_widgets(kind: str, api_inputs: dict, ui_values: list) -> list:
    """The widgets_values the UI twin must hold: API literals in order, plus the frontend-only widgets."""
    out = []
    for key, value in api_inputs.items():
        if isinstance(value, list):
            continue
        out.append(value)
        if key in ("seed", "noise_seed"):  # control_after_generate follows the seed
            control = ui_values[len(out)] if len(ui_values) > len(out) else None
            out.append(control if control in CONTROL_VALUES else "<control_after_generate>")
        if kind == "LoadImage" and key == "image":
            out.append("image")  # the upload widget
    return out


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_api_twin(name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    graph_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
    assert set(graph_nodes) == set(api)
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] == max(links)
    for node_id, node in graph_nodes.items():
        twin = api[node_id]
        assert node["type"] == twin["class_type"]
        api_links = {k: v for k, v in twin["inputs"].items() if isinstance(v, list)}
        ui_links = {}
        for slot in node["inputs"]:
            if slot["link"] is not None:
                link = links[slot["link"]]
                assert link[3] == node["id"] and str(link[3]) == node_id
                ui_links[slot["name"]] = [str(link[1]), link[2]]
        assert ui_links == api_links, f"{name} node {node_id}"
        assert node["widgets_values"] == _ui_widgets(node["type"], twin["inputs"], node["widgets_values"]), f"{name} node {node_id}"
    for link_id, origin, slot, target, _, kind in ui["links"]:
        source = next(n for n in ui["nodes"] if n["id"] == origin)
        assert link_id in source["outputs"][slot]["links"] and source["outputs"][slot]["type"] == kind


@pytest.mark.parametrize("name", NAMES)
def test_workflow_note_names_every_file(name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    files = {v for node in api.values() for v in node["inputs"].values() if isinstance(v, str) and re.search(r"\.(safetensors|png)$", v)}
    assert files
    for f in files:
        assert f in note, f"{name}: the Note does not say where {f} goes"


# ------------------------------------------------------------------ what a ComfyUI user reads
def test_node_texts_speak_to_users():
    """Tooltips and descriptions say "16x downscale" and "detail heads", not the paper's f16 / P' / O'."""
    import ast

    checked = 0
    for path in sorted((REPO / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg in {"tooltip", "description"}:
                text = "".join(c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str))
                checked += 1
                for jargon in (r"\bf16\b", r"\bP'", r"\bO'", r"\breleased\b"):
                    assert not re.search(jargon, text), f"{path.name}: {node.arg} {text!r} says {jargon!r}"
    assert checked > 20
    source = (REPO / "nodes" / "base_latent_nodes.py").read_text()
    assert 'NODE = "SD3 Latent to DA Latent (2x)"' in source and 'NODE = "DA Latent to SD3 Latent (half size)"' in source
    assert 'node_id="DALatentFromBase"' in source and 'node_id="DABaseLatent"' in source
