"""Learning-rate schedules as factors of the base learning rate: ``factor(step, epoch, total_steps)``.

Pure functions of the position in training, like the temperature schedules, so a resumed run continues
exactly without saving scheduler state. Every schedule takes ``warmup_steps`` (linear ramp from
``1 / warmup_steps`` to 1 over the first optimizer steps). Built from config dicts such as
``{"kind": "cosine", "warmup_steps": 500, "min_factor": 0.01}``.
"""

from __future__ import annotations

import dataclasses
import math


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class ConstantLR:
    """factor = 1 (after the warmup)."""

    warmup_steps: int = 0
    needs_total_steps = False

    def __call__(self, step: int, epoch: int, total_steps: int | None) -> float:
        return _warmup(step, self.warmup_steps)


@dataclasses.dataclass(frozen=True)
class CosineLR:
    """Half a cosine from 1 to ``min_factor`` over the steps after the warmup (needs the run's total steps)."""

    warmup_steps: int = 0
    min_factor: float = 0.0
    needs_total_steps = True

    def __call__(self, step: int, epoch: int, total_steps: int | None) -> float:
        if total_steps is None:
            raise ValueError("a cosine learning-rate schedule needs the number of steps: set batches_per_epoch")
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        fraction = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * fraction))


@dataclasses.dataclass(frozen=True)
class StepLR:
    """factor = gamma ** (number of ``milestones`` (epochs) reached), after the warmup."""

    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    needs_total_steps = False

    def __post_init__(self):
        object.__setattr__(self, "milestones", tuple(sorted(int(m) for m in self.milestones)))

    def __call__(self, step: int, epoch: int, total_steps: int | None) -> float:
        return _warmup(step, self.warmup_steps) * self.gamma ** sum(epoch >= m for m in self.milestones)


LR_SCHEDULES = {"constant": ConstantLR, "cosine": CosineLR, "step": StepLR}


def from_config(config: dict | None):
    """A schedule from ``{"kind": name, **parameters}``; ``None`` is constant."""
    if config is None:
        return ConstantLR()
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(
            f'a learning-rate schedule is None or {{"kind": one of {sorted(LR_SCHEDULES)}, ...}}, got {config!r}'
        )
    kind = config["kind"]
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose from {sorted(LR_SCHEDULES)}")
    try:
        schedule = LR_SCHEDULES[kind](**{k: v for k, v in config.items() if k != "kind"})
    except (TypeError, ValueError) as error:
        raise ValueError(f"learning-rate schedule {kind!r}: {error}") from error
    if not isinstance(schedule.warmup_steps, int) or schedule.warmup_steps < 0:
        raise ValueError(
            f"learning-rate schedule {kind!r}: warmup_steps must be an integer >= 0, got {schedule.warmup_steps!r}"
        )
    for value in (schedule(0, 0, 100), schedule(99, 10**3, 100)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"learning-rate schedule {config!r} gives the factor {value}; it must stay finite and >= 0"
            )
    return schedule
