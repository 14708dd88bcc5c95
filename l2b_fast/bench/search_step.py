"""``l2b bench search``: images/s and peak memory of a whole search step on the paper's models.

A search step is forward, backward and both optimizer steps (Adam on the weights, Adam on the logits).
Variants, all starting from the same weights and run on the same batch:

- ``naive``: what existing Learning-to-Branch code does: per child ``F.gumbel_softmax(hard=True)`` and a
  weighted sum over all parents, one node at a time (``l2b_fast.bench.naive.NaiveSupernet``);
- ``per_child``: ``TreeSupernet(execution="per_child")``: the fused branching op, nodes one by one;
- ``grouped``: ``TreeSupernet(execution="grouped")``: every block's children as one batched launch per layer;
- ``grouped_triton``: ``grouped`` with ``conv_backend="triton"``: a gathered block's first convolution reads
  the parents through the sampled index (Triton implicit GEMM) instead of cuDNN on a gathered copy; CUDA only
  (skipped with a note elsewhere);
- ``auto``: ``TreeSupernet(execution="auto")``, the library's default: grouped where it measured faster;
- ``static``: the floor: the same nodes with every child hard-wired to one parent (child j of a block
  reads parent j mod I) and no branching at all, run as a ``TreeNet`` (one node at a time, no logits);
- ``static_grouped``: the same floor run the grouped way: ``execution="grouped"`` with every block in
  eval mode routed to those parents (on CPU each distinct parent is read once by its children's
  concatenated weights; no sampling, no logits gradient, no logits optimizer).

Each variant name may end in ``_bf16`` (bf16 autocast) and/or ``_cl`` (channels_last), switching that on
over the preset: the CPU preset adds ``grouped_bf16``, ``grouped_cl`` and ``grouped_bf16_cl``.

Variants are interleaved: every round runs one step of each, in an order rotated from round to round, so
a shared machine's load falls on all of them alike and their ratios stay fair.

Memory (``step_peak_MiB``): what a step allocates above everything resident before it (weights, buffers,
optimizer state, the batch). CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
CPU: the growth of the resident set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
over one step after a warm-up step, in a fresh process per variant with glibc's mmap threshold fixed at
128 KiB, so freed tensors go back to the system and are not silently reused. ``resident_MiB`` is the bytes
of the variant's parameters, buffers and optimizer state.

Timing: CUDA: CUDA events around each step after zeroing a 256 MiB buffer (L2 flushed, as
``triton.testing.do_bench``); CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` per step and round.
Hardware limit: ``flops_per_step`` is the model's forward + backward FLOPs (``FlopCounterMode`` on the meta
device, batch 1 times the batch, counted once per model: every variant computes the same model), so
``achieved_tflops`` compares variants on the same work; ``peak_fraction`` divides it by the device's dense peak
for the variant's precision (``l2b_fast.bench.estimate.DENSE_PEAK_TFLOPS``) or by ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from l2b_fast.bench import estimate, report
from l2b_fast.bench.branch_benchmark import TIMER, cpu_times, cuda_times, l2_flush_buffer, step_peak_bytes, synchronize
from l2b_fast.bench.naive import NaiveSupernet
from l2b_fast.models import SPECS, ModelSpec
from l2b_fast.nn import TreeNet
from l2b_fast.tree import Tree

VARIANTS = ("naive", "per_child", "grouped", "grouped_triton", "auto", "static", "static_grouped")
CPU_PRECISION_LAYOUT_VARIANTS = ("grouped_bf16", "grouped_cl", "grouped_bf16_cl")
MODELS = tuple(SPECS)


def parse_variant(name: str) -> tuple[str, bool, bool]:
    """``"grouped_bf16_cl"`` -> ``("grouped", True, True)``: the base variant, bf16 autocast, channels_last."""
    base, bf16, channels_last = name, False, False
    if base.endswith("_cl"):
        base, channels_last = base.removesuffix("_cl"), True
    if base.endswith("_bf16"):
        base, bf16 = base.removesuffix("_bf16"), True
    if base not in VARIANTS:
        raise ValueError(
            f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}, each optionally + _bf16 and/or _cl"
        )
    return base, bf16, channels_last


@dataclasses.dataclass(frozen=True)
class Preset:
    """Per model: spec options and batch size; for all: autocast dtype and memory format."""

    description: str
    models: dict  # model name -> {"options": spec options, "batch": int}
    amp_dtype: str | None = None  # "bfloat16" / "float16": autocast
    channels_last: bool = False
    variants: tuple[str, ...] = VARIANTS  # run when --variants is not given


PRESETS = {
    "gpu": Preset(
        "the paper's settings: Taskonomy 128x128, CelebA 218x178 (as released), batch 64, bf16 autocast, channels_last",
        {
            # aspp_channels=192: the paper's parameter counts (as the taskonomy-resnet34 preset); see estimate.py
            "taskonomy_resnet34": {"options": {"input_size": 128, "aspp_channels": 192}, "batch": 64},
            "celeba_branch_vgg": {"options": {}, "batch": 64},
            "celeba_deep_wide": {"options": {}, "batch": 64},
        },
        amp_dtype="bfloat16",
        channels_last=True,
    ),
    "cpu": Preset(
        "reduced for a small CPU: Taskonomy at width 1/4 and 64x64, batch 8; CelebA models at full width, 64x64, "
        "batch 16; fp32",
        {
            "taskonomy_resnet34": {"options": {"width": 0.25, "input_size": 64}, "batch": 8},
            "celeba_branch_vgg": {"options": {"input_size": 64}, "batch": 16},
            "celeba_deep_wide": {"options": {"input_size": 64}, "batch": 16},
        },
        variants=VARIANTS + CPU_PRECISION_LAYOUT_VARIANTS,
    ),
    "tiny": Preset(
        "smoke test: tiny widths, inputs and children; fp32",
        {
            "taskonomy_resnet34": {
                "options": {
                    "width": 1 / 32,
                    "input_size": 16,
                    "children": 2,
                    "branching": "stage",
                    "aspp_channels": 64,
                },
                "batch": 2,
            },
            "celeba_branch_vgg": {
                "options": {"width": 1 / 8, "input_size": 32, "children": (2, 2, 2, 2, 2, 3, 3, 4)},
                "batch": 2,
            },
            "celeba_deep_wide": {
                "options": {"width": 1 / 8, "input_size": 32, "children": (2, 2, 3, 3, 4)},
                "batch": 2,
            },
        },
    ),
}


class VariantUnavailable(RuntimeError):
    """This variant cannot run here (e.g. grouped execution not built); the benchmark reports why."""


def static_tree(spec: ModelSpec) -> Tree:
    """Every child hard-wired to one parent: child j of a block reads parent j mod I (the static floor)."""
    widths = [block.children for block in spec.blocks]
    parents = [[0] * widths[0]] + [[j % widths[b - 1] for j in range(widths[b])] for b in range(1, len(widths))]
    return Tree(list(spec.tasks), parents)


@dataclasses.dataclass
class Variant:
    name: str
    model: torch.nn.Module
    weights: list
    logits: list
    bf16: bool = False  # autocast to bf16 whatever the preset says
    channels_last: bool = False


def build_variant(name: str, spec: ModelSpec, state: dict, device: torch.device, channels_last: bool) -> Variant:
    """The variant's module, loaded with ``state`` (the common initial weights), and its parameter groups."""
    full_name = name
    name, bf16, own_channels_last = parse_variant(name)
    channels_last = channels_last or own_channels_last
    execution = {"grouped": "grouped", "grouped_triton": "grouped", "static_grouped": "grouped", "auto": "auto"}.get(
        name, "per_child"
    )
    if name == "grouped_triton" and device.type != "cuda":
        raise VariantUnavailable(f"{name}: the Triton convolution runs on CUDA only (device {device.type})")
    try:
        with device:  # initialised where it runs: a full-size Taskonomy supernet takes seconds on one CPU core
            supernet = spec.supernet(execution=execution)
    except (ValueError, NotImplementedError) as error:
        raise VariantUnavailable(f"{name}: {error}") from error
    supernet.load_state_dict(state)
    if name == "grouped_triton":
        supernet.set_conv_backend("triton")
    if name == "static":
        model = TreeNet.from_supernet(supernet, static_tree(spec))
        weights, logits = list(model.parameters()), []
    elif name == "static_grouped":
        with torch.no_grad():  # eval-mode routing is the argmax of the logits: point it at the static parents
            for branching, parents in zip(supernet.branchings, static_tree(spec).parents):
                branching.logits.zero_()
                branching.logits[parents, list(range(len(parents)))] = 1.0
        supernet.set_mode("eval")
        model, weights, logits = supernet, supernet.weight_parameters(), []
    else:
        model = NaiveSupernet(supernet) if name == "naive" else supernet
        weights, logits = supernet.weight_parameters(), supernet.logits_parameters()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    return Variant(full_name, model, weights, logits, bf16, channels_last)


def make_step(
    variant: Variant, x: torch.Tensor, targets: dict, amp_dtype: torch.dtype | None
) -> tuple[Callable[[], None], list]:
    """One search step of ``variant`` as a closure (forward, loss, backward, both optimizer steps), and its
    optimizers."""
    weights_optimizer = torch.optim.Adam(variant.weights, lr=1e-4)
    logits_optimizer = torch.optim.Adam(variant.logits, lr=1e-3) if variant.logits else None
    model = variant.model
    amp_dtype = torch.bfloat16 if variant.bf16 else amp_dtype
    if variant.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(x)
        loss = sum(F.mse_loss(outputs[task].float(), target) for task, target in targets.items())
        loss.backward()
        weights_optimizer.step()
        weights_optimizer.zero_grad(set_to_none=True)
        if logits_optimizer is not None:
            logits_optimizer.step()
            logits_optimizer.zero_grad(set_to_none=True)

    return step, [o for o in (weights_optimizer, logits_optimizer) if o is not None]


def resident_bytes(variant: Variant, optimizers) -> int:
    """Bytes of the variant's parameters, buffers and optimizer state (shared tensors counted once)."""
    tensors = {id(t): t for t in [*variant.model.parameters(), *variant.model.buffers()]}
    for optimizer in optimizers:
        for state in optimizer.state.values():
            tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclasses.dataclass
class Case:
    """A model of a preset, built: spec, common initial weights, batch and targets."""

    model: str
    spec: ModelSpec
    batch: int
    state: dict
    x: torch.Tensor
    targets: dict


def build_case(
    model: str,
    preset: Preset,
    device: torch.device,
    *,
    seed: int = 0,
    batch: int | None = None,
    width: float | None = None,
) -> Case:
    entry = preset.models[model]
    options = dict(entry["options"])
    if width is not None:
        options["width"] = width
    spec = SPECS[model](**options)
    batch = batch or entry["batch"]
    torch.manual_seed(seed)
    with device:
        reference = spec.supernet(execution="per_child")
    state = {k: v.clone() for k, v in reference.state_dict().items()}  # every variant starts from these weights
    generator = torch.Generator().manual_seed(seed)
    x = spec.example_input(batch, generator=generator).to(device)
    if preset.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference.eval()
    with torch.no_grad():  # output shapes from one image: a full-size batch would take minutes on a CPU
        shapes = {
            task: (batch, *out.shape[1:])
            for task, out in reference(spec.example_input(1, generator=generator).to(device)).items()
        }
    del reference
    targets = {task: torch.randn(shape, generator=generator).to(device) for task, shape in shapes.items()}
    return Case(model, spec, batch, state, x, targets)


def time_variants(
    case: Case, variants: list[str], preset: Preset, device: torch.device, warmup: int, repeat: int
) -> tuple[dict, dict]:
    """Interleaved step times (ms) per variant, and on CUDA the step peak memory; unavailable ones skipped."""
    amp_dtype = getattr(torch, preset.amp_dtype) if preset.amp_dtype else None
    steps, resident, skipped = {}, {}, {}
    for name in variants:
        try:
            variant = build_variant(name, case.spec, case.state, device, preset.channels_last)
        except VariantUnavailable as error:
            skipped[name] = str(error)
            continue
        steps[name] = (variant, *make_step(variant, case.x, case.targets, amp_dtype))
    order = list(steps)
    compiles = _triton_compile_reports(order)
    with compiles["warmup"]:
        for round_index in range(warmup):
            for name in order:
                steps[name][1]()
        synchronize(device)
    for name, (variant, _, optimizers) in steps.items():
        resident[name] = resident_bytes(variant, optimizers)
    # CPU peaks come from a fresh process per variant (probe_cpu_step_memory), not from the allocator here.
    peaks = (
        {name: step_peak_bytes(step, device) for name, (_, step, _) in steps.items()} if device.type == "cuda" else {}
    )
    times = {name: [] for name in order}
    flush = l2_flush_buffer(device) if device.type == "cuda" else None
    with compiles["timed"]:
        for round_index in range(repeat):
            shift = round_index % max(1, len(order))
            for name in order[shift:] + order[:shift]:
                synchronize(device)
                if device.type == "cuda":
                    times[name].append(cuda_times(steps[name][1], 1, flush)[0])
                else:  # the median of one blocked_autorange: a long step is one warm-up call and one timed call
                    times[name].append(statistics.median(cpu_times(steps[name][1], 1)))
    precisions = {name: variant_precision(variant, preset) for name, (variant, _, _) in steps.items()}
    layouts = {
        name: "channels_last" if variant.channels_last or preset.channels_last else "contiguous"
        for name, (variant, _, _) in steps.items()
    }
    triton = {name: compiles for name in order if name.startswith("grouped_triton")}
    return {
        "times": times, "resident": resident, "peaks": peaks, "precision": precisions, "layout": layouts,
        "triton_compiles": triton,
    }, skipped  # fmt: skip


def _triton_compile_reports(variants: list[str]) -> dict:
    """Context managers counting the Triton convolution's JIT compiles in the warm-up and in the timed rounds
    (:func:`l2b_fast.triton.indexed_conv.compile_report`; a timed round should compile nothing); no-ops without a
    Triton variant. The entered managers' reports are read through ``.report``."""
    if not any(name.startswith("grouped_triton") for name in variants):
        return {"warmup": contextlib.nullcontext(), "timed": contextlib.nullcontext()}
    from l2b_fast.triton.indexed_conv import compile_report

    return {"warmup": _Recorded(compile_report()), "timed": _Recorded(compile_report())}


class _Recorded:
    """A context manager that keeps what the wrapped one yields (``.report``)."""

    def __init__(self, manager):
        self.manager, self.report = manager, None

    def __enter__(self):
        self.report = self.manager.__enter__()
        return self.report

    def __exit__(self, *exc):
        return self.manager.__exit__(*exc)


def compile_columns(compiles: dict | None) -> dict:
    """The Triton convolution's JIT compiles of a ``grouped_triton`` variant: kernels compiled in the warm-up and
    their compile seconds, and kernels compiled in the timed rounds (all variants of the run together)."""
    if compiles is None:
        return {"triton_compiles_warmup": None, "triton_compile_s": None, "triton_compiles_timed": None}
    warmup, timed = compiles["warmup"].report, compiles["timed"].report
    seconds = None if warmup.seconds is None else round(warmup.seconds, 2)
    return {
        "triton_compiles_warmup": warmup.kernels,
        "triton_compile_s": seconds,
        "triton_compiles_timed": timed.kernels,
    }


def variant_precision(variant: Variant, preset: Preset) -> str:
    """ "fp32", "bf16" or "fp16": the autocast dtype a variant's step runs in."""
    if variant.bf16:
        return "bf16"
    return {None: "fp32", "bfloat16": "bf16", "float16": "fp16"}[preset.amp_dtype]


def model_flops_per_step(spec: ModelSpec, batch: int) -> int:
    """Forward + backward FLOPs of one step of the supernet at ``batch`` (on meta: no time, no memory)."""
    flops_per_image, _, _ = estimate.count_step(spec, 1)
    return flops_per_image * batch


def hardware_columns(
    flops: int, median_ms: float, device_name: str, device_type: str, precision: str, peak_override: float | None
) -> dict:
    """``flops_per_step``, ``achieved_tflops``, ``peak_tflops``, ``peak_fraction`` (None where no peak is known)."""
    achieved = flops / (median_ms * 1e-3) / 1e12
    peak = peak_override
    if peak is None and device_type == "cuda":
        peak = estimate.peak_tflops(device_name, precision, tf32=torch.backends.cudnn.allow_tf32)
    return {
        "flops_per_step": flops,
        "achieved_tflops": round(achieved, 4),
        "peak_tflops": peak,
        "peak_fraction": round(achieved / peak, 4) if peak else None,
    }


def probe_cpu_step_memory(
    model: str,
    variant: str,
    preset_name: str,
    *,
    seed: int = 0,
    batch: int | None = None,
    width: float | None = None,
    timeout: float = 600,
) -> int | None:
    """CPU step peak memory (bytes) of one variant, measured in a fresh process (see the module docstring)."""
    request = {"model": model, "variant": variant, "preset": preset_name, "seed": seed, "batch": batch, "width": width}
    environment = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    result = subprocess.run(
        [sys.executable, "-m", "l2b_fast.bench.search_step", "--memory-probe", json.dumps(request)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe of {model}/{variant} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["step_peak_bytes"]


def _read_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _memory_probe_main(request: dict) -> int:
    """In the probe process: build one variant, warm up one step, then measure the next step's RSS peak."""
    preset = PRESETS[request["preset"]]
    device = torch.device("cpu")
    case = build_case(
        request["model"], preset, device, seed=request["seed"], batch=request["batch"], width=request["width"]
    )
    variant = build_variant(request["variant"], case.spec, case.state, device, preset.channels_last)
    step, _ = make_step(variant, case.x, case.targets, getattr(torch, preset.amp_dtype) if preset.amp_dtype else None)
    step()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _read_status_kib("VmRSS")
    step()
    peak = _read_status_kib("VmHWM")
    print(json.dumps({"step_peak_bytes": (peak - before) * 1024}))
    return 0


def cpu_memory_supported() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    device_name = report.environment(device)["device"]
    rows = []
    for model in args.models:
        case = build_case(model, preset, device, seed=args.seed, batch=args.batch, width=args.width)
        flops = model_flops_per_step(case.spec, case.batch)  # once per model: every variant does this work
        measured, skipped = time_variants(case, args.variants, preset, device, args.warmup, args.repeat)
        medians = {name: statistics.median(times) for name, times in measured["times"].items()}
        for name in args.variants:
            row = {
                "model": model,
                "variant": name,
                "batch": case.batch,
                "input": "x".join(map(str, case.spec.input_shape[1:])),
                "width": case.spec.config.get("width"),
            }
            if name in skipped:
                rows.append({**row, "status": "skipped", "note": skipped[name]})
                continue
            times = measured["times"][name]
            median = medians[name]
            peak = measured["peaks"].get(name)
            memory_note = "cuda max_memory_allocated" if peak is not None else "not measured"
            if peak is None and device.type == "cpu" and args.memory:
                peak = probe_cpu_step_memory(
                    model, name, args.preset, seed=args.seed, batch=args.batch, width=args.width
                )
                memory_note = "rss high-water growth, fresh process"
            row.update(
                {
                    "status": "ok",
                    "median_ms": round(median, 3),
                    "min_ms": round(min(times), 3),
                    "images_per_s": round(case.batch / (median / 1e3), 2),
                    "vs_naive": round(medians["naive"] / median, 3) if "naive" in medians else None,
                    "vs_per_child": round(medians["per_child"] / median, 3) if "per_child" in medians else None,
                    "vs_static": round(median / medians["static"], 3) if "static" in medians else None,
                    "vs_static_grouped": round(median / medians["static_grouped"], 3)
                    if "static_grouped" in medians
                    else None,
                    "step_peak_MiB": round(peak / 2**20, 1) if peak is not None else None,
                    "resident_MiB": round(measured["resident"][name] / 2**20, 1),
                    "memory": memory_note,
                    "repeat": len(times),
                    "precision": measured["precision"][name],
                    "layout": measured["layout"][name],
                    **hardware_columns(
                        flops,
                        median,
                        device_name,
                        device.type,
                        measured["precision"][name],
                        getattr(args, "peak_tflops", None),
                    ),
                    "timer": TIMER[device.type],
                    **compile_columns(measured["triton_compiles"].get(name)),
                }
            )
            rows.append(row)
    return rows


def bf16_step_difference(
    spec: ModelSpec, batch: int, *, seed: int = 0, channels_last: bool = True, execution: str = "auto"
) -> dict[str, float]:
    """Relative difference of one search step under bf16 autocast (and channels_last) from the same step in fp32.

    Same weights, batch, targets and branch samples; returns ``loss`` (|bf16 - fp32| / |fp32|) and, over all
    weights and all branching logits, ``weight_grad`` and ``logits_grad`` (||bf16 - fp32|| / ||fp32||).
    """
    torch.manual_seed(seed)
    reference = spec.supernet(execution=execution)
    state = reference.state_dict()
    generator = torch.Generator().manual_seed(seed)
    x = spec.example_input(batch, generator=generator)
    with torch.no_grad():
        targets = {task: torch.randn(out.shape, generator=generator) for task, out in reference.eval()(x).items()}
    step_seed = torch.tensor([seed + 1], dtype=torch.int64)
    results = {}
    for precision in ("fp32", "bf16"):
        net = spec.supernet(execution=execution)
        net.load_state_dict(state)
        net.train()
        inputs = x
        if precision == "bf16" and channels_last:
            net.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = net(inputs, seed=step_seed)  # the same branch samples in both steps
        loss = sum(F.mse_loss(outputs[task].float(), target) for task, target in targets.items())
        loss.backward()

        def flat(parameters):
            return torch.cat([p.grad.flatten() for p in parameters if p.grad is not None])

        results[precision] = (loss.detach(), flat(net.weight_parameters()), flat(net.logits_parameters()))
    (loss32, weights32, logits32), (loss16, weights16, logits16) = results["fp32"], results["bf16"]
    return {
        "loss": float((loss16 - loss32).abs() / loss32.abs()),
        "weight_grad": float((weights16 - weights32).norm() / weights32.norm()),
        "logits_grad": float((logits16 - logits32).norm() / logits32.norm()),
    }


def format_table(rows: list[dict]) -> str:
    """Speed-ups over naive and per_child (higher is better); time over the static floors (lower is better)."""
    header = (
        f"{'model':<19} {'variant':<15} {'median ms':>10} {'images/s':>9} {'speed-up vs naive':>18} "
        f"{'vs per_child':>13} {'/ static':>9} {'/ static_grouped':>17} {'step peak MiB':>14} {'TFLOP/s':>8} "
        f"{'of peak':>8}"
    )
    lines = [header, "-" * len(header)]

    def ratio(value):
        return f"{value:.2f}x" if value is not None else "-"

    def fraction(value):
        return f"{100 * value:.1f}%" if value is not None else "-"

    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['model']:<19} {row['variant']:<15} skipped: {row['note']}")
            continue
        peak = f"{row['step_peak_MiB']:.1f}" if row["step_peak_MiB"] is not None else "n/m"
        lines.append(
            f"{row['model']:<19} {row['variant']:<15} {row['median_ms']:>10.1f} {row['images_per_s']:>9.1f} "
            f"{ratio(row['vs_naive']):>18} {ratio(row['vs_per_child']):>13} {ratio(row['vs_static']):>9} "
            f"{ratio(row['vs_static_grouped']):>17} {peak:>14}"
            f" {row['achieved_tflops']:>8.3g} {fraction(row['peak_fraction']):>8}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Images/s and step peak memory per model and variant, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if row["status"] == "ok"]
    models = list(dict.fromkeys(row["model"] for row in measured))
    variants = list(dict.fromkeys(row["variant"] for row in measured))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    bar = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        for axis, key in zip(axes, ("images_per_s", "step_peak_MiB")):
            values = [
                next((row[key] or 0 for row in measured if row["model"] == m and row["variant"] == variant), 0)
                for m in models
            ]
            axis.bar([i + k * bar for i in range(len(models))], values, bar, label=variant)
    for axis, label in zip(axes, ("images / s (higher is better)", "step peak memory, MiB")):
        axis.set_xticks([i + bar * (len(variants) - 1) / 2 for i in range(len(models))], models, fontsize=8)
        axis.set_ylabel(label)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help=(
            "gpu (the paper's sizes, bf16, channels_last), cpu (reduced) or tiny (smoke test); default gpu on "
            "CUDA, else cpu"
        ),
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument(
        "--variants",
        default=None,
        help=(
            f"comma-separated, from {', '.join(VARIANTS)}, "
            "each optionally + _bf16 (bf16 autocast) and/or _cl (channels_last) (default: the preset's)"
        ),
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed rounds, one step of every variant each (default 20 on cuda, 5 on cpu)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--width", type=float, default=None, help="override the preset's width multiplier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=(
            "the device's peak TFLOP/s for peak_fraction "
            "(default: the dense peak of an H100 or H200 for the variant's precision; none on CPU)"
        ),
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is steadier on a shared machine)",
    )
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="CPU: skip the per-variant memory probes (a process each)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="directory for search_*.csv/.json/.png (default: print only)"
    )
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)


def check_arguments(args: argparse.Namespace) -> None:
    """Validate and complete parsed arguments in place; ``ValueError`` names the problem."""
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"--device {args.device}: not available here")
    args.preset = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    if isinstance(args.models, str):
        args.models = [m for m in args.models.split(",") if m]
    if args.variants is None:
        args.variants = list(PRESETS[args.preset].variants)
    if isinstance(args.variants, str):
        args.variants = [v for v in args.variants.split(",") if v]
    unknown_models = [m for m in args.models if m not in MODELS]
    if unknown_models or not args.models:
        raise ValueError(f"unknown or missing models {unknown_models}; choose from {', '.join(MODELS)}")
    if not args.variants:
        raise ValueError(f"missing variants; choose from {', '.join(VARIANTS)}")
    for variant in args.variants:
        parse_variant(variant)  # raises ValueError naming the variant
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        raise ValueError(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    args.repeat = args.repeat if args.repeat is not None else (20 if args.device == "cuda" else 5)
    if args.repeat < 1 or args.warmup < 0:
        raise ValueError("--repeat must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.batch is not None and args.batch < 1:
        raise ValueError("--batch must be >= 1")
    if args.width is not None and args.width <= 0:
        raise ValueError("--width must be > 0")
    if args.memory and args.device == "cpu" and not cpu_memory_supported():
        print("note: CPU step memory is not measured here (needs Linux /proc/self/clear_refs)", file=sys.stderr)
        args.memory = False


def main_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments: print the table, write CSV/JSON/PNG when ``--out`` is given."""
    check_arguments(args)  # idempotent: ``l2b bench search`` arrives here unchecked
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    meta = report.environment(device)
    meta["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "memory_probe"}
    meta["preset"] = {"name": args.preset, **dataclasses.asdict(preset)}
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | threads {meta['cpu_threads']}")
    print(
        f"preset {args.preset}: {preset.description}"
        + (f" (overrides: batch={args.batch}, width={args.width})" if args.batch or args.width else "")
    )
    rows = run(args)
    print(format_table(rows))
    if args.out is not None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()
        stem = f"search_{args.device}_{slug}_{args.preset}"
        csv_path, json_path = report.write_results(
            rows, meta, args.out, stem, tags=("device", "torch", "triton", "cpu_threads", "date")
        )
        png_path = plot(
            rows,
            args.out / f"{stem}.png",
            f"search step, {meta['device']} (threads={meta['cpu_threads']}), torch {meta['torch']}, preset "
            f"{args.preset}",
        )
        print(f"wrote {csv_path}, {json_path} and {png_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2b_fast.bench.search_step", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.memory_probe is not None:
        return _memory_probe_main(json.loads(args.memory_probe))
    try:
        check_arguments(args)
    except ValueError as error:
        parser.error(str(error))
    return main_from_args(args)


if __name__ == "__main__":
    raise SystemExit(main())
