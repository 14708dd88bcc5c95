"""In-memory multi-task data as a data source of the trainer: tensors of inputs and of every task's targets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import torch


@dataclasses.dataclass
class TensorTaskData:
    """An in-memory multi-task dataset: ``inputs`` [n, ...] and ``targets[task]`` [n, ...].

    ``data.loader(batch_size, seed)`` is a per-epoch factory for :class:`~l2b_fast.train.Trainer`: epoch e's
    batches follow a permutation drawn from ``(seed, e)`` alone, so a resumed run sees the same batches.
    """

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

    def batches(
        self, batch_size: int, order: torch.Tensor | None = None, skip: int = 0
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``(inputs, {task: targets})`` batches in ``order`` (default: as stored), from the ``skip``-th on."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        order = torch.arange(len(self)) if order is None else order
        for start in range(skip * batch_size, len(self), batch_size):
            rows = order[start : start + batch_size]
            yield self.inputs[rows], {task: target[rows] for task, target in self.targets.items()}

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=generator)

    def loader(self, batch_size: int, seed: int | None = None) -> Callable[..., Iterator]:
        """A factory ``data(epoch, skip=0)`` of the epoch's batches, shuffled per epoch (``seed`` None: in order)."""

        def epoch_batches(epoch: int, skip: int = 0) -> Iterator:
            order = None if seed is None else self.epoch_order(seed, epoch)
            return self.batches(batch_size, order, skip)

        epoch_batches.batches_per_epoch = self.num_batches(batch_size)
        return epoch_batches
