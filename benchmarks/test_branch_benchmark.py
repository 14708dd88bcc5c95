"""pytest-benchmark suite: fwd+bwd of the branching op per backend and the naive baseline.

    python -m pytest benchmarks --benchmark-only                # CPU (and CUDA if present)
    python -m pytest benchmarks --benchmark-only --benchmark-json=out.json

Scripted tables with CSV/JSON output: ``python -m l2b_fast.bench`` (see README).
"""

from __future__ import annotations

import pytest
import torch

from l2b_fast import backends
from l2b_fast.bench.branch_benchmark import SHAPES, step_peak_bytes, synchronize
from l2b_fast.bench.naive import branch_naive
from l2b_fast.ops import branch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [("cpu", "cpu-target"), ("cuda", "taskonomy"), ("cuda", "celeba")]


def implementations(device: str) -> list[str]:
    names = [
        n for n, why in backends.available(device).items() if why is None and not (n == "triton" and device == "cpu")
    ]
    return ["naive", *names]


PARAMS = [
    pytest.param(device, shape, name, id=f"{device}-{shape}-{name}")
    for device, shape in CASES
    if device in DEVICES
    for name in implementations(device)
]


@pytest.mark.parametrize("device, shape_name, implementation", PARAMS)
def test_fwd_bwd(benchmark, device, shape_name, implementation):
    shape = SHAPES[shape_name]
    dev = torch.device(device)
    parents = torch.randn((shape.parents, *shape.activation), device=dev, requires_grad=True)
    logits = torch.randn(shape.parents, shape.children, device=dev, requires_grad=True)
    grad = torch.randn((shape.children, *shape.activation), device=dev)
    benchmark.group = f"{device}-{shape_name}"
    benchmark.extra_info.update(parents=shape.parents, children=shape.children, activation=list(shape.activation))
    members = []
    if implementation == "naive":
        members, grads = [p.detach().clone().requires_grad_(True) for p in parents], list(grad.unbind(0))

        def step():
            torch.autograd.backward(branch_naive(members, logits, 1.0), grads)
            synchronize(dev)
    else:

        def step():
            branch(parents, logits, 1.0, backend=implementation).backward(grad)
            synchronize(dev)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    for leaf in (parents, logits, *members):  # the memory step starts without gradients, as python -m l2b_fast.bench
        leaf.grad = None
    benchmark.extra_info["step_peak_MiB"] = round(step_peak_bytes(step, dev) / 2**20, 2)
