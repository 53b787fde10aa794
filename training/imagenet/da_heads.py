"""DA heads on LightningDiT (paper Sec. 3.2 at patch 1), and the DA authors' merged-DiT layout.

P' (a patch conv over the D detail channels) adds to the stock embedder's output; O' (a
linear to p*p*D) writes the detail channels beside the stock output layer.  Both start at
zero, so the patched model is the pretrained one on the base channels and predicts zero
detail.  The maths and modules are :mod:`davae_core.heads`' (DetailPatchEmbed /
DetailOutputLayer around the stock layers); only where they sit differs from SD3's.

The DA authors store the fine-tuned DiT *merged*: one LightningDiT whose ``x_embedder.proj``
reads C+D channels and whose ``final_layer.linear`` writes p*p*(C+D) rows (their "zero_pad"
warm start).  :func:`split_merged_state` cuts such a state into the C-channel LightningDiT
and our heads; :func:`merge_state` is its inverse.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from davae_core.file_validation import CheckpointError, check_heads_tensors, load_weights_only_pickle
from davae_core.heads import DAHeads, DetailOutputLayer, DetailPatchEmbed, HeadsConfig

from .lightningdit import LightningDiT
from .lightningdit_checkpoint import load_lightningdit_state, select_weights

EMBED, OUT = "x_embedder.proj", "final_layer.linear"


def _stock(module: nn.Module) -> nn.Module:
    return module.stock if isinstance(module, (DetailPatchEmbed, DetailOutputLayer)) else module


def heads_config_for_lightningdit(dit: LightningDiT, detail_channels: int) -> HeadsConfig:
    proj = _stock(dit.x_embedder.proj)
    return HeadsConfig(proj.out_channels, proj.kernel_size[0], proj.in_channels, detail_channels)


def attach_da_heads(dit: LightningDiT, heads: DAHeads) -> LightningDiT:
    """Patch ``dit`` in place to read and write C+D channels; again replaces, never stacks.

    ``heads.base_embed`` / ``base_out``, when set, replace the stock P and O (stage 2 trains them in full).
    """
    cfg = heads.config
    expected = heads_config_for_lightningdit(dit, cfg.detail_channels)
    if expected != cfg:
        raise ValueError(f"DA heads were made for {cfg}, but this LightningDiT needs {expected}")
    proj = heads.base_embed if heads.base_embed is not None else _stock(dit.x_embedder.proj)
    out = heads.base_out if heads.base_out is not None else _stock(dit.final_layer.linear)
    dit.x_embedder.proj = DetailPatchEmbed(proj, heads.detail_embed, cfg.base_channels)
    dit.final_layer.linear = DetailOutputLayer(out, heads.detail_out, cfg.patch_size, cfg.base_channels, cfg.detail_channels)
    dit.in_channels = dit.out_channels = cfg.base_channels + cfg.detail_channels
    return dit


def heads_from_lightningdit(dit: LightningDiT, include_base: bool = False) -> DAHeads:
    """The DAHeads living inside a patched LightningDiT (sharing its parameters), e.g. for :func:`save_heads`."""
    embed, out = dit.x_embedder.proj, dit.final_layer.linear
    if not isinstance(embed, DetailPatchEmbed) or not isinstance(out, DetailOutputLayer):
        raise ValueError("this LightningDiT carries no DA heads; call attach_da_heads first")
    heads = DAHeads(heads_config_for_lightningdit(dit, out.detail_channels), device="meta")
    heads.detail_embed, heads.detail_out = embed.detail, out.detail
    if include_base:
        heads.set_base_layers(embed.stock, out.stock)
    return heads


# ------------------------------------------------------------------ warm-start variants (Table 5)
HEAD_INITS = ("zero", "random", "repeat_average")


@torch.no_grad()
def initialize_detail_heads(heads: DAHeads, dit: LightningDiT, mode: str = "zero", generator: torch.Generator | None = None) -> DAHeads:
    """P'/O' as the paper starts them (``zero``) or as Table 5's ablations do, after the authors' code.

    * ``random``: P' Kaiming-uniform, O' uniform(+-1/sqrt(hidden)), O' bias uniform(+-0.01);
    * ``repeat_average`` (patch 1): detail channel j reads base channel ``j mod C``; every input
      column, the base ones too (so P is replaced), is divided by the repeat count ``ceil((C+D)/C)``;
      O' rows repeat O's.  On a detail latent that repeats the base latent, the embedding is P's.
    """
    if mode not in HEAD_INITS:
        raise ValueError(f"head init must be one of {HEAD_INITS}, got {mode!r}")
    heads.zero_()
    heads.set_base_layers(None, None)
    cfg = heads.config
    if mode == "random":
        nn.init.kaiming_uniform_(heads.detail_embed.weight, a=5 ** 0.5, generator=generator)
        bound = cfg.hidden_size ** -0.5
        nn.init.uniform_(heads.detail_out.weight, -bound, bound, generator=generator)
        nn.init.uniform_(heads.detail_out.bias, -0.01, 0.01, generator=generator)
    elif mode == "repeat_average":
        if cfg.patch_size != 1:
            raise ValueError("repeat_average is defined for patch 1 (LightningDiT-XL/1), as in the authors' code")
        stock_embed, stock_out = _stock(dit.x_embedder.proj), _stock(dit.final_layer.linear)
        c, d = cfg.base_channels, cfg.detail_channels
        repeats = -(-(c + d) // c)
        source = torch.arange(c, c + d) % c
        base_embed = nn.Conv2d(c, cfg.hidden_size, 1).to(stock_embed.weight)
        base_embed.weight.copy_(stock_embed.weight / repeats)
        base_embed.bias.copy_(stock_embed.bias)
        heads.detail_embed.weight.copy_(stock_embed.weight[:, source] / repeats)
        heads.detail_out.weight.copy_(stock_out.weight[source])
        heads.detail_out.bias.copy_(stock_out.bias[source])
        heads.set_base_layers(base_embed, None)
    return heads


# ------------------------------------------------------------------ the authors' merged layout
def split_merged_state(
    state: dict[str, torch.Tensor], base_channels: int, source: Any = "state dict",
) -> tuple[dict[str, torch.Tensor], HeadsConfig, dict[str, torch.Tensor]]:
    """Merged C+D LightningDiT -> (C-channel LightningDiT state, heads config, heads state).

    The merged embedder's single bias stays with P (P' gets zero): ``P(x_b) + P'(x_d)`` is the
    same sum.  Output rows are per patch ``(p, p, C+D)``, channels fastest, as LightningDiT unpatchifies.
    """
    weight, out_weight = state.get(f"{EMBED}.weight"), state.get(f"{OUT}.weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or not isinstance(out_weight, torch.Tensor) or out_weight.ndim != 2:
        raise CheckpointError(f"{source}: no LightningDiT patch embedder / output layer ({EMBED}.weight, {OUT}.weight)")
    hidden, channels, p, _ = weight.shape
    detail = channels - base_channels
    if detail <= 0 or out_weight.shape[0] != p * p * channels:
        raise CheckpointError(
            f"{source}: its embedder reads {channels} channels and its output layer writes {out_weight.shape[0]} "
            f"rows; a merged DA DiT reads base {base_channels} + detail channels and writes p*p times as many"
        )

    def rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_patch = t.unflatten(0, (p * p, channels))
        return per_patch[:, :base_channels].flatten(0, 1), per_patch[:, base_channels:].flatten(0, 1)

    base = {k: v for k, v in state.items() if not k.startswith((f"{EMBED}.", f"{OUT}."))}
    base[f"{EMBED}.weight"], base[f"{EMBED}.bias"] = weight[:, :base_channels], state[f"{EMBED}.bias"]
    base[f"{OUT}.weight"], detail_w = rows(out_weight)
    base[f"{OUT}.bias"], detail_b = rows(state[f"{OUT}.bias"])
    heads = {
        "detail_embed.weight": weight[:, base_channels:], "detail_embed.bias": torch.zeros_like(state[f"{EMBED}.bias"]),
        "detail_out.weight": detail_w, "detail_out.bias": detail_b,
    }
    return {k: v.contiguous() for k, v in base.items()}, HeadsConfig(hidden, p, base_channels, detail), heads


def merge_state(base_state: dict[str, torch.Tensor], heads: DAHeads) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_merged_state`: a C-channel LightningDiT state plus our heads, as one C+D DiT."""
    cfg = heads.config
    pp, c, d = cfg.patch_size ** 2, cfg.base_channels, cfg.detail_channels
    embed = heads.base_embed.weight if heads.base_embed is not None else base_state[f"{EMBED}.weight"]
    embed_bias = heads.base_embed.bias if heads.base_embed is not None else base_state[f"{EMBED}.bias"]
    out_w = heads.base_out.weight if heads.base_out is not None else base_state[f"{OUT}.weight"]
    out_b = heads.base_out.bias if heads.base_out is not None else base_state[f"{OUT}.bias"]

    def interleave(base: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        return torch.cat([base.unflatten(0, (pp, c)), detail.unflatten(0, (pp, d))], dim=1).flatten(0, 1)

    merged = dict(base_state)
    merged[f"{EMBED}.weight"] = torch.cat([embed, heads.detail_embed.weight], dim=1)
    merged[f"{EMBED}.bias"] = embed_bias + heads.detail_embed.bias
    merged[f"{OUT}.weight"] = interleave(out_w, heads.detail_out.weight)
    merged[f"{OUT}.bias"] = interleave(out_b, heads.detail_out.bias)
    return {k: v.detach().contiguous() for k, v in merged.items()}


def import_authors_dit(
    path: str | os.PathLike, base_channels: int = 32, prefer: str = "ema",
) -> tuple[LightningDiT, DAHeads]:
    """The authors' merged DA DiT as our C-channel LightningDiT with DA heads attached (and those heads)."""
    state, _ = select_weights(load_weights_only_pickle(path), path, prefer)
    base, config, heads_state = split_merged_state(state, base_channels, path)
    dit = load_lightningdit_state(base, path)
    check_heads_tensors(path, config, {k: tuple(v.shape) for k, v in heads_state.items()})
    heads = DAHeads(config)
    heads.load_state_dict(heads_state)
    return attach_da_heads(dit, heads), heads
