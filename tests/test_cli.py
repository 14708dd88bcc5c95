"""The `l2b` command line: --help everywhere, clear errors, search -> show -> retrain end to end."""

from __future__ import annotations

import json

import pytest
import torch

import l2b_fast
from conftest import bent_square_toml
from l2b_fast import cli
from l2b_fast import config as configs

TINY = bent_square_toml(
    tasks=2,
    samples=200,
    hidden=8,
    validation=0.2,
    search={
        "epochs": 2,
        "batch_size": 50,
        "warmup_epochs": 1,
        "lr_logits": 0.1,
        "tau": '{ kind = "inverse_sqrt", tau0 = 5.0 }',
        "log_every": 1,
    },
    retrain={"epochs": 2, "batch_size": 50},
)


@pytest.mark.parametrize("command", [[], ["search"], ["retrain"], ["show"], ["presets"], ["export"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: l2b" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"l2b_fast {l2b_fast.__version__} (torch ")


def test_presets(capsys):
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == configs.preset_names()
    for line, (name, description) in zip(lines, configs.preset_descriptions().items()):
        assert description and line.endswith(description), line  # each preset says what it is
    assert cli.main(["presets", "--print", "synthetic-b"]) == 0
    assert 'name = "synthetic-b"' in capsys.readouterr().out
    assert cli.main(["presets", "--print", "nope"]) == 2


def test_bad_arguments_and_files(tmp_path, capsys):
    assert cli.main(["search", "--preset", "synthetic-z", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli.main(["search", "--out", str(tmp_path / "z")]) == 2  # a source is required unless resuming
    assert "give --preset or --config" in capsys.readouterr().err and not (tmp_path / "z").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nkind=")
    assert cli.main(["search", "--config", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "invalid TOML" in capsys.readouterr().err
    assert cli.main(["show", str(tmp_path / "missing.json")]) == 2
    assert "no tree file" in capsys.readouterr().err
    broken = tmp_path / "tree.json"
    broken.write_text(json.dumps({"tasks": ["a"], "layers": [{"parents": [3]}]}))
    assert cli.main(["show", str(broken)]) == 2
    assert "layer 0" in capsys.readouterr().err
    assert cli.main(["retrain", "--tree", str(tmp_path / "nothing" / "tree.json")]) == 2


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "no-such-device"])
def test_unavailable_device_is_one_line_and_leaves_no_folder(tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 3:
        pytest.skip("this machine has the CUDA device")
    out = tmp_path / "run"
    assert cli.main(["search", "--preset", "synthetic-a", "--out", str(out), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--device {device!r}" in err and "Traceback" not in err
    assert not out.exists()


def test_search_show_retrain(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "run"
    assert cli.main(["search", "--config", str(config), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "bent-0" in printed and "derived tree" in printed
    assert "tasks learned" in printed or "NOT every task learned" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (
        set(summary["task_losses"]) == {"bent-0", "bent-1", "square-0", "square-1"}
        and summary["task_losses_split"] == "validation"
    )
    assert summary["learned_threshold"] == 0.5 and isinstance(summary["all_tasks_learned"], bool)
    assert summary["tasks_not_learned"] == [t for t, v in summary["task_losses"].items() if v >= 0.5]
    assert summary["numerics"]["dtype"] == "float32" and summary["numerics"]["cpu_capability"]
    for name in (
        "tree.json",
        "tree.png",
        "tree.svg",
        "probabilities.png",
        "probabilities.svg",
        "log.csv",
        "epochs.csv",
        "summary.json",
        "config.json",
    ):
        assert (out / name).is_file(), name
    tree = json.loads((out / "tree.json").read_text())
    assert tree["tasks"] == ["bent-0", "bent-1", "square-0", "square-1"] and len(tree["layers"]) == 3
    assert cli.main(["search", "--config", str(config), "--out", str(out), "--quiet"]) == 2  # would clobber
    assert "--resume" in capsys.readouterr().err

    assert cli.main(["show", str(out / "tree.json"), "--out", str(tmp_path / "picture")]) == 0
    assert "square-1" in capsys.readouterr().out
    assert (tmp_path / "picture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["retrain", "--tree", str(out / "tree.json")]) == 0
    captured = capsys.readouterr()
    assert "retrained tree" in captured.out
    assert "step " in captured.err and "tau" not in captured.err  # no temperature without branching
    for name in ("learned_tree", "all_shared", "independent"):
        assert name in captured.out  # the table: the tree beside both baselines
    summary = json.loads((out / "retrain" / "retrain_summary.json").read_text())
    assert summary["parameters"] > 0 and "val_loss" in summary["final"]
    models = summary["models"]
    assert list(models) == ["learned_tree", "all_shared", "independent"]
    assert [len(layer["parents"]) for layer in models["all_shared"]["tree"]["layers"]] == [1, 1, 4]
    assert [len(layer["parents"]) for layer in models["independent"]["tree"]["layers"]] == [4, 4, 4]
    assert (
        models["all_shared"]["parameters"]
        <= models["learned_tree"]["parameters"]
        <= models["independent"]["parameters"]
    )
    assert all(set(m["task_losses"]) == set(summary["models"]["learned_tree"]["task_losses"]) for m in models.values())
    assert (out / "retrain" / "baselines" / "independent" / "epochs.csv").is_file()
    assert (
        cli.main(
            ["retrain", "--tree", str(out / "tree.json"), "--out", str(tmp_path / "alone"), "--no-baselines", "--quiet"]
        )
        == 0
    )
    assert list(json.loads((tmp_path / "alone" / "retrain_summary.json").read_text())["models"]) == ["learned_tree"]
    assert (
        cli.main(["retrain", "--tree", str(out / "tree.json"), "--device", "cuda:7", "--quiet"]) == 2
        or torch.cuda.device_count() > 7
    )


def test_data_commands(tmp_path, capsys):
    pytest.importorskip("webdataset")
    out = tmp_path / "syn"
    assert (
        cli.main(
            ["data", "synthetic-taskonomy", "--out", str(out), "--n", "12", "--size", "32", "--samples-per-shard", "8"]
        )
        == 0
    )
    assert "train: " in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(entry["total"] for entry in manifest["splits"].values()) == 12
    assert cli.main(["data", "synthetic-celeba", "--out", str(tmp_path / "celeba"), "--n", "6"]) == 0
    assert cli.main(["data", "taskonomy", "--root", str(tmp_path / "no-raw"), "--out", str(tmp_path / "x")]) == 2
    assert "no raw Taskonomy directory" in capsys.readouterr().err
    assert cli.main(["data", "synthetic-taskonomy", "--out", str(out), "--n", "0"]) == 2
