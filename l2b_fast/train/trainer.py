"""A small reusable trainer for supernets (search) and derived trees (retrain).

Separate optimizer parameter groups for weights and logits, warmup epochs without logits updates,
per-task loss weights alpha_k (paper Eq. 1), a pluggable temperature schedule, CSV (and TensorBoard,
if installed) logs of per-task losses, temperature and branching probabilities, and checkpoints every N
steps that resume exactly after a kill: model, optimizers, step, RNG states and the position in the
epoch's shuffled order are restored, and log rows past the checkpoint are dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from l2b_fast.train import schedules
from l2b_fast.train.checkpoints import atomic_save, read_checkpoint, rng_state, set_rng_state
from l2b_fast.train.logs import probability_row

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class TensorTaskData:
    """An in-memory multi-task dataset: ``inputs`` [n, ...] and ``targets[task]`` [n, ...]."""

    inputs: torch.Tensor
    targets: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        for task, target in self.targets.items():
            if target.shape[0] != self.inputs.shape[0]:
                raise ValueError(f"task {task!r} has {target.shape[0]} targets for {self.inputs.shape[0]} inputs")

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def batches(self, batch_size: int, order: torch.Tensor | None = None, skip: int = 0) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        order = torch.arange(len(self)) if order is None else order
        for start in range(skip * batch_size, len(self), batch_size):
            rows = order[start:start + batch_size]
            yield self.inputs[rows], {task: target[rows] for task, target in self.targets.items()}


@dataclasses.dataclass
class TrainConfig:
    epochs: int
    batch_size: int = 100
    warmup_epochs: int = 0  # epochs without logits updates (branching blocks in "frozen" mode)
    lr_weights: float = 1e-3
    weight_decay_weights: float = 0.0
    lr_logits: float = 1e-3
    weight_decay_logits: float = 0.0
    tau: dict | float = 1.0  # schedule config, see l2b_fast.train.schedules.from_config
    task_weights: dict[str, float] | None = None  # alpha_k, default 1 for every task
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch
    log_every: int = 10  # steps
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.checkpoint_every < 0 or self.log_every < 1:
            raise ValueError("checkpoint_every must be >= 0 and log_every >= 1")
        for name in ("lr_weights", "lr_logits", "weight_decay_weights", "weight_decay_logits"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value}")
        schedules.from_config(self.tau)  # validates


class Trainer:
    """Trains ``model`` (a ``TreeSupernet`` or any module returning ``{task: output}``) on ``data``.

    Files in ``out_dir``: ``log.csv`` (every ``log_every`` steps: step, epoch, tau, loss, ``loss.<task>``,
    ``p.b<b>.i<i>.j<j>`` branching probabilities), ``epochs.csv`` (per-epoch train and validation losses),
    ``checkpoints/last.pt``, ``tensorboard/`` when TensorBoard is installed.
    """

    def __init__(
        self,
        model: nn.Module,
        losses: Mapping[str, LossFn],
        data: TensorTaskData,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        val_data: TensorTaskData | None = None,
        device: str | torch.device = "cpu",
    ):
        self.model = model.to(device)
        self.device = torch.device(device)
        self.tasks = list(losses)
        self.losses = dict(losses)
        self.data, self.val_data, self.config = data, val_data, config
        self.out_dir = Path(out_dir)
        self.tau = schedules.from_config(config.tau)
        weights = config.task_weights or {}
        unknown = set(weights) - set(self.tasks)
        if unknown:
            raise ValueError(f"task_weights for unknown tasks {sorted(unknown)}")
        self.alpha = {task: float(weights.get(task, 1.0)) for task in self.tasks}
        self.searching = hasattr(model, "logits_parameters")
        weight_params = model.weight_parameters() if self.searching else list(model.parameters())
        # foreach: one kernel per update for all parameters (on CPU too: a quarter of a small net's step)
        self.weight_optimizer = torch.optim.Adam(weight_params, lr=config.lr_weights, weight_decay=config.weight_decay_weights, foreach=True)
        self.logits_optimizer = (
            torch.optim.Adam(model.logits_parameters(), lr=config.lr_logits, weight_decay=config.weight_decay_logits, foreach=True) if self.searching else None
        )
        self.step = 0
        self.epoch_loss_sums = dict.fromkeys(self.tasks, 0.0)  # running sums of the current epoch
        self.steps_per_epoch = data.num_batches(config.batch_size)
        self.checkpoint_path = self.out_dir / "checkpoints" / "last.pt"
        self._tensorboard = None

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "logits_optimizer": self.logits_optimizer.state_dict() if self.logits_optimizer else None,
            "step": self.step,
            "epoch_loss_sums": dict(self.epoch_loss_sums),
            "rng": rng_state(self.device),
            "config": dataclasses.asdict(self.config),
        }

    def save_checkpoint(self) -> Path:
        return atomic_save(self.state_dict(), self.checkpoint_path)

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        state = read_checkpoint(path or self.checkpoint_path, self.device)
        saved = {k: v for k, v in state["config"].items() if k != "progress"}
        current = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "progress"}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(f"checkpoint {path} was written with another configuration (differs in {changed})")
        self.model.load_state_dict(state["model"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        if self.logits_optimizer is not None:
            self.logits_optimizer.load_state_dict(state["logits_optimizer"])
        self.step = state["step"]
        self.epoch_loss_sums = dict(state["epoch_loss_sums"])
        set_rng_state(state["rng"], self.device)

    # ----------------------------------------------------------------------------- logging
    def _probability_row(self) -> dict[str, float]:
        """Every branching probability as ``p.b<block>.i<parent>.j<child>`` (empty when not searching)."""
        return probability_row(self.model.probabilities()) if self.searching else {}

    def _open_logs(self, resume: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Fixed for the run: the block shapes do not change.
        self._columns = {
            "log.csv": ["step", "epoch", "tau", "loss"] + [f"loss.{t}" for t in self.tasks] + list(self._probability_row()),
            "epochs.csv": self._epoch_columns(),
        }
        for name, columns in self._columns.items():
            path = self.out_dir / name
            kept = []
            if resume and path.exists():
                with path.open(newline="") as handle:  # drop rows written after the checkpoint
                    kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= self.step]
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step if resume else None)
        except ImportError:
            self._tensorboard = None

    def _epoch_columns(self) -> list[str]:
        columns = ["step", "epoch", "train_loss"] + [f"train_loss.{t}" for t in self.tasks]
        if self.val_data is not None:
            columns += ["val_loss"] + [f"val_loss.{t}" for t in self.tasks]
        return columns

    def _append(self, name: str, row: dict) -> None:
        path = self.out_dir / name
        with path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self._columns[name]).writerow(row)
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self._tensorboard.add_scalar(f"{name.removesuffix('.csv')}/{key}", value, row["step"])

    # ----------------------------------------------------------------------------- training
    def _task_losses(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {task: self.losses[task](outputs[task], targets[task]) for task in self.tasks}

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=generator)

    @torch.no_grad()
    def evaluate(self, data: TensorTaskData) -> dict[str, float]:
        """Mean per-task losses (and their alpha-weighted sum, ``loss``) in eval mode."""
        was_training = self.model.training
        self.model.eval()
        totals = dict.fromkeys(self.tasks, 0.0)
        for inputs, targets in data.batches(self.config.batch_size):
            losses = self._task_losses(self.model(inputs.to(self.device)), {t: v.to(self.device) for t, v in targets.items()})
            for task, value in losses.items():
                totals[task] += value.item() * inputs.shape[0]
        self.model.train(was_training)
        means = {task: total / len(data) for task, total in totals.items()}
        means["loss"] = sum(self.alpha[t] * means[t] for t in self.tasks)
        return means

    def fit(self, *, resume: bool = False, stop_after_steps: int | None = None) -> dict[str, float]:
        """Train to the end (or ``stop_after_steps`` total steps); returns the last epoch's losses.

        ``resume=True`` restores ``checkpoints/last.pt``; calling ``fit`` again on a trainer that already
        took steps continues in memory.
        """
        config = self.config
        if resume:
            self.load_checkpoint()
        elif self.step == 0:
            torch.manual_seed(config.seed)
            random.seed(config.seed)
            np.random.seed(config.seed)
        self._open_logs(resume or self.step > 0)
        total_steps = config.epochs * self.steps_per_epoch
        last_epoch: dict[str, float] = {}
        progress = _Progress(total_steps, self.step, enabled=config.progress)
        self.model.train()
        while self.step < total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            warm = epoch < config.warmup_epochs
            if self.searching:
                self.model.set_mode("frozen" if warm else "search")
            for inputs, targets in self.data.batches(config.batch_size, self._epoch_order(epoch), skip):
                tau = self.tau(self.step, epoch)
                if self.searching:
                    self.model.set_tau(tau)
                outputs = self.model(inputs.to(self.device))
                losses = self._task_losses(outputs, {t: v.to(self.device) for t, v in targets.items()})
                loss = sum(self.alpha[t] * losses[t] for t in self.tasks)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {self.step}: lower the learning rates")
                self.weight_optimizer.zero_grad(set_to_none=True)
                if self.logits_optimizer is not None:
                    self.logits_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.weight_optimizer.step()
                if self.logits_optimizer is not None and not warm:
                    self.logits_optimizer.step()
                self.step += 1
                for task in self.tasks:
                    self.epoch_loss_sums[task] += losses[task].item()
                if self.step % config.log_every == 0:
                    row = {"step": self.step, "epoch": epoch, "tau": tau, "loss": loss.item()}
                    row.update({f"loss.{t}": losses[t].item() for t in self.tasks})
                    row.update(self._probability_row())
                    self._append("log.csv", row)
                progress.update(self.step, loss.item(), tau if self.searching else None)  # tau means nothing without branching
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if end_of_epoch:
                    last_epoch = self._finish_epoch(epoch)
                if self.step % config.checkpoint_every == 0 if config.checkpoint_every else end_of_epoch:
                    self.save_checkpoint()
                if stop_after_steps is not None and self.step >= stop_after_steps:
                    progress.close()
                    return last_epoch
        progress.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if not last_epoch:
            last_epoch = self.evaluate(self.data)
        return last_epoch

    def _finish_epoch(self, epoch: int) -> dict[str, float]:
        """Writes the epoch's row of epochs.csv (mean train losses, validation losses); returns them."""
        means = {task: total / self.steps_per_epoch for task, total in self.epoch_loss_sums.items()}
        self.epoch_loss_sums = dict.fromkeys(self.tasks, 0.0)
        result = {"loss": sum(self.alpha[t] * means[t] for t in self.tasks), **means}
        row = {"step": self.step, "epoch": epoch, "train_loss": result["loss"], **{f"train_loss.{t}": means[t] for t in self.tasks}}
        if self.val_data is not None:
            rng = rng_state(self.device)  # evaluation must not shift the training random streams
            val = self.evaluate(self.val_data)
            set_rng_state(rng, self.device)
            row["val_loss"] = val["loss"]
            row.update({f"val_loss.{t}": val[t] for t in self.tasks})
            result.update({f"val_{k}": v for k, v in val.items()})
        self._append("epochs.csv", row)
        return result


class _Progress:
    """tqdm when installed and stderr is a terminal; otherwise a line every ~10% of the run."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        self.next_report = start
        self.started = time.time()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, loss: float, tau: float | None) -> None:
        if not self.enabled:
            return
        shown = {"loss": f"{loss:.4g}"} | ({} if tau is None else {"tau": f"{tau:.3g}"})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown, refresh=False)
        elif step >= self.next_report or step == self.total:
            values = "  ".join(f"{name} {value}" for name, value in shown.items())
            print(f"step {step}/{self.total}  {values}  {time.time() - self.started:.0f}s", file=sys.stderr, flush=True)
            self.next_report = step + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
