"""`l2b export` / :func:`l2b_fast.export.export_run`: the retrained tree as a torch.export program (.pt2) or ONNX
model with a dynamic batch size, equal to the eager model for every model family; bad requests are one line, exit 2,
and write nothing."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from l2b_fast import cli, pipeline
from l2b_fast import config as configs
from l2b_fast.export import METADATA_NAME, export_run, read_metadata
from l2b_fast.train.checkpoints import atomic_save
from l2b_fast.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")

# Every model family at a tiny width, at its [retrain] size (what an exported model takes).
FAMILIES = {
    "synthetic_fc": ("synthetic-a", ["model.hidden=16", "model.fc_blocks=2", "model.nodes=2"]),
    "celeba_branch_vgg": (
        "celeba-vgg",
        ["retrain.size=32", "model.width=0.125", "model.children=[2, 2, 2, 2, 2, 2, 2, 40]"],
    ),
    "celeba_deep_wide": (
        "celeba-deepwide",
        ["retrain.size=32", "model.width=0.125", "model.children=[2, 2, 2, 2, 40]"],
    ),
    "taskonomy_resnet34": (
        "taskonomy-resnet34",
        # 36 is no multiple of the output stride 8: the exported model resizes the predictions too
        ["retrain.size=36", "model.width=0.0625", "model.aspp_channels=8", "model.children=2", "model.branching=stage"],
    ),
}


def _two_branch_tree(tasks: list[str], layers: int) -> Tree:
    """A trunk of one node, then two branches to the task layer: tasks alternate between them."""
    return Tree(list(tasks), [[0]] + [[0, 0]] + [[0, 1]] * (layers - 3) + [[k % 2 for k in range(len(tasks))]])


def make_retrained_run(folder, preset: str, overrides: list[str], seed: int = 0) -> pipeline.TrainedModel:
    """A retrain folder as `l2b retrain` writes it (tree.json, config.json, checkpoints/last.pt,
    retrain_summary.json), with a branching tree and random weights and batch-norm statistics (so eval mode
    matters); returns the model as :func:`pipeline.load_trained` rebuilds it."""
    config = configs.load_config(preset=preset, overrides=overrides)
    recipe = pipeline.recipe_of(config)
    spec = recipe.model_spec(config, config.get("retrain") or config["search"])
    tree = _two_branch_tree(list(recipe.dataset(config).tasks), len(spec.blocks))
    torch.manual_seed(seed)
    net = recipe.wrap(recipe.treenet(config, spec, tree))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    folder.mkdir(parents=True)
    tree.save(folder / "tree.json")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "retrain_summary.json").write_text(json.dumps({"seed": seed}))
    atomic_save({"model": net.state_dict()}, folder / "checkpoints" / "last.pt")
    return pipeline.load_trained(folder)


def _inputs(trained: pipeline.TrainedModel, batch: int) -> torch.Tensor:
    dtype = next(trained.net.parameters()).dtype
    return trained.spec.example_input(batch, generator=torch.Generator().manual_seed(batch), dtype=dtype)


def _assert_close(outputs: dict, expected: dict, tolerance: float) -> None:
    assert list(outputs) == list(expected)
    for task, value in expected.items():
        assert outputs[task].shape == value.shape, task
        torch.testing.assert_close(outputs[task], value, atol=tolerance, rtol=0, msg=task)


def _operator_count(program: torch.export.ExportedProgram, name: str) -> int:
    return sum(1 for node in program.graph.nodes if node.op == "call_function" and name in str(node.target))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pt2_equals_the_eager_model_at_two_batch_sizes(family, tmp_path):
    preset, overrides = FAMILIES[family]
    trained = make_retrained_run(tmp_path / "run", preset, overrides)
    out = tmp_path / "tree.pt2"
    result = export_run(tmp_path / "run", out)
    assert result["files"] == [str(out)] and result["format"] == "pt2" and result["opset"] is None
    assert result["tasks"] == list(trained.net.tasks)
    assert result["input_shape"] == ["batch", *trained.spec.input_shape]
    program = torch.export.load(out)
    exported = program.module()
    for batch in (1, 5):  # neither is the traced batch: the batch size is dynamic
        images = _inputs(trained, batch)
        with torch.no_grad():
            _assert_close(exported(images), trained.net(images), 0.0 if family == "synthetic_fc" else 1e-6)
    # each node of the tree runs once: as many convolutions (linears) in the program as in the TreeNet
    layer_type, operator = (nn.Linear, "linear") if family == "synthetic_fc" else (nn.Conv2d, "conv2d")
    assert _operator_count(program, operator) == sum(isinstance(m, layer_type) for m in trained.net.modules())
    metadata = read_metadata(out)
    assert metadata["tasks"] == result["tasks"] and metadata["tree"] == trained.tree.to_dict()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_equals_the_eager_model_at_two_batch_sizes(family, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    preset, overrides = FAMILIES[family]
    trained = make_retrained_run(tmp_path / "run", preset, overrides)
    out = tmp_path / "tree.onnx"
    result = export_run(tmp_path / "run", out, format="onnx")
    assert result["files"] == [str(out)] and result["opset"] == 18  # small models: one file, weights inside
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(trained.net.tasks)
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (1, 5):
        images = _inputs(trained, batch)
        with torch.no_grad():
            expected = trained.net(images)
        outputs = dict(zip(expected, (torch.from_numpy(a) for a in session.run(None, {"images": images.numpy()}))))
        _assert_close(outputs, expected, 1e-4)
    assert read_metadata(out)["input_shape"] == ["batch", *trained.spec.input_shape]


def test_onnx_opset_is_written_as_asked(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    make_retrained_run(tmp_path / "run", *FAMILIES["synthetic_fc"])
    export_run(tmp_path / "run", tmp_path / "tree.onnx", format="onnx", opset=20)
    model = onnx.load(tmp_path / "tree.onnx")
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 20
    assert any(entry.key == METADATA_NAME for entry in model.metadata_props)


def _synthetic_run_arguments() -> list[str]:
    settings = [
        'data.groups=[{activation = "bent", tasks = 2}, {activation = "sinc", tasks = 2}]',
        "data.samples=200",
        "model.hidden=16",
        "model.fc_blocks=2",
        "model.nodes=2",
        "search.epochs=2",
        "search.warmup_epochs=1",
        "search.batch_size=50",
        "retrain.epochs=1",
        "retrain.batch_size=50",
    ]
    return [argument for setting in settings for argument in ("--set", setting)]


def test_cli_exports_a_run_the_pipeline_made(tmp_path, capsys):
    """search -> retrain --no-baselines -> export, through `l2b`; the program loads and equals the eager model."""
    run = tmp_path / "run"
    assert (
        cli.main(["search", "--preset", "synthetic-a", "--out", str(run), "--quiet", *_synthetic_run_arguments()]) == 0
    )
    assert cli.main(["retrain", "--tree", str(run / "tree.json"), "--quiet", "--no-baselines"]) == 0
    capsys.readouterr()
    out = tmp_path / "deploy" / "tree.pt2"  # a missing folder is made
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "synthetic-a: 4 tasks, input batch x 200 (float64)" in printed and f"wrote {out}" in printed
    trained = pipeline.load_trained(run)
    images = _inputs(trained, 3)
    with torch.no_grad():
        _assert_close(torch.export.load(out).module()(images), trained.net(images), 0.0)
    # a second export to the same file needs --overwrite
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    assert "already exists: use --overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--out", str(out), "--overwrite"]) == 0


def _refused(arguments: list[str], message: str, capsys, tmp_path) -> None:
    before = sorted(path.name for path in tmp_path.iterdir())
    assert cli.main(["export", *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # nothing written


def test_bad_requests_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    make_retrained_run(run, *FAMILIES["synthetic_fc"])
    _refused([str(tmp_path), "--out", str(tmp_path / "t.pt2")], "holds no retrained tree", capsys, tmp_path)
    _refused([str(run), "--out", str(tmp_path / "t.onnx")], "a pt2 export is written to a .pt2 file", capsys, tmp_path)
    _refused([str(run), "--out", str(tmp_path / "t.pt2"), "--format", "onnx"], "to a .onnx file", capsys, tmp_path)
    _refused(
        [str(run), "--out", str(tmp_path / "t.pt2"), "--opset", "18"], "--opset is for --format onnx", capsys, tmp_path
    )
    _refused(
        [str(run), "--out", str(tmp_path / "t.onnx"), "--format", "onnx", "--opset", "9"],
        "opsets 18 to",
        capsys,
        tmp_path,
    )
    _refused([str(run), "--out", str(tmp_path)], "a .pt2 file", capsys, tmp_path)
    (tmp_path / "taken.pt2").write_text("keep me")
    _refused([str(run), "--out", str(tmp_path / "taken.pt2")], "already exists", capsys, tmp_path)
    assert (tmp_path / "taken.pt2").read_text() == "keep me"
    # weights that do not fit the tree (another width): one line, nothing written
    config = json.loads((run / "config.json").read_text())
    config["model"]["hidden"] = 8
    (run / "config.json").write_text(json.dumps(config))
    _refused([str(run), "--out", str(tmp_path / "t.pt2")], "does not fit the tree and model", capsys, tmp_path)


def test_onnx_without_its_packages_names_the_install_command(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    make_retrained_run(run, *FAMILIES["synthetic_fc"])
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: importing it raises ImportError
    _refused(
        [str(run), "--out", str(tmp_path / "t.onnx"), "--format", "onnx"],
        "pip install 'l2b_fast[export]'",
        capsys,
        tmp_path,
    )
