"""What the node pack is made of, read from the source with ``ast`` (nothing is imported).

* Test scaffolding (``davae_testing/``: the ComfyUI runner, stand-ins for files the tiny
  fixtures lack, the tiny SD3 pipeline) never ships: nothing ComfyUI or pip loads (the
  repository's ``__init__``, nodes/, davae_core/, training/) imports it, and ``.comfyignore``
  leaves it out of the Comfy Registry package.
* The DA-VAE's wiring (base on the half-resolution image, detail blocks, the merge/split of
  the structured latent and its normalisation) has one home, ``davae_core/da_wiring.py``; the
  diffusers build (``DAVAE``) and ComfyUI's build (``ComfyDAVAE``) only bring their trunks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_import_graph import ROOT, import_graph  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCAFFOLDING = "davae_testing"
SHIPPED = ("nodes", "davae_core", "training")  # with ROOT: what ComfyUI imports, or pip installs
WIRING_HOME = "davae_core/da_wiring.py"
# the modules that build a DA-VAE from trunks, or dress one for ComfyUI
BUILDERS = ("davae_core/davae_model.py", "nodes/comfy_davae.py", "nodes/vae_adapter.py")
# the pieces a DA-VAE is wired from
WIRING_NAMES = {"merge", "split", "half_resolution", "DetailDownsample", "JointUpsample", "LatentNormalizer"}
WIRING_MODULES = {"da_blocks", "structured_latent"}  # where those pieces are defined


def _names_used(path: Path) -> set[str]:
    """The names a module calls or imports (``foo``, ``from m import foo``) and the last part of each
    module it imports from (``m``); attributes (``x.split``, a tensor's method) are not names."""
    used: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.ImportFrom):
            used.update(alias.name for alias in node.names)
            used.add((node.module or "").rpartition(".")[2])
    return used


def test_the_da_wiring_has_one_home():
    home = _names_used(REPO / WIRING_HOME)
    assert WIRING_NAMES <= home, f"{WIRING_HOME} lacks {sorted(WIRING_NAMES - home)}"
    for builder in BUILDERS:
        again = (WIRING_NAMES | WIRING_MODULES) & _names_used(REPO / builder)
        assert not again, f"{builder} wires the DA-VAE itself ({sorted(again)}); use davae_core.da_wiring.DAWiring"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_reachable_follows_imports_through_other_modules():
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}, "a") == {"b", "c"}


def _scaffolding_reached_from(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    shipped = [m for m in graph if m == ROOT or m.split(".")[0] in SHIPPED]
    found = {m: {r for r in reachable(graph, m) if r.split(".")[0] == SCAFFOLDING} for m in shipped}
    return {m: r for m, r in found.items() if r}


def test_the_pack_never_imports_the_test_scaffolding():
    graph = import_graph()
    # the graph sees the pack's entry, its path into nodes/ and davae_core/, and the scaffolding's own imports
    assert "nodes" in graph[ROOT] and "nodes.comfy_davae" in reachable(graph, ROOT)
    assert f"{SCAFFOLDING}.comfyui_runner" in graph
    planted = {**graph, "nodes.errors": graph["nodes.errors"] | {f"{SCAFFOLDING}.comfyui_runner"}}
    assert ROOT in _scaffolding_reached_from(planted)  # a stray import would be caught
    assert _scaffolding_reached_from(graph) == {}


def test_the_pack_does_not_even_name_the_scaffolding():
    """Dynamic imports (``importlib``) escape the graph: the pack's own files must not mention it at all."""
    files = [REPO / "__init__.py", *(REPO / "nodes").rglob("*.py"), *(REPO / "davae_core").rglob("*.py")]
    assert not [str(f.relative_to(REPO)) for f in files if SCAFFOLDING in f.read_text()]


def test_the_registry_package_leaves_the_scaffolding_out():
    ignored = {line.strip() for line in (REPO / ".comfyignore").read_text().splitlines()}
    assert f"{SCAFFOLDING}/" in ignored and "tests/" in ignored
    assert not (REPO / "training" / "comfyui_runner.py").exists()
