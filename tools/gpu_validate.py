#!/usr/bin/env python3
"""One command for a GPU machine: build, check every kernel path, and only then measure.

    bash tools/gpu_validate.sh --call 1 --out runs/gpu-call1        # build, kernel checks, benchmarks
    bash tools/gpu_validate.sh --call 2 --out runs/gpu-call2        # sanitizer, whole test suite, data benchmark
    python tools/gpu_validate.py --dry-run --call 1 --time-limit 540   # anywhere: the plan with its budgets
    make gpu-wheels                                                    # on a machine with a package index

Stages, in this order (call 1 runs env, wheels, build, kernel-paths, determinism, op-bench, search-bench;
call 2 runs env, wheels, build, sanitizer, test-suite, data-bench); a failed correctness stage (marked *)
stops the run before any benchmark, a stage that runs out of its time is "incomplete" and stops nothing:

  env*          nvidia-smi, python/torch/CUDA/Triton/numpy versions, compute-sanitizer and nvcc
  wheels        test dependencies the GPU image lacks (expecttest, webdataset, braceexpand, pyspng), installed
                offline from ./gpu-wheels
  build*        the extension with its CUDA kernels for this GPU's architecture (reused if built from the
                same sources by an earlier call on the same machine)
  kernel-paths* tests/test_gpu_paths.py: compiled Triton and CUDA kernels against fp64 on every path;
                tests/test_indexed_conv.py, tests/test_indexed_basic_block.py -k cuda: the index-reading Triton
                convolution against its reference, and supernets using it against per_child
  sanitizer*    compute-sanitizer memcheck on a few cases, racecheck and synccheck on one each
                (tools/gpu_sanitize.py; if installed)
  determinism*  tests selected by name: bitwise-identical backward runs, CUDA-graph capture and replay
                (the ops', and the trainer's whole step: all of tests/test_graphed_step.py), sync-free steps,
                torch.compile over a changing tau without recompiles
  test-suite*   the whole `pytest tests`, on the GPU
  op-bench      python -m l2b_fast.bench in fp32 and bf16 (copy bandwidth in the same run), plot, targets
  search-bench  l2b bench search at the paper's sizes, one model at a time
  data-bench    python -m l2b_fast.bench.data_throughput, when webdataset is importable

Each stage runs for at most min(its budget, the time left before --time-limit). Its files go to a scratch
folder that is packed into OUT/results.tar.gz after every stage (and every minute of a long one), so a killed
call still leaves the finished stages' results; OUT itself only ever holds summary.json, summary.md and the
bundle. Without a CUDA device the GPU stages are skipped with the reason, so the command is safe anywhere.
The driver itself uses only the standard library and never touches the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_STAMP = REPO / "build" / "gpu-validate-build.json"  # the sources the extension in the checkout was built from
SANITIZER_ERROR_EXIT = 86  # compute-sanitizer --error-exitcode: errors were found
RESERVE_S = 20  # left at the end: stopping the last command (STOP_GRACE_S), the summary and the bundle
MIN_STAGE_S = 20  # a stage is not started with less time than this left
STOP_GRACE_S = 8  # after SIGINT (pytest then writes its junit report) before the command is killed
CHECKPOINT_S = 60  # a long stage's log is packed into the bundle this often
BUNDLE = "results.tar.gz"
PYTEST_MAXFAIL = 10  # past the first failure, so one call shows the pattern, not just the first case
# Tests of sync-free, capturable, deterministic steps, by name (others' files included, when they exist).
DETERMINISM_TESTS = "bitwise or graph or host_sync or sync_debug or recompil or compile"
# What the GPU image lacks for the test suite and the data benchmark (pins as in requirements-dev.txt).
GPU_WHEELS = ["expecttest==0.3.0", "webdataset==1.0.2", "braceexpand==0.1.7", "pyspng==0.1.4"]
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
                     ("webdataset", "webdataset"), ("braceexpand", "braceexpand"), ("pyspng", "pyspng"),
                     ("matplotlib", "matplotlib")):
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
    status: str  # passed, failed, incomplete (ran out of time), running, skipped, unavailable, not-run, planned
    note: str = ""


@dataclasses.dataclass
class Budget:
    """A stage's time: the seconds, whether they were measured or estimated, and from what."""

    seconds: int
    kind: str  # "measured" (the same work was timed) or "estimated" (worked out from the basis)
    basis: str


@dataclasses.dataclass
class Stage:
    name: str
    what: str
    budget: Budget
    correctness: bool
    needs_gpu: bool
    plan: str  # the command(s), for --dry-run and the summary
    run: Callable[[Context], Result]
    calls: tuple[int, ...]  # the device calls (--call) that run it

    @property
    def budget_s(self) -> int:
        return self.budget.seconds


class Context:
    """Where the run writes, what the machine has, and how commands are started and stopped."""

    def __init__(self, args: argparse.Namespace, work: Path | None = None):
        self.args = args
        self.out: Path = args.out
        self.work: Path = work or args.out  # every stage's files; packed into OUT/results.tar.gz
        self.python: str = args.python
        self.digest = tree_digest()
        self.start = time.monotonic()
        self.deadline = self.start + args.time_limit
        self.probe: dict = {}
        self.stage_commands: list[str] = []
        self.stage_deadline = self.deadline
        self.extra_paths: list[str] = []
        self.targets: dict = {}
        self.checkpoint: Callable[[], None] = lambda: None  # set by main: summary and bundle so far

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
        env["PIP_NO_INDEX"] = "1"  # nothing a stage runs may reach for the network
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"  # /usr/local/bin/nvcc can be a wrapper torch misreads
        env.update(extra)
        return env

    def remaining(self) -> float:
        return self.stage_deadline - time.monotonic()

    def sh(self, command: list[str], log: str, *, timeout: float | None = None, **extra_env: str) -> int | None:
        """Run ``command`` in the checkout, appending its output to ``log`` in the scratch folder; its exit
        status, or None when it ran out of time (its whole process group is then stopped). The bundle is
        re-packed every CHECKPOINT_S while it runs, so a killed call keeps the log up to then."""
        self.stage_commands.append(" ".join(command))
        limit = max(1.0, min(timeout if timeout is not None else self.remaining(), self.remaining()))
        with (self.work / log).open("a") as handle:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            try:
                process = subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=self.env(**extra_env),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as error:
                handle.write(f"cannot start: {error}\n")
                return 127
            end = time.monotonic() + limit
            while True:
                try:
                    rc = process.wait(timeout=max(0.05, min(CHECKPOINT_S, end - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= end:
                        stop(process)
                        handle.write(f"\n[gpu_validate] stopped after {limit:.0f} s (time budget)\n")
                        handle.flush()
                        return None
                    handle.flush()
                    self.checkpoint()
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
    """Stop a timed-out command and everything it started (its own process group): SIGINT first, so pytest
    still writes its junit report of the tests that ran, then SIGKILL for whatever is left."""
    for sig, wait_s in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGTERM, 2)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is still there (workers, children)
    except ProcessLookupError:
        pass
    process.wait()


def status_of(rc: int | None, what: str) -> Result:
    if rc is None:
        return Result("incomplete", f"{what}: stopped at its time budget")
    return Result("passed") if rc == 0 else Result("failed", f"{what}: exit status {rc}")


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped of a pytest --junitxml file, and the skip reasons."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "skip_reasons": []}
    try:
        root = ElementTree.parse(path).getroot()
    except (FileNotFoundError, ElementTree.ParseError):  # not written (killed before the end) or cut short
        return counts
    for suite in root.iter("testsuite"):
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    counts["skip_reasons"] = sorted({s.get("message", "") for s in root.iter("skipped")})
    return counts


def pytest_command(ctx: Context, name: str, *selection: str) -> list[str]:
    report = ctx.work / f"{name}.xml"
    report.unlink(missing_ok=True)  # no stale counts from an earlier run into the same folder
    return [
        ctx.python,
        "-m",
        "pytest",
        *selection,
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        f"--maxfail={PYTEST_MAXFAIL}",
        f"--junitxml={report}",
    ]


def pytest_result(ctx: Context, name: str, rc: int | None, *, skips_fail: bool = False) -> Result:
    counts = junit_counts(ctx.work / f"{name}.xml")
    summary = (
        f"{counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    )
    if rc is None:  # out of time: what ran is still reported; a test that failed before the stop is a failure
        if counts["failures"] or counts["errors"]:
            return Result("failed", f"stopped at its time budget after failures ({summary})")
        return Result("incomplete", f"stopped at its time budget ({summary} before the stop)")
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
    candidates = [
        shutil.which(name),
        f"{cuda_home}/bin/{name}",
        *sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True),
    ]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def run_env(ctx: Context) -> Result:
    log = ctx.work / "env.txt"
    with log.open("a") as handle:
        handle.write(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat()}\nrepository: {REPO}\n")
        handle.write(
            f"commit: {(ctx.output(['git', 'rev-parse', 'HEAD'], 10) or 'unknown (no git metadata)').strip()}\n"
        )
    for command in (
        ["nvidia-smi"],
        [
            "nvidia-smi",
            "--query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw",
            "--format=csv",
        ],
    ):
        if shutil.which(command[0]):
            ctx.sh(command, "env.txt", timeout=30)
    tools = {name: find_tool(name) for name in ("nvcc", "compute-sanitizer", "ncu", "cuobjdump")}
    for name in ("nvcc", "compute-sanitizer"):
        if tools[name]:
            ctx.sh([tools[name], "--version"], "env.txt", timeout=30)
    ctx.probe["tools"] = tools
    (ctx.work / "env.json").write_text(json.dumps(ctx.probe, indent=2) + "\n")
    with log.open("a") as handle:
        handle.write(json.dumps(ctx.probe, indent=2) + "\n")
    if "torch" not in ctx.probe:
        return Result("failed", f"{ctx.python} cannot import torch: {ctx.probe.get('torch_error', 'probe failed')}")
    gpu = (
        f"{ctx.probe['gpu']} (sm_{ctx.probe['capability'].replace('.', '')}, {ctx.probe['sm_count']} SMs)"
        if ctx.has_cuda
        else "no CUDA device"
    )
    versions = ", ".join(f"{k} {ctx.probe.get(k)}" for k in ("python", "torch", "triton", "numpy"))
    sanitizer = "compute-sanitizer found" if tools["compute-sanitizer"] else "no compute-sanitizer"
    return Result("passed", f"{gpu}; {versions}; {sanitizer}")


def wheel_project(path: Path) -> str:
    """The normalised project name of a wheel file (``pyspng-0.1.4-cp312-...whl`` -> ``pyspng``)."""
    return re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()


def requirement_project(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0]).lower()


def wheels_install_command(python: str, wheels: Path, site: str, requirements: list[str]) -> list[str]:
    """The offline install: only the carried folder is read (--no-index), pip never looks for updates."""
    return [
        python,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        str(wheels),
        "--disable-pip-version-check",
        "--no-deps",
        "--no-compile",
        "--target",
        site,
        *requirements,
    ]


def run_wheels(ctx: Context) -> Result:
    wheels = Path(ctx.args.wheels)
    carried = {wheel_project(path) for path in wheels.glob("*.whl")}
    requirements = [r for r in GPU_WHEELS if requirement_project(r) in carried]
    absent = [requirement_project(r) for r in GPU_WHEELS if requirement_project(r) not in carried]
    missing_here = [name for name in absent if not ctx.probe.get(name)]
    missing_note = (
        (
            f"not carried and not installed here: {', '.join(missing_here)} (tests needing them fail or skip; "
            "prepare the wheels with `make gpu-wheels`)"
        )
        if missing_here
        else ""
    )
    if not requirements:
        return Result("skipped", f"no wheels in {wheels}/" + (f"; {missing_note}" if missing_note else ""))
    site = tempfile.mkdtemp(prefix="l2b-gpu-site-")
    rc = ctx.sh(wheels_install_command(ctx.python, wheels, site, requirements), "wheels.log", timeout=120)
    if rc != 0:
        shutil.rmtree(site, ignore_errors=True)
        result = status_of(rc, "offline pip install of the carried wheels")
        errors = [line for line in (ctx.work / "wheels.log").read_text().splitlines() if line.startswith("ERROR:")]
        return Result(result.status, result.note + (f" ({errors[-1]})" if errors else ""))
    ctx.extra_paths.append(site)
    note = f"{', '.join(requirements)} installed offline into {site} (on PYTHONPATH for the later stages)"
    return Result("passed", note + (f"; {missing_note}" if missing_note else ""))


def tree_digest() -> str:
    """sha256 over the code a run checks (csrc, the package, tests, tools, setup.py): ties results to a
    checkout where the device copy has no git metadata (`--dry-run` prints the same digest anywhere)."""
    digest = hashlib.sha256()
    files = [
        p
        for folder in ("csrc", "l2b_fast", "tests", "tools")
        for p in (REPO / folder).rglob("*")
        if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h", ".sh", ".txt", ".toml")
    ]
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
    build_env = {
        "TORCH_CUDA_ARCH_LIST": arch,
        "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)),
        "L2B_BUILD_CUDA": "1",
    }
    how = "pip install -e ."
    rc = ctx.sh(
        [ctx.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], "build.log", **build_env
    )
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
        return Result(
            "failed", "built, but unavailable on CUDA: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items())
        )
    stamp.parent.mkdir(exist_ok=True)
    stamp.write_text(json.dumps({"digest": digest, "arch": arch}) + "\n")
    return Result("passed", f"built with {how} for sm {arch}; cpp and triton run on CUDA")


def workers(ctx: Context, most: int) -> list[str]:
    """pytest-xdist arguments when the machine has it: Triton's compiles and CPU-side work run in parallel."""
    count = min(most, max(1, (os.cpu_count() or 2) // 2))
    return ["-n", str(count)] if ctx.probe.get("pytest-xdist") and count > 1 else []


def run_kernel_paths(ctx: Context) -> Result:
    selection = [
        "tests/test_gpu_paths.py",
        "tests/test_indexed_conv.py",
        "tests/test_indexed_basic_block.py",
        "-k",
        "cuda",
    ]
    rc = ctx.sh(pytest_command(ctx, "kernel-paths", *selection, *workers(ctx, 4)), "kernel-paths.log")
    return pytest_result(ctx, "kernel-paths", rc, skips_fail=True)


# tool, driver arguments, extra environment. Sized for one short call: memcheck (out-of-bounds and misaligned
# accesses, both backends) on the pair blocks, the fallback and the unvectorised kernels; racecheck and synccheck
# (shared memory and barriers: only the CUDA backward's cp.async pipeline uses them) on the pipeline's case.
SANITIZER_RUNS = [
    (
        "memcheck",
        [
            "--backends",
            "cpp,triton",
            "--dtypes",
            "float32,bfloat16",
            "--cases",
            "pairs8-30x40,fallback-46x46,odd-misaligned-5x7",
        ],
        {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
    ),
    ("racecheck", ["--backends", "cpp", "--dtypes", "float32", "--cases", "pipeline-5x5"], {}),
    ("synccheck", ["--backends", "cpp", "--dtypes", "float32", "--cases", "pipeline-5x5"], {}),
]


def run_sanitizer(ctx: Context) -> Result:
    sanitizer = ctx.probe.get("tools", {}).get("compute-sanitizer") or find_tool("compute-sanitizer")
    if not sanitizer:
        return Result("skipped", "compute-sanitizer is not installed on this machine")
    verdicts, failed, incomplete = [], False, False
    for tool, driver_args, extra in SANITIZER_RUNS:
        log = f"sanitizer-{tool}.log"
        command = [
            sanitizer,
            "--tool",
            tool,
            "--error-exitcode",
            str(SANITIZER_ERROR_EXIT),
            "--print-limit",
            "30",
            ctx.python,
            "tools/gpu_sanitize.py",
            *driver_args,
        ]
        rc = ctx.sh(command, log, **extra)
        text = (ctx.work / log).read_text(errors="replace")
        errors = [line.split("ERROR SUMMARY:")[-1].strip() for line in text.splitlines() if "ERROR SUMMARY:" in line]
        if rc is None:
            verdicts.append(f"{tool}: stopped at the time budget")
            incomplete = True
            break
        elif "not supported" in text.lower() and rc not in (0, SANITIZER_ERROR_EXIT):
            verdicts.append(f"{tool}: unavailable on this machine (device not supported)")
        elif rc == 0:
            verdicts.append(f"{tool}: clean ({errors[-1] if errors else 'no summary line'})")
        else:
            failed = True
            found = errors[-1] if errors else f"exit status {rc}"
            verdicts.append(
                f"{tool}: {found}" + (" (errors found)" if rc == SANITIZER_ERROR_EXIT else " (the driver failed)")
            )
        if ctx.remaining() < MIN_STAGE_S and tool != SANITIZER_RUNS[-1][0]:
            verdicts.append("the time budget ran out before the next tool")
            incomplete = True
            break
    if failed:
        return Result("failed", "; ".join(verdicts))
    if incomplete:
        return Result("incomplete", "; ".join(verdicts))
    if all("unavailable" in v for v in verdicts):
        return Result("unavailable", "; ".join(verdicts))
    return Result("passed", "; ".join(verdicts))


def run_determinism(ctx: Context) -> Result:
    rc = ctx.sh(
        pytest_command(ctx, "determinism", "tests", "-k", DETERMINISM_TESTS, *workers(ctx, 4)), "determinism.log"
    )
    return pytest_result(ctx, "determinism", rc)


def run_test_suite(ctx: Context) -> Result:
    per_test = ["--timeout", "300"] if ctx.probe.get("pytest-timeout") else []
    rc = ctx.sh(pytest_command(ctx, "test-suite", "tests", *workers(ctx, 8), *per_test), "test-suite.log")
    return pytest_result(ctx, "test-suite", rc)


BENCH_DTYPES = ("float32", "bfloat16")
TARGET_SPEEDUP, TARGET_COPY_PCT = 8.0, 80.0  # the op targets at I = J = 5, 64x64x32x32


def run_op_bench(ctx: Context) -> Result:
    bench_dir = ctx.work / "bench"
    notes, status = [], "passed"
    for dtype in BENCH_DTYPES:  # fp32 first: the targets are read off it
        command = [ctx.python, "-m", "l2b_fast.bench", "--device", "cuda", "--dtype", dtype, "--out", str(bench_dir)]
        rc = ctx.sh(command, "op-bench.log")
        if rc != 0:
            result = status_of(rc, f"{dtype} benchmark")
            notes.append(result.note)
            status = "failed" if status == "failed" or result.status == "failed" else result.status
            if rc is None:
                break
    csvs = sorted(map(str, bench_dir.glob("branch_cuda_*.csv")))
    if csvs and ctx.probe.get("matplotlib") and ctx.remaining() > 10:
        ctx.sh(
            [ctx.python, "benchmarks/plot_branch_benchmark.py", *csvs, "--out", str(bench_dir / "branch_cuda.png")],
            "op-bench.log",
            timeout=60,
        )
    ctx.targets = op_targets(bench_dir)
    notes += [f"{k}: {v}" for k, v in ctx.targets.items()]
    return Result(status, "; ".join(notes))


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
                targets[f"{name} fwd+bwd vs naive"] = (
                    f"{speedup}x (target {TARGET_SPEEDUP:g}x: {'met' if speedup >= TARGET_SPEEDUP else 'missed'})"
                )
            if copy_pct is not None:
                targets[f"{name} backward / copy bandwidth"] = (
                    f"{copy_pct}% (target {TARGET_COPY_PCT:g}%: {'met' if copy_pct >= TARGET_COPY_PCT else 'missed'})"
                )
    return targets


# One process per model, the Taskonomy one first (the data benchmark converts its rate into loader cores): a
# stage stopped at its budget keeps the models already measured. The names are l2b_fast.models.SPECS' keys.
SEARCH_MODELS = ("taskonomy_resnet34", "celeba_branch_vgg", "celeba_deep_wide")
SEARCH_REPEAT = 10  # timed rounds per variant (the benchmark's default on CUDA is 20): fits the call's budget


def run_search_bench(ctx: Context) -> Result:
    command = [ctx.python, "-m", "l2b_fast.cli", "bench", "search"]
    if ctx.output([*command, "--help"], 60) is None:
        return Result("skipped", "`l2b bench search` is not in this checkout")
    done = []
    for model in SEARCH_MODELS:
        rc = ctx.sh(
            [
                *command,
                "--device",
                "cuda",
                "--preset",
                "gpu",
                "--models",
                model,
                "--repeat",
                str(SEARCH_REPEAT),
                "--out",
                str(ctx.work / "search" / model),
            ],
            "search-bench.log",
        )
        if rc != 0:
            result = status_of(rc, f"l2b bench search, {model}")
            measured = f" (measured: {', '.join(done)})" if done else ""
            return Result(result.status, result.note + measured)
        done.append(model)
    return Result("passed", f"{', '.join(done)} at the paper's sizes (preset gpu, {SEARCH_REPEAT} rounds)")


def search_rate(search_dir: Path) -> float | None:
    """Images/s of the library's fastest Taskonomy search step measured by the search-bench stage."""
    rates = [
        row["images_per_s"]
        for path in search_dir.rglob("search_cuda_*.json")
        for row in json.loads(path.read_text())["rows"]
        if row.get("model") == "taskonomy_resnet34"
        and row.get("variant") in ("per_child", "grouped")
        and row.get("status") == "ok"
    ]
    return max(rates) if rates else None


def run_data_bench(ctx: Context) -> Result:
    if ctx.output([ctx.python, "-c", "import webdataset"], 60) is None:
        return Result("skipped", "webdataset is not importable (carry its wheel: make gpu-wheels)")
    rate = search_rate(ctx.work / "search")  # the loader cores one GPU needs, at the rate measured in this run
    extra = ["--gpu-samples-per-s", str(rate)] if rate else []
    command = [ctx.python, "-m", "l2b_fast.bench.data_throughput", "--out", str(ctx.work / "data"), *extra]
    result = status_of(ctx.sh(command, "data-bench.log"), "data throughput benchmark")
    return Result(
        result.status,
        result.note or (f"cores per GPU at the measured {rate} images/s: see data-bench.log" if rate else ""),
    )


CALL_1, CALL_2 = (1,), (2,)
BOTH_CALLS = (1, 2)  # a second call may land on a fresh machine: it needs the environment and the build again
STAGES = [
    Stage(
        "env",
        "machine, versions, tools",
        Budget(
            30,
            "estimated",
            "the same stage took 4.8 s on a 2-core CPU machine (torch import and probe, "
            "nvcc --version); nvidia-smi, CUDA start-up and compute-sanitizer --version add a few seconds",
        ),
        True,
        False,
        "nvidia-smi; python probe of torch/CUDA/triton/numpy; compute-sanitizer/nvcc --version",
        run_env,
        BOTH_CALLS,
    ),
    Stage(
        "wheels",
        "carried test dependencies",
        Budget(
            15,
            "measured",
            "the offline install of the four wheels took 1.2 s on a 2-core CPU machine; the rest covers pip's start-up",
        ),
        False,
        False,
        "pip install --no-index --find-links gpu-wheels --disable-pip-version-check --no-deps "
        "--target /tmp/... expecttest webdataset braceexpand pyspng",
        run_wheels,
        BOTH_CALLS,
    ),
    Stage(
        "build",
        "extension with CUDA kernels",
        Budget(
            150,
            "estimated",
            "nvcc of both .cu files for sm_90 took 60 s of CPU time (120 s wall on 2 busy "
            "cores) on a CPU machine; on 16 cores they compile in parallel with the 3 C++ files, so about "
            "60-80 s with pip and the link; seconds when a warm machine reuses the build",
        ),
        True,
        True,
        "CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=<this GPU> MAX_JOBS=<cores> "
        "pip install --no-build-isolation --no-deps -e .",
        run_build,
        BOTH_CALLS,
    ),
    Stage(
        "kernel-paths",
        "compiled Triton + CUDA vs fp64, every path",
        Budget(
            90,
            "estimated",
            "119 tests; Triton compiles for sm_90 took about 1 s per kernel on a CPU "
            "machine (72 kernels in 69 s): about 70 kernels here, shared by 4 pytest-xdist workers through "
            "Triton's cache, plus each worker's torch and CUDA start (about 10 s); the kernels run in ms",
        ),
        True,
        True,
        "pytest tests/test_gpu_paths.py tests/test_indexed_conv.py tests/test_indexed_basic_block.py "
        f"-k cuda --maxfail={PYTEST_MAXFAIL} (no skips allowed)",
        run_kernel_paths,
        CALL_1,
    ),
    Stage(
        "sanitizer",
        "memcheck on a few cases, racecheck and synccheck on one each",
        Budget(
            120,
            "estimated",
            "3 runs, each a python and torch start under compute-sanitizer (about 20 s) "
            "and 12, 1 and 1 cases whose kernels take milliseconds natively (memcheck's 10-100x slow-down "
            "keeps each under a second); Triton compiles about 1 s per kernel, measured",
        ),
        True,
        True,
        "compute-sanitizer --tool memcheck (3 cases x cpp,triton x fp32,bf16), racecheck and "
        "synccheck (pipeline-5x5, cpp, fp32) python tools/gpu_sanitize.py",
        run_sanitizer,
        CALL_2,
    ),
    Stage(
        "determinism",
        "bitwise runs, CUDA graphs, compile-once",
        Budget(
            100,
            "estimated",
            "59 tests, 20 of them torch.compile (4-8 s each on a CPU machine; on a GPU "
            "inductor compiles its Triton kernels at about 1 s each, in parallel), over 4 workers",
        ),
        True,
        True,
        f"pytest tests -k '{DETERMINISM_TESTS}' --maxfail={PYTEST_MAXFAIL}",
        run_determinism,
        CALL_1,
    ),
    Stage(
        "test-suite",
        "the whole test suite on the GPU",
        Budget(
            130,
            "estimated",
            "what call 2 leaves after its other stages; the suite's 1206 tests have not "
            "been timed on a GPU, so a stop at the budget reports how many ran (incomplete)",
        ),
        True,
        True,
        f"pytest tests --maxfail={PYTEST_MAXFAIL} [-n 8 with pytest-xdist]",
        run_test_suite,
        CALL_2,
    ),
    Stage(
        "op-bench",
        "op benchmark at the paper's sizes, copy bandwidth, memory",
        Budget(
            55,
            "estimated",
            "2 processes (fp32, bf16), each a torch and CUDA start (about 10 s), about 6 "
            "Triton kernels at about 1 s each (measured), 4 implementations x 2 shapes x 52 steps of a few "
            "ms; the plot about 5 s",
        ),
        False,
        True,
        "python -m l2b_fast.bench --device cuda --dtype {float32,bfloat16}; plot",
        run_op_bench,
        CALL_1,
    ),
    Stage(
        "search-bench",
        "search-step benchmark at the paper's sizes",
        Budget(
            80,
            "estimated",
            f"3 models x 7 variants x {SEARCH_REPEAT + 2} rounds: a Taskonomy step at batch "
            "64 and 128x128 is about 2.3 TFLOP, 20-60 ms in bf16 on an H100/H200, the CelebA steps less; "
            "building the models about 20 s; the grouped_triton variant's convolution kernels about 1 s each",
        ),
        False,
        True,
        f"l2b bench search --device cuda --preset gpu --repeat {SEARCH_REPEAT} --models <one at a time>",
        run_search_bench,
        CALL_1,
    ),
    Stage(
        "data-bench",
        "data loader benchmark",
        Budget(
            75,
            "estimated",
            "the 2-core CPU results in benchmarks/results: 12 loader runs of 768 samples "
            "at 140-480 samples/s (about 45 s) plus writing 384 synthetic samples; a GPU machine's cores are "
            "no slower",
        ),
        False,
        True,
        "python -m l2b_fast.bench.data_throughput",
        run_data_bench,
        CALL_2,
    ),
]
STAGE_NAMES = [stage.name for stage in STAGES]
CALLS = sorted({call for stage in STAGES for call in stage.calls})


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def default_out() -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    return Path(os.environ.get("OUT") or tempfile.gettempdir()) / f"gpu-{stamp}"


def planned_seconds(stages: list[Stage]) -> int:
    """The time a run of these stages needs at their full budgets, the reserve at the end included."""
    return sum(stage.budget_s for stage in stages) + RESERVE_S


def plan_timeouts(stages: list[Stage], time_limit: float) -> list[tuple[float, float]]:
    """(planned start, timeout) of each stage if every earlier one used its whole budget: the timeout is
    min(budget, time left before the reserve); 0 for a stage that would not start (under MIN_STAGE_S left)."""
    start, plan = 0.0, []
    for stage in stages:
        left = time_limit - RESERVE_S - start
        timeout = min(stage.budget_s, left) if left >= MIN_STAGE_S else 0.0
        plan.append((start, timeout))
        start += timeout
    return plan


def parse_args(argv=None) -> argparse.Namespace:
    names = [stage.name for stage in STAGES]
    parser = argparse.ArgumentParser(
        prog="tools/gpu_validate.py",
        description=__doc__.split("\n\n")[0],
        epilog="Stages: " + ", ".join(names),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder: summary.json, summary.md, results.tar.gz (default: $OUT/gpu-<date>, "
        "else a temporary folder)",
    )
    parser.add_argument(
        "--call",
        type=int,
        choices=CALLS,
        default=None,
        help="the stages of one short device call: 1 = build, kernel paths, determinism, op and "
        "search benchmarks; 2 = build, sanitizer, whole test suite, data benchmark",
    )
    parser.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset instead of --call, always run in the fixed order (default: all)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds for the whole run, from the call's own limit (e.g. 540 for a 600 s call); each "
        "stage runs for at most min(its budget, the time left) (default: the stages' budgets plus "
        f"{RESERVE_S} s)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="after a failed correctness stage, still run the other correctness stages (never the benchmarks)",
    )
    parser.add_argument("--dry-run", action="store_true", help="write and print the plan with its budgets, run nothing")
    parser.add_argument(
        "--bundle",
        action="store_true",
        help="kept for older command lines: results are always packed into results.tar.gz",
    )
    parser.add_argument(
        "--wheels", type=Path, default=REPO / "gpu-wheels", help="folder of carried wheels (default ./gpu-wheels)"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for every stage (default: this one)")
    parser.add_argument(
        "--download-wheels",
        type=Path,
        metavar="DIR",
        default=None,
        help=f"download the wheels the GPU image lacks (python {GPU_PYTHON}) into DIR and exit",
    )
    args = parser.parse_args(argv)
    if args.call is not None and args.stages is not None:
        parser.error("give --call or --stages, not both")
    if args.stages is not None:
        unknown = [s for s in args.stages.split(",") if s not in names]
        if unknown:
            parser.error(f"unknown stage {', '.join(unknown)}; choose from {', '.join(names)}")
        args.stages = [s for s in names if s in args.stages.split(",")]
    elif args.call is not None:
        args.stages = [stage.name for stage in STAGES if args.call in stage.calls]
    else:
        args.stages = names
    if args.time_limit is None:
        args.time_limit = planned_seconds([stage for stage in STAGES if stage.name in args.stages])
    if args.time_limit < RESERVE_S + MIN_STAGE_S:
        parser.error(f"--time-limit must be at least {RESERVE_S + MIN_STAGE_S} s")
    args.out = args.out or default_out()
    return args


def download_command(target: Path, python: str) -> list[str]:
    """pip download, for the GPU image's Python and platform, of the packages it lacks (no dependencies:
    they are all listed)."""
    platforms = [arg for platform in GPU_PLATFORMS for arg in ("--platform", platform)]
    return [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        GPU_PYTHON,
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(target),
        *GPU_WHEELS,
    ]


def download_wheels(target: Path, python: str) -> int:
    target.mkdir(parents=True, exist_ok=True)
    command = download_command(target, python)
    print("$", " ".join(command), flush=True)
    rc = subprocess.call(command)
    if rc == 0:
        print(f"wheels in {target}: {', '.join(p.name for p in sorted(target.glob('*.whl')))}")
    return rc


def write_atomically(path: Path, text: str) -> None:
    """A call killed mid-write leaves the previous complete file, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_summary(ctx: Context, rows: list[dict], dry_run: bool) -> dict:
    selected = [stage for stage in STAGES if stage.name in ctx.args.stages]
    statuses = [row["status"] for row in rows]
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "call": ctx.args.call,
        "time_limit_s": ctx.args.time_limit,
        "reserve_s": RESERVE_S,
        "planned_s": planned_seconds(selected),
        "fits_time_limit": planned_seconds(selected) <= ctx.args.time_limit,
        "tree_digest": ctx.digest,
        "seconds": round(time.monotonic() - ctx.start, 1),
        "machine": {
            k: ctx.probe.get(k)
            for k in (
                "gpu",
                "capability",
                "sm_count",
                "gpu_memory_GiB",
                "python",
                "torch",
                "torch_cuda",
                "triton",
                "numpy",
            )
        },
        "passed": "failed" not in statuses,
        "correctness_passed": not any(row["status"] == "failed" for row in rows if row["correctness"]),
        "complete": len(rows) == len(selected) and not {"incomplete", "not-run", "running"} & set(statuses),
        "bundle": None if dry_run else BUNDLE,
        "scratch_folder": None if dry_run else str(ctx.work),  # packed into the bundle; removed at a normal end
        "stages": rows,
        "op_targets": ctx.targets,
    }
    write_atomically(ctx.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# GPU validation {summary['date']}" + (" (plan)" if dry_run else ""),
        "",
        f"machine: {summary['machine']}",
        "",
        f"time limit {ctx.args.time_limit:g} s, planned {summary['planned_s']} s"
        + ("" if dry_run else f"; every stage's files are in {BUNDLE}"),
        "",
        "| stage | status | s | timeout s | budget s | budget from | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['timeout_s']} | {r['budget_s']} "
        f"| {r['budget_kind']} | {r['note']} |"
        for r in rows
    ]
    write_atomically(ctx.out / "summary.md", "\n".join(lines) + "\n")
    return summary


def pack(work: Path, out: Path) -> None:
    """Every file of the scratch folder into OUT/results.tar.gz, replaced in one step: a call killed while
    packing keeps the previous bundle."""
    partial = out / f".{BUNDLE}.partial"
    with tarfile.open(partial, "w:gz") as archive:
        for path in sorted(work.rglob("*")):
            if path.is_file():
                try:
                    archive.add(path, arcname=str(path.relative_to(work)))
                except OSError:  # removed or rewritten by a running command meanwhile: the next pack has it
                    pass
    os.replace(partial, out / BUNDLE)


def stage_row(stage: Stage, result: Result, seconds: float, timeout: float, commands: list[str]) -> dict:
    return {
        "stage": stage.name,
        "what": stage.what,
        "status": result.status,
        "seconds": round(seconds, 1),
        "note": result.note,
        "commands": commands,
        "correctness": stage.correctness,
        "budget_s": stage.budget_s,
        "budget_kind": stage.budget.kind,
        "budget_basis": stage.budget.basis,
        "timeout_s": round(timeout, 1),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.download_wheels is not None:
        return download_wheels(args.download_wheels, args.python)
    args.out.mkdir(parents=True, exist_ok=True)
    work = None if args.dry_run else Path(tempfile.mkdtemp(prefix="gpu-validate-"))
    ctx = Context(args, work)
    selected = [stage for stage in STAGES if stage.name in args.stages]
    what = f"call {args.call}, " if args.call else ""
    print(
        f"gpu_validate: {what}{len(selected)} stages in {args.time_limit:g} s -> {args.out}, code digest {ctx.digest}"
        + (" (dry run: nothing is run)" if args.dry_run else ""),
        flush=True,
    )
    rows: list[dict] = []

    def checkpoint(running: dict | None = None) -> None:
        write_summary(ctx, rows + ([running] if running else []), args.dry_run)
        if work is not None:
            pack(work, args.out)

    if args.dry_run:
        for stage, (start, timeout) in zip(selected, plan_timeouts(selected, args.time_limit)):
            kind = "correctness" if stage.correctness else "setup or measurement"
            kind += ", needs a GPU" if stage.needs_gpu else ""
            fit = "" if timeout >= stage.budget_s else (" (cut to the time left)" if timeout else " (does not fit)")
            planned = Result("planned", f"{kind}: {stage.plan}{fit}")
            rows.append({**stage_row(stage, planned, 0.0, timeout, [stage.plan]), "planned_start_s": start})
        summary = write_summary(ctx, rows, True)
        for row in rows:
            print(
                f"  {row['stage']:13s} at {row['planned_start_s']:5.0f} s, budget {row['budget_s']:4d} s "
                f"({row['budget_kind']}), timeout {row['timeout_s']:5.0f} s"
            )
        print(
            f"gpu_validate: planned {summary['planned_s']} s of {args.time_limit:g} s"
            + ("" if summary["fits_time_limit"] else ": DOES NOT FIT")
            + f"; plan: {args.out / 'summary.json'}"
        )
        return 0 if summary["fits_time_limit"] else 1

    probe_begin = time.monotonic()
    ctx.probe = ctx.python_json(PROBE) or {"torch_error": f"{args.python} did not answer the probe"}
    stopped = None
    for stage in selected:
        begin = probe_begin if stage.name == "env" else time.monotonic()  # the probe is the env stage's main work
        ctx.stage_commands = []
        timeout = 0.0
        if stopped and (not stage.correctness or not args.keep_going):
            result = Result("not-run", f"after the failure of {stopped}")
        elif stage.needs_gpu and not ctx.has_cuda:
            result = Result(
                "skipped",
                "no CUDA device here" + (f" ({ctx.probe['torch_error']})" if "torch_error" in ctx.probe else ""),
            )
        elif ctx.deadline - time.monotonic() - RESERVE_S < MIN_STAGE_S:
            result = Result("not-run", "the time limit was reached")
        else:
            ctx.stage_deadline = min(time.monotonic() + stage.budget_s, ctx.deadline - RESERVE_S)
            timeout = ctx.stage_deadline - time.monotonic()
            running = Result("running", "the call ended during this stage (its log is bundled every minute)")
            ctx.checkpoint = lambda: checkpoint(
                stage_row(stage, running, time.monotonic() - begin, timeout, ctx.stage_commands)
            )
            ctx.checkpoint()
            try:
                result = stage.run(ctx)
            except Exception as error:  # a bug or a missing file: record it, keep the summary
                result = Result("failed", f"{type(error).__name__}: {error}")
            ctx.checkpoint = lambda: None
        if stage.correctness and result.status == "failed" and stopped is None:
            stopped = stage.name
        rows.append(stage_row(stage, result, time.monotonic() - begin, timeout, ctx.stage_commands))
        print(f"[{rows[-1]['seconds']:6.1f} s] {stage.name:13s} {result.status:10s} {result.note}", flush=True)
        checkpoint()  # after every stage: a killed call still leaves the summary and the bundle so far
    summary = write_summary(ctx, rows, False)
    pack(work, args.out)
    shutil.rmtree(work, ignore_errors=True)
    verdict = "passed" if summary["complete"] else "nothing failed, but incomplete"
    verdict = verdict if summary["passed"] else "FAILED"
    print(
        f"gpu_validate: {verdict} in {summary['seconds']} s; summary: {args.out / 'summary.json'}, "
        f"results: {args.out / BUNDLE}"
    )
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
