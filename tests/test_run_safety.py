"""Run folders are safe to open: a checkpoint is read as tensors and plain data only, so a crafted ``.pt``
cannot run code, through the library or through ``l2b eval``; its RNG states survive the restricted loader."""

from __future__ import annotations

import json
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from l2b_fast import cli  # noqa: E402
from l2b_fast.data.loader import SkippedDataWarning  # noqa: E402
from l2b_fast.datasets.celeba import synthetic as synthetic_celeba  # noqa: E402
from l2b_fast.train.checkpoints import atomic_save, read_checkpoint, rng_state, set_rng_state  # noqa: E402
from test_cli_pipeline import _sets  # noqa: E402


class WritesMarker:
    """Unpickling this object calls ``open(marker, "w")``: the file appears only if the loader ran the payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted_checkpoints(folder: Path, marker: Path) -> list[Path]:
    """The payload in torch's zip format (beside real weights) and as a bare pickle stream."""
    folder.mkdir(parents=True, exist_ok=True)
    zipped, bare = folder / "zipped.pt", folder / "bare.pt"
    torch.save({"model": {"weight": torch.zeros(2)}, "extra": WritesMarker(marker)}, zipped)
    bare.write_bytes(pickle.dumps({"model": WritesMarker(marker)}, protocol=2))  # torch.save's own protocol
    return [zipped, bare]


def test_the_crafted_checkpoints_do_run_code_when_fully_unpickled(tmp_path):
    # the control: without the restriction each file writes the marker, so the refusals below are real
    marker = tmp_path / "marker"
    for path in _crafted_checkpoints(tmp_path / "runs", marker):
        try:
            torch.load(path, weights_only=False)
        except RuntimeError:  # the bare stream lacks torch's magic number, read after the payload ran
            pass
        assert marker.is_file(), path
        marker.unlink()


def test_read_checkpoint_refuses_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "marker"
    for path in _crafted_checkpoints(tmp_path / "runs", marker):
        with pytest.raises(ValueError) as refused:
            read_checkpoint(path, "cpu")
        message = str(refused.value)
        assert len(message.splitlines()) == 1 and str(path) in message, message
        assert "holds objects other than tensors and plain data" in message
        assert not marker.exists()


def test_read_checkpoint_names_a_truncated_file_in_one_line(tmp_path):
    path = atomic_save({"model": {"weight": torch.arange(1000.0)}}, tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read checkpoint") as refused:
        read_checkpoint(path, "cpu")
    assert len(str(refused.value).splitlines()) == 1


def test_rng_states_round_trip_through_a_checkpoint_file(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0.0, 1.0)  # and in python's
    saved = rng_state(torch.device("cpu"))
    expected = (torch.rand(4), random.random(), random.gauss(0.0, 1.0), np.random.standard_normal(3), np.random.rand())
    atomic_save({"rng": saved}, tmp_path / "rng.pt")
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    set_rng_state(read_checkpoint(tmp_path / "rng.pt", "cpu")["rng"], torch.device("cpu"))
    again = (torch.rand(4), random.random(), random.gauss(0.0, 1.0), np.random.standard_normal(3), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:3] == again[1:3]
    assert np.array_equal(expected[3], again[3]) and expected[4] == again[4]


@pytest.fixture(scope="module")
def retrained_run(tmp_path_factory) -> Path:
    """A tiny CelebA search and retrain (its own synthetic shards), made once for the tests below."""
    preset, run = "celeba-vgg", tmp_path_factory.mktemp("runs") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: see the one_thread fixture
    try:
        assert cli.main(["search", "--preset", preset, "--out", str(run), "--quiet", *_sets(preset)]) == 0
        assert cli.main(["retrain", "--tree", str(run / "tree.json"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.mark.usefixtures("one_thread")
def test_l2b_eval_refuses_a_crafted_checkpoint_in_the_run_folder(retrained_run, tmp_path, capsys):
    checkpoint, marker = retrained_run / "retrain" / "checkpoints" / "last.pt", tmp_path / "marker"
    state = torch.load(checkpoint, weights_only=True)
    try:
        torch.save({**state, "extra": WritesMarker(marker)}, checkpoint)  # the real weights plus the payload
        assert cli.main(["eval", str(retrained_run), "--split", "test"]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1, error
        assert str(checkpoint) in error and "holds objects other than tensors and plain data" in error, error
        assert not marker.exists() and not (retrained_run / "eval.json").exists()
    finally:
        torch.save(state, checkpoint)  # the untouched run for the next test


@pytest.mark.usefixtures("one_thread")
def test_l2b_eval_counts_the_samples_of_a_truncated_shard_as_missing(retrained_run, tmp_path, capsys):
    data = tmp_path / "faces"
    synthetic_celeba.generate(data, 60, 32, samples_per_shard=3)  # test split: 6 samples in 2 shards
    manifest = json.loads((data / "manifest.json").read_text())["splits"]["test"]
    assert manifest["samples"] == [3, 3]
    shard = data / manifest["shards"][1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # keeps about its first sample
    with pytest.warns(SkippedDataWarning):
        assert cli.main(["eval", str(retrained_run), "--split", "test", "--data", str(data)]) == 0
    result = json.loads((retrained_run / "eval.json").read_text())
    samples, skipped = result["samples"], result["skipped_samples"]
    assert 3 <= samples < 6 and result["manifest_samples"] == 6 and result["missing_samples"] == 6 - samples
    never_read = 6 - samples - skipped
    out = capsys.readouterr().out
    expected = f"warning: evaluated {samples} of the 6 samples the manifest lists: {6 - samples} missing ("
    assert expected in out, out
    line = next(line for line in out.splitlines() if line.startswith("warning: evaluated"))
    assert (f"{skipped} corrupt sample(s) skipped" in line) == (skipped > 0), line
    assert (f"{never_read} never read" in line) == (never_read > 0), line
