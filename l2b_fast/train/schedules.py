"""Temperature schedules: ``tau(step, epoch)``, pure functions of the position in training (so a resumed
run continues exactly). Built from config dicts such as ``{"kind": "inverse_sqrt", "tau0": 50}``."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Constant:
    """tau = value."""

    value: float = 1.0

    def __call__(self, step: int, epoch: int) -> float:
        return self.value


@dataclasses.dataclass(frozen=True)
class InverseSqrt:
    """tau = tau0 / sqrt(step + 1), floored at ``min`` (the paper's synthetic experiment: 50 / sqrt(iteration))."""

    tau0: float = 50.0
    min: float = 0.1

    def __call__(self, step: int, epoch: int) -> float:
        return max(self.min, self.tau0 / math.sqrt(step + 1))


@dataclasses.dataclass(frozen=True)
class EpochDecay:
    """tau = tau0 * rate ** (epoch // every), floored at ``min`` (per-epoch decay, as for CelebA/Taskonomy)."""

    tau0: float = 5.0
    rate: float = 0.965
    every: int = 1
    min: float = 0.1

    def __call__(self, step: int, epoch: int) -> float:
        return max(self.min, self.tau0 * self.rate ** (epoch // self.every))


@dataclasses.dataclass(frozen=True)
class Linear:
    """tau from ``start`` to ``end`` linearly over ``steps`` steps, then ``end``."""

    start: float = 5.0
    end: float = 0.1
    steps: int = 10000

    def __call__(self, step: int, epoch: int) -> float:
        fraction = min(1.0, step / max(1, self.steps))
        return self.start + (self.end - self.start) * fraction


@dataclasses.dataclass(frozen=True)
class Exponential:
    """tau = tau0 * exp(-rate * step), floored at ``min``."""

    tau0: float = 5.0
    rate: float = 1e-4
    min: float = 0.1

    def __call__(self, step: int, epoch: int) -> float:
        return max(self.min, self.tau0 * math.exp(-self.rate * step))


SCHEDULES = {
    "constant": Constant,
    "inverse_sqrt": InverseSqrt,
    "epoch_decay": EpochDecay,
    "linear": Linear,
    "exponential": Exponential,
}


def from_config(config: dict | float | int):
    """A schedule from ``{"kind": name, **parameters}`` (or a bare number: constant)."""
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        if not (math.isfinite(config) and config > 0):
            raise ValueError(f"a constant temperature must be finite and positive, got {config!r}")
        return Constant(float(config))
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(
            f'a temperature schedule is a number or {{"kind": one of {sorted(SCHEDULES)}, ...}}, got {config!r}'
        )
    parameters = {k: v for k, v in config.items() if k != "kind"}
    kind = config["kind"]
    if kind not in SCHEDULES:
        raise ValueError(f"unknown temperature schedule {kind!r}; choose from {sorted(SCHEDULES)}")
    try:
        schedule = SCHEDULES[kind](**parameters)
    except TypeError as error:
        raise ValueError(f"schedule {kind!r}: {error}") from error
    for value in (schedule(0, 0), schedule(10**6, 10**3)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"schedule {config!r} gives tau = {value}; tau must stay finite and positive")
    return schedule
