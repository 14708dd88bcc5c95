"""Peak memory in the op benchmark (python -m l2b_fast.bench): the measurement, the columns, the plot."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from l2b_fast import backends
from l2b_fast.bench import branch_benchmark as bench
from l2b_fast.bench import report

CPU = torch.device("cpu")


def test_cpu_peak_is_the_running_maximum_of_the_step_allocations():
    kept = []

    def step():
        first = torch.empty(200_000)  # 800 kB
        second = torch.empty(100_000)  # 400 kB: 1.2 MB live
        del first
        kept.append(torch.empty(300_000))  # 1.2 MB + 400 kB = 1.6 MB, the peak; survives the step
        del second

    for _ in range(2):  # the second measurement is not offset by what the first left allocated
        assert bench.step_peak_bytes(step, CPU) == 1_600_000
    kept.clear()
    assert bench.step_peak_bytes(lambda: None, CPU) == 0


def test_peak_memory_needs_a_cpu_or_cuda_device():
    with pytest.raises(ValueError, match="meta"):
        bench.step_peak_bytes(lambda: None, torch.device("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_counts_what_the_step_allocates():
    resident = torch.empty(2**20, device="cuda")

    def step():
        scratch = torch.empty(2**22, dtype=torch.uint8, device="cuda")  # 4 MiB
        del scratch

    assert bench.step_peak_bytes(step, torch.device("cuda")) == 2**22
    del resident


def test_rows_carry_memory_next_to_time(monkeypatch, tmp_path):
    shape = bench.Shape("memory-test", 3, 4, (64, 1024))  # N = 65536: children and gradients are MiB-sized
    monkeypatch.setitem(bench.SHAPES, shape.name, shape)
    names = [n for n in ("ref", "cpp") if backends.unavailable_reason(n, "cpu") is None]
    rows = bench.run([shape.name], names, CPU, warmup=0, repeat=1)
    assert [row["implementation"] for row in rows] == ["naive", *names]
    element = 4
    for row in rows:
        assert row["inputs_MiB"] == round((3 + 4) * shape.numel * element / 2**20 + 3 * 4 * element / 2**20, 2)
        # out [J, N] and grad_parents [I, N] are alive together at the end of the backward
        assert row["step_peak_MiB"] >= (3 + 4) * shape.numel * element / 2**20 - 0.01
    by_name = {row["implementation"]: row for row in rows}
    assert by_name["naive"]["step_peak_MiB"] > min(
        by_name[n]["step_peak_MiB"] for n in names
    )  # stacks and weights every parent
    csv_path, json_path = report.write_results(rows, report.environment(CPU), tmp_path, "branch_cpu_memory-test")
    with csv_path.open() as handle:
        assert "step_peak_MiB" in next(csv.reader(handle))
    assert "step_peak_MiB" in bench.format_table(rows).splitlines()[0]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_draws_memory_and_still_reads_csvs_without_it(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "plot_branch_benchmark", Path(__file__).resolve().parent.parent / "benchmarks" / "plot_branch_benchmark.py"
    )
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    base = {"device": "cpu", "parents": 3, "children": 4, "activation": "64x1024", "dtype": "float32"}
    rows = [
        {
            **base,
            "shape": "a",
            "implementation": "naive",
            "fwd_bwd_ms": 4.0,
            "speedup_vs_naive": 1.0,
            "step_peak_MiB": 3.5,
            "inputs_MiB": 1.8,
        },
        {
            **base,
            "shape": "a",
            "implementation": "cpp",
            "fwd_bwd_ms": 1.0,
            "speedup_vs_naive": 4.0,
            "step_peak_MiB": 1.8,
            "inputs_MiB": 1.8,
        },
    ]
    with_memory, without = tmp_path / "new.csv", tmp_path / "old.csv"
    for path, fields in ((with_memory, list(rows[0])), (without, [k for k in rows[0] if not k.endswith("MiB")])):
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows([{**row, "shape": f"{row['shape']}-{path.stem}"} for row in rows])
    for inputs in ([without], [with_memory, without]):
        out = tmp_path / f"plot{len(inputs)}.png"
        assert plot.main([*map(str, inputs), "--out", str(out)]) == 0
        assert out.stat().st_size > 1000


# --- timing: L2 flush before every CUDA call (host logic through fake events), torch.utils.benchmark on CPU


class _FakeEvent:
    """Records into a shared log; elapsed time is the number of log entries between two events."""

    log: list = []

    def __init__(self, enable_timing: bool):
        assert enable_timing
        self.position = None

    def record(self):
        self.position = len(self.log)
        self.log.append("record")

    def synchronize(self):
        self.log.append("synchronize")

    def elapsed_time(self, end) -> float:
        return float(end.position - self.position)


class _FakeFlush:
    def zero_(self):
        _FakeEvent.log.append("flush")


def test_cuda_times_flush_l2_before_every_timed_call():
    _FakeEvent.log = []
    times = bench.cuda_times(lambda: _FakeEvent.log.append("fn"), 3, _FakeFlush(), event=_FakeEvent)
    assert _FakeEvent.log == ["flush", "record", "fn", "record"] * 3 + ["synchronize"]
    assert times == [2.0, 2.0, 2.0]  # the flush lies outside every timed interval
    assert bench.L2_FLUSH_BYTES > 50 * 2**20  # larger than an H100's L2


def test_cpu_times_come_from_torch_utils_benchmark():
    calls = []
    times = bench.cpu_times(lambda: calls.append(1), repeat=3, min_run_time=0.001)
    assert len(times) >= 3 and all(t > 0 for t in times)
    assert len(calls) > len(times)  # blocked_autorange's untimed warm-up call comes first
    assert "torch.utils.benchmark" in bench.TIMER["cpu"] and "L2" in bench.TIMER["cuda"]
