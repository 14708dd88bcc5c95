"""tools/gpu_validate.py (the GPU run in two short calls) and tools/gpu_sanitize.py, as far as a CPU allows:
the plans and their budgets, the stage order and its stop rules, time limits, the CPU auto-skip, the offline
wheels, and result files that survive a killed call."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
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


def bundled(out: Path, name: str) -> str:
    """A file of the results bundle."""
    with tarfile.open(out / "results.tar.gz") as archive:
        return archive.extractfile(name).read().decode()


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


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
    rc = gpu_validate.main(
        ["--out", str(tmp_path), "--stages", "env,build,kernel-paths,sanitizer,op-bench", "--python", sys.executable]
    )
    assert rc == 0
    found = statuses(tmp_path)
    assert found["env"] == "passed"
    assert {found[s] for s in ("build", "kernel-paths", "sanitizer", "op-bench")} == {"skipped"}
    rows = {row["stage"]: row for row in summary(tmp_path)["stages"]}
    assert "no CUDA device" in rows["build"]["note"]
    env = json.loads(bundled(tmp_path, "env.json"))
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False
    assert sorted(p.name for p in files_under(tmp_path)) == ["results.tar.gz", "summary.json", "summary.md"]


def fake_stages(monkeypatch, outcomes: dict[str, str], ran: list[str], seconds: float = 0.0):
    """Every stage replaced by one that records its call and returns the given status (default passed)."""

    def runner(name):
        def run(ctx):
            ran.append(name)
            time.sleep(seconds)
            return gpu_validate.Result(outcomes.get(name, "passed"), "fake")

        return run

    stages = [dataclasses.replace(s, run=runner(s.name)) for s in gpu_validate.STAGES]
    monkeypatch.setattr(gpu_validate, "STAGES", stages)
    monkeypatch.setattr(
        gpu_validate.Context, "python_json", lambda self, code, timeout=180: {"cuda_available": True, "torch": "fake"}
    )


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
    # a stage starts only with 20 s left before the 20 s reserve: here for the first 1.5 s, about 5 stages
    assert gpu_validate.main(["--out", str(tmp_path), "--time-limit", "41.5"]) == 0
    found = statuses(tmp_path)
    assert ran and found[ran[-1]] == "passed" and len(ran) < len(gpu_validate.STAGES)
    assert {status for name, status in found.items() if name not in ran} == {"not-run"}


def test_results_go_into_the_bundle_and_the_folder_keeps_three_files(tmp_path, monkeypatch):
    ran: list[str] = []
    fake_stages(monkeypatch, {}, ran)

    def writes_results(ctx):
        (ctx.work / "bench").mkdir()
        (ctx.work / "bench" / "branch.csv").write_text("a,b\n")
        for k in range(12):  # more files than a device call returns
            (ctx.work / f"part{k}.log").write_text(f"{k}\n")
        return gpu_validate.Result("passed")

    stages = [dataclasses.replace(s, run=writes_results) if s.name == "op-bench" else s for s in gpu_validate.STAGES]
    monkeypatch.setattr(gpu_validate, "STAGES", stages)
    assert gpu_validate.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in files_under(tmp_path)) == ["results.tar.gz", "summary.json", "summary.md"]
    assert bundled(tmp_path, "bench/branch.csv") == "a,b\n" and bundled(tmp_path, "part11.log") == "11\n"
    assert not Path(summary(tmp_path)["scratch_folder"]).exists()  # removed once packed


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
    path.write_text(
        f'<testsuites><testsuite tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}">{cases}'
        "</testsuite></testsuites>"
    )


def test_pytest_stages_read_the_junit_counts(tmp_path):
    ctx = gpu_validate.Context(gpu_validate.parse_args(["--out", str(tmp_path)]))
    write_junit(tmp_path / "kernel-paths.xml", 10, 0, 2)
    result = gpu_validate.pytest_result(ctx, "kernel-paths", 0, skips_fail=True)
    assert result.status == "failed" and "needs a CUDA device" in result.note  # a skipped backend is a failure
    assert gpu_validate.pytest_result(ctx, "kernel-paths", 0).status == "passed"
    assert gpu_validate.pytest_result(ctx, "kernel-paths", 1).status == "failed"
    stopped = gpu_validate.pytest_result(ctx, "kernel-paths", None)  # out of time: incomplete, with what ran
    assert stopped.status == "incomplete" and "10 tests" in stopped.note
    write_junit(tmp_path / "failing.xml", 10, 3, 0)
    assert gpu_validate.pytest_result(ctx, "failing", None).status == "failed"  # failures seen before the stop
    (tmp_path / "cut.xml").write_text("<testsuites><testsuite tests=")  # a report cut short by a kill
    assert gpu_validate.pytest_result(ctx, "cut", None).status == "incomplete"
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
    ctx.probe = {"expecttest": "0.3.0", "webdataset": None, "braceexpand": None, "pyspng": None}
    result = gpu_validate.run_wheels(ctx)
    assert result.status == "skipped" and "webdataset, braceexpand, pyspng" in result.note
    assert "make gpu-wheels" in result.note


def test_sanitizer_driver_runs_its_cases_on_cpu(capsys):
    cases = "fallback-46x46,odd-misaligned-5x7,pairs8-30x40"
    assert (
        gpu_sanitize.main(["--device", "cpu", "--backends", "cpp", "--dtypes", "float32,bfloat16", "--cases", cases])
        == 0
    )
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
  -c) if [ -f "$state/built" ]; then
        echo '{{"load_error": null, "cuda": {{"ref": null, "cpp": null, "triton": null}}}}';
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
def test_build_stage_builds_in_place_when_pip_does_not(
    tmp_path, monkeypatch, pip_rc, pip_builds, setup_fails, status, calls, how
):
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
    model_dir = tmp_path / "taskonomy_resnet34"  # the stage runs one model per process, each into its folder
    model_dir.mkdir()
    (model_dir / "search_cuda_nvidia-h200_gpu.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert gpu_validate.search_rate(tmp_path) == 620.0


CALL_STAGES = {
    1: ["env", "wheels", "build", "kernel-paths", "determinism", "op-bench", "search-bench"],
    2: ["env", "wheels", "build", "sanitizer", "test-suite", "data-bench"],
}


@pytest.mark.parametrize("call", [1, 2])
def test_each_call_plans_its_stages_within_540_s(tmp_path, call):
    assert gpu_validate.main(["--dry-run", "--call", str(call), "--time-limit", "540", "--out", str(tmp_path)]) == 0
    plan = summary(tmp_path)
    assert [row["stage"] for row in plan["stages"]] == CALL_STAGES[call]
    assert plan["call"] == call and plan["fits_time_limit"] and plan["planned_s"] <= 540
    assert sum(row["budget_s"] for row in plan["stages"]) + plan["reserve_s"] == plan["planned_s"]
    for row in plan["stages"]:
        assert row["budget_s"] > 0 and row["timeout_s"] == row["budget_s"]  # every stage gets its whole budget
        assert row["budget_kind"] in ("measured", "estimated") and len(row["budget_basis"]) > 40
    starts = [row["planned_start_s"] for row in plan["stages"]]
    assert starts == sorted(starts) and starts[-1] + plan["stages"][-1]["budget_s"] + plan["reserve_s"] <= 540
    assert "| budget s |" in (tmp_path / "summary.md").read_text()


def test_the_two_calls_cover_every_stage():
    in_calls = {name for stages in CALL_STAGES.values() for name in stages}
    assert in_calls == set(gpu_validate.STAGE_NAMES)
    measured = [stage.name for stage in gpu_validate.STAGES if stage.budget.kind == "measured"]
    assert measured == ["wheels"]  # the only stage whose own work was timed (offline install, CPU machine)


def test_a_plan_longer_than_the_time_limit_is_cut_and_flagged(tmp_path):
    assert gpu_validate.main(["--dry-run", "--call", "1", "--time-limit", "300", "--out", str(tmp_path)]) == 1
    plan = summary(tmp_path)
    assert not plan["fits_time_limit"]
    rows = {row["stage"]: row for row in plan["stages"]}
    # 280 s before the reserve: env 30 + wheels 15 + build 150 leave 85 s for kernel-paths (budget 90)
    assert rows["build"]["timeout_s"] == rows["build"]["budget_s"]
    assert rows["kernel-paths"]["timeout_s"] == 85 and "cut to the time left" in rows["kernel-paths"]["note"]
    assert rows["search-bench"]["timeout_s"] == 0 and "does not fit" in rows["search-bench"]["note"]


def test_call_and_stages_are_exclusive(tmp_path):
    with pytest.raises(SystemExit):
        gpu_validate.parse_args(["--call", "1", "--stages", "env", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        gpu_validate.parse_args(["--call", "3", "--out", str(tmp_path)])
    args = gpu_validate.parse_args(["--call", "2", "--out", str(tmp_path)])
    assert args.stages == CALL_STAGES[2] and args.time_limit <= 540  # the call's own budget by default


def test_an_incomplete_stage_does_not_stop_the_later_ones(tmp_path, monkeypatch):
    ran: list[str] = []
    fake_stages(monkeypatch, {"kernel-paths": "incomplete", "determinism": "incomplete"}, ran)
    assert gpu_validate.main(["--out", str(tmp_path), "--call", "1"]) == 0  # nothing failed
    assert ran == CALL_STAGES[1]  # the benchmarks still ran
    result = summary(tmp_path)
    assert result["passed"] and result["correctness_passed"] and not result["complete"]


def test_each_stage_runs_for_min_of_its_budget_and_the_time_left(tmp_path, monkeypatch):
    seen: dict[str, float] = {}

    def record(name):
        def run(ctx):
            seen[name] = ctx.remaining()
            return gpu_validate.Result("passed")

        return run

    def stage(name, seconds):
        budget = gpu_validate.Budget(seconds, "estimated", "test")
        return dataclasses.replace(gpu_validate.STAGES[0], name=name, budget=budget, run=record(name))

    stages = [stage("short", 25), stage("long", 500)]
    monkeypatch.setattr(gpu_validate, "STAGES", stages)
    monkeypatch.setattr(gpu_validate.Context, "python_json", lambda self, code, timeout=180: {"cuda_available": True})
    assert gpu_validate.main(["--out", str(tmp_path), "--stages", "short,long", "--time-limit", "100"]) == 0
    # short: its own 25 s; long: what is left of 100 s before the 20 s reserve, not its 500 s
    assert 23 < seen["short"] <= 25 and 75 < seen["long"] <= 80
    rows = {row["stage"]: row for row in summary(tmp_path)["stages"]}
    assert rows["short"]["timeout_s"] == pytest.approx(25, abs=1)
    assert rows["long"]["timeout_s"] == pytest.approx(80, abs=2)


def test_pytest_stages_collect_up_to_ten_failures(tmp_path):
    ctx = gpu_validate.Context(gpu_validate.parse_args(["--out", str(tmp_path)]))
    command = gpu_validate.pytest_command(ctx, "kernel-paths", "tests/test_gpu_paths.py")
    assert "--maxfail=10" in command and "-x" not in command and "--exitfirst" not in command


REHEARSAL = """
import os, sys
sys.path.insert(0, {tools!r})
import gpu_validate

gpu_validate.CHECKPOINT_S = 0.3  # the real 60 s, shortened: a long stage's log reaches the bundle while it runs


def quick(ctx):
    (ctx.work / "quick.log").write_text("quick stage: done\\n")
    return gpu_validate.Result("passed", "wrote quick.log")


def overrun(ctx):  # needs far more than the stage's 2 s budget
    code = "import time; print('overrun: started', flush=True); time.sleep(120)"
    return gpu_validate.status_of(ctx.sh([sys.executable, "-c", code], "overrun.log"), "the slow command")


def hang(ctx):  # the whole call is killed while this one runs
    code = ("import os, time; print('hang: started', flush=True); "
            "open({marker!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    return gpu_validate.status_of(ctx.sh([sys.executable, "-c", code], "hang.log"), "the hanging command")


def budget(seconds):
    return gpu_validate.Budget(seconds, "estimated", "rehearsal")


gpu_validate.STAGES = [
    gpu_validate.Stage("quick", "writes a file", budget(30), True, True, "write quick.log", quick, (1,)),
    gpu_validate.Stage("overrun", "outlives its budget", budget(2), True, True, "sleep 120", overrun, (1,)),
    gpu_validate.Stage("hang", "killed with the call", budget(300), True, True, "sleep 600", hang, (1,)),
]
gpu_validate.Context.python_json = lambda self, code, timeout=180: {{"cuda_available": True}}
raise SystemExit(gpu_validate.main(sys.argv[1:]))
"""


def test_a_killed_call_leaves_the_bundle_of_the_stages_before_it(tmp_path):
    """Rehearsal of a device call that ends badly: one stage overruns its budget (stopped, incomplete), the
    next one hangs and the whole call is then killed with SIGKILL, as a call past its limit is."""
    out, marker = tmp_path / "out", tmp_path / "hang.pid"
    launcher = tmp_path / "rehearsal.py"
    launcher.write_text(REHEARSAL.format(tools=str(TOOLS), marker=str(marker)))
    with (tmp_path / "driver.log").open("w") as log:
        command = [sys.executable, str(launcher), "--call", "1", "--time-limit", "400", "--out", str(out)]
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    hang_pid = None
    try:
        for _ in range(600):
            if marker.exists() and marker.read_text():
                break
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()
            time.sleep(0.1)
        else:
            pytest.fail("the hanging stage never started")
        hang_pid = int(marker.read_text())
        time.sleep(1.5)  # a few of the shortened checkpoints while the hanging stage runs
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=30) == -signal.SIGKILL
    finally:
        if driver.poll() is None:
            driver.kill()
        if hang_pid is not None:  # its own session: the driver's kill does not reach it
            try:
                os.kill(hang_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    files = files_under(out)
    assert len(files) <= 8 and {"summary.json", "results.tar.gz"} <= {p.name for p in files}
    assert bundled(out, "quick.log") == "quick stage: done\n"
    overrun_log = bundled(out, "overrun.log")
    assert "overrun: started" in overrun_log and "stopped after 2 s" in overrun_log
    assert "hang: started" in bundled(out, "hang.log")  # packed while the stage ran
    result = summary(out)
    assert statuses(out) == {"quick": "passed", "overrun": "incomplete", "hang": "running"}
    assert result["passed"] and not result["complete"]
    shutil.rmtree(result["scratch_folder"], ignore_errors=True)  # the killed driver could not remove it


def make_wheel(folder: Path, project: str, version: str) -> Path:
    """A minimal pure-Python wheel: one module that says its version."""
    files = {
        f"{project}.py": f"VERSION = {version!r}\n",
        f"{project}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n",
        f"{project}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{project}-{version}.dist-info/RECORD,,")
    path = folder / f"{project}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{project}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_wheels_stage_installs_the_carried_wheels_offline(tmp_path):
    wheels, out = tmp_path / "gpu-wheels", tmp_path / "out"
    wheels.mkdir()
    out.mkdir()
    make_wheel(wheels, "braceexpand", "0.1.7")  # one of the four; the others are reported as missing
    ctx = gpu_validate.Context(gpu_validate.parse_args(["--out", str(out), "--wheels", str(wheels)]))
    ctx.probe = {"expecttest": "0.3.0"}
    try:
        result = gpu_validate.run_wheels(ctx)
        assert result.status == "passed", (out / "wheels.log").read_text()
        assert "braceexpand==0.1.7 installed offline" in result.note and "webdataset, pyspng" in result.note
        command = ctx.stage_commands[0]
        assert "--no-index --find-links" in command and "--disable-pip-version-check" in command
        site = Path(ctx.extra_paths[0])
        assert (site / "braceexpand.py").read_text() == "VERSION = '0.1.7'\n"
        make_wheel(wheels, "webdataset", "0.0.1")  # not the pinned version: pip's own error is the note
        failed = gpu_validate.run_wheels(ctx)
        assert failed.status == "failed" and "No matching distribution found for webdataset==1.0.2" in failed.note
    finally:
        for path in ctx.extra_paths:
            shutil.rmtree(path, ignore_errors=True)


def test_wheel_download_command_targets_the_gpu_image():
    command = gpu_validate.download_command(Path("gpu-wheels"), "python3")
    assert command[:4] == ["python3", "-m", "pip", "download"]
    text = " ".join(command)
    assert "--no-deps --only-binary=:all: --python-version 3.12 --implementation cp" in text
    assert "--platform manylinux_2_28_x86_64" in text and "-d gpu-wheels" in text
    assert command[-4:] == ["expecttest==0.3.0", "webdataset==1.0.2", "braceexpand==0.1.7", "pyspng==0.1.4"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_wheels_runs_the_download(tmp_path):
    done = subprocess.run(["make", "-n", "gpu-wheels"], cwd=TOOLS.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tools/gpu_validate.py --download-wheels gpu-wheels" in done.stdout


def test_the_calls_are_plain_shell_commands(tmp_path):
    out = tmp_path / "plan"
    command = [
        "bash",
        str(TOOLS / "gpu_validate.sh"),
        "--call",
        "1",
        "--dry-run",
        "--time-limit",
        "540",
        "--out",
        str(out),
    ]
    environment = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [row["stage"] for row in summary(out)["stages"]] == CALL_STAGES[1]


def test_sanitizer_runs_name_cases_and_dtypes_the_driver_has():
    """Sized-down sanitizer runs: memcheck on a few cases, racecheck and synccheck on one case each."""
    for tool, driver_args, _ in gpu_validate.SANITIZER_RUNS:
        options = dict(zip(driver_args[::2], driver_args[1::2]))
        cases, dtypes = options["--cases"].split(","), options["--dtypes"].split(",")
        assert set(cases) <= set(gpu_sanitize.CASES) and set(dtypes) <= set(gpu_sanitize.DTYPES)
        assert len(cases) == (3 if tool == "memcheck" else 1)


def test_a_pytest_stage_stopped_at_its_budget_reports_the_tests_that_ran(tmp_path):
    """The stop sends SIGINT first: pytest still writes its junit report, so the note says how far it got."""
    tests = tmp_path / "test_slow.py"
    tests.write_text(
        "import time\n\n\ndef test_a():\n    pass\n\n\ndef test_b():\n    pass\n\n\n"
        "def test_c():\n    time.sleep(120)\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    ctx = gpu_validate.Context(gpu_validate.parse_args(["--out", str(out)]))
    rc = ctx.sh(gpu_validate.pytest_command(ctx, "slow", str(tests)), "slow.log", timeout=10)
    result = gpu_validate.pytest_result(ctx, "slow", rc)
    assert rc is None and result.status == "incomplete" and "2 tests, 0 failed" in result.note
    assert "KeyboardInterrupt" in (out / "slow.log").read_text()
