"""The training loop kit: the skeleton every stage's trainer runs on, written once.

A stage (or a new backend) plugs in with two things:

* a **model object**, a :class:`TrainedModel` (subclassed: stage 1's
  :class:`~davae_training.stage1.step.TokenizerModel`, stage 2's
  :class:`~davae_training.stage2.model.AdapterModel`): the network the engine prepares, the module
  classes FSDP2 shards one by one (``shard_classes``), whether it keeps an EMA (``ema_decay``),
  which tensors a checkpoint holds (``checkpoint_tensors``, ``weights_file``), and small networks
  trained beside it whole on every rank (``aux``: stage 1's discriminator);
* a **step**: ``step(batch, step_index, generator) -> (loss, logs)``, the forward pass and loss of
  one micro-batch.  The trainer, ``python -m davae_training.preflight`` and
  ``python -m bench.train_throughput`` call the same step object.

:class:`Engine` runs steps (what preflight and the benchmark need); :class:`TrainingLoop` adds the
run around them.  A trainer's loop then reads as its algorithm::

    with TrainingLoop(cfg, resume, change_learning_rate, "stage 2") as loop:  # lock, accelerator, logging, seed, resume plan, run config
        loop.prepare(model)                  # engine; optimizer, lr schedule and EMA on the prepared parameters; resume
                                             # (or continue an earlier phase); guard; global batch; trackers
        while loop.running:
            for micro in loop.micro_batches():   # train.gradient_accumulation_steps of them
                with loop.accumulate():          # no gradient sync before the last one; autocast
                    loss, logs = step(next(batches), loop.step, loop.generator(micro))
                    loop.backward(loss, logs)
            loop.update()                        # clip, non-finite guard, optimizer, lr, EMA: one device read
            loop.log()                           # every train.log_every: means since the last log, over all ranks
            loop.images("samples", make_rows)    # every train.image_every: rows made on every rank
            loop.checkpoint()                    # every train.checkpoint_every; then the fault hook
        return loop.finish(export)               # final checkpoint and grid, summary.json, export(): every rank

One idiom per chore:

* **accumulation**: ``gradient_accumulation_steps`` micro-batches inside accelerate's
  ``accumulate`` (DDP skips the all-reduce until the last), then one :meth:`Engine.update`;
* **logging**: every logged value is the mean over all micro-batches since the previous log and
  over all ranks; tensors are summed on the device and read once per log;
* **seeds**: :meth:`Engine.generator` gives each micro-batch its own generator on the device,
  seeded from ``(train.seed, step, micro-batch, rank)``, and the global RNG is reseeded the same
  way at every step, so a resumed run draws exactly what the uninterrupted one drew.

Engines (``accelerate launch --config_file training/accelerate/{ddp,fsdp,deepspeed_zero2}.yaml``):
DDP; FSDP2 (``fully_shard`` of each ``shard_classes`` module and the root; also on CPUs, see
:func:`davae_training.runtime.run_requested_engine_on_cpu`); DeepSpeed ZeRO-1/2 with fp32 weights
in the module and this kit's autocast (refused: ZeRO-3, fp16, ``train.on_nonfinite=skip``, and an
accumulation or clipping in the DeepSpeed config that differs from the run config).  Everything
that must follow ``prepare`` is made after it: the trained-parameter list, the optimizer (DeepSpeed
excepted: it needs the optimizer in ``prepare`` and keeps the parameters), the lr schedule, the EMA.
What every rank must join runs on every rank: gathering whole tensors (checkpoints, digests,
exports), sample grids, exports.  Checkpoints hold whole tensors by the unwrapped model's names
(safetensors) and JSON; DeepSpeed adds its own optimizer shards.
"""

from __future__ import annotations

import contextlib
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoints import (
    FINAL_DIR,
    RunCheckpointError,
    TrainerState,
    apply_learning_rate,
    checkpoint_name,
    find_latest_checkpoint,
    latest_complete_checkpoint,
    plan_resume,
    read_trainer_state,
    write_checkpoint,
    write_run_config,
)
from .config import ConfigError, TrainLoopConfig, log_global_batch
from .optimizers import make_lr_scheduler, make_optimizer
from .run_safety import NonFiniteGuard, OutputLock
from .runtime import (
    derive_seed,
    describe_engine,
    engine_name,
    init_trackers,
    logger,
    make_accelerator,
    maybe_inject_fault,
    progress_bar,
    seed_everything,
    setup_logging,
)
from .sharding import full_tensor, gather_whole, load_whole_, reshard

OPTIMIZER_FILE = "optimizer.safetensors"  # per-parameter optimizer state, whole tensors by parameter name
OPTIMIZER_META = "optimizer.json"  # param groups, non-tensor state, the lr schedule
DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's own optimizer shards, in this subfolder of a checkpoint


# ---------------------------------------------------------------------------- the model object
@dataclass
class Auxiliary:
    """A small network trained beside the main one, whole on every rank (stage 1's discriminator).

    Its gradients are averaged over ranks by the kit (one all-reduce per step); it has its own
    AdamW and steps whenever it received gradients.
    """

    module: nn.Module
    learning_rate: float
    weights_file: str


class TrainedModel:
    """What a stage gives the kit: the network to train and how it is kept.  Subclass it.

    The kit replaces ``network`` by the prepared one (DDP wrapper, FSDP2-sharded module, DeepSpeed
    engine) and sets ``ema``; :attr:`module` is always the unwrapped network.
    """

    shard_classes: tuple[str, ...] = ()  # module classes FSDP2 shards on their own; the root takes the rest
    weights_file = "model.safetensors"
    ema_file = "model_ema.safetensors"
    checkpoint_frozen = False  # True: checkpoints hold the whole state dict; False: the trained tensors only
    load_hint = ""  # added to the refusal of a checkpoint that does not fit the model

    def __init__(self, network: nn.Module, ema_decay: float = 0.0, aux: dict[str, Auxiliary] | None = None):
        self.network = network
        self.ema_decay = ema_decay
        self.ema = None
        self.aux = dict(aux or {})

    @property
    def module(self) -> nn.Module:
        return unwrap(self.network)

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of everything trained, in a fixed order (after prepare: the prepared ones)."""
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def engine_problems(self, engine: str) -> list[str]:
        """What this model cannot do under ``engine`` ("single", "ddp", "fsdp2", "deepspeed"); the kit refuses to start."""
        return []

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict() if self.checkpoint_frozen else dict(self.trained_parameters())

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.trained_parameters(), self.ema.shadow_params)) if self.ema is not None else {}

    @contextlib.contextmanager
    def ema_weights(self, use: bool = True) -> Iterator[None]:
        """Inside: the trained parameters hold the EMA (every rank, no communication); after: the raw ones back."""
        if not use or self.ema is None:
            yield
            return
        reshard(self.network)  # the sharded parameters, not whole copies a forward pass left behind
        params = list(self.trained_parameters().values())
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            self.ema.copy_to(params)
        try:
            yield
        finally:
            reshard(self.network)  # a forward pass inside may have left FSDP's root whole, holding the EMA
            with torch.no_grad():
                for p, r in zip(params, raw):
                    p.copy_(r)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP / DeepSpeed / torch.compile wrappers (FSDP2 shards in place)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def make_ema(parameters: list[nn.Parameter], decay: float):
    """diffusers' EMAModel over ``parameters`` (None when ``decay`` is 0)."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=decay)


# ---------------------------------------------------------------------------- engine
class Engine:
    """An accelerator, a prepared model object and its optimizers: runs steps, writes nothing."""

    def __init__(self, train: TrainLoopConfig, accelerator=None):
        self.train = train
        self.accelerator = accelerator if accelerator is not None else make_accelerator(train)
        self.state = TrainerState(world_size=self.accelerator.num_processes, engine=engine_name(self.accelerator))
        self.model: TrainedModel | None = None
        self.guard: NonFiniteGuard | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._host_sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def deepspeed(self) -> bool:
        return self.state.engine == "deepspeed"

    # ------------------------------------------------------------ prepare
    def prepare(self, model: TrainedModel) -> None:
        """The engine wraps or shards ``model.network``; then the optimizer, lr schedule and EMA on
        the prepared parameters, the auxiliary networks' optimizers and the non-finite guard."""
        acc, train = self.accelerator, self.train
        self._configure_engine(model)
        if self.deepspeed:  # DeepSpeed builds its engine around the optimizer and keeps the parameters
            raw = make_optimizer(model.trained_parameters().values(), train)
            model.network, self.optimizer = acc.prepare(model.network, raw)
        else:
            model.network = acc.prepare(model.network)
            raw = self.optimizer = make_optimizer(model.trained_parameters().values(), train)
        self.model = model
        self.params = model.trained_parameters()
        self.scheduler = acc.prepare_scheduler(make_lr_scheduler(raw, train, acc.num_processes))
        model.ema = make_ema(list(self.params.values()), model.ema_decay)
        self.aux_optimizers = {}
        for name, aux in model.aux.items():
            aux.module.to(self.device)
            self.aux_optimizers[name] = torch.optim.AdamW(
                aux.module.parameters(), lr=aux.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)
        self.engine_info = describe_engine(acc, model.network)
        if self.engine_info["engine"] == "fsdp2" and not self.engine_info["sharded_parameters"]:
            raise RuntimeError(f"FSDP was set up but no parameter of the prepared {self.engine_info['wrapper']} is sharded")
        logger.info("engine: %s", ", ".join(f"{k}={v}" for k, v in self.engine_info.items()))
        self.guard = NonFiniteGuard(acc, train.on_nonfinite, self.last_good_checkpoint)

    def last_good_checkpoint(self) -> Path | None:
        return None

    def _configure_engine(self, model: TrainedModel) -> None:
        """Tell FSDP what to shard and DeepSpeed what the run config says; refuse what cannot be honoured."""
        train, state = self.train, self.accelerator.state
        problems = model.engine_problems(self.state.engine)
        if problems:
            raise ConfigError(f"{self.state.engine} cannot run this config as asked:\n  " + "\n  ".join(problems))
        if self.state.engine == "fsdp2":
            plugin = state.fsdp_plugin
            if plugin.fsdp_version != 2:
                raise ConfigError("the accelerate config asks for FSDP version 1: set fsdp_version: 2 (FSDP2, fully_shard)")
            if not model.shard_classes:
                raise ConfigError(f"{type(model).__name__} names no module classes for FSDP to shard")
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            plugin.auto_wrap_policy = transformer_auto_wrap_policy  # the model object names the shard units
            plugin.transformer_cls_names_to_wrap = list(model.shard_classes)
            if train.optimizer != "adamw":
                raise ConfigError(f"train.optimizer={train.optimizer} keeps quantised state that FSDP cannot shard; "
                                  "use train.optimizer=adamw with FSDP")
        if self.deepspeed:
            configure_deepspeed(state.deepspeed_plugin.deepspeed_config, train, self.accelerator.num_processes)

    # ------------------------------------------------------------ per micro-batch
    def generator(self, micro: int = 0) -> torch.Generator:
        """This micro-batch's random draws, on the device: a pure function of (seed, step, micro-batch, rank)."""
        seed = derive_seed(self.train.seed, self.state.step, micro, self.accelerator.process_index)
        return torch.Generator(device=self.device).manual_seed(seed)

    def micro_batches(self) -> Iterator[int]:
        """The micro-batch indices of one optimizer step; counts the data position."""
        torch.manual_seed(derive_seed(self.train.seed, "global", self.state.step, self.accelerator.process_index))
        for micro in range(self.train.gradient_accumulation_steps):
            yield micro
            self.state.micro_batches += 1

    def autocast(self):
        """The run's mixed precision (also under DeepSpeed, which keeps fp32 weights here)."""
        mp = self.train.mixed_precision
        if mp not in ("bf16", "fp16"):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        with self.accelerator.accumulate(self.model.network), self.autocast():
            yield

    def backward(self, loss: torch.Tensor, logs: dict[str, torch.Tensor | float] | None = None) -> None:
        """Flag a non-finite loss, add ``logs`` to the running sums (on the device), backward."""
        self.guard.note_loss(loss)
        self.add_logs(logs or {})
        self.accelerator.backward(loss)

    def add_logs(self, logs: dict[str, torch.Tensor | float]) -> None:
        for key, value in logs.items():
            if torch.is_tensor(value):
                value = value.detach().float().reshape(())
                self._sums[key] = self._sums[key] + value if key in self._sums else value
            else:
                self._host_sums[key] = self._host_sums.get(key, 0.0) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1

    # ------------------------------------------------------------ per optimizer step
    def update(self) -> bool:
        """Average the auxiliary gradients, clip, ask the guard (one device read), step the optimizers,
        the lr schedule and the EMA; False when the guard skipped the step."""
        acc, train = self.accelerator, self.train
        self._average_aux_gradients()
        scaler = None if self.deepspeed else acc.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        params = list(self.params.values())
        norms = []
        if self.deepspeed:
            norm = self.model.network.get_global_grad_norm()
            if norm is not None:
                norms.append(torch.as_tensor(norm, dtype=torch.float32, device=self.device))
        elif train.max_grad_norm:
            norms.append(full_tensor(torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)))
        for aux in self.model.aux.values():
            grads = [p for p in aux.module.parameters() if p.grad is not None]
            if grads and train.max_grad_norm:
                norms.append(torch.nn.utils.clip_grad_norm_(grads, train.max_grad_norm))
        grad_norm = torch.stack([n.float().to(self.device) for n in norms]).norm() if norms else None
        if grad_norm is None and not self.deepspeed:  # nothing clipped: the guard measures the gradients itself
            grad_norm = self._total_norm(params)
        skip = self.guard.skip_step(params, self.state.step + 1, grad_norm, applied=self.deepspeed)
        if not skip:
            if self.deepspeed:
                pass  # the engine stepped inside backward
            elif scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            for name, opt in self.aux_optimizers.items():
                if any(p.grad is not None for p in self.model.aux[name].module.parameters()):
                    opt.step()
            self.scheduler.step()
            if self.model.ema is not None:
                self.model.ema.step(params)
        self.optimizer.zero_grad(set_to_none=True)
        for opt in self.aux_optimizers.values():
            opt.zero_grad(set_to_none=True)
        if norms:
            self.add_logs({"grad_norm": grad_norm})
        self.state.step += 1
        return not skip

    def _total_norm(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        grads = [p.grad for p in params if p.grad is not None]
        return full_tensor(torch.nn.utils.get_total_norm(grads)) if grads else None

    def _average_aux_gradients(self) -> None:
        """The mean over ranks of each auxiliary network's gradients, as DDP would give (one all-reduce)."""
        world = self.accelerator.num_processes
        if world == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for aux in self.model.aux.values():
            grads = [p.grad for p in aux.module.parameters() if p.grad is not None]
            if grads:
                flat = _flatten_dense_tensors(grads)
                torch.distributed.all_reduce(flat)
                flat /= world
                for g, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    g.copy_(mean)

    def logged_means(self) -> dict[str, float]:
        """Means of the values added since the last call, over micro-batches and ranks (one device read)."""
        keys = sorted(self._sums)
        values: dict[str, float] = {}
        if keys:
            local = torch.stack([self._sums[k] / self._counts[k] for k in keys])
            values = dict(zip(keys, self.accelerator.reduce(local, reduction="mean").tolist()))
        values.update({k: v / self._counts[k] for k, v in self._host_sums.items()})
        values["lr"] = self.scheduler.get_last_lr()[0]
        self._sums, self._host_sums, self._counts = {}, {}, {}
        return values

    def close(self) -> None:
        """Leave no process-wide accelerate state behind (for another Engine in the same process)."""
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)

    # ------------------------------------------------------------ checkpoint contents
    def fill_checkpoint(self, folder: Path) -> None:
        """Whole tensors into ``folder`` (every rank gathers; the main process writes)."""
        acc, model = self.accelerator, self.model
        reshard(model.network)
        weights = gather_whole(model.checkpoint_tensors())
        ema = gather_whole(model.ema_tensors())
        optimizer, meta = ({}, {}) if self.deepspeed else optimizer_state(self.optimizer, self.params)
        meta["scheduler"] = self.scheduler.state_dict()
        meta["aux"] = {}
        if acc.is_main_process:
            save_file(weights, str(folder / model.weights_file))
            if model.ema is not None:
                save_file(ema, str(folder / model.ema_file), metadata={"optimization_step": str(model.ema.optimization_step)})
            if not self.deepspeed:
                save_file(optimizer, str(folder / OPTIMIZER_FILE))
            for name, aux in model.aux.items():
                save_file(gather_whole(aux.module.state_dict()), str(folder / aux.weights_file))
                aux_params = dict(aux.module.named_parameters())
                aux_tensors, meta["aux"][name] = optimizer_state(self.aux_optimizers[name], aux_params)
                save_file(aux_tensors, str(folder / f"optimizer_{name}.safetensors"))
            (folder / OPTIMIZER_META).write_text(json.dumps(meta, indent=1))
        if self.deepspeed:  # its optimizer shards: every rank writes its own
            model.network.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_checkpoint(self, folder: Path) -> None:
        """The inverse of :meth:`fill_checkpoint`, on every rank (each reads the whole tensors it needs)."""
        model = self.model
        try:
            load_whole_(model.checkpoint_tensors(), load_file(str(folder / model.weights_file)),
                        str(folder / model.weights_file), model.load_hint)
            if model.ema is not None:
                self._load_ema(folder / model.ema_file)
            meta = json.loads((folder / OPTIMIZER_META).read_text())
            if self.deepspeed:
                if not (folder / DEEPSPEED_TAG).is_dir():
                    raise RunCheckpointError(f"{folder} was not written under DeepSpeed (no {DEEPSPEED_TAG}/): resume it with DDP or FSDP")
                model.network.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
            else:
                if (folder / DEEPSPEED_TAG).is_dir():
                    raise RunCheckpointError(f"{folder} was written under DeepSpeed, whose optimizer state only DeepSpeed reads: "
                                             "resume it with the DeepSpeed config")
                load_optimizer_state(self.optimizer, self.params, load_file(str(folder / OPTIMIZER_FILE)), meta)
            for name, aux in model.aux.items():
                load_whole_(aux.module.state_dict(), load_file(str(folder / aux.weights_file)), str(folder / aux.weights_file))
                load_optimizer_state(self.aux_optimizers[name], dict(aux.module.named_parameters()),
                                     load_file(str(folder / f"optimizer_{name}.safetensors")), meta["aux"][name])
            self.scheduler.load_state_dict(meta["scheduler"])
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise RunCheckpointError(f"{folder}: cannot be resumed into this run: {e}") from e
        self.state = read_trainer_state(folder, self.accelerator.num_processes)
        self.state.world_size, self.state.engine = self.accelerator.num_processes, engine_name(self.accelerator)

    def _load_ema(self, path: Path) -> None:
        from safetensors import safe_open

        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; this run has an EMA but the checkpoint has none")
        with safe_open(str(path), framework="pt") as f:
            step = int((f.metadata() or {}).get("optimization_step", 0))
        load_whole_(self.model.ema_tensors(), load_file(str(path)), str(path))
        self.model.ema.optimization_step = step


def configure_deepspeed(ds: dict[str, Any], train: TrainLoopConfig, num_processes: int) -> None:
    """Write the run config's micro-batch, accumulation and clipping into DeepSpeed's config ``ds``; refuse what
    DeepSpeed cannot honour, and a value the accelerate config sets that differs from the run config."""
    problems = []
    stage = int(ds.get("zero_optimization", {}).get("stage", 2))
    if stage > 2:
        problems.append(f"ZeRO stage {stage} shards the parameters in DeepSpeed's own format, which the checkpoints, EMA and "
                        "export cannot read: use ZeRO-2, or FSDP (training/accelerate/fsdp.yaml) to shard parameters")
    if train.on_nonfinite == "skip":
        problems.append("train.on_nonfinite=skip: DeepSpeed applies the optimizer step inside backward, so a step cannot be "
                        "skipped; use train.on_nonfinite=stop, or DDP/FSDP")
    if train.mixed_precision == "fp16":
        problems.append("train.mixed_precision=fp16 needs loss scaling, which this trainer does not run under DeepSpeed; use bf16")
    wanted = {"gradient_accumulation_steps": ("train.gradient_accumulation_steps", train.gradient_accumulation_steps),
              "gradient_clipping": ("train.max_grad_norm", train.max_grad_norm or 0.0)}
    for key, (ours, want) in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto" and float(given) != float(want):
            problems.append(f"the DeepSpeed config sets {key}={given}, the run config {ours}={want}: remove {key} from the "
                            "accelerate config (the run config decides), or set the run config to match")
    if problems:
        raise ConfigError("DeepSpeed cannot run this config as asked:\n  " + "\n  ".join(problems))
    ds.update({key: want for key, (_, want) in wanted.items()})
    ds["train_micro_batch_size_per_gpu"] = train.batch_size
    ds["train_batch_size"] = train.batch_size * train.gradient_accumulation_steps * num_processes
    # fp32 master weights stay in the module (the EMA and the checkpoints read them); the kit autocasts
    ds["bf16"] = {"enabled": False}
    ds["fp16"] = {"enabled": False}


def optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(whole per-parameter state tensors keyed ``name::key``, JSON-able rest): engine-neutral."""
    tensors, other = {}, {}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"{name}::{key}"] = value
            else:
                other[f"{name}::{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return gather_whole(tensors), {"state": other, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    by_name: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["state"].items()]:
        name, _, part = key.rpartition("::")
        by_name.setdefault(name, {})[part] = value
    unknown = sorted(set(by_name) - set(params))
    if unknown:
        raise ValueError(f"optimizer state for parameters this model does not train, e.g. {unknown[:2]}")
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group.update(saved)
    # AdamW keeps its step count on the CPU unless fused or capturable
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for name, p in params.items():
        entries = {}
        for key, value in by_name.get(name, {}).items():
            if torch.is_tensor(value) and (value.dim() > 0 or on_device):
                value = value.to(p.device)
                if isinstance(p, DTensor) and tuple(value.shape) == tuple(p.shape):
                    value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            entries[key] = value
        if entries:
            optimizer.state[p] = entries


# ---------------------------------------------------------------------------- the run
class TrainingLoop(Engine):
    """An :class:`Engine` with the run around it: lock, logging, resume, checkpoints, trackers,
    progress bar, images, the fault hook and the finish.  Use as a context manager."""

    def __init__(self, config: Any, resume: str | None = None, change_learning_rate: bool = False, desc: str = "train",
                 bar_keys: tuple[str, ...] = ("loss",)):
        train = config.train
        self.config = config
        self.out = Path(train.output_dir)
        self.lock = OutputLock(self.out)  # a second run into the same folder refuses to start
        self.lock.acquire()
        try:
            super().__init__(train)
            setup_logging(self.accelerator, self.out)
            seed_everything(train.seed)
            self.plan = plan_resume(resume, config, change_learning_rate)  # before the run config is rewritten
            write_run_config(self.accelerator, self.out, config)
        except BaseException:
            self.lock.release()
            raise
        self.desc, self.bar_keys = desc, bar_keys
        self.last_logged: dict[str, float] = {}
        self._last_images: tuple[str, Callable[[], list[torch.Tensor] | None]] | None = None

    def __enter__(self) -> "TrainingLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    @property
    def running(self) -> bool:
        return self.state.step < self.train.max_steps

    def last_good_checkpoint(self) -> Path | None:
        return latest_complete_checkpoint(self.out)[0]

    def prepare(self, model: TrainedModel) -> None:
        super().prepare(model)
        if self.plan is not None:
            self.load_checkpoint(self.plan.path)
            self.state = self.plan.position(self.state)
            logger.info("resumed from %s at step %d", self.plan.path, self.state.step)
            if self.plan.learning_rate is not None:
                apply_learning_rate(getattr(self.optimizer, "optimizer", self.optimizer), self.scheduler, self.plan.learning_rate)
                logger.info("resume: learning rate set to %g (was %g in the checkpoint)", self.plan.learning_rate,
                            self.plan.changes["train.learning_rate"][0])
        log_global_batch(self.train, self.accelerator.num_processes)  # and how to reach the recipe's, if it differs
        init_trackers(self.accelerator, self.train, self.config)
        self.bar = progress_bar(self.accelerator, self.train.max_steps, self.state.step, self.desc)

    def due(self, every: int) -> bool:
        return bool(every) and self.state.step % every == 0

    def update(self) -> bool:
        stepped = super().update()
        self.bar.update(1)
        return stepped

    def log(self, **host_values: float) -> None:
        """Every ``train.log_every`` steps and at the last: trackers, the log file, the bar."""
        if host_values:
            self.add_logs(host_values)
        if not (self.due(self.train.log_every) or self.state.step == self.train.max_steps):
            return
        values = self.logged_means()
        self.accelerator.log(values, step=self.state.step)
        self.last_logged = values
        self.bar.set_postfix({k: f"{values[k]:.4g}" for k in self.bar_keys if k in values})
        logger.info("step %d: %s", self.state.step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def images(self, tag: str, make_rows: Callable[[], list[torch.Tensor] | None]) -> Path | None:
        """Every ``train.image_every`` steps: ``make_rows()`` on every rank, the grid written by the main one."""
        self._last_images = (tag, make_rows)
        return self._write_images(tag, make_rows) if self.due(self.train.image_every) else None

    def _write_images(self, tag: str, make_rows: Callable[[], list[torch.Tensor] | None]) -> Path | None:
        from .images import log_image_file, save_image_grid

        rows = make_rows()  # every rank: a sharded network needs all of them for its forward passes
        reshard(self.model.network)
        path = None
        if rows and self.accelerator.is_main_process:
            path = save_image_grid(rows, self.out / "samples" / f"step-{self.state.step:08d}.png")
            log_image_file(self.accelerator, tag, path, self.state.step)
        self.accelerator.wait_for_everyone()
        return path

    def checkpoint(self) -> None:
        """Every ``train.checkpoint_every`` steps; then the fault hook (tests kill the run here)."""
        if self.due(self.train.checkpoint_every):
            self.save()
        maybe_inject_fault(self.state.step)

    def save(self) -> Path:
        return write_checkpoint(self.accelerator, self.out, self.state, self.fill_checkpoint, self.train.checkpoints_total_limit)

    def finish(self, export: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """The final checkpoint (unless just written) and grid, ``final/summary.json`` with the engine that
        ran and each rank's digest of the trained weights, then ``export()`` on every rank; returns the summary."""
        self.bar.close()
        latest = find_latest_checkpoint(self.out)
        if latest is None or latest.name != checkpoint_name(self.state.step):
            self.save()
        if self._last_images is not None and self.train.image_every and self.state.step % self.train.image_every:
            self._write_images(*self._last_images)
        reshard(self.model.network)
        summary = {"step": self.state.step, "engine": self.engine_info, **self.rank_digests(), "last_logged": self.last_logged}
        if self.guard.skipped:
            summary["skipped_steps"] = self.guard.skipped
        summary.update(export() if export is not None else {})
        if self.accelerator.is_main_process:
            from davae_core.atomic_files import write_json_atomic

            write_json_atomic(self.out / FINAL_DIR / "summary.json", summary)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if torch.distributed.is_initialized():  # tear gloo down while every rank is alive: at exit it can hang
            torch.distributed.destroy_process_group()
        return summary

    def rank_digests(self) -> dict[str, Any]:
        """Every rank's digest of its whole trained weights; replicated engines must agree."""
        from accelerate.utils import gather_object

        from .checkpoints import tensor_digest

        digest = tensor_digest(gather_whole(dict(self.model.trained_parameters())))
        digests = gather_object([digest])
        in_sync = len(set(digests)) == 1
        if not in_sync:
            logger.error("trained weights differ between ranks: %s", digests)
        return {"world_size": self.accelerator.num_processes, "rank_digests": digests, "ranks_in_sync": in_sync}
