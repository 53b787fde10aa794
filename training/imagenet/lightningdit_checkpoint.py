"""Load LightningDiT checkpoints (``{"model", "ema"}`` pickles, as its train.py saves them).

The public ``hustvl/lightningdit-xl-imagenet256-800ep`` file and the DA authors' merged DiT
share this layout.  Loading is safe by default: an uncompressed zip archive only, read with
``torch.load(weights_only=True)``; the architecture is read from the tensor shapes, bounded,
and compared with a ``meta``-device build before any model is allocated; the stored sin-cos
position table and RoPE tables must equal the ones this code computes (a file whose tables
differ was made for another grid or is not a LightningDiT).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from davae_core.file_validation import CheckpointError, compare_shapes, load_weights_only_pickle, meta_shapes
from davae_core.vavae_import import unwrap_state_dict

from .lightningdit import LightningDiT, LightningDiTConfig

logger = logging.getLogger("davae_training.imagenet")

ROPE_KEYS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
# far above XL (1152 wide, 28 deep, 16x16 grid at 256 px, 1000 classes), far below what would exhaust memory
LIMITS = {"hidden_size": 16384, "depth": 256, "input_size": 512, "in_channels": 4096, "num_classes": 1_000_000,
          "ffn_hidden_size": 65536}


def select_weights(obj: Any, source: Any, prefer: str = "ema") -> tuple[dict[str, torch.Tensor], str]:
    """The ``ema`` (or ``model``) state dict of a training checkpoint, or a bare state dict; and which it was."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("ema", "model")):
        order = (prefer, "model" if prefer == "ema" else "ema")
        chosen = next(k for k in order if isinstance(obj.get(k), dict))
        if chosen != prefer:
            logger.warning("%s: has no '%s' weights; using '%s'", source, prefer, chosen)
        return unwrap_state_dict(obj[chosen], source, keys=()), chosen
    return unwrap_state_dict(obj, source, keys=()), "state_dict"


def _shape(state: dict[str, torch.Tensor], key: str, ndim: int, source: Any) -> tuple[int, ...]:
    if key not in state or state[key].ndim != ndim:
        found = tuple(state[key].shape) if key in state else "missing"
        raise CheckpointError(f"{source}: '{key}' is {found}; a LightningDiT checkpoint has a {ndim}-D tensor there")
    return tuple(state[key].shape)


def infer_config(state: dict[str, torch.Tensor], source: Any = "state dict") -> LightningDiTConfig:
    """The architecture the tensors imply (heads from the RoPE tables' width), bounded before use."""
    hidden, in_channels, patch, _ = _shape(state, "x_embedder.proj.weight", 4, source)
    tokens = _shape(state, "pos_embed", 3, source)[1]
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise CheckpointError(f"{source}: pos_embed holds {tokens} positions, not a square grid")
    if ROPE_KEYS[0] not in state:
        raise CheckpointError(f"{source}: no RoPE tables ({ROPE_KEYS[0]}); only LightningDiTs trained with use_rope load here")
    head_dim = _shape(state, ROPE_KEYS[0], 2, source)[1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    fields = {
        "input_size": grid * patch, "patch_size": patch, "in_channels": in_channels, "hidden_size": hidden, "depth": depth,
        "num_heads": hidden // max(head_dim, 1), "ffn_hidden_size": _shape(state, "blocks.0.mlp.w3.weight", 2, source)[1],
        "num_classes": _shape(state, "y_embedder.embedding_table.weight", 2, source)[0] - 1,
        "use_qknorm": "blocks.0.attn.q_norm.weight" in state,
    }
    for name, limit in LIMITS.items():
        if not 1 <= fields[name] <= limit:
            raise CheckpointError(f"{source}: its tensors imply {name} = {fields[name]}; allowed 1 to {limit}")
    try:
        return LightningDiTConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{source}: its tensors imply no valid LightningDiT ({e})") from e


def checkpoint_state(weights: dict[str, torch.Tensor], model: LightningDiT) -> dict[str, torch.Tensor]:
    """``weights`` (LightningDiT's names) with the tables LightningDiT's train.py also saves: the frozen
    sin-cos ``pos_embed`` and the RoPE tables (persistent buffers there, recomputed here)."""
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    state["pos_embed"] = model.pos_embed.detach().cpu().clone()
    state[ROPE_KEYS[0]] = model.rope.cos.detach().cpu().clone()
    state[ROPE_KEYS[1]] = model.rope.sin.detach().cpu().clone()
    return state


def _check_tables(model: LightningDiT, state: dict[str, torch.Tensor], source: Any) -> None:
    tables = {"pos_embed": model.pos_embed, ROPE_KEYS[0]: model.rope.cos, ROPE_KEYS[1]: model.rope.sin}
    for key, ours in tables.items():
        if key in state and not torch.allclose(state[key].float(), ours, atol=1e-4):
            raise CheckpointError(
                f"{source}: its '{key}' differs from LightningDiT's for a {model.config.grid}x{model.config.grid} "
                "grid; the file was made for another grid or by another model"
            )


def with_fresh_qk_norm(state: dict[str, torch.Tensor], config: LightningDiTConfig, source: Any) -> tuple[dict, LightningDiTConfig]:
    """Switch qk-norm on over weights trained without it, as the DA authors' config does: the new
    q/k RMSNorms start at weight 1, which still normalises q and k, so this warm start is not exact."""
    if config.use_qknorm:
        return state, config
    logger.warning("%s: qk-norm switched on over weights trained without it; q/k norms start at weight 1", source)
    fresh = {f"blocks.{i}.attn.{n}_norm.weight": torch.ones(config.head_dim) for i in range(config.depth) for n in "qk"}
    return {**state, **fresh}, dataclasses.replace(config, use_qknorm=True)


def load_lightningdit_state(
    state: dict[str, torch.Tensor], source: Any = "state dict", config: LightningDiTConfig | None = None,
    enable_qknorm: bool = False,
) -> LightningDiT:
    """A LightningDiT holding ``state`` (LightningDiT's key names), checked before it is allocated.

    ``enable_qknorm`` switches qk-norm on for a checkpoint trained without it (:func:`with_fresh_qk_norm`).
    """
    config = config or infer_config(state, source)
    if enable_qknorm:
        state, config = with_fresh_qk_norm(state, config, source)
    weights = {k: v for k, v in state.items() if k not in ROPE_KEYS}
    compare_shapes(source, meta_shapes(lambda: LightningDiT(config), source), {k: tuple(v.shape) for k, v in weights.items()})
    model = LightningDiT(config)
    _check_tables(model, state, source)
    model.load_state_dict(weights)
    return model.eval()


def load_lightningdit(
    path: str | os.PathLike, prefer: str = "ema", config: LightningDiTConfig | None = None, enable_qknorm: bool = False,
) -> LightningDiT:
    """LightningDiT from a ``{"model", "ema"}`` checkpoint (``ema`` unless ``prefer="model"``)."""
    state, chosen = select_weights(load_weights_only_pickle(path), path, prefer)
    model = load_lightningdit_state(state, path, config, enable_qknorm)
    logger.info("%s: loaded the '%s' weights (%s)", path, chosen, model.config)
    return model
