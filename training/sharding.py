"""Tensors that may be sharded across ranks (FSDP2 ``DTensor``): whole copies out, whole copies back in.

Under DDP or DeepSpeed ZeRO-2 every rank holds every trained tensor and these are plain copies;
under FSDP2 each rank holds a shard, so :func:`full_tensor` is a collective (every rank calls it,
in the same order) and :func:`copy_whole_` takes this rank's part of a whole tensor.  Checkpoints
and exports hold whole tensors with the unwrapped model's names, so a run saved under one engine
resumes and exports under another.
"""

from __future__ import annotations

import torch


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (a collective), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def reshard(module: torch.nn.Module) -> None:
    """Put FSDP2's parameters back on their shards after a forward pass outside training.

    FSDP2 keeps the root's parameters whole after a forward (to spare an all-gather before the
    backward that usually follows); after a sampling or reconstruction pass no backward follows,
    and until a reshard the module's registered parameters are those whole copies, not the
    sharded ones the optimizer, the EMA and the checkpoints hold.  No-op for other engines.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gather_whole(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole, detached CPU copies (every rank calls this; all get the same result)."""
    return {name: full_tensor(t.detach()).cpu().contiguous() for name, t in tensors.items()}


@torch.no_grad()
def copy_whole_(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Put a whole tensor into ``target``, which may be this rank's shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(target.device, target.dtype)
    if isinstance(target, DTensor):  # every rank holds the whole tensor: take the local part, no communication
        whole = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(whole)


def load_whole_(live: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Copy ``state`` into the same-named ``live`` tensors; refuses missing, extra or mis-shaped names."""
    missing = sorted(set(live) - set(state))
    extra = sorted(set(state) - set(live))
    if missing or extra:
        raise ValueError(f"{source}: does not match this model ({len(missing)} missing, e.g. {missing[:2]}; "
                         f"{len(extra)} unexpected, e.g. {extra[:2]}){'; ' + hint if hint else ''}")
    for name, t in live.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model needs {tuple(t.shape)}")
        copy_whole_(t, state[name])
