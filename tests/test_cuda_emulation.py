"""The CUDA fused backward's device code, run on the CPU by the emulator in tools/cuda_emulator, against
the float64 reference: the paths no CPU run of the real CUDA build reaches (pipeline steady state,
8 x 8 pair blocks, dots-only groups, misaligned scalar path, output flags), in every cp.async timing."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,  # compiles the emulator once (~25 s on 2 cores)
    pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler"),
]

EMULATOR = Path(__file__).resolve().parents[1] / "tools" / "cuda_emulator" / "emulator.py"


@pytest.fixture(scope="module")
def emulator():
    spec = importlib.util.spec_from_file_location("l2b_cuda_emulator_driver", EMULATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.load()
    return module


@pytest.mark.parametrize(
    "dtype, timing",
    [
        (torch.float32, "at_wait"),
        (torch.float32, "at_issue"),
        (torch.float32, "random"),
        (torch.bfloat16, "random"),
        (torch.float64, "random"),
    ],
)
def test_steady_state_pipeline(emulator, dtype, timing):
    """Many tiles per block: every stage of the cp.async ring is refilled while others are read."""
    plan, parents_error, dots_error = emulator.check(
        5, 5, 20 * 1024 + 40, dtype, timing=timing
    )  # N % 8 == 0: vectorised
    assert plan["tiles_per_block"] > 3 * plan["stages"] and plan["vectorised"]
    tolerance = emulator.TOLERANCE[dtype]
    assert parents_error <= tolerance[0] and dots_error <= tolerance[1]


@pytest.mark.parametrize(
    "name, parents, children, numel, options, expected",
    [
        ("8x8 pair blocks", 30, 40, 1536, {}, {"pair_m": 8, "launches": 1}),
        ("8x8 pair blocks", 5, 40, 2048, {}, {"pair_m": 8, "launches": 1}),
        ("groups: I * J > 2048", 46, 46, 512, {}, {"launches": 2}),
        ("misaligned scalar path", 3, 7, 1031, {"misaligned": True}, {"vectorised": 0}),
        ("no parents gradient", 4, 6, 2000, {"need_grad_parents": False}, {"launches": 1}),
        ("segment sum alone", 4, 6, 2000, {"need_grad_logits": False}, {"launches": 0}),
        ("segment sum alone, misaligned", 4, 6, 2001, {"need_grad_logits": False, "misaligned": True}, {"launches": 0}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_untested_paths(emulator, name, parents, children, numel, options, expected, dtype):
    plan, parents_error, dots_error = emulator.check(parents, children, numel, dtype, timing="random", **options)
    for key, value in expected.items():
        assert plan[key] == value, (name, plan)
    tolerance = emulator.TOLERANCE[dtype]
    assert parents_error <= tolerance[0] and dots_error <= tolerance[1], (name, parents_error, dots_error)


def test_lanes_take_whole_rounds(emulator):
    """The issue's 2/3 lane occupancy at 30x40 and 5x40: tiles are now whole rounds of the lanes."""
    for parents, children in ((30, 40), (5, 40)):
        plan, _, _ = emulator.check(parents, children, 1024, torch.float32)
        assert plan["tile"] % (plan["lanes"] * 4) == 0, plan


def test_shared_memory_attribute_is_never_lowered(emulator):
    """fp32 30x40 (one fused launch, 110,044 B at the H100 budget), then 46x46 (dots-only groups of the same
    kernel, 95,224 B), then 30x40 again: the kernel's opt-in attribute only ever rises and no launch exceeds the
    attribute at its time (the fake runtime refuses one that does, as CUDA does), and every result is right."""
    emulator.reset_launch_state()
    for parents, children in ((30, 40), (46, 46), (30, 40)):
        plan, parents_error, dots_error = emulator.check(parents, children, 512, torch.float32)
        tolerance = emulator.TOLERANCE[torch.float32]
        assert parents_error <= tolerance[0] and dots_error <= tolerance[1], (parents, children, plan)
    log = emulator.launch_log()
    launches = [row for row in log if row["event"] == "launch"]
    assert [row["bytes"] for row in launches] == [110_044, 95_224, 95_224, 110_044], launches  # the sizes of the bug
    assert len({row["kernel"] for row in launches}) == 1, launches  # one kernel: its attribute is shared
    attribute = emulator.DEFAULT_SMEM
    for row in log:
        if row["event"] == "set":
            assert row["bytes"] > attribute, log  # raised, never lowered (and never set without need)
            attribute = row["bytes"]
        else:
            assert row["bytes"] <= row["attribute"] == attribute, log
    assert attribute == 110_044
