#!/usr/bin/env python3
"""One command for a GPU machine: build, check every kernel path, and only then measure.

    bash tools/gpu_validate.sh --out "$OUT/gpu-$(date +%Y%m%d)" --bundle    # on the GPU machine
    python tools/gpu_validate.py --dry-run                                    # anywhere: the plan, nothing run
    python tools/gpu_validate.py --download-wheels gpu-wheels                 # on a machine with a package index

Stages, in this order; a failed correctness stage (marked *) stops the run before any benchmark:

  env*          nvidia-smi, python/torch/CUDA/Triton/numpy versions, compute-sanitizer and nvcc
  wheels        test dependencies the GPU image lacks (expecttest, webdataset, pyspng), from ./gpu-wheels
  build*        the extension with its CUDA kernels for this GPU's architecture (reused if built from the
                same sources by an earlier call on the same machine)
  kernel-paths* tests/test_gpu_paths.py: compiled Triton and CUDA kernels against fp64 on every path;
                tests/test_indexed_conv.py, tests/test_indexed_basic_block.py -k cuda: the index-reading Triton
                convolution against its reference, and supernets using it against per_child
  sanitizer*    compute-sanitizer memcheck, racecheck, synccheck over tools/gpu_sanitize.py (if installed)
  determinism*  tests selected by name: bitwise-identical backward runs, CUDA-graph capture and replay
                (the ops', and the trainer's whole step: all of tests/test_graphed_step.py), sync-free steps,
                torch.compile over a changing tau without recompiles
  test-suite*   the whole `pytest tests`, on the GPU
  op-bench      python -m l2b_fast.bench in fp32 and bf16 (copy bandwidth in the same run), plot, targets
  search-bench  l2b bench search, when this checkout has it
  data-bench    python -m l2b_fast.bench.data_throughput, when webdataset is importable

Without a CUDA device the GPU stages are skipped with the reason, so the command is safe anywhere. Every
stage writes its log under --out; summary.json and summary.md say what passed, failed, was skipped or did
not fit the time limit. The driver itself uses only the standard library and never touches the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
BUILD_STAMP = REPO / "build" / "gpu-validate-build.json"  # the sources the extension in the checkout was built from
SANITIZER_ERROR_EXIT = 86  # compute-sanitizer --error-exitcode: errors were found
RESERVE_S = 15  # left at the end for the summary and the bundle
# Tests of sync-free, capturable, deterministic steps, by name (others' files included, when they exist).
DETERMINISM_TESTS = "bitwise or graph or host_sync or sync_debug or recompil or compile"
# What the GPU image lacks for the test suite and the data benchmark (pins as in requirements-dev.txt).
GPU_WHEELS = ["expecttest==0.3.0", "webdataset==1.0.2", "braceexpand", "pyspng==0.1.4"]
GPU_PYTHON = "3.12"
GPU_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]

PROBE = r"""
import importlib.metadata, importlib.util, json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    gpu_memory_GiB=round(p.total_memory / 2**30, 1))
except Exception as error:
    info["torch_error"] = repr(error)
for module, dist in (("triton", "triton"), ("numpy", "numpy"), ("xdist", "pytest-xdist"),
                     ("pytest_timeout", "pytest-timeout"), ("expecttest", "expecttest"),
                     ("webdataset", "webdataset"), ("pyspng", "pyspng"), ("matplotlib", "matplotlib")):
    try:
        info[dist] = importlib.metadata.version(dist) if importlib.util.find_spec(module) else None
    except Exception:
        info[dist] = None
print(json.dumps(info))
"""

EXTENSION_PROBE = r"""
import json
from l2b_fast import _extension, backends
print(json.dumps({"load_error": _extension.LOAD_ERROR, "cuda": backends.available("cuda")}))
"""


@dataclasses.dataclass
class Result:
    status: str  # passed, failed, skipped, unavailable, timeout, not-run, planned
    note: str = ""


@dataclasses.dataclass
class Stage:
    name: str
    what: str
    budget_s: int
    correctness: bool
    needs_gpu: bool
    plan: str  # the command(s), for --dry-run and the summary
    run: Callable[[Context], Result]


class Context:
    """Where the run writes, what the machine has, and how commands are started and stopped."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out
        self.python: str = args.python
        self.digest = tree_digest()
        self.start = time.monotonic()
        self.deadline = self.start + args.time_limit
        self.probe: dict = {}
        self.stage_commands: list[str] = []
        self.stage_deadline = self.deadline
        self.extra_paths: list[str] = []
        self.targets: dict = {}

    @property
    def has_cuda(self) -> bool:
        return bool(self.probe.get("cuda_available"))

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("L2B_BACKEND", None)  # the tests and benchmarks choose backends themselves
        env.pop("TRITON_INTERPRET", None)  # the compiled Triton kernels are what a GPU run checks
        paths = [str(REPO), *self.extra_paths, env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["MPLBACKEND"] = "Agg"
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"  # /usr/local/bin/nvcc can be a wrapper torch misreads
        env.update(extra)
        return env

    def remaining(self) -> float:
        return self.stage_deadline - time.monotonic()

    def sh(self, command: list[str], log: str, *, timeout: float | None = None, **extra_env: str) -> int | None:
        """Run ``command`` in the checkout, appending its output to ``log`` under --out; its exit status,
        or None when it ran out of time (its whole process group is then stopped)."""
        self.stage_commands.append(" ".join(command))
        limit = max(1.0, min(timeout if timeout is not None else self.remaining(), self.remaining()))
        with (self.out / log).open("a") as handle:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            try:
                process = subprocess.Popen(command, cwd=REPO, env=self.env(**extra_env), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as error:
                handle.write(f"cannot start: {error}\n")
                return 127
            try:
                rc = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                stop(process)
                handle.write(f"\n[gpu_validate] stopped after {limit:.0f} s (time budget)\n")
                return None
            handle.write(f"[gpu_validate] exit status {rc}\n")
            return rc

    def output(self, command: list[str], timeout: float = 120) -> str | None:
        """stdout of a short command, or None if it failed (no log)."""
        try:
            done = subprocess.run(command, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    def python_json(self, code: str, timeout: float = 180) -> dict | None:
        text = self.output([self.python, "-c", code], timeout)
        try:
            return json.loads(text.strip().splitlines()[-1]) if text else None
        except (json.JSONDecodeError, IndexError):
            return None


def stop(process: subprocess.Popen) -> None:
    """Stop a timed-out command and everything it started (its own process group)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is still there (workers, children)
    except ProcessLookupError:
        pass
    process.wait()


def status_of(rc: int | None, what: str) -> Result:
    if rc is None:
        return Result("timeout", f"{what}: stopped at its time budget")
    return Result("passed") if rc == 0 else Result("failed", f"{what}: exit status {rc}")


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped of a pytest --junitxml file, and the skip reasons."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "skip_reasons": []}
    if not path.exists():
        return counts
    root = ElementTree.parse(path).getroot()
    for suite in root.iter("testsuite"):
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    counts["skip_reasons"] = sorted({s.get("message", "") for s in root.iter("skipped")})
    return counts


def pytest_command(ctx: Context, name: str, *selection: str) -> list[str]:
    (ctx.out / f"{name}.xml").unlink(missing_ok=True)  # no stale counts from an earlier run into the same --out
    return [ctx.python, "-m", "pytest", *selection, "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={ctx.out / (name + '.xml')}"]


def pytest_result(ctx: Context, name: str, rc: int | None, *, skips_fail: bool = False) -> Result:
    counts = junit_counts(ctx.out / f"{name}.xml")
    summary = f"{counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    if rc is None:
        return Result("timeout", f"stopped at its time budget ({summary})")
    if rc == 5 or counts["tests"] == 0:
        return Result("failed", "no tests were selected")
    if rc != 0:
        return Result("failed", f"pytest exit status {rc}: {summary}")
    if skips_fail and counts["skipped"]:
        return Result("failed", f"{summary}; on a GPU nothing here may skip: {'; '.join(counts['skip_reasons'])}")
    return Result("passed", summary)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [shutil.which(name), f"{cuda_home}/bin/{name}", *sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True)]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def run_env(ctx: Context) -> Result:
    log = ctx.out / "env.txt"
    with log.open("a") as handle:
        handle.write(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat()}\nrepository: {REPO}\n")
        handle.write(f"commit: {(ctx.output(['git', 'rev-parse', 'HEAD'], 10) or 'unknown (no git metadata)').strip()}\n")
    for command in (["nvidia-smi"], ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw", "--format=csv"]):
        if shutil.which(command[0]):
            ctx.sh(command, "env.txt", timeout=30)
    tools = {name: find_tool(name) for name in ("nvcc", "compute-sanitizer", "ncu", "cuobjdump")}
    for name in ("nvcc", "compute-sanitizer"):
        if tools[name]:
            ctx.sh([tools[name], "--version"], "env.txt", timeout=30)
    ctx.probe["tools"] = tools
    (ctx.out / "env.json").write_text(json.dumps(ctx.probe, indent=2) + "\n")
    with log.open("a") as handle:
        handle.write(json.dumps(ctx.probe, indent=2) + "\n")
    if "torch" not in ctx.probe:
        return Result("failed", f"{ctx.python} cannot import torch: {ctx.probe.get('torch_error', 'probe failed')}")
    gpu = f"{ctx.probe['gpu']} (sm_{ctx.probe['capability'].replace('.', '')}, {ctx.probe['sm_count']} SMs)" if ctx.has_cuda else "no CUDA device"
    versions = ", ".join(f"{k} {ctx.probe.get(k)}" for k in ("python", "torch", "triton", "numpy"))
    sanitizer = "compute-sanitizer found" if tools["compute-sanitizer"] else "no compute-sanitizer"
    return Result("passed", f"{gpu}; {versions}; {sanitizer}")


def run_wheels(ctx: Context) -> Result:
    wheels = sorted(Path(ctx.args.wheels).glob("*.whl"))
    if not wheels:
        missing = [d for d in ("expecttest", "webdataset", "pyspng") if not ctx.probe.get(d)]
        note = f"no wheels in {ctx.args.wheels}/"
        if missing:
            note += f"; missing here: {', '.join(missing)} (tests needing them fail or skip; prepare with --download-wheels)"
        return Result("skipped", note)
    site = tempfile.mkdtemp(prefix="l2b-gpu-site-")
    rc = ctx.sh([ctx.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--target", site, *map(str, wheels)], "wheels.log", timeout=120)
    if rc != 0:
        return status_of(rc, "pip install of the carried wheels")
    ctx.extra_paths.append(site)
    return Result("passed", f"{len(wheels)} wheels installed into {site} (on PYTHONPATH for the later stages)")


def tree_digest() -> str:
    """sha256 over the code a run checks (csrc, the package, tests, tools, setup.py): ties results to a
    checkout where the device copy has no git metadata (`--dry-run` prints the same digest anywhere)."""
    digest = hashlib.sha256()
    files = [p for folder in ("csrc", "l2b_fast", "tests", "tools") for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h", ".sh", ".txt", ".toml")]
    for path in sorted([*files, REPO / "setup.py"]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def source_digest(ctx: Context, arch: str) -> str:
    """What the built extension depends on: its sources, the build script, torch, the architecture."""
    digest = hashlib.sha256(f"{ctx.probe.get('torch')}|{arch}".encode())
    files = sorted(p for p in (REPO / "csrc").rglob("*") if p.is_file()) + [REPO / "setup.py"]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cpp_on_cuda(extension: dict | None) -> bool:
    """The probe found the compiled extension with its CUDA kernels."""
    return bool(extension) and extension["cuda"].get("cpp") is None


def run_build(ctx: Context) -> Result:
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or ctx.probe["capability"]
    stamp = BUILD_STAMP
    digest = source_digest(ctx, arch)
    extension = ctx.python_json(EXTENSION_PROBE)
    if stamp.exists() and json.loads(stamp.read_text()).get("digest") == digest and cpp_on_cuda(extension):
        return Result("passed", f"reused the extension an earlier call built from these sources (sm {arch})")
    build_env = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)), "L2B_BUILD_CUDA": "1"}
    how = "pip install -e ."
    rc = ctx.sh([ctx.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], "build.log", **build_env)
    if rc is None:
        return status_of(rc, how)
    extension = ctx.python_json(EXTENSION_PROBE) if rc == 0 else None
    if not cpp_on_cuda(extension):
        # pip failed, or put the extension where the checkout's package does not see it: build in place
        why = f"pip install -e . exited with {rc}" if rc else "pip install -e . left no CUDA kernels in the checkout"
        how = f"setup.py build_ext --inplace ({why})"
        rc = ctx.sh([ctx.python, "setup.py", "build_ext", "--inplace"], "build.log", **build_env)
        if rc != 0:
            return status_of(rc, how)
        extension = ctx.python_json(EXTENSION_PROBE)
    if not extension:
        return Result("failed", "the built package does not import (see build.log)")
    unavailable = {name: why for name, why in extension["cuda"].items() if why is not None}
    if unavailable:
        return Result("failed", "built, but unavailable on CUDA: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    stamp.parent.mkdir(exist_ok=True)
    stamp.write_text(json.dumps({"digest": digest, "arch": arch}) + "\n")
    return Result("passed", f"built with {how} for sm {arch}; cpp and triton run on CUDA")


def workers(ctx: Context, most: int) -> list[str]:
    """pytest-xdist arguments when the machine has it: Triton's compiles and CPU-side work run in parallel."""
    count = min(most, max(1, (os.cpu_count() or 2) // 2))
    return ["-n", str(count)] if ctx.probe.get("pytest-xdist") and count > 1 else []


def run_kernel_paths(ctx: Context) -> Result:
    rc = ctx.sh(pytest_command(ctx, "kernel-paths", "tests/test_gpu_paths.py", "tests/test_indexed_conv.py", "tests/test_indexed_basic_block.py", "-x", "-k", "cuda", *workers(ctx, 4)), "kernel-paths.log")
    return pytest_result(ctx, "kernel-paths", rc, skips_fail=True)


SANITIZER_RUNS = [  # tool, driver arguments, extra environment
    ("memcheck", ["--backends", "cpp,triton"], {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
    ("racecheck", ["--backends", "cpp", "--dtypes", "bfloat16,float32,float64"], {}),
    ("synccheck", ["--backends", "cpp", "--dtypes", "bfloat16,float32,float64"], {}),
]


def run_sanitizer(ctx: Context) -> Result:
    sanitizer = ctx.probe.get("tools", {}).get("compute-sanitizer") or find_tool("compute-sanitizer")
    if not sanitizer:
        return Result("skipped", "compute-sanitizer is not installed on this machine")
    verdicts, failed = [], False
    for tool, driver_args, extra in SANITIZER_RUNS:
        log = f"sanitizer-{tool}.log"
        command = [sanitizer, "--tool", tool, "--error-exitcode", str(SANITIZER_ERROR_EXIT), "--print-limit", "30",
                   ctx.python, "tools/gpu_sanitize.py", *driver_args]
        rc = ctx.sh(command, log, **extra)
        text = (ctx.out / log).read_text(errors="replace")
        errors = [line.split("ERROR SUMMARY:")[-1].strip() for line in text.splitlines() if "ERROR SUMMARY:" in line]
        if rc is None:
            verdicts.append(f"{tool}: timed out")
            failed = True
        elif "not supported" in text.lower() and rc not in (0, SANITIZER_ERROR_EXIT):
            verdicts.append(f"{tool}: unavailable on this machine (device not supported)")
        elif rc == 0:
            verdicts.append(f"{tool}: clean ({errors[-1] if errors else 'no summary line'})")
        else:
            failed = True
            found = errors[-1] if errors else f"exit status {rc}"
            verdicts.append(f"{tool}: {found}" + (" (errors found)" if rc == SANITIZER_ERROR_EXIT else " (the driver failed)"))
        if ctx.remaining() < 20:
            verdicts.append("time budget reached")
            failed = True
            break
    if not failed and all("unavailable" in v for v in verdicts):
        return Result("unavailable", "; ".join(verdicts))
    return Result("failed" if failed else "passed", "; ".join(verdicts))


def run_determinism(ctx: Context) -> Result:
    rc = ctx.sh(pytest_command(ctx, "determinism", "tests", "-k", DETERMINISM_TESTS, *workers(ctx, 4)), "determinism.log")
    return pytest_result(ctx, "determinism", rc)


def run_test_suite(ctx: Context) -> Result:
    per_test = ["--timeout", "300"] if ctx.probe.get("pytest-timeout") else []
    rc = ctx.sh(pytest_command(ctx, "test-suite", "tests", *workers(ctx, 8), *per_test), "test-suite.log")
    return pytest_result(ctx, "test-suite", rc)


BENCH_DTYPES = ("float32", "bfloat16")
TARGET_SPEEDUP, TARGET_COPY_PCT = 8.0, 80.0  # the op targets at I = J = 5, 64x64x32x32


def run_op_bench(ctx: Context) -> Result:
    bench_dir = ctx.out / "bench"
    notes, failed = [], False
    for dtype in BENCH_DTYPES:
        rc = ctx.sh([ctx.python, "-m", "l2b_fast.bench", "--device", "cuda", "--dtype", dtype, "--out", str(bench_dir)], "op-bench.log")
        if rc != 0:
            failed = True
            notes.append(status_of(rc, f"{dtype} benchmark").note)
    csvs = sorted(map(str, bench_dir.glob("branch_cuda_*.csv")))
    if csvs and ctx.probe.get("matplotlib"):
        ctx.sh([ctx.python, "benchmarks/plot_branch_benchmark.py", *csvs, "--out", str(bench_dir / "branch_cuda.png")], "op-bench.log", timeout=60)
    ctx.targets = op_targets(bench_dir)
    notes += [f"{k}: {v}" for k, v in ctx.targets.items()]
    return Result("failed" if failed else "passed", "; ".join(notes))


def op_targets(bench_dir: Path) -> dict[str, str]:
    """The issue's targets read off the fp32 results: fused fwd+bwd >= 8x naive, backward >= 80% of copy."""
    targets = {}
    for path in sorted(bench_dir.glob("branch_cuda_*_float32.json")):
        for row in json.loads(path.read_text())["rows"]:
            if row["shape"] != "taskonomy" or row["implementation"] in ("naive", "ref"):
                continue
            name = row["implementation"]
            speedup, copy_pct = row.get("speedup_vs_naive"), row.get("backward_pct_of_copy")
            if speedup is not None:
                targets[f"{name} fwd+bwd vs naive"] = f"{speedup}x (target {TARGET_SPEEDUP:g}x: {'met' if speedup >= TARGET_SPEEDUP else 'missed'})"
            if copy_pct is not None:
                targets[f"{name} backward / copy bandwidth"] = f"{copy_pct}% (target {TARGET_COPY_PCT:g}%: {'met' if copy_pct >= TARGET_COPY_PCT else 'missed'})"
    return targets


def run_search_bench(ctx: Context) -> Result:
    command = [ctx.python, "-m", "l2b_fast.cli", "bench", "search"]
    if ctx.output([*command, "--help"], 60) is None:
        return Result("skipped", "`l2b bench search` is not in this checkout")
    rc = ctx.sh([*command, "--device", "cuda", "--preset", "gpu", "--out", str(ctx.out / "search")], "search-bench.log")
    return status_of(rc, "l2b bench search")


def search_rate(search_dir: Path) -> float | None:
    """Images/s of the library's fastest Taskonomy search step measured by the search-bench stage."""
    rates = [
        row["images_per_s"]
        for path in search_dir.glob("search_cuda_*.json")
        for row in json.loads(path.read_text())["rows"]
        if row.get("model") == "taskonomy_resnet34" and row.get("variant") in ("per_child", "grouped") and row.get("status") == "ok"
    ]
    return max(rates) if rates else None


def run_data_bench(ctx: Context) -> Result:
    if ctx.output([ctx.python, "-c", "import webdataset"], 60) is None:
        return Result("skipped", "webdataset is not importable (carry it: --download-wheels gpu-wheels)")
    rate = search_rate(ctx.out / "search")  # the loader cores one GPU needs, at the rate measured above
    extra = ["--gpu-samples-per-s", str(rate)] if rate else []
    rc = ctx.sh([ctx.python, "-m", "l2b_fast.bench.data_throughput", "--out", str(ctx.out / "data"), *extra], "data-bench.log")
    result = status_of(rc, "data throughput benchmark")
    return Result(result.status, result.note or (f"cores per GPU at the measured {rate} images/s: see data-bench.log" if rate else ""))


STAGES = [
    Stage("env", "machine, versions, tools", 60, True, False, "nvidia-smi; python probe of torch/CUDA/triton/numpy; compute-sanitizer/nvcc --version", run_env),
    Stage("wheels", "carried test dependencies", 120, False, False, "pip install --no-index --no-deps --target /tmp/... gpu-wheels/*.whl", run_wheels),
    Stage("build", "extension with CUDA kernels", 420, True, True, "CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=<this GPU> MAX_JOBS=<cores> pip install --no-build-isolation --no-deps -e .", run_build),
    Stage("kernel-paths", "compiled Triton + CUDA vs fp64, every path", 360, True, True, "pytest tests/test_gpu_paths.py tests/test_indexed_conv.py tests/test_indexed_basic_block.py -x -k cuda (no skips allowed)", run_kernel_paths),
    Stage("sanitizer", "memcheck, racecheck, synccheck", 240, True, True, "compute-sanitizer --tool {memcheck,racecheck,synccheck} python tools/gpu_sanitize.py", run_sanitizer),
    Stage("determinism", "bitwise runs, CUDA graphs, compile-once", 240, True, True, f"pytest tests -k '{DETERMINISM_TESTS}'", run_determinism),
    Stage("test-suite", "the whole test suite on the GPU", 360, True, True, "pytest tests [-n 8 with pytest-xdist]", run_test_suite),
    Stage("op-bench", "op benchmark, copy bandwidth, memory", 240, False, True, "python -m l2b_fast.bench --device cuda --dtype {float32,bfloat16}; plot", run_op_bench),
    Stage("search-bench", "search-step benchmark", 240, False, True, "l2b bench search --device cuda --preset gpu", run_search_bench),
    Stage("data-bench", "data loader benchmark", 180, False, True, "python -m l2b_fast.bench.data_throughput", run_data_bench),
]
STAGE_NAMES = [stage.name for stage in STAGES]


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def default_out() -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    return Path(os.environ.get("OUT") or tempfile.gettempdir()) / f"gpu-{stamp}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_validate.py", description=__doc__.split("\n\n")[0], epilog="Stages: " + ", ".join(STAGE_NAMES),
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT/gpu-<date>, else a temporary folder)")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma-separated subset, always run in the fixed order listed below (default: all)")
    parser.add_argument("--time-limit", type=float, default=560, help="seconds for the whole run; stages that no longer fit are reported as not run (default 560)")
    parser.add_argument("--keep-going", action="store_true", help="after a failed correctness stage, still run the other correctness stages (never the benchmarks)")
    parser.add_argument("--dry-run", action="store_true", help="write and print the plan, run nothing")
    parser.add_argument("--bundle", action="store_true", help="pack every result file except the summaries into results.tar.gz (a device call returns at most 8 files)")
    parser.add_argument("--wheels", type=Path, default=REPO / "gpu-wheels", help="folder of carried wheels (default ./gpu-wheels)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every stage (default: this one)")
    parser.add_argument("--download-wheels", type=Path, metavar="DIR", default=None, help=f"download the wheels the GPU image lacks (python {GPU_PYTHON}) into DIR and exit")
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages.split(",") if s not in STAGE_NAMES]
    if unknown:
        parser.error(f"unknown stage {', '.join(unknown)}; choose from {', '.join(STAGE_NAMES)}")
    if args.time_limit <= RESERVE_S:
        parser.error(f"--time-limit must exceed {RESERVE_S} s")
    args.stages = [s for s in STAGE_NAMES if s in args.stages.split(",")]
    args.out = args.out or default_out()
    return args


def download_wheels(target: Path, python: str) -> int:
    """pip download, for the GPU image's Python, of the packages it lacks (no dependencies: they are listed)."""
    target.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in GPU_PLATFORMS for arg in ("--platform", platform)]
    command = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", GPU_PYTHON,
               "--implementation", "cp", *platforms, "-d", str(target), *GPU_WHEELS]
    print("$", " ".join(command), flush=True)
    rc = subprocess.call(command)
    if rc == 0:
        print(f"wheels in {target}: {', '.join(p.name for p in sorted(target.glob('*.whl')))}")
    return rc


def write_summary(ctx: Context, rows: list[dict], dry_run: bool) -> dict:
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "tree_digest": ctx.digest,
        "seconds": round(time.monotonic() - ctx.start, 1),
        "machine": {k: ctx.probe.get(k) for k in ("gpu", "capability", "sm_count", "gpu_memory_GiB", "python", "torch", "torch_cuda", "triton", "numpy")},
        "passed": not any(row["status"] in ("failed", "timeout") for row in rows),
        "correctness_passed": not any(row["status"] in ("failed", "timeout") for row in rows if row["correctness"]),
        "stages": rows,
        "op_targets": ctx.targets,
    }
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# GPU validation {summary['date']}", "", f"machine: {summary['machine']}", "",
             "| stage | status | s | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['note']} |" for r in rows]
    (ctx.out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def bundle(out: Path) -> None:
    """Everything but the two summaries into results.tar.gz, the originals removed."""
    keep = {"summary.json", "summary.md", "results.tar.gz"}
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and not (p.parent == out and p.name in keep)]
    with tarfile.open(out / "results.tar.gz", "w:gz") as archive:
        for path in files:
            archive.add(path, arcname=str(path.relative_to(out)))
    for path in files:
        path.unlink()
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.download_wheels is not None:
        return download_wheels(args.download_wheels, args.python)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args)
    selected = [stage for stage in STAGES if stage.name in args.stages]
    print(f"gpu_validate: {len(selected)} stages -> {args.out}, code digest {ctx.digest}" + (" (dry run: nothing is run)" if args.dry_run else ""), flush=True)
    probe_begin = time.monotonic()
    if not args.dry_run:
        ctx.probe = ctx.python_json(PROBE) or {"torch_error": f"{args.python} did not answer the probe"}
    rows, stopped = [], None
    for stage in selected:
        begin = probe_begin if stage.name == "env" else time.monotonic()  # the probe is the env stage's main work
        ctx.stage_commands = []
        if args.dry_run:
            kind = ("correctness" if stage.correctness else "setup or measurement") + (", needs a GPU" if stage.needs_gpu else "")
            result = Result("planned", f"{kind}: {stage.plan}")
            ctx.stage_commands = [stage.plan]
        elif stopped and (not stage.correctness or not args.keep_going):
            result = Result("not-run", f"after the failure of {stopped}")
        elif stage.needs_gpu and not ctx.has_cuda:
            result = Result("skipped", "no CUDA device here" + (f" ({ctx.probe['torch_error']})" if "torch_error" in ctx.probe else ""))
        elif ctx.deadline - time.monotonic() - RESERVE_S < 20:
            result = Result("not-run", "the time limit was reached")
        else:
            ctx.stage_deadline = min(time.monotonic() + stage.budget_s, ctx.deadline - RESERVE_S)
            try:
                result = stage.run(ctx)
            except Exception as error:  # a bug or a missing file: record it, keep the summary
                result = Result("failed", f"{type(error).__name__}: {error}")
        if stage.correctness and result.status in ("failed", "timeout") and stopped is None:
            stopped = stage.name
        rows.append({"stage": stage.name, "what": stage.what, "status": result.status, "seconds": round(time.monotonic() - begin, 1),
                     "note": result.note, "commands": ctx.stage_commands, "correctness": stage.correctness})
        print(f"[{rows[-1]['seconds']:6.1f} s] {stage.name:13s} {result.status:9s} {result.note}", flush=True)
        write_summary(ctx, rows, args.dry_run)  # after every stage: a killed run still leaves one
    summary = write_summary(ctx, rows, args.dry_run)
    if args.bundle and not args.dry_run:
        bundle(args.out)
    print(f"gpu_validate: {'all stages passed or skipped' if summary['passed'] else 'FAILED'} in {summary['seconds']} s; summary: {args.out / 'summary.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
