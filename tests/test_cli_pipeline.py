"""`l2b search/retrain/eval` with the CelebA and Taskonomy presets: end to end on tiny synthetic shards the
command makes itself, and one clear line with exit 2 (and no run folder) for each kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2b_fast import cli
from l2b_fast.datasets.celeba import synthetic as synthetic_celeba

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny everything: a few synthetic samples, 32-pixel images, narrow models, one or two short epochs.
COMMON = [
    "search.size=32",
    "retrain.size=32",
    "search.epochs=2",
    "search.warmup_epochs=1",
    "retrain.epochs=1",
    "data.num_workers=0",
    "data.eval_batch_size=2",
    "synthetic.size=32",
    "search.log_every=1",
    "retrain.log_every=1",
]
TINY = {
    "taskonomy-resnet34": COMMON
    + [
        "synthetic.samples=20",
        "model.width=0.0625",
        "model.aspp_channels=8",
        "model.children=2",
        "model.branching=stage",
        "search.batch_size=4",
        "retrain.batch_size=4",
        "retrain.size=36",
    ],  # 36 is no multiple of the output stride 8: predictions are resized
    "celeba-vgg": COMMON
    + [
        "synthetic.samples=20",
        "model.width=0.125",
        "model.children=[2, 2, 2, 2, 2, 2, 2, 40]",
        "search.batch_size=8",
        "retrain.batch_size=8",
    ],
}


def _sets(preset: str) -> list[str]:
    return [argument for setting in TINY[preset] for argument in ("--set", setting)]


@pytest.mark.parametrize("preset", list(TINY))
def test_search_retrain_eval_end_to_end(preset, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["search", "--preset", preset, "--out", str(run), "--quiet", *_sets(preset)]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and f"wrote {run}/tree.json" in out
    for name in (
        "tree.json",
        "tree.png",
        "probabilities.png",
        "log.csv",
        "epochs.csv",
        "summary.json",
        "config.json",
        "checkpoints/last.pt",
        "synthetic-data/manifest.json",
    ):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["search"]["size"] == 32  # the overrides are what ran
    assert cli.main(["retrain", "--tree", str(run / "tree.json"), "--quiet"]) == 0  # data: the search's
    assert "retrained tree" in capsys.readouterr().out
    assert (run / "retrain" / "retrain_summary.json").is_file()
    assert cli.main(["eval", str(run), "--split", "test"]) == 0
    table = capsys.readouterr().out
    assert "LearnToBranch" in table and f"ours ({preset}, test, 2 samples)" in table and "params (M)" in table
    result = json.loads((run / "eval.json").read_text())
    assert result["split"] == "test" and result["samples"] == 2 == result["manifest_samples"]
    assert result["parameters"] == json.loads((run / "retrain" / "retrain_summary.json").read_text())["parameters"]
    assert all(isinstance(value, float) for metrics in result["tasks"].values() for value in metrics.values())
    # a second search into the same folder must not clobber it
    assert cli.main(["search", "--preset", preset, "--out", str(run), "--quiet", *_sets(preset)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def _fails_cleanly(arguments: list[str], message: str, capsys, run) -> None:
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    assert not run.exists()  # nothing half-written


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    search = ["search", "--preset", "taskonomy-resnet34", "--out", str(run), "--quiet"]
    _fails_cleanly(search + ["--data", str(tmp_path / "missing")], "no such directory", capsys, run)
    (tmp_path / "empty").mkdir()
    _fails_cleanly(search + ["--data", str(tmp_path / "empty")], "no manifest", capsys, run)
    synthetic_celeba.generate(tmp_path / "faces", 10, 16, samples_per_shard=5)
    _fails_cleanly(
        search + ["--data", str(tmp_path / "faces")], "the shards hold 'celeba' data, not 'taskonomy'", capsys, run
    )
    _fails_cleanly(search + ["--set", "search.epochz=3"], "--set search.epochz: unknown key", capsys, run)
    _fails_cleanly(search + ["--set", "search.epochs"], "expected KEY=VALUE", capsys, run)
    if not torch.cuda.is_available():
        _fails_cleanly(search + ["--device", "cuda"], "--device 'cuda' is not available", capsys, run)
    _fails_cleanly(
        ["search", "--preset", "synthetic-a", "--out", str(run), "--data", str(tmp_path / "faces")],
        "--data is for shard data",
        capsys,
        run,
    )
    _fails_cleanly(["eval", str(run)], "holds no retrained tree", capsys, run)


def test_torchrun_two_ranks_search(tmp_path):
    """`torchrun ... l2b search`: two gloo ranks train one supernet; rank 0 alone makes the data and writes."""
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "l2b_fast.cli",
        "search",
        "--preset",
        "celeba-vgg",
        "--out",
        str(run),
        "--quiet",
        *_sets("celeba-vgg"),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["environment"]["world_size"] == 2
    assert finished.stdout.count("wrote ") == 1  # one rank prints
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and sum(row.startswith("step,") for row in rows) == 1  # one writer
    assert len(rows) - 1 == summary["timing"]["images"] // 8  # a row per step; batch 8 over both ranks
