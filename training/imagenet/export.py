"""The trained DA LightningDiT as the files ``python -m davae_training.imagenet.generate`` reads.

* ``<name>_dit.pt``: LightningDiT's own ``{"model", "ema"}`` layout with C input channels (the
  trained P and O under ``x_embedder.proj`` / ``final_layer.linear``, the sin-cos and RoPE tables),
  plain tensors only, so it loads with ``torch.load(weights_only=True)``
  (:func:`~.lightningdit_checkpoint.load_lightningdit`);
* ``<name>_heads.safetensors``: P' and O' in our DA heads format (:func:`davae_core.save_heads`),
  from the EMA unless ``export.use_ema`` is off.

    python -m davae_training.imagenet.generate --davae DAVAE --dit <name>_dit.pt --heads <name>_heads.safetensors ...

The trainer writes both at the end of a run; for a checkpoint of a stopped run:

    python -m davae_training.imagenet.export --run RUN_DIR [--checkpoint latest|final|PATH] [--no-ema] [--out DIR]
"""

from __future__ import annotations

import argparse
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


def export_run(run_dir: str | os.PathLike, checkpoint: str = "latest", use_ema: bool = True, out_dir: str | os.PathLike | None = None,
               name: str | None = None) -> dict[str, Path]:
    """Both files from a run's checkpoint (or ``final/``), the DiT rebuilt from the run's own config."""
    from safetensors.torch import load_file

    from ..checkpoints import FINAL_DIR, RUN_CONFIG, latest_complete_checkpoint
    from ..config import load_config
    from .config import LightningDiTTrainConfig
    from .step import DiTModel, build_da_dit

    run = Path(run_dir)
    if not (run / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"{run}: no {RUN_CONFIG}; pass the output_dir of an ImageNet stage-2 run")
    cfg = load_config(LightningDiTTrainConfig, run / RUN_CONFIG)
    if checkpoint in ("latest", "final"):
        final = run / FINAL_DIR
        folder = final if (final / DiTModel.weights_file).is_file() else None
        if folder is None and checkpoint == "latest":
            folder = latest_complete_checkpoint(run)[0]
        if folder is None:
            raise FileNotFoundError(f"{run}: no {'checkpoint and no ' if checkpoint == 'latest' else ''}final/ weights yet")
    else:
        folder = Path(checkpoint)
    trained = load_file(str(folder / DiTModel.weights_file))
    ema = load_file(str(folder / DiTModel.ema_file)) if (folder / DiTModel.ema_file).is_file() else {}
    detail_channels = trained[f"{EMBED}.detail.weight"].shape[1]
    dit = build_da_dit(cfg.model, detail_channels)  # the tables and heads layout the trained tensors belong to
    missing = sorted(set(dict(dit.named_parameters())) - set(trained))
    if missing:
        raise ValueError(f"{folder}: holds no {missing[:3]}: not a checkpoint of this run's model")
    info = {"trainer": "davae_training.train_lightningdit", "source": str(folder), "head_init": cfg.model.head_init}
    return write_exports(trained, ema, dit, out_dir or run / "export", name or cfg.export.name, use_ema, info)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m davae_training.imagenet.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the output_dir of an ImageNet stage-2 run")
    ap.add_argument("--checkpoint", default="latest", help="'latest', 'final' or a checkpoint folder")
    ap.add_argument("--no-ema", action="store_true", help="the heads (and the file's ema entry) from the raw weights")
    ap.add_argument("--out", default=None, help="output folder (default RUN/export)")
    ap.add_argument("--name", default=None, help="file name stem (default the run's export.name)")
    args = ap.parse_args(argv)
    for kind, path in export_run(args.run, args.checkpoint, not args.no_ema, args.out, args.name).items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
