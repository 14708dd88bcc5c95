"""The one training loop of l2b_fast: any batches (webdataset loaders, DataLoaders, lists, in-memory tensors
through :class:`~l2b_fast.data.tensors.TensorTaskData`, per-epoch factories), on one process or many (``torchrun``,
DistributedDataParallel).

Search (a model holding :class:`~l2b_fast.nn.Branching` blocks, e.g. a ``TreeSupernet``) and retrain (a
``TreeNet`` or any module returning ``{task: output}``) alike: two optimizers (weights, logits; Adam with
the paper's L2 weight decay or AdamW), warmup epochs with frozen logits, temperature and learning-rate
schedules, task weights, mixed precision (bf16, or fp16 with gradient scaling), channels_last, gradient
accumulation, ``torch.compile``, a whole-step CUDA graph (``cuda_graph``), CSV/TensorBoard logs, progress, atomic
checkpoints and exact resume.

The logits are found by the model itself: the ``logits`` parameters of the ``Branching`` modules of the
unwrapped module (under DistributedDataParallel and ``torch.compile``), never by looking for methods on the
wrapper, so a DDP-wrapped supernet keeps its logits frozen during warmup.

One tree per optimizer step: every forward of a step (each accumulated batch, on every rank) samples from
:func:`~l2b_fast.train.distributed.step_seed` (run seed, step), so all ranks route through the same tree
without communicating, and accumulating k batches equals one batch k times larger. A model whose forward
takes ``seed=`` (``TreeSupernet``) gets it as a persistent int64 device tensor that is ``fill_``ed before
each step: no host synchronisation, and a compiled model (``compile={"fullgraph": True}``, or
``{"mode": "reduce-overhead"}`` for CUDA graphs) reads the new seed and the new temperature (the
``Branching.tau_tensor`` buffers) from memory, so it compiles once for the whole run. A model whose
forward only takes ``generator=`` gets a ``torch.Generator`` seeded with the same value (drawing from it
breaks a compiled graph, so fullgraph needs ``seed=``). Eager and compiled runs sample the same trees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from l2b_fast.nn.branching import Branching
from l2b_fast.nn.cost import TreeCost
from l2b_fast.nn.supernet import TreeSupernet
from l2b_fast.train import distributed, graphed_step, lr_schedules, schedules
from l2b_fast.train.checkpoints import atomic_save, read_checkpoint, rng_state, set_rng_state
from l2b_fast.train.logs import Progress, RunLogs, probability_row

__all__ = [
    "TrainConfig",
    "Trainer",
    "Evaluation",
    "NonFiniteLossError",
    "unwrap_model",
    "branching_modules",
    "StreamConfig",
    "StreamTrainer",
]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# "step": every step samples from (run seed, step), the same tree on every rank, a device tensor under compile and
# CUDA graphs. "global": torch's global generator, seeded once with the run seed (one process only).
SAMPLINGS = ("step", "global")
CHECKPOINT_FORMAT = "l2b_fast.stream_trainer/1"
# Settings a resumed run may change: how it reports, and how long it trains (more epochs continue the run).
RESUME_MAY_CHANGE = ("progress", "epochs")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class TrainConfig:
    """Settings of a :class:`Trainer` run (all of them are stored in the checkpoint and must match on resume,
    except ``progress``).

    ``batches_per_epoch``: batches drawn from the data per epoch and rank (None: until the iterable ends).
    ``accumulation``: batches per optimizer step (the last step of an epoch may take fewer; its gradient is
    rescaled to the mean). ``steps`` below are optimizer steps. ``optimizer``: ``"adam"`` (weight decay as an L2
    term in the gradient, as the paper's Adam) or ``"adamw"`` (decoupled). ``lr_schedule`` scales
    ``lr_weights``, ``lr_schedule_logits`` scales ``lr_logits`` (see :mod:`l2b_fast.train.lr_schedules`; None:
    constant). ``tau``: see :mod:`l2b_fast.train.schedules` (``{"kind": "epoch_decay", ...}`` decays per epoch,
    as the paper does for CelebA and Taskonomy). ``precision``: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"``
    (autocast and a GradScaler). ``compile``: ``torch.compile`` the model (True, or a dict of its keyword
    arguments: ``{"fullgraph": True}`` makes any graph break an error; ``{"mode": "reduce-overhead"}`` replays
    the compiled forward and backward as CUDA graphs; the step seed and tau are device tensors, so neither
    recompiles nor re-records). ``cuda_graph``: capture the whole step (forward, loss, backward, both optimizers'
    steps) in a CUDA graph and replay it every step (:mod:`l2b_fast.train.graphed_step`: one graph for warmup, one
    for the search; the epoch's short last batch gets its own graph after its eager steps); CUDA only, one
    process, ``accumulation=1``, fp32 or bf16, a forward taking ``seed=``. ``sampling``: where a supernet's branch
    samples come from: ``"step"`` (default; :func:`~l2b_fast.train.distributed.step_seed` of the run seed and the
    step, see below) or ``"global"`` (torch's global generator seeded once with ``seed``, one process only: the
    stream the synthetic presets' measured outcomes were found with). ``checkpoint_every``: steps between
    checkpoints (0: only at the end of each epoch; epochs always end with one). ``budget_parameters`` /
    ``budget_flops``: a search (a model holding a ``TreeSupernet``) adds ``budget_weight * relu(expected - budget)
    / budget`` to the loss after warmup, ``expected`` the derived tree's expected parameters / FLOPs per sample
    under the current logits (:mod:`l2b_fast.nn.cost`; FLOPs measured once on the first batch's first sample);
    ignored when training a fixed tree.
    """

    epochs: int
    batches_per_epoch: int | None = None
    accumulation: int = 1
    warmup_epochs: int = 0
    optimizer: str = "adam"
    lr_weights: float = 1e-3
    weight_decay_weights: float = 0.0
    lr_logits: float = 1e-3
    weight_decay_logits: float = 0.0
    lr_schedule: dict | None = None
    lr_schedule_logits: dict | None = None
    tau: dict | float = 1.0
    task_weights: dict[str, float] | None = None
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool | dict = False
    cuda_graph: bool = False
    sampling: str = "step"
    checkpoint_every: int = 0
    log_every: int = 10
    budget_parameters: int | None = None
    budget_flops: int | None = None
    budget_weight: float = 1.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "accumulation", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.batches_per_epoch is not None and (
            not isinstance(self.batches_per_epoch, int) or self.batches_per_epoch < 1
        ):
            raise ValueError(f"batches_per_epoch must be None or an integer >= 1, got {self.batches_per_epoch!r}")
        if not isinstance(self.warmup_epochs, int) or not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be an integer in [0, epochs], got {self.warmup_epochs!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.compile, (bool, dict)):
            raise ValueError(f"compile must be True/False or a dict of torch.compile options, got {self.compile!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {sorted(SAMPLINGS)}, got {self.sampling!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {self.cuda_graph!r}")
        if self.cuda_graph:
            graphed_step.check_config(self)
        for name in ("lr_weights", "lr_logits", "weight_decay_weights", "weight_decay_logits"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        for name in ("budget_parameters", "budget_flops"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer (or unset), got {value!r}")
        weight = self.budget_weight
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight > 0)
        ):
            raise ValueError(f"budget_weight must be a finite positive number, got {weight!r}")
        first_tau = schedules.from_config(self.tau)(0, 0)  # validates a schedule (not a bare number)
        if not (math.isfinite(first_tau) and first_tau > 0):
            raise ValueError(f"tau must stay finite and positive, got {self.tau!r}")
        lr_schedules.from_config(self.lr_schedule)
        lr_schedules.from_config(self.lr_schedule_logits)


class NonFiniteLossError(FloatingPointError):
    """A task's loss became NaN or infinite; the run stopped before writing a checkpoint of that state."""


@dataclasses.dataclass
class Evaluation:
    """Result of :meth:`Trainer.evaluate`, over all ranks: per-task mean losses and their weighted sum
    (``losses["loss"]``), the samples evaluated, and the data set's metric accumulator (None without one)."""

    losses: dict[str, float]
    samples: int
    metrics: object | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def branching_modules(model: nn.Module) -> list[Branching]:
    """The model's branching blocks (its connectivity logits), found in the unwrapped module."""
    return [module for module in unwrap_model(model).modules() if isinstance(module, Branching)]


class _TaskLosses:
    """Per-task losses from a data set object (``task_targets`` + ``losses``, :mod:`l2b_fast.datasets`) or a
    mapping ``{task: loss_fn(prediction, target)}``."""

    def __init__(self, losses, model_tasks: list[str] | None):
        self.dataset = (
            losses
            if callable(getattr(losses, "task_targets", None)) and callable(getattr(losses, "losses", None))
            else None
        )
        if self.dataset is not None:
            known = list(self.dataset.tasks)
        elif isinstance(losses, Mapping):
            known = list(losses)
            bad = [task for task, fn in losses.items() if not callable(fn)]
            if bad:
                raise TypeError(f"losses for tasks {bad} are not callable")
            self.functions = dict(losses)
        else:
            raise TypeError(
                f"losses must be a data set (l2b_fast.datasets) or a mapping {{task: loss_fn}}, got "
                f"{type(losses).__name__}"
            )
        self.tasks = list(model_tasks) if model_tasks is not None else known
        missing = [task for task in self.tasks if task not in known]
        if missing:
            raise ValueError(f"no loss for the model's task(s) {missing}; losses cover {known}")

    def __call__(self, outputs: Mapping[str, torch.Tensor], targets, masks) -> dict[str, torch.Tensor]:
        missing = [task for task in self.tasks if task not in outputs]
        if missing:
            raise ValueError(f"the model gave no output for task(s) {missing}")
        outputs = {task: outputs[task] for task in self.tasks}
        if self.dataset is not None:
            targets, masks = self.dataset.task_targets(targets, masks)
            return self.dataset.losses(outputs, targets, masks)
        if not isinstance(targets, Mapping):
            raise TypeError(f"targets must be a mapping {{task: tensor}}, got {type(targets).__name__}")
        absent = [task for task in self.tasks if task not in targets]
        if absent:
            raise ValueError(f"the batch has no target for task(s) {absent}")
        return {task: self.functions[task](outputs[task], targets[task]) for task in self.tasks}

    def metrics(self):
        return (
            self.dataset.metrics()
            if self.dataset is not None and callable(getattr(self.dataset, "metrics", None))
            else None
        )

    def metric_columns(self) -> list[str]:
        columns = getattr(self.dataset, "columns", ()) if self.metrics() is not None else ()
        return [column.name for column in columns]

    def update_metrics(self, metrics, outputs, targets, masks) -> None:
        targets, masks = self.dataset.task_targets(targets, masks)
        metrics.update({task: outputs[task] for task in self.tasks}, targets, masks)


def _split_batch(batch) -> tuple:
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    shape = (
        f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    )
    raise TypeError(f"a batch must be (inputs, targets) or (inputs, targets, masks), got {shape}")


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _check_data(data, name: str) -> bool:
    """True for a factory (called per epoch), False for an iterable; TypeError for anything else."""
    if isinstance(data, Iterable):
        return False
    if callable(data):
        return True
    raise TypeError(f"{name} must be an iterable of batches or a factory returning one, got {type(data).__name__}")


def _lookahead(iterator: Iterator) -> Iterator[tuple[object, bool]]:
    """``(item, is_last)`` pairs: the last batch of an epoch must synchronise the accumulated gradients."""
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def _set_lr(group: dict, value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)  # in place: a captured optimizer step reads it from memory (no sync)
    else:
        group["lr"] = value


def _find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    while not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)  # torch.compile's wrapper
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


class Trainer:
    """Trains ``model`` on the batches of ``data``, in one process or as one rank of a DDP job.

    Args:
        model: a module returning ``{task: output}``: a supernet (holding ``Branching`` blocks: search) or a
            derived tree (retrain); plain, or already wrapped in DistributedDataParallel. Moved to the device.
        losses: a data set object of :mod:`l2b_fast.datasets` (batches ``(inputs, targets, masks)`` or
            ``(inputs, targets)`` as its loaders yield) or ``{task: loss_fn(prediction, target)}`` (batches
            ``(inputs, {task: target})``).
        data: the training batches of this rank: an iterable, iterated once per epoch (a list, a DataLoader,
            a loader), or a factory ``data(epoch)`` returning the epoch's iterable; a factory that also takes
            ``skip`` (``data(epoch, skip=k)``) returns the epoch's batches from the k-th on (a cheap resume).
        config: :class:`TrainConfig`.
        out_dir: logs and ``checkpoints/last.pt`` (written by rank 0 only).
        val_data: evaluated at the end of every epoch (an iterable, or a factory ``val_data()``); each rank
            passes its own part (every sample on exactly one rank, as the eval loaders do).
        context: from :func:`l2b_fast.train.distributed.setup`; default: the initialised process group (if
            any) and ``device`` (default: the model's device).
        prepare_batch: ``prepare_batch(batch, device) -> (inputs, targets[, masks])`` for batches of another
            shape, e.g. raw Taskonomy batches normalised on the GPU:
            ``lambda batch, device: protocol.to_targets_batch(batch[0], device)``.

    Exact resume (``fit(resume=True)``) restores the model, optimizers, gradient scaler, step and epoch, every
    rank's RNG states (torch, CUDA, numpy, python) and the position in the epoch's data: the trainer puts back
    the RNG states saved when the epoch began, re-creates the epoch's iterable (``iter(data)`` or
    ``data(epoch)``), drops the batches already used (or asks ``data(epoch, skip=k)``), then restores the
    checkpoint's RNG states. This reproduces the batches when an epoch's batches depend only on the epoch and
    on the RNG states when the iterable is created and gives its first batch: lists and tensors, DataLoaders
    (shuffled or not, with non-persistent workers), factories that seed from the epoch (the webdataset train
    loaders built per epoch with ``seed=seed + epoch``). An iterable whose stream moves on across epochs
    (a webdataset train loader built once: its persistent workers start the next pass where the last ended)
    is resumed at the right position but not with the same samples; build it per epoch for exactness.
    Checkpoints at the end of an epoch (``checkpoint_every=0``) resume with nothing to drop.
    """

    def __init__(
        self,
        model: nn.Module,
        losses: Mapping[str, LossFn] | object,
        data: Iterable | Callable[..., Iterable],
        config: TrainConfig,
        out_dir: str | Path,
        *,
        val_data: Iterable | Callable[[], Iterable] | None = None,
        context: distributed.DistContext | None = None,
        device: str | torch.device | None = None,
        prepare_batch: Callable[[object, torch.device], tuple] | None = None,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = config
        if (
            context is not None
            and device is not None
            and distributed.resolve_device(device, context.local_rank) != context.device
        ):
            raise ValueError(f"device {device!r} differs from the context's {context.device}; give one of them")
        self.context = context or self._default_context(model, device)
        self.device = self.context.device
        self.out_dir = Path(out_dir)
        self.module = unwrap_model(model)
        self.branchings = branching_modules(self.module)
        self.searching = bool(self.branchings)
        self.losses = _TaskLosses(losses, getattr(self.module, "tasks", None))
        self.tasks = self.losses.tasks
        weights = config.task_weights or {}
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_weights for unknown tasks {unknown}")
        self.alpha = {task: float(weights.get(task, 1.0)) for task in self.tasks}
        self._factory = _check_data(data, "data")
        if val_data is not None:
            _check_data(val_data, "val_data")
        self.data, self.val_data = data, val_data
        if prepare_batch is not None and not callable(prepare_batch):
            raise TypeError(f"prepare_batch must be callable, got {type(prepare_batch).__name__}")
        self.prepare_batch = prepare_batch
        self._takes_skip = self._factory and "skip" in inspect.signature(data).parameters
        self.model = self._prepare_model(model)
        forward_parameters = inspect.signature(self.module.forward).parameters
        # The step's sampling seed: an int64 device tensor where the forward takes seed= (compiles fullgraph,
        # CUDA-graph safe), else a generator; both filled from (run seed, step), the same on every rank.
        stepped = self.searching and config.sampling == "step"
        if self.searching and config.sampling == "global" and self.context.distributed:
            raise ValueError(
                "sampling='global' draws from each process's own generator, so ranks would sample different "
                "trees: use sampling='step'"
            )
        self._forward_takes_seed = stepped and "seed" in forward_parameters
        self._forward_kwargs_generator = stepped and not self._forward_takes_seed and "generator" in forward_parameters
        if (
            self.searching
            and not (self._forward_takes_seed or self._forward_kwargs_generator)
            and self.context.distributed
        ):
            raise ValueError(
                f"{type(self.module).__name__}.forward takes neither seed= nor generator=: ranks would sample "
                "different trees (TreeSupernet takes both)"
            )
        self._step_seed = torch.zeros(1, dtype=torch.int64, device=self.device) if self._forward_takes_seed else None
        self._generator = torch.Generator(device=self.device) if self._forward_kwargs_generator else None
        self._budget_net = self._find_budget_net()
        self.budget_costs: list[tuple[TreeCost, int]] | None = None  # measured at the first forward
        self._build_optimizers()
        self.graphed_step = graphed_step.GraphedStep(self) if config.cuda_graph else None  # ValueError off CUDA
        self.tau = schedules.from_config(config.tau)
        self.lr_schedule = lr_schedules.from_config(config.lr_schedule)
        self.lr_schedule_logits = lr_schedules.from_config(config.lr_schedule_logits)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.steps_per_epoch = self._known_steps_per_epoch()
        for name, schedule in (("lr_schedule", self.lr_schedule), ("lr_schedule_logits", self.lr_schedule_logits)):
            if schedule.needs_total_steps and self.steps_per_epoch is None:
                raise ValueError(
                    f"{name} {schedule!r} needs the number of steps: set batches_per_epoch (the data has no length)"
                )
        # Position: optimizer steps taken, the epoch, batches of this epoch used (at the last step's end).
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self._epoch_sums = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)
        self._epoch_rng: dict | None = None  # RNG states when the current epoch's iterable was created
        self.checkpoint_path = self.out_dir / "checkpoints" / "last.pt"
        metric_columns = [f"val.{name}" for name in self.losses.metric_columns()] if self.val_data is not None else []
        self.logs = RunLogs(
            self.out_dir,
            {
                "log.csv": ["step", "epoch", "tau", "lr", "loss"]
                + [f"loss.{t}" for t in self.tasks]
                + list(self._probability_row()),
                "epochs.csv": ["step", "epoch", "train_loss"]
                + [f"train_loss.{t}" for t in self.tasks]
                + (
                    ["val_loss"] + [f"val_loss.{t}" for t in self.tasks] + ["val_samples"] + metric_columns
                    if self.val_data is not None
                    else []
                ),
            },
        )

    # ----------------------------------------------------------------------------- set-up
    @staticmethod
    def _default_context(model: nn.Module, device) -> distributed.DistContext:
        if device is None:
            parameter = next(model.parameters(), None)
            device = parameter.device if parameter is not None else "cpu"
        resolved = distributed.resolve_device(device)
        if dist.is_available() and dist.is_initialized():
            return distributed.DistContext(
                dist.get_rank(),
                dist.get_world_size(),
                int(os.environ.get("LOCAL_RANK", 0)),
                resolved,
                dist.get_backend(),
            )
        return distributed.DistContext(device=resolved)

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        """Device, memory format, DDP wrapping (under a process group) and compilation: the module to call."""
        self.ddp = _find_ddp(model)
        if self.ddp is not None:
            if not self.context.distributed:
                raise ValueError(
                    "a DistributedDataParallel model needs an initialised process group of more than one rank"
                )
            if self.config.channels_last:
                raise ValueError(
                    "channels_last: pass the unwrapped model (it must be converted before "
                    "DistributedDataParallel wraps it)"
                )
        else:
            if self.context.distributed and model is not self.module:
                raise ValueError(
                    "under DDP pass the uncompiled model and set compile=True (DistributedDataParallel must wrap "
                    "the module before torch.compile)"
                )
            if self.config.channels_last:
                self.module.to(memory_format=torch.channels_last)
            self.module.to(self.device)
            if self.context.distributed:
                # Every parameter gets a gradient at every step (frozen logits through a zero tie), so DDP
                # needs no search for unused parameters.
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                self.ddp = model = DistributedDataParallel(
                    self.module, device_ids=device_ids, find_unused_parameters=False
                )
        if self.config.compile:
            options = self.config.compile if isinstance(self.config.compile, dict) else {}
            model = torch.compile(model, **options)
        return model

    def _find_budget_net(self) -> TreeSupernet | None:
        """The supernet whose expected size the budget penalises (None: no budget, or not a search)."""
        if not self.searching or (self.config.budget_parameters is None and self.config.budget_flops is None):
            return None
        nets = [module for module in self.module.modules() if isinstance(module, TreeSupernet)]
        if not nets:
            raise ValueError(
                f"budget_parameters / budget_flops need a TreeSupernet; {type(self.module).__name__} holds none"
            )
        return nets[0]

    def _budget_penalty(self, inputs) -> torch.Tensor:
        """``budget_weight * relu(expected - budget) / budget`` summed over the budgets set (a 0-d float64)."""
        if self.budget_costs is None:
            limits = (("parameters", self.config.budget_parameters), ("flops", self.config.budget_flops))
            sample = inputs[:1] if isinstance(inputs, torch.Tensor) else None
            self.budget_costs = [
                (TreeCost.of_supernet(kind, self._budget_net, sample), limit) for kind, limit in limits if limit
            ]
        penalty = 0.0
        for cost, limit in self.budget_costs:
            penalty = penalty + torch.relu(cost.expected(self._budget_net) - limit) / limit
        return self.config.budget_weight * penalty

    def _build_optimizers(self) -> None:
        config, optimizer = self.config, OPTIMIZERS[self.config.optimizer]
        logits = [branching.logits for branching in self.branchings]
        logit_ids = {id(p) for p in logits}
        weights = [p for p in self.module.parameters() if id(p) not in logit_ids and p.requires_grad]
        # foreach: one kernel per update for all parameters (on CPU too: a quarter of a small net's step); a
        # captured step chooses its own settings (graphed_step: tensor learning rates)
        foreach = None if config.cuda_graph else True
        self.weight_optimizer = optimizer(
            weights, lr=config.lr_weights, weight_decay=config.weight_decay_weights, foreach=foreach
        )
        self.logits_optimizer = (
            optimizer(logits, lr=config.lr_logits, weight_decay=config.weight_decay_logits, foreach=foreach)
            if logits
            else None
        )
        self._logits = logits

    def _known_steps_per_epoch(self) -> int | None:
        batches = self.config.batches_per_epoch
        if batches is None:  # the webdataset train loaders and TensorTaskData.loader factories say it
            batches = getattr(self.data, "batches_per_epoch", None)
        if batches is None and not self._factory:
            try:
                batches = len(self.data)
            except TypeError:  # an iterable without a length
                batches = None
        return None if batches is None else math.ceil(batches / self.config.accumulation)

    @property
    def total_steps(self) -> int | None:
        return None if self.steps_per_epoch is None else self.steps_per_epoch * self.config.epochs

    # ----------------------------------------------------------------------------- checkpoints
    def _rank_state(self) -> dict:
        """What differs between ranks: RNG states (now and at the epoch's start) and the epoch's loss sums."""
        return {"rng": rng_state(self.device), "epoch_rng": self._epoch_rng, "epoch_sums": self._epoch_sums.cpu()}

    def state_dict(self) -> dict:
        """The state shared by all ranks, and this rank's own under ``ranks`` (:meth:`save_checkpoint` gathers every
        rank's)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.module.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "logits_optimizer": self.logits_optimizer.state_dict() if self.logits_optimizer else None,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "config": dataclasses.asdict(self.config),
            "world_size": self.context.world_size,
            "ranks": [self._rank_state()],
        }

    def save_checkpoint(self) -> Path:
        """Collective under DDP (every rank calls it at the same step): rank 0 writes ``checkpoints/last.pt``."""
        ranks = distributed.all_gather_objects(self._rank_state()) if self.context.distributed else [self._rank_state()]
        if self.context.is_main:
            atomic_save({**self.state_dict(), "ranks": ranks}, self.checkpoint_path)
        return self.checkpoint_path

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        path = Path(path or self.checkpoint_path)
        state = read_checkpoint(path, self.device)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a checkpoint of the l2b_fast trainer")
        defaults = {
            field.name: field.default
            for field in dataclasses.fields(TrainConfig)
            if field.default is not dataclasses.MISSING
        }
        # newer settings: their defaults; more epochs is a safe change (a run continues)
        resumable = {k: v for k, v in {**defaults, **state["config"]}.items() if k not in RESUME_MAY_CHANGE}
        saved, current = (
            resumable,
            {k: v for k, v in dataclasses.asdict(self.config).items() if k not in RESUME_MAY_CHANGE},
        )
        if self.config.epochs < state["epoch"]:
            raise ValueError(
                f"checkpoint {path} has trained {state['epoch']} epochs already: epochs={self.config.epochs} "
                "cannot continue it"
            )
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(f"checkpoint {path} was written with another configuration (differs in {changed})")
        if state["world_size"] != self.context.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {state['world_size']} rank(s); resume it with "
                f"{state['world_size']}, not {self.context.world_size}"
            )
        self.module.load_state_dict(state["model"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        if self.logits_optimizer is not None:
            self.logits_optimizer.load_state_dict(state["logits_optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        own = state["ranks"][self.context.rank]
        self._epoch_sums = own["epoch_sums"].to(self.device)
        self._epoch_rng = own["epoch_rng"]
        set_rng_state(own["rng"], self.device)
        if self.graphed_step is not None:
            self.graphed_step.reset()  # new optimizer state and param groups: capture again

    # ----------------------------------------------------------------------------- data
    def _epoch_batches(self, epoch: int, skip: int) -> Iterator:
        """The epoch's batches from the ``skip``-th on (at most ``batches_per_epoch``), as an uninterrupted run saw
        them."""
        resuming = skip > 0
        if resuming:
            if self._epoch_rng is None:
                raise ValueError(
                    "the checkpoint holds no RNG state of the epoch's start: it cannot be resumed mid-epoch"
                )
            current = rng_state(self.device)
            set_rng_state(self._epoch_rng, self.device)  # the state the iterable was created with
        else:
            self._epoch_rng = rng_state(self.device)
        if self._takes_skip:
            source, to_drop = self.data(epoch, skip=skip), 0
        else:
            source, to_drop = (self.data(epoch) if self._factory else self.data), skip
        iterator = iter(source)
        for dropped in range(to_drop):
            try:
                next(iterator)
            except StopIteration:
                raise ValueError(
                    f"epoch {epoch}: the data gave {dropped} batches on resume, but the checkpoint had used {skip}"
                ) from None
        if resuming:
            set_rng_state(current, self.device)  # where training left off (the checkpoint's states on resume)
        limit = self.config.batches_per_epoch
        return iterator if limit is None else itertools.islice(iterator, max(0, limit - skip))

    def _prepare(self, batch) -> tuple:
        """A loader's batch -> ``(inputs, targets, masks)`` on the device (``prepare_batch`` first, if given)."""
        if self.prepare_batch is not None:
            batch = self.prepare_batch(batch, self.device)
        inputs, targets, masks = (_to_device(part, self.device) for part in _split_batch(batch))
        if self.config.channels_last and isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets, masks

    # ----------------------------------------------------------------------------- logging
    def _probability_row(self) -> dict[str, float]:
        return probability_row([branching.probabilities() for branching in self.branchings])

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.context.distributed:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.context.world_size
        return values

    def _check_finite(self, task_losses, where: str) -> None:
        """:class:`NonFiniteLossError` naming the first task whose loss (a list of per-task values) is not finite.
        fp16: the gradient scaler skips steps with inf/NaN and lowers its scale; that is not an error."""
        if self.config.precision == "fp16":
            return
        for task, value in zip(self.tasks, task_losses):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the loss of task {task!r} became {value} {where}; the last checkpoint ({self.checkpoint_path}) "
                    "holds the last finite state: lower the learning rates"
                )

    # ----------------------------------------------------------------------------- training
    def _set_learning_rates(self, epoch: int) -> float:
        factor = self.lr_schedule(self.step, epoch, self.total_steps)
        for group in self.weight_optimizer.param_groups:
            _set_lr(group, self.config.lr_weights * factor)
        if self.logits_optimizer is not None:
            logits_factor = self.lr_schedule_logits(self.step, epoch, self.total_steps)
            for group in self.logits_optimizer.param_groups:
                _set_lr(group, self.config.lr_logits * logits_factor)
        return self.config.lr_weights * factor

    def _autocast(self):
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _forward_losses(self, inputs, targets, masks, frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted loss (a scalar, for backward) and the detached per-task losses (float64 [tasks])."""
        with self._autocast():
            if self._forward_takes_seed:
                outputs = self.model(inputs, seed=self._step_seed)  # filled at the step's start (_run_epoch)
            elif self._forward_kwargs_generator:
                self._generator.manual_seed(distributed.step_seed(self.config.seed, self.step))
                outputs = self.model(inputs, generator=self._generator)
            else:
                outputs = self.model(inputs)
            losses = self.losses(outputs, targets, masks)
            loss = sum(self.alpha[task] * losses[task] for task in self.tasks)
            if self._budget_net is not None and not frozen:  # the budget steers the logits only after warmup
                loss = loss + self._budget_penalty(inputs).to(loss.dtype)
            if frozen and self.ddp is not None:
                # Frozen logits take no gradient, which DDP (find_unused_parameters=False) reports as an
                # error at the next step: tie them in with weight 0, so their gradient exists and is zero.
                loss = loss + 0.0 * sum(logits.sum() for logits in self._logits)
        detached = torch.stack([losses[task].detach().to(torch.float64) for task in self.tasks])
        return loss, detached

    def _optimizer_step(self, batches_in_step: int, frozen: bool) -> None:
        if batches_in_step < self.config.accumulation:  # the epoch's short last step: the mean of its batches
            rescale = self.config.accumulation / batches_in_step
            for group in self.weight_optimizer.param_groups + (
                self.logits_optimizer.param_groups if self.logits_optimizer else []
            ):
                for parameter in group["params"]:
                    if parameter.grad is not None:
                        parameter.grad.mul_(rescale)
        self.scaler.step(self.weight_optimizer)
        if self.logits_optimizer is not None and not frozen:
            self.scaler.step(self.logits_optimizer)
        self.scaler.update()

    def fit(
        self,
        *,
        resume: bool = False,
        stop_after_steps: int | None = None,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> dict[str, float]:
        """Train to the end (or until ``stop_after_steps`` optimizer steps in all); returns the last epoch's means.

        ``resume=True`` restores ``checkpoints/last.pt``. ``on_step(trainer)`` runs after every optimizer step
        (after its log row and checkpoint). Under DDP every rank calls ``fit`` with the same arguments.
        """
        config = self.config
        if resume:
            self.load_checkpoint()
        elif self.step == 0 and self.epoch == 0:
            # Seeded per rank: dropout and other global randomness differ across ranks, the tree does not.
            global_sampling = self.searching and config.sampling == "global"
            rank_seed = (
                config.seed if global_sampling else distributed.step_seed(config.seed, self.context.rank, stream=1)
            )
            torch.manual_seed(rank_seed)
            random.seed(rank_seed)
            np.random.seed(rank_seed % 2**32)
        if self.context.is_main:
            self.logs.open(self.step if (resume or self.step > 0) else None)
        progress = self._progress()
        last_epoch: dict[str, float] = {}
        self.model.train()
        try:
            while self.epoch < config.epochs:
                stopped = self._run_epoch(progress, stop_after_steps, on_step)
                if stopped:
                    return last_epoch
                last_epoch = self._finish_epoch()
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._epoch_sums.zero_()
                self.save_checkpoint()
                if self.steps_per_epoch is None:
                    self.steps_per_epoch = self.step // self.epoch  # known after one pass
                    progress = progress or self._progress()
        finally:
            if progress is not None:
                progress.close()
            self.logs.close()
        return last_epoch

    def _progress(self) -> Progress | None:
        if not (self.context.is_main and self.config.progress) or self.total_steps is None:
            return None
        return Progress(self.total_steps, self.step, enabled=True)

    def _run_epoch(self, progress, stop_after_steps, on_step) -> bool:
        """Trains the rest of the current epoch; True if it stopped at ``stop_after_steps``."""
        config, epoch = self.config, self.epoch
        frozen = epoch < config.warmup_epochs
        for branching in self.branchings:
            branching.mode = "frozen" if frozen else "search"
        group_losses = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)
        in_step = 0
        batches = self._epoch_batches(epoch, self.batch_in_epoch)
        for batch, is_last in _lookahead(batches):
            inputs, targets, masks = self._prepare(batch)
            if in_step == 0:
                tau = self.tau(self.step, epoch)
                for branching in self.branchings:
                    branching.tau = tau
                lr = self._set_learning_rates(epoch)
                if self._forward_takes_seed:  # in place: a fill kernel, no sync; compiled and captured steps read it
                    self._step_seed.fill_(distributed.step_seed(config.seed, self.step))
                if self.graphed_step is None:  # a graph's replays overwrite its own gradients
                    self.weight_optimizer.zero_grad(set_to_none=True)
                    if self.logits_optimizer is not None:
                        self.logits_optimizer.zero_grad(set_to_none=True)
                group_losses.zero_()
            in_step += 1
            synchronise = in_step == config.accumulation or is_last
            no_sync = self.ddp.no_sync() if self.ddp is not None and not synchronise else contextlib.nullcontext()
            if self.graphed_step is not None:  # accumulation 1: forward, backward and both optimizers' steps
                group_losses += self.graphed_step(inputs, targets, masks, frozen)
            else:
                with no_sync:
                    loss, task_losses = self._forward_losses(inputs, targets, masks, frozen)
                    self.scaler.scale(loss / config.accumulation).backward()
                group_losses += task_losses
                if not synchronise:
                    continue
                self._optimizer_step(in_step, frozen)
            self._epoch_sums += group_losses
            self.batch_in_epoch += in_step
            self.step += 1
            if self.step % config.log_every == 0:
                self._log_step(epoch, tau, lr, group_losses / in_step)
            if progress is not None:
                progress.update(self.step, self._running_loss, tau if self.searching else None)
            if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                # never a checkpoint of a diverged run: the epoch's sums hold every step's losses (one sync here)
                self._check_finite((self._mean_over_ranks(self._epoch_sums)).tolist(), f"by step {self.step}")
                self.save_checkpoint()
            if on_step is not None:
                on_step(self)
            in_step = 0
            if stop_after_steps is not None and self.step >= stop_after_steps:
                return True
        if self.batch_in_epoch == 0:
            raise ValueError(
                f"epoch {epoch}: the data gave no batch (an iterator or generator is used up after one pass: pass "
                "a factory data(epoch))"
            )
        return False

    def _running_loss(self) -> float:
        """The weighted loss of this epoch so far on this rank (mean over its batches), for the progress line."""
        means = (self._epoch_sums / max(self.batch_in_epoch, 1)).tolist()
        return sum(self.alpha[task] * value for task, value in zip(self.tasks, means))

    def _log_step(self, epoch: int, tau: float, lr: float, task_losses: torch.Tensor) -> None:
        means = self._mean_over_ranks(task_losses).tolist()  # every rank logs at the same steps: a collective
        loss = sum(self.alpha[t] * value for t, value in zip(self.tasks, means))
        self._check_finite(means, f"at step {self.step}")
        if self.context.is_main:
            row = {"step": self.step, "epoch": epoch, "tau": tau, "lr": lr, "loss": loss}
            row.update({f"loss.{t}": value for t, value in zip(self.tasks, means)})
            row.update(self._probability_row())
            self.logs.append("log.csv", row)

    def _finish_epoch(self) -> dict[str, float]:
        """The epoch's row of epochs.csv (mean train losses over batches and ranks, validation); returns it."""
        means = (self._mean_over_ranks(self._epoch_sums) / self.batch_in_epoch).tolist()
        result = {
            "loss": sum(self.alpha[t] * value for t, value in zip(self.tasks, means)),
            **dict(zip(self.tasks, means)),
        }
        self._check_finite(means, f"in epoch {self.epoch}")
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "train_loss": result["loss"],
            **{f"train_loss.{t}": means[k] for k, t in enumerate(self.tasks)},
        }
        if self.val_data is not None:
            rng = rng_state(self.device)  # evaluation must not shift the training random streams
            evaluation = self.evaluate(self.val_data)
            set_rng_state(rng, self.device)
            row["val_loss"], row["val_samples"] = evaluation.losses["loss"], evaluation.samples
            row.update({f"val_loss.{t}": evaluation.losses[t] for t in self.tasks})
            if evaluation.metrics is not None:
                row.update(
                    {
                        f"val.{name}": value
                        for name, value in evaluation.metrics.summary().items()
                        if f"val.{name}" in self.logs.columns["epochs.csv"]
                    }
                )
            result.update({f"val_{k}": v for k, v in evaluation.losses.items()})
        if self.context.is_main:
            self.logs.append("epochs.csv", row)
        return result

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, data: Iterable | Callable[[], Iterable]) -> Evaluation:
        """Losses (means over samples) and the data set's metrics over ``data``, summed over all ranks.

        The unwrapped model runs in eval mode (argmax routing for a supernet), with no collective per batch,
        so ranks may hold different numbers of batches; each rank passes its own part of the data (each
        sample on exactly one rank). Under DDP every rank must call it.
        """
        source = data() if callable(data) and not isinstance(data, Iterable) else data
        was_training = self.module.training
        self.module.eval()
        metrics = self.losses.metrics()
        sums = torch.zeros(len(self.tasks) + 1, dtype=torch.float64, device=self.device)  # per task, then samples
        try:
            for batch in source:
                inputs, targets, masks = self._prepare(batch)
                with self._autocast():
                    outputs = self.module(inputs)
                    losses = self.losses(outputs, targets, masks)
                count = inputs.shape[0]
                sums[:-1] += torch.stack([losses[task].detach().to(torch.float64) for task in self.tasks]) * count
                sums[-1] += count
                if metrics is not None:
                    self.losses.update_metrics(metrics, outputs, targets, masks)
        finally:
            self.module.train(was_training)
        if self.context.distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            if metrics is not None:
                metrics.all_reduce()
        samples = int(sums[-1].item())
        means = (sums[:-1] / max(samples, 1)).tolist() if samples else [math.nan] * len(self.tasks)
        losses = dict(zip(self.tasks, means))
        losses["loss"] = sum(self.alpha[t] * losses[t] for t in self.tasks)
        return Evaluation(losses, samples, metrics)


# The names of the streaming trainer before it became the only one.
StreamConfig = TrainConfig
StreamTrainer = Trainer
