"""The search-step benchmark (`l2b bench search`): a tiny smoke run, its files and columns, and its baselines."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from l2b_fast import cli
from l2b_fast.bench import search_step
from l2b_fast.models import celeba_deep_wide_spec


pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_run_writes_tagged_csv_json_and_plot(tmp_path, capsys):
    code = cli.main(["bench", "search", "--preset", "tiny", "--models", "celeba_deep_wide", "--repeat", "1", "--warmup", "0", "--no-memory", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    stem = next(tmp_path.glob("search_cpu_*_tiny.csv")).stem
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    with open(tmp_path / f"{stem}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["variant"] for row in rows] == list(search_step.VARIANTS)
    for column in ("model", "batch", "input", "median_ms", "images_per_s", "vs_naive", "vs_per_child", "vs_static", "step_peak_MiB", "resident_MiB", "memory", "device", "torch", "cpu_threads"):
        assert column in rows[0], column
    measured = {row["variant"]: row for row in rows if row["status"] == "ok"}
    assert {"naive", "per_child", "static"} <= set(measured)
    for row in measured.values():
        assert float(row["median_ms"]) > 0 and float(row["images_per_s"]) > 0 and float(row["resident_MiB"]) > 0
        assert row["memory"] == "not measured" and row["step_peak_MiB"] == ""
    assert float(measured["naive"]["vs_naive"]) == 1.0
    for row in rows:
        if row["status"] != "ok":  # grouped execution not built yet: reported, never faked
            assert row["variant"] in ("grouped", "grouped_triton", "static_grouped") and row["note"]
    meta = json.loads((tmp_path / f"{stem}.json").read_text())["meta"]
    assert meta["torch"] == torch.__version__ and meta["preset"]["name"] == "tiny"
    assert meta["config"]["repeat"] == 1
    assert "celeba_deep_wide" in capsys.readouterr().out


def test_bad_arguments_fail_clearly(capsys):
    assert cli.main(["bench", "search", "--preset", "tiny", "--models", "mnist", "--no-memory"]) == 2
    assert "mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search_step.main(["--variants", "fast", "--no-memory"])
    spec = celeba_deep_wide_spec(width=1 / 8, input_size=32)
    with pytest.raises(ValueError, match="fast"):
        search_step.build_variant("fast", spec, {}, torch.device("cpu"), channels_last=False)


@pytest.mark.skipif(not search_step.cpu_memory_supported(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_memory_probe_sees_the_activations():
    # batch 64 at 32x32: the step's activations are megabytes, far above glibc's retained heap.
    peak = search_step.probe_cpu_step_memory("celeba_deep_wide", "per_child", "tiny", batch=64)
    assert peak > 2**20


def test_every_variant_computes_the_same_function():
    """With logits that make the static parents certain picks, all variants give the supernet's outputs."""
    spec = celeba_deep_wide_spec(width=1 / 8, input_size=32, children=(2, 3, 3, 2, 2), tasks=("a", "b", "c"))
    torch.manual_seed(0)
    net = spec.supernet(execution="per_child")
    tree = search_step.static_tree(spec)
    with torch.no_grad():
        for branching, parents in zip(net.branchings, tree.parents):
            branching.logits.fill_(-1e4)
            branching.logits[parents, list(range(len(parents)))] = 1e4
    state = net.state_dict()
    x = spec.example_input(3).double()
    expected = net.double()(x)
    for name in search_step.VARIANTS:
        try:
            variant = search_step.build_variant(name, spec, state, torch.device("cpu"), channels_last=False)
        except search_step.VariantUnavailable:
            continue
        got = variant.model.double()(x)
        for task in spec.tasks:
            torch.testing.assert_close(got[task], expected[task], msg=f"{name} {task}")
        assert bool(variant.logits) == (name in ("naive", "per_child", "grouped", "auto"))
