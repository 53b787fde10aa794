"""Peak device memory of a block, the 8 GB cap, and out-of-memory as a result rather than a crash.

On a CPU nothing here is measured: the figures say so (``measured: false``) instead of
standing in an estimate or process RSS for GPU memory.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .. import common
from .settings import GIB

NOT_MEASURED = {"measured": False, "why": "CPU run: GPU memory is not measured here"}


def _gib(n: int) -> float:
    return round(n / GIB, 3)


@contextmanager
def peak(device: torch.device) -> Iterator[dict[str, Any]]:
    """The dict yielded holds, after the block, the peak allocated bytes (weights included) and
    the rise above what was allocated when the block began; on a CPU, ``NOT_MEASURED``."""
    out: dict[str, Any] = {}
    if device.type != "cuda":
        yield out
        out.update(NOT_MEASURED)
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield out
    torch.cuda.synchronize(device)
    top = torch.cuda.max_memory_allocated(device)
    out.update(measured=True, method="torch.cuda.max_memory_allocated", peak_gib=_gib(top), rise_gib=_gib(top - before),
               baseline_gib=_gib(before))


def merge_peaks(peaks: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest of several :func:`peak` results (one variant's repeated runs)."""
    measured = [p for p in peaks if p.get("measured")]
    if not measured:
        return dict(NOT_MEASURED)
    return max(measured, key=lambda p: p["peak_gib"])


def run_guarded(fn, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """``(fn(), {"out_of_memory": False, **peak})``, or ``(None, {"out_of_memory": True, "error": ...})``."""
    try:
        with peak(device) as mem:
            value = fn()
        return value, {"out_of_memory": False, **mem}
    except (RuntimeError, MemoryError) as error:
        if not common.is_out_of_memory(error):
            raise
        message = str(error).splitlines()[0][:200]
    release(device)  # outside the except block: the failed call's tensors can go
    return None, {"out_of_memory": True, "error": message}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def smaller_card(get_free_memory, hidden: int):
    """ComfyUI's ``get_free_memory`` as a card ``hidden`` bytes smaller would answer it (CPU memory unchanged)."""

    def free_memory(dev=None, torch_free_too=False):
        answer = get_free_memory(dev, torch_free_too)
        if getattr(dev, "type", None) in ("cpu", "mps"):
            return answer
        if torch_free_too:
            total, torch_free = answer
            return max(0, total - hidden), torch_free
        return max(0, answer - hidden)

    return free_memory


@contextmanager
def small_card(device: torch.device, cap_bytes: int) -> Iterator[dict[str, Any]]:
    """Make this process a ``cap_bytes`` card: torch refuses allocations above it
    (``set_per_process_memory_fraction``), and ComfyUI, which asks ``get_free_memory`` about the whole
    GPU, is told what the small card would leave free (:func:`smaller_card`).  That is ComfyUI's
    reserve (``--reserve-vram``, ``EXTRA_RESERVED_VRAM``) made to reach every reader: the reserve
    alone only enters ``load_models_gpu``'s plan, while ComfyUI's VAE batching and the pack's tile
    sizing read the free memory directly.  Both restored afterwards.  On a CPU there is no card to shrink."""
    import comfy.model_management as mm

    info: dict[str, Any] = {"cap_gib": _gib(cap_bytes)}
    if device.type != "cuda":
        info["applied"] = False
        info["why"] = "CPU run: no GPU memory to cap"
        yield info
        return
    total = torch.cuda.get_device_properties(device).total_memory
    real_free_memory = mm.get_free_memory
    mm.unload_all_models()
    release(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
    mm.get_free_memory = smaller_card(real_free_memory, max(0, total - cap_bytes))
    info.update(applied=True, total_gib=_gib(total), hidden_gib=_gib(max(0, total - cap_bytes)),
                comfy_free_gib_seen=_gib(mm.get_free_memory(device)), comfy_reserve_gib=_gib(mm.extra_reserved_memory()))
    try:
        yield info
    finally:
        mm.unload_all_models()
        release(device)
        mm.get_free_memory = real_free_memory
        torch.cuda.set_per_process_memory_fraction(1.0, device)
