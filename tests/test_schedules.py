"""Temperature schedules."""

from __future__ import annotations

import math

import pytest

from l2b_fast.train import schedules


def test_schedule_values():
    assert schedules.Constant(2.0)(100, 3) == 2.0
    inverse = schedules.InverseSqrt(tau0=50.0, min=0.1)
    assert inverse(0, 0) == 50.0 and inverse(99, 0) == pytest.approx(5.0) and inverse(10**9, 0) == 0.1
    decay = schedules.EpochDecay(tau0=5.0, rate=0.5, every=2, min=0.1)
    assert [decay(0, e) for e in range(5)] == [5.0, 5.0, 2.5, 2.5, 1.25]
    linear = schedules.Linear(start=4.0, end=1.0, steps=3)
    assert [linear(s, 0) for s in range(5)] == [4.0, 3.0, 2.0, 1.0, 1.0]
    exponential = schedules.Exponential(tau0=1.0, rate=0.5, min=0.01)
    assert exponential(2, 0) == pytest.approx(math.exp(-1))


def test_from_config():
    assert schedules.from_config(3) == schedules.Constant(3.0)
    assert schedules.from_config({"kind": "inverse_sqrt", "tau0": 10}) == schedules.InverseSqrt(tau0=10)
    with pytest.raises(ValueError, match="unknown"):
        schedules.from_config({"kind": "cosine"})
    with pytest.raises(ValueError, match="unexpected keyword"):
        schedules.from_config({"kind": "linear", "speed": 3})
    with pytest.raises(ValueError, match="positive"):
        schedules.from_config({"kind": "linear", "start": 1.0, "end": -1.0})
    with pytest.raises(ValueError):
        schedules.from_config("fast")
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite and positive"):
            schedules.from_config(bad)
