"""The trained DA LightningDiT as the files ``python -m davae_training.imagenet.generate`` reads.

* ``<name>_dit.pt``: LightningDiT's own ``{"model", "ema"}`` layout with C input channels (the
  trained P and O under ``x_embedder.proj`` / ``final_layer.linear``, the sin-cos and RoPE tables),
  plain tensors only, so it loads with ``torch.load(weights_only=True)``
  (:func:`~.lightningdit_checkpoint.load_lightningdit`);
* ``<name>_heads.safetensors``: P' and O' in our DA heads format (:func:`davae_core.save_heads`),
  from the EMA unless ``export.use_ema`` is off.

    python -m davae_training.imagenet.generate --davae DAVAE --dit <name>_dit.pt --heads <name>_heads.safetensors ...
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from davae_core.atomic_files import atomic_write
from davae_core.checkpoint import save_heads
from davae_core.heads import DAHeads

from .da_heads import EMBED, OUT, heads_config_for_lightningdit
from .lightningdit import LightningDiT
from .lightningdit_checkpoint import checkpoint_state

# names of the patched DiT's DA layers -> LightningDiT's names (stock) or our heads' names (detail)
STOCK = {f"{EMBED}.stock.": f"{EMBED}.", f"{OUT}.stock.": f"{OUT}."}
DETAIL = {f"{EMBED}.detail.": "detail_embed.", f"{OUT}.detail.": "detail_out."}


def split_trained(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A patched DiT's parameters -> (LightningDiT state with C channels, heads state)."""
    base, heads = {}, {}
    for name, t in tensors.items():
        detail = next((p for p in DETAIL if name.startswith(p)), None)
        stock = next((p for p in STOCK if name.startswith(p)), None)
        if detail is not None:
            heads[DETAIL[detail] + name[len(detail):]] = t.detach().float().cpu()
        elif stock is not None:
            base[STOCK[stock] + name[len(stock):]] = t.detach().float().cpu()
        else:
            base[name] = t.detach().float().cpu()
    return base, heads


def save_trained(trained: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], folder: str | os.PathLike, ema_step: int,
                 weights_file: str, ema_file: str) -> None:
    """The run's ``final/``: whole trained tensors and their EMA by the patched DiT's names (safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    for tensors, name, meta in ((trained, weights_file, None), (ema, ema_file, {"optimization_step": str(ema_step)})):
        if tensors:
            with atomic_write(folder / name) as tmp:
                save_file({n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}, str(tmp), metadata=meta)


def write_exports(trained: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], dit: LightningDiT, out_dir: str | os.PathLike,
                  name: str, use_ema: bool = True, info: dict | None = None) -> dict[str, Path]:
    """Both files from whole tensors (the trainer's gathered raw and EMA parameters)."""
    from ..run_safety import check_finite_tensors

    heads_source = ema if use_ema and ema else trained
    check_finite_tensors(heads_source.items(), f"export to {out_dir}")
    out = Path(out_dir)
    raw_base, raw_heads = split_trained(trained)
    ema_base, ema_heads = split_trained(ema) if ema else (raw_base, raw_heads)
    dit_path = out / f"{name}_dit.pt"
    with atomic_write(dit_path) as tmp:
        torch.save({"model": checkpoint_state(raw_base, dit), "ema": checkpoint_state(ema_base, dit)}, tmp)
    heads = DAHeads(heads_config_for_lightningdit(dit, dit.in_channels - dit.config.in_channels))
    heads.load_state_dict(ema_heads if heads_source is ema else raw_heads)
    heads_path = save_heads(heads, out / f"{name}_heads.safetensors",
                            info={"ema": heads_source is ema and bool(ema), **(info or {})})
    return {"dit": dit_path, "heads": heads_path}
