"""The trainer on in-memory data (the synthetic recipe): parameter groups, warmup, logs, checkpoints and exact resume
(also after a real kill)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import bent_square_toml
from l2b_fast import config as configs
from l2b_fast import datasets
from l2b_fast.train import TrainConfig, Trainer

TINY = bent_square_toml(
    tasks=2,
    samples=300,
    hidden=16,
    validation=0.2,
    search={
        "epochs": 4,
        "batch_size": 40,
        "warmup_epochs": 1,
        "lr_weights": 3e-3,
        "lr_logits": 0.1,
        "tau": '{ kind = "inverse_sqrt", tau0 = 5.0 }',
        "checkpoint_every": 3,
        "log_every": 2,
    },
    retrain={"epochs": 2, "batch_size": 40},
)


@pytest.fixture
def tiny_config(tmp_path) -> dict:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return configs.load_config(path=path)


RECIPE = datasets.recipe("synthetic")


def make_trainer(config: dict, out: Path, **overrides) -> Trainer:
    source = RECIPE.data(config, None, None, seed=0)
    settings = {**config["search"], **overrides}
    torch.manual_seed(0)
    net = RECIPE.supernet(config, RECIPE.model_spec(config, settings))
    return Trainer(
        net,
        RECIPE.dataset(config),
        source.train(settings, 0, 1),
        configs.train_config(settings, RECIPE, seed=0, progress=False),
        out,
        val_data=source.evaluation("val", settings),
    )


def test_parameter_groups_and_warmup(tiny_config, tmp_path):
    trainer = make_trainer(tiny_config, tmp_path, warmup_epochs=2, epochs=3)
    assert trainer.weight_optimizer.param_groups[0]["lr"] == 3e-3
    assert trainer.logits_optimizer.param_groups[0]["lr"] == 0.1
    trainer.fit(stop_after_steps=2 * trainer.steps_per_epoch)
    for branching in trainer.branchings:
        assert torch.equal(branching.logits.detach(), torch.zeros_like(branching.logits))  # frozen in warmup
    trainer.fit(resume=True)
    assert any(b.logits.detach().abs().sum() > 0 for b in trainer.branchings)
    with open(tmp_path / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {"step", "epoch", "tau", "loss", "loss.bent-0", "p.b1.i0.j1"} <= set(rows[0])
    assert float(rows[0]["tau"]) > float(rows[-1]["tau"])


def test_task_weights(tiny_config, tmp_path):
    trainer = make_trainer(tiny_config, tmp_path, task_weights={"bent-0": 2.0})
    assert trainer.alpha["bent-0"] == 2.0 and trainer.alpha["square-1"] == 1.0
    with pytest.raises(ValueError, match="unknown tasks"):
        make_trainer(tiny_config, tmp_path / "x", task_weights={"nope": 1.0})


def test_resume_is_exact(tiny_config, tmp_path):
    """Stopping mid-epoch at a checkpoint and resuming gives bit-identical weights, logits and logs."""
    whole = make_trainer(tiny_config, tmp_path / "whole")
    whole.fit()
    part = make_trainer(tiny_config, tmp_path / "part")
    part.fit(stop_after_steps=9)  # checkpoint_every = 3, mid-epoch (7 steps per epoch)
    part.fit(stop_after_steps=10)  # rows past the checkpoint are written, then the "kill" loses them
    resumed = make_trainer(tiny_config, tmp_path / "part")
    resumed.fit(resume=True)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for name in ("log.csv", "epochs.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "part" / name).read_text()


def test_resume_refuses_other_config_or_missing_checkpoint(tiny_config, tmp_path):
    make_trainer(tiny_config, tmp_path).fit(stop_after_steps=3)
    with pytest.raises(ValueError, match="another configuration"):
        make_trainer(tiny_config, tmp_path, lr_weights=1.0).fit(resume=True)
    with pytest.raises(FileNotFoundError):
        make_trainer(tiny_config, tmp_path / "empty").fit(resume=True)
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        make_trainer(tiny_config, tmp_path).fit(resume=True)


def test_bad_train_config():
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(epochs=2, warmup_epochs=3)
    with pytest.raises(ValueError, match="lr_weights"):
        TrainConfig(epochs=2, lr_weights=float("nan"))


def l2b(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen(
        [sys.executable, "-m", "l2b_fast.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_killed_search_resumes_to_the_same_tree(tmp_path):
    """SIGKILL a real `l2b search` after a checkpoint, `--resume`, and get the uninterrupted run's result."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.replace("epochs = 4", "epochs = 30").replace("checkpoint_every = 3", "checkpoint_every = 1"))
    common = ["--config", str(config), "--seed", "3", "--threads", "1", "--quiet"]
    reference = l2b("search", *common, "--out", str(tmp_path / "whole"))
    killed = l2b("search", *common, "--out", str(tmp_path / "killed"))
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if (
            checkpoint.exists()
            and checkpoint.stat().st_size > 0
            and len((tmp_path / "killed" / "log.csv").read_text().splitlines()) > 20
        ):
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed: make it longer"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "tree.json").exists()
    again = l2b("search", *common, "--out", str(tmp_path / "killed"))
    assert again.wait(timeout=300) == 2 and "--resume" in again.stderr.read()  # refuses to overwrite
    resumed = l2b("search", *common, "--out", str(tmp_path / "killed"), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    for name in ("tree.json", "log.csv", "epochs.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "killed" / name).read_text(), name
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["model"]
    again = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(whole[k], again[k]) for k in whole)
