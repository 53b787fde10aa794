"""Packaging rules: the repo imports outside ComfyUI, davae_core never imports ComfyUI, and an
install puts only namespaced packages into site-packages."""

import ast
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_repository_imports_outside_comfyui(tmp_path):
    # ComfyUI imports the pack directory as a package; without ComfyUI that import must not fail
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('davae_pack', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}'])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['davae_pack'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert importlib.util.find_spec('comfy_api') is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_pack_in_a_comfyui_without_the_v3_api_logs_the_version_it_needs(tmp_path):
    # a stand-in for an old ComfyUI: comfy, folder_paths and comfy_api, but no comfy_api.latest
    for pkg in ("comfy", "comfy_api"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "folder_paths.py").write_text("")
    code = (
        "import importlib.util, logging, sys\n"
        f"sys.path.insert(0, r'{tmp_path}')\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"spec = importlib.util.spec_from_file_location('davae_pack', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}'])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['davae_pack'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "print('has_entrypoint', hasattr(mod, 'comfy_entrypoint'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "has_entrypoint False"
    assert "need ComfyUI 0.3.64 or newer" in out.stderr and "comfy_api.latest" in out.stderr


def test_davae_core_never_imports_comfyui():
    for path in (ROOT / "davae_core").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in {"comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths"}, f"{path.name} imports {name}"


def test_install_exposes_only_namespaced_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    assert all(p.split(".")[0] in {"davae_core", "davae_training"} for p in packages), packages
    spec = importlib.util.find_spec("davae_training")
    assert spec is not None and Path(spec.origin).resolve().parent == (ROOT / "training").resolve()


def test_torch_stays_out_of_requirements_txt():
    lines = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not any(l.lower().startswith(("torch", "torchvision")) for l in lines if l)


def test_every_training_subpackage_is_installed():
    # with a package-dir mapping, setuptools installs only the packages it is told about
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    folders = {".".join(("davae_training",) + p.parent.relative_to(ROOT / "training").parts).rstrip(".")
               for p in (ROOT / "training").rglob("__init__.py")}
    assert "davae_training.stage2" in folders
    assert folders <= listed, f"add to [tool.setuptools] packages: {sorted(folders - listed)}"


def test_registry_metadata_points_at_files_in_the_repository():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    urls, comfy = project["project"]["urls"], project["tool"]["comfy"]
    assert set(urls) >= {"Repository", "Documentation", "Issues"}
    assert all(u.startswith(urls["Repository"]) for u in urls.values())
    assert comfy["requires-comfyui"] == ">=0.3.64"
    raw = urls["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy["Icon"].startswith(raw)
    icon = ROOT / comfy["Icon"][len(raw):]
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{icon} is not a PNG"
    ignored = {l.strip() for l in (ROOT / ".comfyignore").read_text().splitlines() if l.strip() and not l.startswith("#")}
    assert {"tests/", "bench/", ".ci/", "*.safetensors"} <= ignored
    assert not ignored & {"nodes/", "davae_core/", "example_workflows/", "__init__.py", "pyproject.toml"}


def test_requirements_txt_lists_no_library_a_host_depends_on():
    """ComfyUI-Manager installs requirements.txt into ComfyUI's environment: nothing there may move its core."""
    lines = [l.split("#")[0].strip().lower() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    forbidden = ("torch", "diffusers", "transformers", "huggingface-hub", "huggingface_hub", "peft", "accelerate", "tokenizers")
    listed = [l for l in lines if l]
    assert not [l for l in listed if l.startswith(forbidden)], listed


def test_node_pack_imports_only_diffusers_free_core_modules():
    """Every davae_core module that nodes/ imports, and what those import, stays off diffusers/peft/accelerate."""
    heavy = {"diffusers", "peft", "accelerate", "transformers"}
    seen, todo = set(), []
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module and node.module.startswith("davae_core"):
                todo.append(node.module.split(".", 1)[1] if "." in node.module else "__init__")
    assert todo, "nodes/ imports no davae_core module: the scan is broken"
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / "davae_core" / f"{name}.py").read_text())
        for node in tree.body:  # module level only: lazy imports inside functions are the point
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(node.module)
                tops = []
            else:
                tops = []
            assert not heavy & set(tops), f"davae_core/{name}.py (reached from nodes/) imports {tops}"
    assert {"checkpoint", "comfy_latent", "da_blocks", "heads"} <= seen
