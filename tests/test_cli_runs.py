"""What a user does to a run through `l2b`: refused settings write nothing, Ctrl-C and resume with only --out, one
process per run folder, a loss that diverges, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import bent_square_toml

TINY = bent_square_toml(
    tasks=2, samples=300, hidden=16, validation=0.2,
    search={"epochs": 3, "batch_size": 40, "warmup_epochs": 1, "lr_weights": 3e-3, "lr_logits": 0.1,
            "tau": '{ kind = "inverse_sqrt", tau0 = 5.0 }', "checkpoint_every": 3, "log_every": 2},
)  # fmt: skip


def l2b(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen(
        [sys.executable, "-m", "l2b_fast.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kwargs,
    )  # fmt: skip


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
    return children


def run(*args, timeout=300) -> tuple[int, str, str]:
    process = l2b(*args)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.mark.parametrize("setting", ["search.lr_logits=-1", "search.precision=fp8", "search.epochs=three",
                                     "search.epochs=2.5", "search.cuda_graph=maybe"])  # fmt: skip
def test_a_refused_setting_is_one_line_exit_2_and_writes_nothing(tmp_path, config_file, setting):
    code, _, err = run("search", "--config", str(config_file), "--out", str(tmp_path / "out"), "--set", setting)
    assert code == 2 and len(err.strip().splitlines()) == 1 and setting.split("=")[0].split(".")[1] in err, err
    assert not (tmp_path / "out").exists()


def test_a_cuda_graph_on_the_cpu_is_refused_before_anything_is_written(tmp_path, config_file):
    code, _, err = run("search", "--config", str(config_file), "--out", str(tmp_path / "out"),
                       "--set", "search.cuda_graph=true", "--device", "cpu")  # fmt: skip
    assert code == 2 and "search.cuda_graph needs a CUDA device" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_resume_into_an_empty_folder_writes_nothing(tmp_path):
    code, _, err = run("search", "--out", str(tmp_path / "empty"), "--resume")
    assert code == 2 and "no checkpoint to resume" in err and not (tmp_path / "empty").exists()


def test_keys_the_docs_name_are_accepted_where_the_preset_file_does_not_set_them(tmp_path, config_file):
    from l2b_fast import config as configs

    config = configs.load_config(path=config_file, overrides=["search.channels_last=true", "search.compile=true"])
    assert config["search"]["channels_last"] is True and config["search"]["compile"] is True
    with pytest.raises(ValueError, match="unknown key"):
        configs.load_config(path=config_file, overrides=["search.epochz=3"])


def test_interrupt_then_resume_with_only_out_equals_an_uninterrupted_run(tmp_path, config_file):
    """Ctrl-C (SIGINT) mid-run: exit 130, one line naming the resume command, the last checkpoint intact; the
    command it names (only --out and --resume) finishes the run exactly as an uninterrupted one."""
    long = tmp_path / "long.toml"
    long.write_text(TINY.replace("epochs = 3", "epochs = 40").replace("checkpoint_every = 3", "checkpoint_every = 1"))
    common = ["--config", str(long), "--seed", "2", "--threads", "1", "--quiet"]
    reference = l2b("search", *common, "--out", str(tmp_path / "whole"))
    interrupted = l2b("search", *common, "--out", str(tmp_path / "cut"))
    checkpoint = tmp_path / "cut" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and interrupted.poll() is None
        and not (checkpoint.exists() and len((tmp_path / "cut" / "log.csv").read_text().splitlines()) > 10)
    ):
        time.sleep(0.05)
    assert interrupted.poll() is None, "the run finished before it could be interrupted: make it longer"
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.endswith(f"continue with: l2b search --out {tmp_path / 'cut'} --resume"), err
    assert "Traceback" not in err
    code, _, err = run("search", "--out", str(tmp_path / "cut"), "--resume", "--quiet", "--threads", "1")
    assert code == 0, err
    assert reference.wait(timeout=300) == 0
    for name in ("tree.json", "log.csv", "epochs.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "cut" / name).read_text(), name


def test_resume_takes_only_more_epochs(tmp_path, config_file):
    out = tmp_path / "run"
    assert run("search", "--config", str(config_file), "--out", str(out), "--quiet", "--seed", "1")[0] == 0
    code, _, err = run("search", "--out", str(out), "--resume", "--set", "search.lr_weights=1")
    assert code == 2 and "search.epochs" in err and "lr_weights" in err
    code, _, err = run("search", "--out", str(out), "--resume", "--seed", "4")
    assert code == 2 and "--seed 1" in err
    code, _, err = run("search", "--out", str(out), "--resume", "--quiet", "--set", "search.epochs=4")
    assert code == 0, err
    assert (out / "epochs.csv").read_text().count("\n") == 1 + 4  # header and four epochs


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path, config_file):
    long = tmp_path / "long.toml"
    long.write_text(TINY.replace("epochs = 3", "epochs = 200"))
    first = l2b("search", "--config", str(long), "--out", str(tmp_path / "run"), "--quiet", "--threads", "1")
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "log.csv").exists():
        time.sleep(0.05)
    code, _, err = run("search", "--out", str(tmp_path / "run"), "--resume", "--quiet")
    if code == 2 and "no checkpoint" in err:  # not yet checkpointed: a fresh start is refused the same way
        code, _, err = run("search", "--config", str(long), "--out", str(tmp_path / "run"), "--overwrite", "--quiet")
    first.kill()
    first.wait()
    assert code == 1 and "in use by another l2b process (pid" in err and len(err.strip().splitlines()) == 1, err


def test_a_diverging_loss_stops_with_one_line_naming_the_task_and_keeps_the_last_finite_checkpoint(
    tmp_path, config_file
):
    diverging = tmp_path / "diverging.toml"
    diverging.write_text(TINY.replace("lr_weights = 0.003", "lr_weights = 1e30"))
    code, _, err = run("search", "--config", str(diverging), "--out", str(tmp_path / "run"), "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "the loss of task '" in err and "lower the learning rates" in err
    import torch

    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    if checkpoint.exists():  # a checkpoint written before the divergence holds finite weights only
        state = torch.load(checkpoint, weights_only=True)
        assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["search", "retrain"])
def test_streaming_run_killed_mid_epoch_resumes_byte_for_byte(tmp_path, stage):
    """A CelebA search (and a retrain) on shards, SIGKILLed mid-epoch after a checkpoint, resumed with only the
    folder and --resume: the same tree and logs as an uninterrupted run."""
    pytest.importorskip("webdataset")
    from l2b_fast.datasets.celeba import synthetic as synthetic_celeba

    data = tmp_path / "data"
    synthetic_celeba.generate(data, 40, 32, samples_per_shard=4)
    tiny = ["search.size=32", "retrain.size=32", "model.width=0.125", "model.children=[2, 2, 2, 2, 40]",
            "search.batch_size=4", "retrain.batch_size=4", "search.epochs=4", "search.warmup_epochs=1",
            "retrain.epochs=4", "data.num_workers=0", "data.eval_batch_size=4", "search.log_every=1",
            "retrain.log_every=1", "search.checkpoint_every=1", "retrain.checkpoint_every=1"]  # fmt: skip
    sets = [argument for setting in tiny for argument in ("--set", setting)]
    common = ["--preset", "celeba-deepwide", "--data", str(data), "--threads", "1", "--quiet", *sets]

    def start(out):
        if stage == "search":
            return l2b("search", *common, "--out", str(out))
        return l2b(
            "retrain",
            "--tree",
            str(tmp_path / "searched" / "tree.json"),
            "--out",
            str(out),
            "--threads",
            "1",
            "--quiet",
        )

    if stage == "retrain":
        assert run("search", *common, "--out", str(tmp_path / "searched"))[0] == 0
    reference = start(tmp_path / "whole")
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    killed = start(tmp_path / "killed")
    log = tmp_path / "killed" / "log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        if (
            log.exists()
            and len(log.read_text().splitlines()) > 12
            and (tmp_path / "killed" / "checkpoints" / "last.pt").exists()
        ):
            break
        time.sleep(0.02)
    assert killed.poll() is None, "the run finished before it could be killed: make it longer"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    if stage == "search":
        code, _, err = run("search", "--out", str(tmp_path / "killed"), "--resume", "--quiet")
    else:
        tree = str(tmp_path / "searched" / "tree.json")
        code, _, err = run("retrain", "--tree", tree, "--out", str(tmp_path / "killed"), "--resume", "--quiet")
    assert code == 0, err
    names = ("tree.json", "log.csv", "epochs.csv") if stage == "search" else ("log.csv", "epochs.csv")
    for name in names:
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "killed" / name).read_text(), name


def test_dry_run_prints_the_step_size_and_writes_nothing(tmp_path, capsys):
    from l2b_fast import cli

    out = tmp_path / "run"
    assert (
        cli.main(["search", "--preset", "celeba-vgg", "--out", str(out), "--dry-run", "--set", "model.width=0.25"]) == 0
    )
    printed = capsys.readouterr().out
    assert "celeba_branch_vgg, batch 64, 218x178, fp32" in printed and "estimated peak per GPU" in printed
    assert "fits in 80 GiB" in printed and "FLOP per image" in printed
    assert not out.exists()


@pytest.mark.slow
def test_two_rank_streaming_search_killed_mid_epoch_resumes_byte_for_byte(tmp_path):
    """`torchrun --nproc_per_node=2 l2b search` on shards, the whole process group SIGKILLed mid-epoch after a
    checkpoint, resumed under torchrun with only --out and --resume: the same tree and logs as an uninterrupted
    two-rank run."""
    pytest.importorskip("webdataset")
    from pathlib import Path

    from l2b_fast.datasets.celeba import synthetic as synthetic_celeba

    data = tmp_path / "data"
    synthetic_celeba.generate(data, 40, 32, samples_per_shard=4)
    tiny = ["search.size=32", "model.width=0.125", "model.children=[2, 2, 2, 2, 40]", "search.batch_size=4",
            "search.epochs=4", "search.warmup_epochs=1", "data.num_workers=0", "data.eval_batch_size=4",
            "search.log_every=1", "search.checkpoint_every=1"]  # fmt: skip
    sets = [argument for setting in tiny for argument in ("--set", setting)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
    )

    def torchrun(*args, **kwargs):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "l2b_fast.cli",
        ]
        return subprocess.Popen(
            [*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
        )

    common = ["--preset", "celeba-deepwide", "--data", str(data), "--quiet", *sets]
    reference = torchrun("search", *common, "--out", str(tmp_path / "whole"))
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    killed = torchrun("search", *common, "--out", str(tmp_path / "killed"))
    log = tmp_path / "killed" / "log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        if (
            log.exists()
            and len(log.read_text().splitlines()) > 8
            and (tmp_path / "killed" / "checkpoints" / "last.pt").exists()
        ):
            break
        time.sleep(0.02)
    assert killed.poll() is None, "the run finished before it could be killed: make it longer"
    ranks = _children(killed.pid)  # torchrun starts each rank in a session of its own
    assert len(ranks) == 2
    for pid in [killed.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in ranks):
        time.sleep(0.02)
    resumed = torchrun("search", "--out", str(tmp_path / "killed"), "--resume", "--quiet")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    for name in ("tree.json", "log.csv", "epochs.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "killed" / name).read_text(), name
