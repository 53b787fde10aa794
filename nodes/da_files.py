"""The ``davae`` model folder and the files in it (DA-VAE tokenizers and DA heads).

``models/davae/`` is registered as the folder ``davae``; ``extra_model_paths.yaml`` can add
more paths to it (``davae: path/to/dir``).  Our files say what they hold in their header,
which lets each loader list only its own kind; files without our header (the authors'
checkpoints) are listed by both and go through :mod:`davae_core.authors_import`.
"""

from __future__ import annotations

import os

from ..davae_core import authors_import
from ..davae_core.checkpoint import KIND_DAVAE, KIND_HEADS, CheckpointError, load_heads, load_tensors, read_metadata
from ..davae_core.davae_config import DAVAEConfig

FOLDER = "davae"
EXTENSIONS = {".safetensors", ".pt", ".pth", ".ckpt", ".bin"}
ZERO_HEADS = "zero-init (no file)"


def register_folder() -> None:
    """Make ``models/davae/`` a model folder, keeping paths ``extra_model_paths.yaml`` already added."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default)
        folder_paths.folder_names_and_paths[FOLDER][1].update(EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))


def file_kind(path: str) -> str | None:
    """``"davae"``, ``"da_heads"`` or ``None`` for a file without our header (e.g. the authors')."""
    try:
        return read_metadata(path)["kind"]
    except CheckpointError:
        return None


def list_files(kind: str) -> list[str]:
    """Names in the ``davae`` folder that are of ``kind`` or of no known kind."""
    import folder_paths

    names = []
    for name in folder_paths.get_filename_list(FOLDER):
        path = folder_paths.get_full_path(FOLDER, name)
        if path is not None and file_kind(path) in (kind, None):
            names.append(name)
    return names


def tokenizer_state(path: str) -> tuple[DAVAEConfig, dict]:
    """(config, state dict in our keys) of a DA-VAE file: our format, or the authors' through the importer."""
    kind = file_kind(path)
    if kind == KIND_DAVAE:
        meta = read_metadata(path, KIND_DAVAE)
        try:
            config = DAVAEConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its architecture config cannot be read ({e}); export the file again") from e
        return config, load_tensors(path)
    if kind is not None:
        raise CheckpointError(f"{path}: holds DA heads, not a DA-VAE; pick it in 'DA-SD3 Model Patch' instead")
    return authors_import.read_tokenizer(path)


def load_heads_file(path: str):
    """:class:`DAHeads` from our format, or from the authors' checkpoint through the importer."""
    kind = file_kind(path)
    if kind == KIND_HEADS:
        return load_heads(path)
    if kind is not None:
        raise CheckpointError(f"{path}: holds a DA-VAE tokenizer, not DA heads; pick it in 'DA-VAE Loader' instead")
    return authors_import.import_heads(path)


__all__ = ["FOLDER", "ZERO_HEADS", "register_folder", "list_files", "tokenizer_state", "load_heads_file", "KIND_DAVAE", "KIND_HEADS"]
