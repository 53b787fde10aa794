"""The process a trainer runs in: seeds, the accelerate ``Accelerator`` and its engine, logging, progress.

* :func:`seed_everything` (same seed on every rank) and :func:`derive_seed` (one seed per draw);
* :func:`make_accelerator`: the ``Accelerator`` of a ``train:`` section, with the engine the launch
  asked for (``accelerate launch --config_file training/accelerate/{ddp,fsdp,deepspeed_zero2}.yaml``)
  really set up, also on CPUs (:func:`run_requested_engine_on_cpu`);
* :func:`describe_engine`: which engine a prepared network really runs under (tests assert it);
* :func:`setup_logging`, :func:`setup_plain_logging`, :func:`progress_bar`, :func:`init_trackers`;
* :func:`maybe_inject_fault`: the kill-and-resume tests' hook.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainLoopConfig, config_to_dict, flatten_config

logger = logging.getLogger("davae_training")

FAULT_ENV = "DAVAE_FAULT_AFTER_STEP"  # test hook: os._exit after this optimizer step

# what each of accelerate's distributed types is called here (summary.json, logs, tests)
ENGINES = {"NO": "single", "MULTI_CPU": "ddp", "MULTI_GPU": "ddp", "FSDP": "fsdp2", "DEEPSPEED": "deepspeed"}


# ---------------------------------------------------------------------------- seeds
def seed_everything(seed: int) -> None:
    """Same seed on every process: model init and data order must agree across ranks."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, *parts: int | str) -> int:
    """A seed for one draw (a micro-batch's noise, an epoch's shuffle) from the run's seed.

    A pure function of its arguments, so a resumed run redraws exactly what the uninterrupted
    one drew, without saving any RNG state; hashing keeps nearby parts' seeds unrelated.
    """
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------- accelerator and engine
def make_accelerator(loop: TrainLoopConfig, cpu: bool | None = None):
    """An ``Accelerator`` with the loop's precision, accumulation, trackers and project folders."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration

    out = Path(loop.output_dir)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    report = None if loop.report_to in ("none", "", None) else loop.report_to
    kwargs: dict[str, Any] = {}
    if cpu is None and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cpu = True  # accelerate only sets up gloo (MULTI_CPU) for torchrun/mpirun workers when told cpu=True
    if cpu is not None:
        kwargs["cpu"] = cpu
    accelerator = Accelerator(
        mixed_precision=loop.mixed_precision,
        gradient_accumulation_steps=loop.gradient_accumulation_steps,
        log_with=report,
        project_config=project,
        **kwargs,
    )
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        run_requested_engine_on_cpu(accelerator)
    if loop.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def run_requested_engine_on_cpu(accelerator) -> str | None:
    """Give a CPU run the engine its launch config asked for.

    accelerate sets FSDP or DeepSpeed up only for GPU-like devices: launched on CPUs (gloo) with
    ``fsdp.yaml`` or ``deepspeed_zero2.yaml`` it silently trains plain DDP.  torch's FSDP2
    ``fully_shard`` and DeepSpeed's ZeRO (``DS_ACCELERATOR=cpu``) both run over gloo, so the plugin
    the launch described is installed on the accelerator state here, and ``prepare`` then goes
    through accelerate's own FSDP2 / DeepSpeed path, as it does on GPUs.  Returns the engine set.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        state.fsdp_plugin = plugin
        kind = DistributedType.FSDP
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(accelerator.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        accelerator.deepspeed_engine_wrapped = None
        kind = DistributedType.DEEPSPEED
    else:
        return None
    state.distributed_type = kind
    PartialState._shared_state["distributed_type"] = kind
    logger.info("CPU run: %s set up as the launch config asks (accelerate alone would run plain DDP)", ENGINES[kind.name])
    return ENGINES[kind.name]


def engine_name(accelerator) -> str:
    return ENGINES.get(accelerator.distributed_type.name, accelerator.distributed_type.name.lower())


def describe_engine(accelerator, network: torch.nn.Module) -> dict[str, Any]:
    """What the prepared ``network`` really runs under, read off the objects (not the config)."""
    from torch.distributed.tensor import DTensor, Shard

    params = list(network.parameters())
    sharded = sum(isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements) for p in params)
    info = {"engine": engine_name(accelerator), "processes": accelerator.num_processes,
            "wrapper": type(network).__name__, "parameters": len(params), "sharded_parameters": int(sharded),
            "mixed_precision": accelerator.mixed_precision}
    if info["engine"] == "deepspeed":
        info["zero_stage"] = int(accelerator.state.deepspeed_plugin.zero_stage)
    return info


# ---------------------------------------------------------------------------- logging and progress
def setup_logging(accelerator, output_dir: str | os.PathLike) -> None:
    """INFO to stderr on the main process (warnings everywhere) and to ``<output_dir>/train.log``.

    Records still propagate to the root logger, so an application (or pytest) that configured
    logging keeps seeing them; the stderr handler is only added when the root has none.
    """
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    for h in [h for h in logger.handlers if getattr(h, "_davae_training", False)]:
        logger.removeHandler(h)
        h.close()
    handlers: list[logging.Handler] = []
    if not logging.getLogger().handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    if accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._davae_training = True  # ours to replace on the next call
        logger.addHandler(h)


def setup_plain_logging() -> None:
    """Log to stderr outside a training run (exports, evaluation)."""
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)


def progress_bar(accelerator, total: int, initial: int = 0, desc: str = "train"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)


def init_trackers(accelerator, loop: TrainLoopConfig, config: Any) -> None:
    """The run's trackers, with the whole config as hyperparameters (TensorBoard takes scalars and strings)."""
    if loop.report_to not in ("none", "", None):
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten_config(config_to_dict(config)).items()}
        accelerator.init_trackers(loop.project_name, config=flat)


def maybe_inject_fault(step: int) -> None:
    """Test hook: with ``DAVAE_FAULT_AFTER_STEP=k`` the process dies hard (no cleanup) after step k."""
    target = os.environ.get(FAULT_ENV)
    if target is not None and int(target) == step:
        sys.stderr.write(f"{FAULT_ENV}={target}: exiting hard after step {step}\n")
        sys.stderr.flush()
        os._exit(17)
