"""What the node pack is made of, read from the source with ``ast`` (nothing is imported).

* The DA-VAE's wiring (base on the half-resolution image, detail blocks, the merge/split of
  the structured latent and its normalisation) has one home, ``davae_core/da_wiring.py``; the
  diffusers build (``DAVAE``) and ComfyUI's build (``ComfyDAVAE``) only bring their trunks.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIRING_HOME = "davae_core/da_wiring.py"
# the modules that build a DA-VAE from trunks, or dress one for ComfyUI
BUILDERS = ("davae_core/davae_model.py", "nodes/comfy_davae.py", "nodes/vae_adapter.py")
# the pieces a DA-VAE is wired from
WIRING_NAMES = {"merge", "split", "half_resolution", "DetailDownsample", "JointUpsample", "LatentNormalizer"}


def _names_used(path: Path) -> set[str]:
    """Every name a module loads or imports (``foo``, ``x.foo`` and ``from m import foo`` all count)."""
    used: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            used.update(alias.name for alias in node.names)
    return used


def test_the_da_wiring_has_one_home():
    home = _names_used(REPO / WIRING_HOME)
    assert WIRING_NAMES <= home, f"{WIRING_HOME} lacks {sorted(WIRING_NAMES - home)}"
    for builder in BUILDERS:
        again = WIRING_NAMES & _names_used(REPO / builder)
        assert not again, f"{builder} wires the DA-VAE itself ({sorted(again)}); use davae_core.da_wiring.DAWiring"
