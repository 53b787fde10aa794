"""Crafted files in models/davae/ selected in the nodes of a real ComfyUI (COMFYUI_PATH).

Each crafted file makes its prompt fail with an error naming the file and what is wrong,
and the next prompt in the same ComfyUI process runs: a file the user merely selected
cannot take the host down.  The memory bound of the refusals is measured in
test_file_validation.py; here the path through the nodes is what is checked.

    COMFYUI_PATH=/path/to/ComfyUI-0.8.0  python -m pytest tests/test_nodes_file_refusal.py
    COMFYUI_PATH=/path/to/ComfyUI-0.3.64 python -m pytest tests/test_nodes_file_refusal.py
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_harness as harness  # noqa: E402

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout (0.8.0 or 0.3.64) to run these", allow_module_level=True)

WORKFLOW = "davae_t2i_1024"


def _recast(src: Path, dst: Path, change) -> None:
    """``src``'s tensors under its own config as ``change`` rewrites it."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta["davae_config"] = json.dumps(change(json.loads(meta["davae_config"])))
    save_file(load_file(str(src)), str(dst), metadata=meta)


@pytest.fixture(scope="module")
def crafted(fixtures_dir, tmp_path_factory):
    """A second davae folder holding crafted files, removed again after this module."""
    harness.boot(Path(fixtures_dir))
    import folder_paths

    folder = tmp_path_factory.mktemp("crafted_davae")
    ours = Path(fixtures_dir) / "davae"
    _recast(ours / "da_heads_tiny.safetensors", folder / "crafted_heads_huge.safetensors", lambda c: {**c, "hidden_size": 60_000_000})
    wide = {"block_out_channels": [4096] * 8, "layers_per_block": 8,
            "down_block_types": ["DownEncoderBlock2D"] * 8, "up_block_types": ["UpDecoderBlock2D"] * 8}
    _recast(ours / "davae_tiny.safetensors", folder / "crafted_davae_wide.safetensors",
            lambda c: {**c, "base_vae": {**c["base_vae"], **wide}})
    authors = {"dc_down.conv.weight": torch.zeros(8, 32, 3, 3), "dc_up.conv.weight": torch.zeros(1).expand(2048, 10**6, 3, 3)}
    torch.save(authors, folder / "crafted_authors.bin")
    folder_paths.add_model_folder_path("davae", str(folder))
    folder_paths.filename_list_cache.pop("davae", None)
    yield folder
    folder_paths.folder_names_and_paths["davae"][0].remove(str(folder))
    folder_paths.filename_list_cache.pop("davae", None)


def _prompt(**files) -> dict:
    prompt = harness.to_fixture_prompt(harness.load_api_workflow(WORKFLOW))
    for node in prompt.values():
        if node["class_type"] == "DASD3ModelPatch" and "heads" in files:
            node["inputs"]["heads"] = files["heads"]
        if node["class_type"] == "DAVAELoader" and "davae_name" in files:
            node["inputs"]["davae_name"] = files["davae_name"]
    return prompt


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"heads": "crafted_heads_huge.safetensors"},
         ["crafted_heads_huge.safetensors", "config field 'hidden_size' is 60000000", "an integer from 1 to 16384"]),
        ({"davae_name": "crafted_davae_wide.safetensors"},
         ["crafted_davae_wide.safetensors", "tensors do not match the architecture in its own metadata"]),
        ({"davae_name": "crafted_authors.bin"},
         ["crafted_authors.bin", "tensor 'dc_up.conv.weight' has shape (2048, 1000000, 3, 3)", "storage holds only 4 bytes"]),
    ],
)
def test_crafted_file_fails_its_prompt_clearly_and_the_next_prompt_runs(crafted, files, expected, caplog):
    caplog.set_level(logging.ERROR)
    with pytest.raises(AssertionError, match="prompt failed") as failure:
        harness.run_prompt(_prompt(**files))
    message = str(failure.value) + caplog.text  # ComfyUI logs the node's exception message
    for part in expected:
        assert part in message, message[:2000]
    sizes = harness.saved_image_sizes(harness.run_prompt(_prompt()))
    assert sizes == {"13": [(256, 256)]}
