"""Forward+backward time of every backend against the naive implementation, with achieved bandwidth.

Bytes are the fewest the fused op must move (its cost model), N elements per parent:
forward gather reads and writes J*N; the fused backward reads J*N (grad) + I*N (parents) and writes I*N.
effective_GBps = those minimum bytes / measured time, for every implementation (the naive one moves ~3 I J N
elements, so its real traffic is far higher); backward_GBps is the same for the fused backward op alone, to
compare with the device copy bandwidth measured in the same run.

Memory: step_peak_MiB is the peak of what one forward+backward step allocates above what was allocated
before it (children, gradients, workspaces; ``inputs_MiB`` = parents + upstream gradient + logits, the same
for every implementation, is resident besides). Measured in one extra, untimed step per implementation
(``MEMORY_METHOD`` says how on each device).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import tempfile

import torch

from l2b_fast.bench.naive import branch_naive
from l2b_fast.ops import branch


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    parents: int
    children: int
    activation: tuple[int, ...]  # S = (batch, channels, height, width)

    @property
    def numel(self) -> int:
        return math.prod(self.activation)


SHAPES = {
    "taskonomy": Shape("taskonomy", 5, 5, (64, 64, 32, 32)),
    "celeba": Shape("celeba", 30, 40, (64, 64, 8, 8)),
    "cpu-target": Shape("cpu-target", 5, 5, (16, 64, 32, 32)),
    "tiny": Shape("tiny", 3, 4, (2, 8, 6, 6)),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# As triton.testing.do_bench: a buffer larger than any L2 (H100: 50 MB) is zeroed before every timed call, so
# no call finds the previous one's tensors in L2 (the op benchmark's 31-84 MB tensors would partly hit it).
L2_FLUSH_BYTES = 256 * 2**20
CPU_MIN_RUN_TIME_S = 0.05  # torch.utils.benchmark block length: one untimed warm-up call, then >= 1 timed call
TIMER = {
    "cuda": "cuda events, L2 flushed before each call (as triton.testing.do_bench)",
    "cpu": "torch.utils.benchmark.Timer.blocked_autorange",
}


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)


def cuda_times(fn, repeat: int, flush: torch.Tensor, event=None) -> list[float]:
    """ms of ``repeat`` calls of ``fn``, each between two CUDA events after zeroing ``flush`` (evicts L2).

    ``event`` makes the events (default ``torch.cuda.Event``); tests pass a fake to check the order on CPU.
    """
    event = event or torch.cuda.Event
    pairs = []
    for _ in range(repeat):
        start, end = event(enable_timing=True), event(enable_timing=True)
        flush.zero_()
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    pairs[-1][1].synchronize()  # events complete in order: the last one done means all are
    return [start.elapsed_time(end) for start, end in pairs]


def cpu_times(fn, repeat: int, min_run_time: float = CPU_MIN_RUN_TIME_S) -> list[float]:
    """ms per call of ``fn``: one value per block of ``torch.utils.benchmark``'s blocked_autorange, at least
    ``repeat``."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = []
    while len(times) < repeat:
        times += [seconds * 1e3 for seconds in timer.blocked_autorange(min_run_time=min_run_time).times]
    return times


def measure(fn, device: torch.device, warmup: int, repeat: int) -> list[float]:
    """Times in ms of ``fn()`` after ``warmup`` calls: ``TIMER[device.type]`` says how."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        return cuda_times(fn, repeat, l2_flush_buffer(device))
    return cpu_times(fn, repeat)


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, repeat: int) -> float:
    """Device copy bandwidth in GB/s (bytes read + written per second) for a buffer of ``nbytes``."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    ms = statistics.median(measure(lambda: target.copy_(source), device, warmup, repeat))
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the step",
    "cpu": "torch.profiler memory events (profile_memory=True): peak of the running total of tensor allocations "
    "through PyTorch's CPU allocator during the step (memory a kernel allocates outside PyTorch is not seen)",
}


def step_peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn`` above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu and cuda, not {device.type}")
    # The profiler reports every allocation and free of the CPU allocator with its running total
    # ("Total Allocated", counted from the start of profiling); its trace is where those events are exposed.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        profiler.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace)["traceEvents"]
    finally:
        os.remove(path)
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        return 0
    # The running total also counts blocks of earlier profiles freed while the profiler was off.
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in memory) - start)


def fused_min_bytes(shape: Shape, element_size: int) -> dict[str, int]:
    n, i, j = shape.numel, shape.parents, shape.children
    return {"forward": 2 * j * n * element_size, "backward": (2 * i + j) * n * element_size}


def run(
    shape_names: list[str],
    backend_names: list[str],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    repeat: int = 10,
    naive: bool = True,
    tau: float = 1.0,
) -> list[dict]:
    rows = []
    for shape_name in shape_names:
        shape = SHAPES[shape_name]
        generator = torch.Generator(device).manual_seed(0)
        parents = torch.randn((shape.parents, *shape.activation), device=device, dtype=dtype, generator=generator)
        grad = torch.randn((shape.children, *shape.activation), device=device, dtype=dtype, generator=generator)
        logits = torch.randn(shape.parents, shape.children, device=device, generator=generator)
        minimum = fused_min_bytes(shape, parents.element_size())
        inputs_bytes = sum(t.numel() * t.element_size() for t in (parents, grad, logits))
        timings, peaks = {}, {}
        if naive:
            members = [p.clone().requires_grad_(True) for p in parents]
            naive_logits = logits.clone().requires_grad_(True)
            grads = list(grad.unbind(0))

            def naive_step():
                for tensor in (*members, naive_logits):  # as optimizer.zero_grad(set_to_none=True)
                    tensor.grad = None
                torch.autograd.backward(branch_naive(members, naive_logits, tau), grads)

            timings["naive"] = (measure(naive_step, device, warmup, repeat), None)
            for tensor in (*members, naive_logits):  # the memory step starts without gradients
                tensor.grad = None
            peaks["naive"] = step_peak_bytes(naive_step, device)
            del members, naive_logits, grads, naive_step  # its copy of the parents is not resident for the others
        tau_tensor = torch.full((), tau, dtype=torch.float64, device=device)  # the ops' schema takes tau as a tensor
        for name in backend_names:
            fused_parents = parents.clone().requires_grad_(True)
            fused_logits = logits.clone().requires_grad_(True)

            # The F821 suppressions here and below: a false positive for closures over names that a later `del` in
            # this scope removes; each closure runs before that `del`, in the same iteration.
            def fused_step(name=name):
                fused_parents.grad = fused_logits.grad = None  # noqa: F821
                branch(fused_parents, fused_logits, tau, backend=name).backward(grad)  # noqa: F821

            backward_ms = None
            if name != "ref":
                backend_ops = _backend_ops(name)
                with torch.no_grad():
                    soft, index = backend_ops.sample_branches(
                        logits, tau_tensor, None, torch.tensor([1], device=device)
                    )
                backward_ms = statistics.median(
                    measure(
                        lambda: backend_ops.branch_backward(grad, parents, index, soft, tau_tensor),  # noqa: F821
                        device,
                        warmup,
                        repeat,
                    )
                )
            timings[name] = (measure(fused_step, device, warmup, repeat), backward_ms)
            fused_parents.grad = fused_logits.grad = None
            peaks[name] = step_peak_bytes(fused_step, device)
            del fused_parents, fused_logits, fused_step
        naive_ms = statistics.median(timings["naive"][0]) if naive else None
        for name, (times, backward_ms) in timings.items():
            ms = statistics.median(times)
            row = {
                "shape": shape.name,
                "parents": shape.parents,
                "children": shape.children,
                "activation": "x".join(map(str, shape.activation)),
                "dtype": str(dtype).removeprefix("torch."),
                "implementation": name,
                "fwd_bwd_ms": round(ms, 4),
                "fwd_bwd_ms_min": round(min(times), 4),
                "speedup_vs_naive": round(naive_ms / ms, 2) if naive_ms else None,
                "backward_ms": round(backward_ms, 4) if backward_ms else None,
                "fused_min_bytes": minimum["forward"] + minimum["backward"],
                "effective_GBps": round((minimum["forward"] + minimum["backward"]) / (ms * 1e-3) / 1e9, 2),
                "backward_GBps": round(minimum["backward"] / (backward_ms * 1e-3) / 1e9, 2) if backward_ms else None,
                "step_peak_MiB": round(peaks[name] / 2**20, 2),
                "inputs_MiB": round(inputs_bytes / 2**20, 2),
            }
            rows.append(row)
        del parents, grad
    return rows


def _backend_ops(name: str):
    if name == "triton":
        from l2b_fast.ops import _triton  # noqa: F401  (defines the namespace)

        return torch.ops.l2b_fast_triton
    return torch.ops.l2b_fast


def format_table(rows: list[dict]) -> str:
    columns = [
        "shape",
        "dtype",
        "implementation",
        "fwd_bwd_ms",
        "speedup_vs_naive",
        "effective_GBps",
        "backward_ms",
        "backward_GBps",
        "step_peak_MiB",
    ]
    table = [columns] + [["" if row[c] is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[k]) for line in table) for k in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
