"""Export a stage-2 run for ComfyUI: a LoRA file and a DA heads file.

    python -m davae_training.stage2.export --run RUN_DIR [--checkpoint latest|PATH] [--no-ema] --out OUT_DIR

* ``<name>_lora.safetensors``: the peft LoRA with diffusers/peft names and the
  ``transformer.`` prefix (``transformer.transformer_blocks.N.attn.to_q.lora_A.weight``), which
  ComfyUI's stock LoRA loaders map onto its MMDiT (``comfy.utils.mmdit_to_diffusers``).  ComfyUI
  scales a LoRA by ``alpha / rank`` when ``.alpha`` keys exist and by 1.0 otherwise, so
  ``.alpha`` keys are written whenever alpha != rank (``--alpha-keys always`` writes them
  anyway).  The header carries diffusers' ``lora_adapter_metadata`` so diffusers'
  ``load_lora_adapter`` rebuilds the same LoraConfig.
* ``<name>_heads.safetensors``: our DA heads format (:func:`davae_core.save_heads`) with P' and
  O', plus the retrained P and O when they differ from the base model's.  The DA-SD3 Model
  Patch node loads it; it is never merged into the checkpoint (ComfyUI detects SD3 by its
  16-channel P).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from davae_core.atomic_files import atomic_write
from davae_core.checkpoint import save_heads
from davae_core.dtypes import DTYPES
from davae_core.heads import DAHeads

from .model import ADAPTER_NAME, ExportLayout

LORA_PREFIX = "transformer."
# trained tensor names of the patched transformer -> names in a DAHeads module
HEAD_NAMES = {"pos_embed.proj.detail.": "detail_embed.", "proj_out.detail.": "detail_out.",
              "pos_embed.proj.stock.": "base_embed.", "proj_out.stock.": "base_out."}
STOCK = {"pos_embed.proj.stock.": "pos_embed.proj.", "proj_out.stock.": "proj_out."}  # -> names in the base model


def export_tensors(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a live, whole transformer exports: its LoRA and all four heads."""
    return {n: p.detach() for n, p in transformer.named_parameters() if "lora_" in n or n.startswith(tuple(HEAD_NAMES))}


# ---------------------------------------------------------------------------- LoRA
def lora_state_dict_for_comfy(tensors: dict[str, torch.Tensor], config: Any, alpha_keys: str = "auto",
                              dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """``transformer.``-prefixed LoRA tensors with peft's saved names (+ ``.alpha``) and the LoraConfig as a dict."""
    rank, alpha = int(config.r), float(config.lora_alpha)
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("per-layer rank/alpha patterns cannot be expressed for ComfyUI's loaders; train with one rank/alpha")
    adapter = f".{ADAPTER_NAME}."
    out = {LORA_PREFIX + k.replace(adapter, "."): v.detach().to("cpu", dtype).contiguous()
           for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
    write_alpha = alpha_keys == "always" or (alpha_keys == "auto" and alpha != rank)
    if write_alpha:
        for layer in {k.rsplit(".lora_A.", 1)[0] for k in out if ".lora_A." in k}:
            out[f"{layer}.alpha"] = torch.tensor(alpha)
    meta = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(config.target_modules),
            "init_lora_weights": str(config.init_lora_weights)}
    return out, meta


def write_lora(tensors: dict[str, torch.Tensor], layout: ExportLayout, path: str | os.PathLike, alpha_keys: str = "auto",
               info: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    out, meta = lora_state_dict_for_comfy(tensors, layout.lora_config, alpha_keys, dtype)
    exported = {k[len(LORA_PREFIX):].rsplit(".lora_", 1)[0] for k in out if ".lora_" in k}
    dropped = sorted(set(layout.lora_layers) - exported)
    if dropped:  # would silently weaken the LoRA in ComfyUI
        raise RuntimeError(f"{len(dropped)} LoRA layers have no exported tensors, e.g. {dropped[:3]}")
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(meta), "davae_info": json.dumps(info or {})}
    return _atomic_save(out, Path(path), header)


# ---------------------------------------------------------------------------- heads
def base_heads_changed(tensors: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    """Whether the trained P or O differ from the pretrained ``pos_embed.proj`` / ``proj_out``."""
    for name, t in tensors.items():
        for trained_prefix, base_prefix in STOCK.items():
            if name.startswith(trained_prefix):
                ref = base_state[base_prefix + name[len(trained_prefix):]].to(torch.float32)
                if not torch.allclose(t.detach().float().cpu(), ref, atol=atol, rtol=0):
                    return True
    return False


def write_heads(tensors: dict[str, torch.Tensor], layout: ExportLayout, path: str | os.PathLike,
                base_state: dict[str, torch.Tensor] | None = None, info: dict | None = None) -> Path:
    """P', O' always; P, O when ``base_state`` is None or they moved away from it."""
    include_base = base_state is None or base_heads_changed(tensors, base_state)
    heads = DAHeads(layout.heads_config)
    if include_base:
        heads.add_base_layers()
    state = {HEAD_NAMES[prefix] + name[len(prefix):]: t.detach().float().cpu()
             for name, t in tensors.items() for prefix in HEAD_NAMES if name.startswith(prefix)}
    heads.load_state_dict({k: v for k, v in state.items() if include_base or not k.startswith("base_")})
    about = {"base_heads": "retrained P and O included" if include_base else "stock P and O (unchanged)", **(info or {})}
    return save_heads(heads, path, info=about)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# ---------------------------------------------------------------------------- both files
def write_for_comfy(tensors: dict[str, torch.Tensor], layout: ExportLayout, out_dir: str | os.PathLike, name: str,
                    base_state: dict[str, torch.Tensor] | None, alpha_keys: str = "auto", info: dict | None = None,
                    lora_dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """``<name>_lora.safetensors`` (when the model has a LoRA) and ``<name>_heads.safetensors`` from whole tensors:
    the trainer's gathered (EMA) tensors under any engine, or a live transformer's (:func:`export_for_comfy`)."""
    from ..run_safety import check_finite_tensors

    check_finite_tensors(tensors.items(), f"export to {out_dir}")  # what the files hold
    out = Path(out_dir)
    paths = {}
    if layout.lora_config is not None:
        paths["lora"] = write_lora(tensors, layout, out / f"{name}_lora.safetensors", alpha_keys, info, lora_dtype)
    paths["heads"] = write_heads(tensors, layout, out / f"{name}_heads.safetensors", base_state, info)
    return paths


def export_lora(transformer: nn.Module, path: str | os.PathLike, alpha_keys: str = "auto", info: dict | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    return write_lora(export_tensors(transformer), ExportLayout.of(transformer), path, alpha_keys, info, dtype)


def export_heads(transformer: nn.Module, path: str | os.PathLike, base_state: dict[str, torch.Tensor] | None = None,
                 info: dict | None = None) -> Path:
    return write_heads(export_tensors(transformer), ExportLayout.of(transformer), path, base_state, info)


def export_for_comfy(transformer: nn.Module, out_dir: str | os.PathLike, name: str, base_state: dict[str, torch.Tensor] | None,
                     alpha_keys: str = "auto", info: dict | None = None, lora_dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Both files from a live, whole transformer (one process)."""
    return write_for_comfy(export_tensors(transformer), ExportLayout.of(transformer), out_dir, name, base_state, alpha_keys,
                           info, lora_dtype)


def main(argv: list[str] | None = None) -> None:
    from .run_file import load_run_for_export

    ap = argparse.ArgumentParser(prog="python -m davae_training.stage2.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the stage-2 run directory (output_dir of its config)")
    ap.add_argument("--checkpoint", default="latest", help="'latest', 'final' or a checkpoint directory")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    ap.add_argument("--out", default=None, help="output folder (default RUN/export)")
    ap.add_argument("--name", default="da_sd35m", help="file name stem")
    ap.add_argument("--alpha-keys", choices=["auto", "always"], default="auto")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="LoRA tensor dtype (fp16 halves the file)")
    args = ap.parse_args(argv)
    transformer, base_state, info = load_run_for_export(args.run, args.checkpoint, use_ema=not args.no_ema)
    paths = export_for_comfy(transformer, args.out or Path(args.run) / "export", args.name, base_state, args.alpha_keys, info,
                             DTYPES[args.dtype])
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
