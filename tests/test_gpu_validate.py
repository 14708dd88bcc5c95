"""tools/gpu_validate.py (the one-command GPU run) and tools/gpu_sanitize.py, as far as a CPU allows:
the plan, the stage order and its stop rules, time limits, the CPU auto-skip, result files."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


gpu_validate = load_tool("gpu_validate")
gpu_sanitize = load_tool("gpu_sanitize")


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def statuses(out: Path) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in summary(out)["stages"]}


def test_dry_run_plans_every_stage_in_order(tmp_path, capsys):
    assert gpu_validate.main(["--dry-run", "--out", str(tmp_path)]) == 0
    result = summary(tmp_path)
    assert result["dry_run"] and [row["stage"] for row in result["stages"]] == gpu_validate.STAGE_NAMES
    assert all(row["status"] == "planned" and row["commands"] for row in result["stages"])
    # correctness before measurement: no benchmark stage comes before a correctness stage
    kinds = [row["correctness"] for row in result["stages"] if row["stage"] not in ("env", "wheels")]
    assert kinds == sorted(kinds, reverse=True)
    assert "kernel-paths" in capsys.readouterr().out
    assert (tmp_path / "summary.md").read_text().count("| planned |") == len(gpu_validate.STAGES)


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(SystemExit) as error:
        gpu_validate.main(["--stages", "env,benchmarks", "--out", str(tmp_path)])
    assert error.value.code == 2
    with pytest.raises(SystemExit):
        gpu_validate.main(["--time-limit", "5", "--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would build and run the GPU stages")
def test_cpu_run_skips_the_gpu_stages_with_the_reason(tmp_path):
    rc = gpu_validate.main(["--out", str(tmp_path), "--stages", "env,build,kernel-paths,sanitizer,op-bench", "--python", sys.executable])
    assert rc == 0
    found = statuses(tmp_path)
    assert found["env"] == "passed"
    assert {found[s] for s in ("build", "kernel-paths", "sanitizer", "op-bench")} == {"skipped"}
    rows = {row["stage"]: row for row in summary(tmp_path)["stages"]}
    assert "no CUDA device" in rows["build"]["note"]
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False


def fake_stages(monkeypatch, outcomes: dict[str, str], ran: list[str], seconds: float = 0.0):
    """Every stage replaced by one that records its call and returns the given status (default passed)."""

    def runner(name):
        def run(ctx):
            ran.append(name)
            time.sleep(seconds)
            return gpu_validate.Result(outcomes.get(name, "passed"), "fake")

        return run

    stages = [gpu_validate.Stage(s.name, s.what, s.budget_s, s.correctness, s.needs_gpu, s.plan, runner(s.name)) for s in gpu_validate.STAGES]
    monkeypatch.setattr(gpu_validate, "STAGES", stages)
    monkeypatch.setattr(gpu_validate.Context, "python_json", lambda self, code, timeout=180: {"cuda_available": True, "torch": "fake"})


def test_a_correctness_failure_stops_the_run_before_the_benchmarks(tmp_path, monkeypatch):
    ran: list[str] = []
    fake_stages(monkeypatch, {"kernel-paths": "failed"}, ran)
    assert gpu_validate.main(["--out", str(tmp_path)]) == 1
    assert ran == ["env", "wheels", "build", "kernel-paths"]
    found = statuses(tmp_path)
    assert found["sanitizer"] == found["op-bench"] == "not-run"
    assert not summary(tmp_path)["correctness_passed"]


def test_keep_going_runs_the_other_checks_but_no_benchmark(tmp_path, monkeypatch):
    ran: list[str] = []
    fake_stages(monkeypatch, {"sanitizer": "failed"}, ran)
    assert gpu_validate.main(["--out", str(tmp_path), "--keep-going"]) == 1
    assert ran == ["env", "wheels", "build", "kernel-paths", "sanitizer", "determinism", "test-suite"]
    assert statuses(tmp_path)["op-bench"] == "not-run"


def test_a_failed_benchmark_is_reported_without_failing_correctness(tmp_path, monkeypatch):
    ran: list[str] = []
    fake_stages(monkeypatch, {"op-bench": "failed", "sanitizer": "unavailable"}, ran)
    assert gpu_validate.main(["--out", str(tmp_path)]) == 1
    assert ran == gpu_validate.STAGE_NAMES  # the later benchmarks still ran
    assert summary(tmp_path)["correctness_passed"] and not summary(tmp_path)["passed"]


def test_stages_that_no_longer_fit_the_time_limit_are_not_run(tmp_path, monkeypatch):
    ran: list[str] = []
    fake_stages(monkeypatch, {}, ran, seconds=0.3)
    # a stage starts only with 20 s left before the 15 s reserve: here for the first 1.5 s, about 5 stages
    assert gpu_validate.main(["--out", str(tmp_path), "--time-limit", "36.5"]) == 0
    found = statuses(tmp_path)
    assert ran and found[ran[-1]] == "passed" and len(ran) < len(gpu_validate.STAGES)
    assert {status for name, status in found.items() if name not in ran} == {"not-run"}


def test_bundle_leaves_the_summaries_and_one_archive(tmp_path, monkeypatch):
    ran: list[str] = []
    fake_stages(monkeypatch, {}, ran)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "branch.csv").write_text("a,b\n")
    (tmp_path / "kernel-paths.log").write_text("ok\n")
    assert gpu_validate.main(["--out", str(tmp_path), "--bundle"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(tmp_path / "results.tar.gz") as archive:
        assert {"bench/branch.csv", "kernel-paths.log"} <= set(archive.getnames())


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def test_a_command_over_its_budget_is_stopped_with_its_children(tmp_path):
    args = gpu_validate.parse_args(["--out", str(tmp_path)])
    tmp_path.mkdir(exist_ok=True)
    ctx = gpu_validate.Context(args)
    pid_file = tmp_path / "grandchild.pid"
    child = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    begin = time.monotonic()
    assert ctx.sh([sys.executable, "-c", child], "slow.log", timeout=3) is None
    assert time.monotonic() - begin < 30
    assert "stopped after" in (tmp_path / "slow.log").read_text()
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed with its group (a zombie until whoever adopted it reaps it)
        if not running(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's own child outlived the stop")
    assert ctx.sh([sys.executable, "-c", "raise SystemExit(3)"], "slow.log", timeout=30) == 3


def write_junit(path: Path, tests: int, failures: int, skipped: int, reason: str = "needs a CUDA device") -> None:
    cases = "".join(f'<testcase name="t{k}"><skipped message="{reason}"/></testcase>' for k in range(skipped))
    path.write_text(f'<testsuites><testsuite tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}">{cases}</testsuite></testsuites>')


def test_pytest_stages_read_the_junit_counts(tmp_path):
    ctx = gpu_validate.Context(gpu_validate.parse_args(["--out", str(tmp_path)]))
    write_junit(tmp_path / "kernel-paths.xml", 10, 0, 2)
    result = gpu_validate.pytest_result(ctx, "kernel-paths", 0, skips_fail=True)
    assert result.status == "failed" and "needs a CUDA device" in result.note  # a skipped backend is a failure
    assert gpu_validate.pytest_result(ctx, "kernel-paths", 0).status == "passed"
    assert gpu_validate.pytest_result(ctx, "kernel-paths", 1).status == "failed"
    assert gpu_validate.pytest_result(ctx, "kernel-paths", None).status == "timeout"
    write_junit(tmp_path / "empty.xml", 0, 0, 0)
    assert gpu_validate.pytest_result(ctx, "empty", 5).note == "no tests were selected"


def test_op_targets_read_off_the_fp32_results(tmp_path):
    rows = [
        {"shape": "taskonomy", "implementation": "naive", "speedup_vs_naive": 1.0, "backward_pct_of_copy": None},
        {"shape": "taskonomy", "implementation": "cpp", "speedup_vs_naive": 9.5, "backward_pct_of_copy": 71.0},
        {"shape": "celeba", "implementation": "cpp", "speedup_vs_naive": 30.0, "backward_pct_of_copy": 90.0},
    ]
    (tmp_path / "branch_cuda_h200_float32.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    targets = gpu_validate.op_targets(tmp_path)
    assert targets == {
        "cpp fwd+bwd vs naive": "9.5x (target 8x: met)",
        "cpp backward / copy bandwidth": "71.0% (target 80%: missed)",
    }


def test_wheels_stage_without_wheels_says_what_is_missing(tmp_path):
    ctx = gpu_validate.Context(gpu_validate.parse_args(["--out", str(tmp_path), "--wheels", str(tmp_path / "none")]))
    ctx.probe = {"expecttest": "0.3.0", "webdataset": None, "pyspng": None}
    result = gpu_validate.run_wheels(ctx)
    assert result.status == "skipped" and "webdataset, pyspng" in result.note


def test_sanitizer_driver_runs_its_cases_on_cpu(capsys):
    cases = "fallback-46x46,odd-misaligned-5x7,pairs8-30x40"
    assert gpu_sanitize.main(["--device", "cpu", "--backends", "cpp", "--dtypes", "float32,bfloat16", "--cases", cases]) == 0
    assert capsys.readouterr().out.count(" ran in ") == 6
    with pytest.raises(SystemExit):
        gpu_sanitize.main(["--device", "cpu", "--cases", "nope"])


def test_sanitizer_verdicts_from_exit_status_and_report(tmp_path):
    """A stand-in compute-sanitizer: memcheck clean, racecheck reports errors, synccheck cannot run."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$2" in\n'
        '  memcheck) echo "========= ERROR SUMMARY: 0 errors"; exit 0;;\n'
        '  racecheck) echo "========= ERROR SUMMARY: 2 errors"; exit 86;;\n'
        '  *) echo "========= Error: Device not supported"; exit 1;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    ctx = gpu_validate.Context(gpu_validate.parse_args(["--out", str(out)]))
    ctx.probe = {"tools": {"compute-sanitizer": str(fake)}}
    result = gpu_validate.run_sanitizer(ctx)
    assert result.status == "failed"
    assert "memcheck: clean (0 errors)" in result.note and "racecheck: 2 errors (errors found)" in result.note
    assert "synccheck: unavailable" in result.note
    assert (out / "sanitizer-racecheck.log").exists() and "--error-exitcode 86" in ctx.stage_commands[1]


FAKE_PYTHON = """#!/bin/sh
# Stands in for the GPU machine's python3: -c answers the extension probe, -m pip and setup.py "build".
state="{state}"
case "$1" in
  -c) if [ -f "$state/built" ]; then echo '{{"load_error": null, "cuda": {{"ref": null, "cpp": null, "triton": null}}}}';
      else echo '{{"load_error": "ImportError", "cuda": {{"ref": null, "cpp": "not built", "triton": null}}}}'; fi;;
  -m) echo pip >> "$state/calls"; [ -f "$state/pip_builds" ] && touch "$state/built"; exit "$(cat "$state/pip_rc")";;
  setup.py) echo setup >> "$state/calls"; [ -f "$state/setup_fails" ] && exit 1; touch "$state/built";;
esac
"""


@pytest.mark.parametrize(
    "pip_rc, pip_builds, setup_fails, status, calls, how",
    [
        (0, True, False, "passed", ["pip"], "built with pip install -e ."),
        (1, False, False, "passed", ["pip", "setup"], "pip install -e . exited with 1"),
        (0, False, False, "passed", ["pip", "setup"], "left no CUDA kernels in the checkout"),
        (0, False, True, "failed", ["pip", "setup"], "exit status 1"),
    ],
    ids=["pip", "pip-fails", "pip-builds-elsewhere", "nothing-builds"],
)
def test_build_stage_builds_in_place_when_pip_does_not(tmp_path, monkeypatch, pip_rc, pip_builds, setup_fails, status, calls, how):
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    out.mkdir()
    (state / "pip_rc").write_text(str(pip_rc))
    for flag, name in ((pip_builds, "pip_builds"), (setup_fails, "setup_fails")):
        if flag:
            (state / name).touch()
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON.format(state=state))
    python.chmod(0o755)
    monkeypatch.setattr(gpu_validate, "BUILD_STAMP", tmp_path / "build" / "stamp.json")
    ctx = gpu_validate.Context(gpu_validate.parse_args(["--out", str(out), "--python", str(python)]))
    ctx.probe = {"capability": "9.0", "torch": "2.11.0+cu130"}
    result = gpu_validate.run_build(ctx)
    assert result.status == status and how in result.note
    assert (state / "calls").read_text().split() == calls
    if status == "passed":  # a second call on the same machine reuses the build
        again = gpu_validate.run_build(ctx)
        assert again.status == "passed" and "reused" in again.note
        assert (state / "calls").read_text().split() == calls


def test_data_bench_takes_the_measured_search_rate(tmp_path):
    rows = [
        {"model": "taskonomy_resnet34", "variant": "naive", "status": "ok", "images_per_s": 900.0},
        {"model": "taskonomy_resnet34", "variant": "per_child", "status": "ok", "images_per_s": 410.5},
        {"model": "taskonomy_resnet34", "variant": "grouped", "status": "ok", "images_per_s": 620.0},
        {"model": "celeba_branch_vgg", "variant": "grouped", "status": "ok", "images_per_s": 9000.0},
    ]
    assert gpu_validate.search_rate(tmp_path) is None
    (tmp_path / "search_cuda_nvidia-h200_gpu.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert gpu_validate.search_rate(tmp_path) == 620.0
