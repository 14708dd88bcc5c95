"""The search-step benchmark (`l2b bench search`): a tiny smoke run, its files and columns, and its baselines."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from l2b_fast import cli
from l2b_fast.bench import estimate, search_step
from l2b_fast.models import SPECS, celeba_branch_vgg_spec, celeba_deep_wide_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_run_writes_tagged_csv_json_and_plot(tmp_path, capsys):
    code = cli.main(
        [
            "bench",
            "search",
            "--preset",
            "tiny",
            "--models",
            "celeba_deep_wide",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--no-memory",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    stem = next(tmp_path.glob("search_cpu_*_tiny.csv")).stem
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    with open(tmp_path / f"{stem}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["variant"] for row in rows] == list(search_step.VARIANTS)
    for column in (
        "model",
        "batch",
        "input",
        "median_ms",
        "images_per_s",
        "vs_naive",
        "vs_per_child",
        "vs_static",
        "step_peak_MiB",
        "resident_MiB",
        "memory",
        "device",
        "torch",
        "cpu_threads",
    ):
        assert column in rows[0], column
    for column in ("precision", "layout", "flops_per_step", "achieved_tflops", "peak_tflops", "peak_fraction", "timer"):
        assert column in rows[0], column
    measured = {row["variant"]: row for row in rows if row["status"] == "ok"}
    assert {"naive", "per_child", "static"} <= set(measured)
    for row in measured.values():
        assert float(row["median_ms"]) > 0 and float(row["images_per_s"]) > 0 and float(row["resident_MiB"]) > 0
        assert row["memory"] == "not measured" and row["step_peak_MiB"] == ""
        assert row["peak_fraction"] == "" and row["precision"] == "fp32" and "torch.utils.benchmark" in row["timer"]
    # one model, one FLOP count: every variant's TFLOP/s is that work over its own time
    tiny_spec = search_step.build_case("celeba_deep_wide", search_step.PRESETS["tiny"], torch.device("cpu")).spec
    flops = search_step.model_flops_per_step(tiny_spec, 2)
    for row in measured.values():
        assert int(row["flops_per_step"]) == flops > 0
        achieved = flops / (float(row["median_ms"]) * 1e-3) / 1e12
        assert float(row["achieved_tflops"]) == pytest.approx(achieved, rel=1e-2, abs=1e-4)
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


def test_variant_suffixes_switch_on_bf16_and_channels_last():
    assert search_step.parse_variant("grouped_bf16_cl") == ("grouped", True, True)
    assert search_step.parse_variant("per_child_cl") == ("per_child", False, True)
    assert search_step.parse_variant("static") == ("static", False, False)
    with pytest.raises(ValueError, match="grouped_cl_bf16"):  # suffixes in the documented order only
        search_step.parse_variant("grouped_cl_bf16")
    assert set(search_step.CPU_PRECISION_LAYOUT_VARIANTS) <= set(search_step.PRESETS["cpu"].variants)
    spec = celeba_deep_wide_spec(width=1 / 8, input_size=32)
    state = spec.supernet(execution="per_child").state_dict()
    variant = search_step.build_variant("per_child_bf16_cl", spec, state, torch.device("cpu"), channels_last=False)
    assert variant.bf16 and variant.channels_last and variant.name == "per_child_bf16_cl"
    weight = next(p for p in variant.model.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert search_step.variant_precision(variant, search_step.PRESETS["tiny"]) == "bf16"


def test_peak_fraction_uses_the_override_or_the_known_gpu_peak():
    columns = search_step.hardware_columns(2 * 10**12, 1000.0, "Intel Xeon", "cpu", "fp32", None)
    assert columns == {"flops_per_step": 2 * 10**12, "achieved_tflops": 2.0, "peak_tflops": None, "peak_fraction": None}
    assert search_step.hardware_columns(2 * 10**12, 1000.0, "Intel Xeon", "cpu", "fp32", 4.0)["peak_fraction"] == 0.5
    on_h100 = search_step.hardware_columns(989.4 * 10**12, 1000.0 / 0.4, "NVIDIA H100 80GB HBM3", "cuda", "bf16", None)
    assert on_h100["peak_tflops"] == 989.4 and on_h100["peak_fraction"] == pytest.approx(0.4)
    with pytest.raises(SystemExit):
        search_step.main(["--preset", "tiny", "--peak-tflops", "-1", "--no-memory"])


def test_bf16_step_difference_is_measured_not_zero():
    spec = celeba_branch_vgg_spec(width=1 / 8, input_size=32)
    difference = search_step.bf16_step_difference(spec, 4, execution="per_child")
    assert 0 < difference["loss"] < 0.01  # the loss agrees to bf16's precision
    assert difference["weight_grad"] > 0 and difference["logits_grad"] > 0


def test_gpu_preset_fits_an_80_gb_gpu():
    """Every variant of the GPU preset is resident at once; one step's activations at a time (estimate, bf16)."""
    preset = search_step.PRESETS["gpu"]
    for model, entry in preset.models.items():
        spec = SPECS[model](**entry["options"])
        step = estimate.estimate(spec, entry["batch"], "bf16", execution="grouped", device_memory_gib=80)
        resident = len(preset.variants) * step.weight_state_bytes
        assert resident + step.activation_bytes + step.workspace_bytes < 0.75 * 80 * 2**30, model


def test_compile_columns_report_the_triton_variants_jit_compiles():
    import contextlib
    import types

    from l2b_fast.bench import search_step

    assert search_step.compile_columns(None) == {
        "triton_compiles_warmup": None, "triton_compile_s": None, "triton_compiles_timed": None,
    }  # fmt: skip
    noop = search_step._triton_compile_reports(["per_child", "grouped"])
    assert all(isinstance(manager, contextlib.nullcontext) for manager in noop.values())
    fake = {
        "warmup": types.SimpleNamespace(report=types.SimpleNamespace(kernels=12, seconds=3.456)),
        "timed": types.SimpleNamespace(report=types.SimpleNamespace(kernels=0, seconds=0.0)),
    }
    assert search_step.compile_columns(fake) == {
        "triton_compiles_warmup": 12, "triton_compile_s": 3.46, "triton_compiles_timed": 0,
    }  # fmt: skip
