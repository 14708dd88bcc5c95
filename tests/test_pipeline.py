"""The streaming pipeline (l2b_fast.pipeline): the CelebA/Taskonomy presets, --set overrides, data checks and
search -> retrain -> evaluate through the API on tiny synthetic shards."""

from __future__ import annotations

import json

import pytest
import torch

from l2b_fast import config as configs
from l2b_fast import datasets, pipeline
from l2b_fast.datasets.celeba import synthetic as synthetic_celeba
from l2b_fast.datasets.recipe import ToInputSize
from l2b_fast.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")

STREAM_PRESETS = ("taskonomy-resnet34", "celeba-vgg", "celeba-deepwide")


@pytest.mark.parametrize("name", STREAM_PRESETS)
def test_presets_hold_the_papers_settings(name):
    config = configs.load_config(preset=name)
    assert (
        pipeline.recipe_of(config).reads_shards
        and config["name"] == name
        and config["description"].startswith("paper Table")
    )
    search, retrain = config["search"], config["retrain"]
    assert search["optimizer"] == "adam" and search["batch_size"] == 64 and search["warmup_epochs"] == 2
    assert search["tau"] == {"kind": "epoch_decay", "tau0": 10.0, "rate": 0.965, "min": 0.1}
    assert search["weight_decay_weights"] == 1e-4 and retrain["weight_decay_weights"] == 1e-4
    if name.startswith("taskonomy"):
        assert (search["size"], retrain["size"]) == (128, 256) and config["model"]["children"] == 5
    else:
        assert search["size"] == retrain["size"] == [218, 178]
    for section in (search, retrain):  # every training setting is one the streaming trainer takes
        assert (
            configs.train_config(section, pipeline.recipe_of(config), seed=0, progress=False).epochs
            == section["epochs"]
        )
    # the preset's model at its search size builds (on the meta device: no memory for the full model)
    with torch.device("meta"):
        spec = pipeline.recipe_of(config).model_spec(config, search)
    assert spec.tasks == pipeline.recipe_of(config).dataset(config).tasks


def test_overrides_parse_toml_values_and_reject_unknown_keys():
    config = configs.load_config(
        preset="celeba-vgg",
        overrides=[
            "search.epochs=3",
            "search.lr_logits=1e-2",
            "model.width=0.5",
            "search.size=[64, 48]",
            "search.tau.tau0=5",
            "data.kind=celeba",
            "search.precision=bf16",
        ],
    )
    assert config["search"]["epochs"] == 3 and config["search"]["lr_logits"] == 0.01 and config["model"]["width"] == 0.5
    assert (
        config["search"]["size"] == [64, 48]
        and config["search"]["tau"]["tau0"] == 5
        and config["search"]["precision"] == "bf16"
    )
    assert configs.apply_overrides({"a": {"b": 1}}, ['a.b={kind = "constant"}'])["a"]["b"] == {"kind": "constant"}
    assert configs.apply_overrides({"a": {"b": 1}}, ["a.b = true"])["a"]["b"] is True
    for bad, message in (
        ("search.epoch=3", "unknown key"),
        ("nope.epochs=3", "nope is not a table"),
        ("search.epochs", "KEY=VALUE"),
        ("=3", "KEY=VALUE"),
        ("search.epochs.x=1", "search.epochs is not a table"),
    ):
        with pytest.raises(ValueError, match=message):
            configs.load_config(preset="celeba-vgg", overrides=[bad])
    with pytest.raises(ValueError, match="data kind 'mnist'"):
        configs.load_config(preset="celeba-vgg", overrides=["data.kind=mnist"])
    with pytest.raises(ValueError, match="family"):
        configs.load_config(preset="celeba-vgg", overrides=["model.family=resnet"])
    with pytest.raises(ValueError, match="batch_size"):
        configs.load_config(preset="taskonomy-resnet34", overrides=["search.batch_size=0"])
    # the synthetic presets take --set too
    assert (
        configs.load_config(preset="synthetic-a", overrides=["search.epochs=2", "search.warmup_epochs=1"])["search"][
            "epochs"
        ]
        == 2
    )
    with pytest.raises(ValueError, match="warmup_epochs"):  # checked when loaded, before a run writes anything
        configs.load_config(preset="synthetic-a", overrides=["search.epochs=2"])


def test_check_data_names_each_problem(tmp_path):
    config = configs.load_config(preset="taskonomy-resnet34")
    with pytest.raises(ValueError, match="no such directory"):
        pipeline.recipe_of(config).check_data(config, tmp_path / "missing", ("train",))
    with pytest.raises(ValueError, match="no manifest"):
        pipeline.recipe_of(config).check_data(config, tmp_path, ("train",))
    synthetic_celeba.generate(tmp_path / "faces", 10, 16, samples_per_shard=5)
    with pytest.raises(ValueError, match="hold 'celeba' data, not 'taskonomy'"):
        pipeline.recipe_of(config).check_data(config, tmp_path / "faces", ("train",))
    celeba = configs.load_config(preset="celeba-vgg")
    assert pipeline.recipe_of(celeba).check_data(celeba, tmp_path / "faces", ("train", "test"))["dataset"] == "celeba"
    with pytest.raises(ValueError, match="'holdout' split is empty or missing"):
        pipeline.recipe_of(celeba).check_data(celeba, tmp_path / "faces", ("holdout",))


TINY_CELEBA = [
    "search.size=32",
    "retrain.size=32",
    "model.width=0.125",
    "search.batch_size=8",
    "retrain.batch_size=8",
    "search.epochs=2",
    "search.warmup_epochs=1",
    "retrain.epochs=1",
    "data.num_workers=0",
    "data.eval_batch_size=3",
    "search.log_every=1",
    "retrain.log_every=1",
]


def test_search_retrain_evaluate_through_the_api(tmp_path):
    config = configs.load_config(preset="celeba-deepwide", overrides=TINY_CELEBA)
    data = synthetic_celeba.generate(tmp_path / "data", 40, 32, samples_per_shard=8) and tmp_path / "data"
    summary = pipeline.search(config, tmp_path / "run", data, progress=False)
    tree = Tree.load(tmp_path / "run" / "tree.json")
    assert (
        tree.tasks == list(datasets.get("celeba").tasks)
        and summary["tree_parameters"] <= summary["supernet_parameters"]
    )
    assert summary["timing"]["images"] == 2 * (32 // 8) * 8 and summary["timing"]["images_per_second"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data"] == str(data)
    with pytest.raises(ValueError, match="holds no retrained tree"):
        pipeline.trained_run(tmp_path / "run")
    retrained = pipeline.retrain(config, tree, tmp_path / "run" / "retrain", data, progress=False)
    assert retrained["parameters"] == summary["tree_parameters"]
    result = pipeline.evaluate(tmp_path / "run", data, split="test")
    written = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert written["split"] == "test" and written["samples"] == 4 == written["manifest_samples"]
    assert written["labelled"] == dict.fromkeys(tree.tasks, 4)  # no labels.json in these shards: all labelled
    assert written["parameters"] == summary["tree_parameters"] and set(written["tasks"]) == set(tree.tasks)
    accuracies = [metrics["accuracy"] for metrics in written["tasks"].values()]
    assert all(value in (0.0, 25.0, 50.0, 75.0, 100.0) for value in accuracies)  # 4 test samples per attribute
    assert written["summary"]["mean_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert "LearnToBranch-Deep-Wide" in result["table"] and "ours (celeba-deepwide, test, 4 samples)" in result["table"]
    with pytest.raises(ValueError, match="do not match"):
        pipeline.retrain(config, Tree(["a"], [[0]]), tmp_path / "other", data, progress=False)


class _Dense(torch.nn.Module):
    """Outputs at half the input's side (an output stride of 2), a vector task, and records its options."""

    tasks = ("dense", "vector")

    def forward(self, inputs, generator=None, *, seed=None):
        self.options = {"generator": generator, "seed": seed}
        return {"dense": inputs[:, :, ::2, ::2] * 2, "vector": inputs.mean(dim=(2, 3))}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("side", [6, 7, 9])
def test_dense_predictions_are_resized_to_the_input(side, dtype):
    inner = _Dense()
    net = ToInputSize(inner)
    inputs = torch.randn(2, 3, side, side + 1, dtype=dtype)
    seed = torch.tensor([5])
    outputs = net(inputs, seed=seed)
    assert inner.options["seed"] is seed and inner.options["generator"] is None and net.tasks == inner.tasks
    reference = torch.nn.functional.interpolate(
        inputs[:, :, ::2, ::2] * 2, size=(side, side + 1), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(outputs["dense"], reference)
    torch.testing.assert_close(outputs["vector"], inputs.mean(dim=(2, 3)))
    same_size = {"dense": inputs}
    inner.forward = lambda x, **options: same_size
    assert net(inputs)["dense"] is inputs  # already at the input's size: untouched


def test_evaluation_data_needs_only_the_evaluated_split(tmp_path):
    """A shard set holding only a test split serves an evaluation; a search on it is refused (no train split)."""
    config = configs.load_config(preset="celeba-vgg")
    recipe = pipeline.recipe_of(config)
    synthetic_celeba.generate(tmp_path / "test-only", 4, 16, splits=(("test", 1.0),))
    source = recipe.data(config, tmp_path / "test-only", None, 0, splits=("test",))
    assert source.evaluation("test", {"size": 16}) is not None
    with pytest.raises(ValueError, match="'train' split is empty or missing"):
        recipe.data(config, tmp_path / "test-only", None, 0)
    assert datasets.names() == ["celeba", "taskonomy"] and datasets.get("celeba").tasks == recipe.dataset(config).tasks
    with pytest.raises(ValueError, match="options: "):
        datasets.get("taskonomy", colour=True)
