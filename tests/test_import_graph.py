"""The repository's packages import each other without a circle (imports inside functions count too).

A circle works until someone moves an import to the top of a file; it also hides which module is
the foundation.  The graph is read from the source with ``ast`` (nothing is imported), over
the repository's ``__init__.py`` (what ComfyUI imports as the pack), davae_core/, training/
(installed as ``davae_training``), nodes/, bench/ and davae_testing/ (test scaffolding).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("davae_core", "training", "nodes", "bench", "davae_testing")
ROOT = "__init__"  # the repository's own __init__.py; its relative imports reach nodes/ and davae_core/
ALIASES = {"davae_training": "training"}  # installed name -> folder
# absolute names that mean this repository (a bare `nodes` is ComfyUI's nodes.py, ours is reached relatively)
ABSOLUTE_OURS = {"davae_core", "davae_training", "bench", "davae_testing"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {ROOT: REPO / "__init__.py"}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            found[_module_name(path)] = path
    return found


def _canonical(name: str) -> str:
    head, _, rest = name.partition(".")
    if head not in ABSOLUTE_OURS:
        return ""  # a library's module
    head = ALIASES.get(head, head)
    return f"{head}.{rest}" if rest else head


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    if module == ROOT:
        package = []
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(package):
        raise ValueError(f"{module}: relative import beyond the repository root")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [_canonical(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and not _canonical(node.module or ""):
                continue
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    source = _resolve_relative(module, is_package, node.level, node.module)
                else:
                    source = _canonical(node.module or "")
                # `from pkg import sub` imports the submodule; `from pkg import name` runs pkg/__init__
                for alias in node.names:
                    sub = f"{source}.{alias.name}" if source else alias.name
                    targets.append(sub if sub in modules else source)
            for target in targets:
                # `import a.b.c` with a.b.c ours: edge to the deepest module of ours it names
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_repositories_imports():
    graph = import_graph()
    # a few edges that must exist, so an empty or broken graph cannot pass the next test
    assert "training.stage2.objective" in graph["training.stage2.step"] and "training.loop" in graph["training.stage2.trainer"]
    assert "davae_core.checkpoint" in graph["nodes.da_files"]
    assert "comfy" not in " ".join(graph["nodes.structured_latent_nodes"])  # ComfyUI's modules are not ours
    assert "davae_core.heads" in graph["bench.sd3_models"]


def test_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_repository():
    cycle = find_cycle(import_graph())
    if cycle:
        pytest.fail("import circle: " + " -> ".join(cycle))
