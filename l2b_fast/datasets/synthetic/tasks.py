"""The controlled synthetic experiment of the paper (Sec. 4.1, Fig. 3).

Tasks ``T_{r,s} = multiplier * activation_r(((B + delta_s) Z) / phi)`` with Z in R^200, T in R^100,
B ~ N(0, b_var), delta_s ~ N(0, delta_var) (variances; the paper's N(0, 10) and N(0, 2)), phi = 200.
Task names are ``<group>-<index>``, the group being the activation (``bent``) or the activation and its
multiplier (``sin_x2``). The model: four branching blocks of three fully-connected nodes (100 units,
ReLU between them) and task-specific bias heads as the task layer.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from l2b_fast.data.tensors import TensorTaskData
from l2b_fast.nn import Bias, BlockSpec

ACTIVATIONS = {
    "sin": torch.sin,
    "cos": torch.cos,
    "square": torch.square,
    "bent": lambda x: (torch.sqrt(x * x + 1) - 1) / 2 + x,  # bent identity
    "sinc": lambda x: torch.sinc(x / math.pi),  # sin(x) / x
}


@dataclasses.dataclass(frozen=True)
class TaskGroup:
    activation: str
    tasks: int = 5
    multiplier: float | None = None  # given: the output is scaled and the group is named "<activation>_x<m>"

    @property
    def name(self) -> str:
        return self.activation if self.multiplier is None else f"{self.activation}_x{self.multiplier:g}"


def task_names(groups: list[TaskGroup]) -> list[str]:
    return [f"{group.name}-{s}" for group in groups for s in range(group.tasks)]


def make_tasks(
    groups: list[TaskGroup],
    samples: int,
    *,
    input_dim: int = 200,
    output_dim: int = 100,
    b_var: float = 10.0,
    delta_var: float = 2.0,
    phi: float | None = None,
    standardise: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    test_samples: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | tuple[torch.Tensor, dict[str, torch.Tensor], TensorTaskData]:
    """Inputs Z [samples, input_dim] ~ N(0, 1) and targets {task: [samples, output_dim]} in ``dtype``.

    ``test_samples > 0`` also returns a test set of that many samples of the same tasks: its inputs are drawn after
    every task's parameters (so the first two results do not change) and standardised with the statistics of the
    ``samples``.

    ``standardise`` z-scores every output of every task over the samples (so tasks with large ranges do
    not dominate the L2 loss); it also removes pure output multipliers. The data is drawn and computed in
    float64 and then cast, so one seed gives the same tasks in every dtype and on every CPU.
    """
    for group in groups:
        if group.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {group.activation!r}; choose from {sorted(ACTIVATIONS)}")
        if group.tasks < 1:
            raise ValueError(f"group {group.name} needs >= 1 task")
    names = task_names(groups)
    if len(set(names)) != len(names):
        raise ValueError(f"task groups give duplicate task names: {names}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    generator = torch.Generator().manual_seed(seed)
    phi = float(input_dim) if phi is None else phi
    if not phi > 0:
        raise ValueError(f"phi must be positive, got {phi}")
    double = torch.float64
    z = torch.randn(samples, input_dim, generator=generator, dtype=double)
    base = torch.randn(output_dim, input_dim, generator=generator, dtype=double) * math.sqrt(b_var)
    targets, test_targets, weights = {}, {}, {}
    for group in groups:
        for s in range(group.tasks):
            delta = torch.randn(output_dim, input_dim, generator=generator, dtype=double) * math.sqrt(delta_var)
            weights[f"{group.name}-{s}"] = (group, base + delta)
    z_test = torch.randn(test_samples, input_dim, generator=generator, dtype=double) if test_samples else None
    for task, (group, weight) in weights.items():
        value = (group.multiplier or 1.0) * ACTIVATIONS[group.activation](z @ weight.T / phi)
        test = (
            (group.multiplier or 1.0) * ACTIVATIONS[group.activation](z_test @ weight.T / phi) if test_samples else None
        )
        if standardise:
            mean, std = value.mean(0), value.std(0).clamp_min(1e-8)
            value = (value - mean) / std
            test = None if test is None else (test - mean) / std
        targets[task] = value.to(dtype)
        if test is not None:
            test_targets[task] = test.to(dtype)
    if not test_samples:
        return z.to(dtype), targets
    return z.to(dtype), targets, TensorTaskData(z_test.to(dtype), test_targets)


def blocks(
    tasks: int, *, input_dim: int = 200, hidden: int = 100, output_dim: int = 100, fc_blocks: int = 4, nodes: int = 3
) -> list[BlockSpec]:
    """``fc_blocks`` blocks of ``nodes`` fully-connected nodes (ReLU after all but the last), then a task
    layer of bias nodes, one per task."""

    def fc(block: int, child: int) -> nn.Module:
        in_features = input_dim if block == 0 else hidden
        out_features = output_dim if block == fc_blocks - 1 else hidden
        linear = nn.Linear(in_features, out_features)
        return linear if block == fc_blocks - 1 else nn.Sequential(linear, nn.ReLU())

    return [BlockSpec(nodes, fc) for _ in range(fc_blocks)] + [BlockSpec(tasks, lambda block, child: Bias(output_dim))]
