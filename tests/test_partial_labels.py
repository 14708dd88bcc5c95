"""Partial labels end to end: shards (labels.json), loader masks, losses, gradients, metrics, generators, eval.json."""

from __future__ import annotations

import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("webdataset")

from l2b_fast import cli, datasets, pipeline  # noqa: E402
from l2b_fast import config as configs  # noqa: E402
from l2b_fast.data import shards  # noqa: E402
from l2b_fast.data.images import CorruptSampleError  # noqa: E402
from l2b_fast.data.labels import check_label_fraction, count_labels, sample_labels  # noqa: E402
from l2b_fast.data.loader import SkipCounter  # noqa: E402
from l2b_fast.datasets.celeba import synthetic as synthetic_celeba  # noqa: E402
from l2b_fast.datasets.celeba.dataset import ATTRIBUTES  # noqa: E402
from l2b_fast.datasets.celeba.loaders import celeba_label_mask, celeba_loader  # noqa: E402
from l2b_fast.datasets.taskonomy import synthetic as synthetic_taskonomy  # noqa: E402
from l2b_fast.datasets.taskonomy.loaders import taskonomy_eval_loader, taskonomy_train_loader  # noqa: E402
from l2b_fast.datasets.taskonomy.protocol import TASKS, TaskonomyProtocol  # noqa: E402
from l2b_fast.tree import Tree  # noqa: E402


def tar_members(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


# ------------------------------------------------------------------------------------------------ losses
def test_celeba_loss_of_a_batch_without_labels_is_zero_with_a_zero_gradient():
    celeba = datasets.get("celeba", attributes=("Smiling", "Male"))
    logits = torch.randn(5, 1, requires_grad=True)
    target = torch.tensor([float("nan"), float("inf"), 1.0, 0.0, 7.0])  # garbage where unlabelled
    loss = celeba.loss("Smiling", logits, target, torch.zeros(5, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_celeba_loss_averages_over_the_labelled_examples_only():
    celeba = datasets.get("celeba", attributes=("Smiling",))
    logits = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 0.0, float("nan"), 1.0, 0.0, float("nan")], dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, False, False])
    loss = celeba.loss("Smiling", logits, target, mask)
    expected = F.binary_cross_entropy_with_logits(logits[mask, 0].detach(), target[mask])
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert torch.equal(logits.grad[~mask], torch.zeros(3, 1, dtype=torch.float64))
    assert bool((logits.grad[mask] != 0).all())
    full = celeba.loss("Smiling", logits, torch.tensor([1.0, 0, 1, 1, 0, 0], dtype=torch.float64))
    same = celeba.loss("Smiling", logits, torch.tensor([1.0, 0, 1, 1, 0, 0], dtype=torch.float64), mask | True)
    torch.testing.assert_close(full, same)  # an all-True mask is the unmasked loss
    with pytest.raises(ValueError, match="label mask must be bool"):
        celeba.loss("Smiling", logits, target, mask.float())


def test_taskonomy_losses_of_a_batch_without_labels_are_zero_with_zero_gradients():
    taskonomy = datasets.get("taskonomy")
    b, size = 2, 8
    targets = {
        "segment_semantic": torch.full((b, size, size), 255, dtype=torch.int64),  # what the loader gives
        "normal": torch.randn(b, 3, size, size),
        "depth_zbuffer": torch.randn(b, 1, size, size),
        "keypoints2d": torch.randn(b, 1, size, size),
        "edge_texture": torch.randn(b, 1, size, size),
    }
    channels = {"segment_semantic": 17, "normal": 3, "depth_zbuffer": 1, "keypoints2d": 1, "edge_texture": 1}
    outputs = {task: torch.randn(b, c, size, size, requires_grad=True) for task, c in channels.items()}
    masks = {task: torch.zeros(b, size, size, dtype=torch.bool) for task in TASKS}
    losses = taskonomy.losses(outputs, targets, masks)
    sum(losses.values()).backward()
    for task in TASKS:
        assert torch.isfinite(losses[task]) and float(losses[task].detach()) == 0.0, task
        assert torch.equal(outputs[task].grad, torch.zeros_like(outputs[task])), task


# ------------------------------------------------------------------------------------------------ metrics
def test_celeba_metrics_count_only_labelled_examples():
    celeba = datasets.get("celeba", attributes=("Male", "Smiling", "Young"))
    logits = torch.tensor([[3.0, -3.0, 3.0], [3.0, 3.0, 3.0], [-3.0, 3.0, 3.0], [3.0, 3.0, -3.0]])
    table = torch.zeros(4, 40)
    table[:, ATTRIBUTES.index("Male")] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # right, wrong, right, right
    table[:, ATTRIBUTES.index("Smiling")] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # right, right, wrong, right
    labelled = torch.zeros(4, 40, dtype=torch.bool)
    labelled[:, ATTRIBUTES.index("Male")] = torch.tensor([True, False, True, True])  # the wrong one unlabelled
    labelled[:, ATTRIBUTES.index("Smiling")] = torch.tensor([True, True, True, False])
    targets, masks = celeba.task_targets({"attributes": table}, {"attributes": labelled})
    outputs = {name: logits[:, i] for i, name in enumerate(celeba.attributes)}
    metrics = celeba.metrics()
    metrics.update(outputs, targets, masks)
    values = metrics.compute()
    assert values["Male"]["accuracy"] == 100.0 and values["Smiling"]["accuracy"] == pytest.approx(200 / 3)
    assert math.isnan(values["Young"]["accuracy"])  # no example labelled with it
    assert metrics.labelled() == {"Male": 3, "Smiling": 3, "Young": 0} and metrics.samples == 4
    assert metrics.summary()["mean_accuracy"] == pytest.approx((100.0 + 200 / 3) / 2)  # Young left out
    unmasked = celeba.metrics()
    unmasked.update(outputs, *celeba.task_targets({"attributes": table}))
    assert unmasked.labelled() == {"Male": 4, "Smiling": 4, "Young": 4}
    assert unmasked.compute()["Male"]["accuracy"] == 75.0


def test_taskonomy_metrics_leave_out_unlabelled_examples():
    taskonomy = datasets.get("taskonomy", tasks=("segment_semantic", "depth_zbuffer"))
    torch.manual_seed(0)
    size = 6
    seg = torch.randint(1, 17, (2, size, size))
    seg[1] = 255  # the second example has no segmentation label
    targets = {"segment_semantic": seg, "depth_zbuffer": torch.rand(2, 1, size, size)}
    outputs = {"segment_semantic": torch.randn(2, 17, size, size), "depth_zbuffer": torch.rand(2, 1, size, size)}
    masks = {"depth_zbuffer": torch.ones(2, size, size, dtype=torch.bool)}
    masks["depth_zbuffer"][0] = False  # the first has no depth label
    both = taskonomy.metrics()
    both.update(outputs, targets, masks)
    assert both.labelled() == {"segment_semantic": 1, "depth_zbuffer": 1} and both.samples == 2
    first = taskonomy.metrics()
    first.update({k: v[:1] for k, v in outputs.items()}, {k: v[:1] for k, v in targets.items()})
    second = taskonomy.metrics()
    second.update({k: v[1:] for k, v in outputs.items()}, {k: v[1:] for k, v in targets.items()})
    assert both.compute()["segment_semantic"] == first.compute()["segment_semantic"]
    assert both.compute()["depth_zbuffer"] == second.compute()["depth_zbuffer"]


# ------------------------------------------------------------------------------------------------ loaders
def test_celeba_label_mask_reads_labels_json():
    assert bool(celeba_label_mask(None).all())
    mask = celeba_label_mask(json.dumps(["Young", "Male"]).encode())
    assert mask.tolist() == [name in ("Young", "Male") for name in ATTRIBUTES]
    for bad, message in ((b"[1, 2]", "list of attribute names"), (b'["Hat"]', "unknown"), (b"{", "not JSON")):
        with pytest.raises(CorruptSampleError, match=message):
            celeba_label_mask(bad)


def test_celeba_loader_masks_follow_the_shards_labels(tmp_path):
    synthetic_celeba.generate(tmp_path, 30, 16, samples_per_shard=8, label_fraction=0.4, seed=3)
    members = {key: value for path in shards.shard_paths(tmp_path, "train") for key, value in tar_members(path).items()}
    loader = celeba_loader(
        shards.shard_paths(tmp_path, "train"), batch_size=5, train=False, rank=0, world_size=1, with_keys=True
    )
    seen = 0
    for _, targets, masks, keys in loader:
        for index, key in enumerate(keys):
            kept = json.loads(members[key]["labels.json"])
            assert masks["attributes"][index].tolist() == [name in kept for name in ATTRIBUTES]
            unlabelled = ~masks["attributes"][index]
            assert bool((targets["attributes"][index][unlabelled] == 0).all())  # nothing leaks
            seen += 1
    assert seen == 24


def test_celeba_loader_skips_a_sample_with_a_bad_labels_member(tmp_path):
    synthetic_celeba.generate(tmp_path / "good", 10, 16, samples_per_shard=10, label_fraction=0.5)
    samples = tar_members(tmp_path / "good" / "train-000000.tar")
    first = sorted(samples)[0]
    samples[first]["labels.json"] = b'["Not_An_Attribute"]'
    shards.write_tar(tmp_path / "bad.tar", [{"__key__": key, **members} for key, members in sorted(samples.items())])
    counter = SkipCounter("test")
    loader = celeba_loader(
        [str(tmp_path / "bad.tar")], batch_size=2, train=False, rank=0, world_size=1, skip_counter=counter
    )
    assert sum(batch[0].shape[0] for batch in loader) == len(samples) - 1 and counter.skipped_samples == 1


def test_taskonomy_loaders_mask_unlabelled_tasks_on_both_normalisation_paths(tmp_path):
    synthetic_taskonomy.generate(tmp_path, 12, 32, samples_per_shard=6, label_fraction=0.5, seed=1)
    urls = shards.shard_paths(tmp_path, "train")
    members = {key: value for url in urls for key, value in tar_members(url).items()}
    for key, sample in members.items():
        kept = json.loads(sample["labels.json"])
        assert kept and {f"{task}.png" for task in TASKS if task not in kept}.isdisjoint(sample)
    rgb, targets, masks, keys = next(
        iter(taskonomy_eval_loader(urls, batch_size=10, size=32, rank=0, world_size=1, with_keys=True))
    )
    for index, key in enumerate(keys):
        kept = json.loads(members[key]["labels.json"])
        for task in TASKS:
            assert bool(masks[task][index].any()) == (task in kept), (key, task)
        if "segment_semantic" not in kept:
            assert bool((targets["segment_semantic"][index] == 255).all())
    protocol = TaskonomyProtocol()

    def train(normalize):
        return taskonomy_train_loader(
            urls, batch_size=4, size=24, epoch_samples=8, seed=5, rank=0, world_size=1, normalize=normalize
        )

    for normalised, (raw,) in zip(train(True), train(False)):
        _, batch_targets, batch_masks = protocol.to_targets_batch(raw)
        for task in TASKS:
            assert torch.equal(batch_masks[task], normalised[2][task]), task
            assert torch.equal(batch_targets[task], normalised[1][task]), task


# ------------------------------------------------------------------------------------------------ generators
def test_sample_labels_keeps_at_least_one_task_and_checks_the_fraction():
    rng = np.random.default_rng(0)
    kept = [sample_labels(("a", "b", "c"), 0.01, rng) for _ in range(200)]
    assert all(len(labels) >= 1 for labels in kept) and count_labels(("a", "b", "c"), [["a"], ["a", "c"]]) == {
        "a": 2,
        "b": 0,
        "c": 1,
    }
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label fraction must lie in"):
            check_label_fraction(bad)


def test_synthetic_celeba_label_fraction_is_seeded_and_keeps_the_images(tmp_path):
    full = synthetic_celeba.generate(tmp_path / "full", 100, 16, samples_per_shard=100)
    half = synthetic_celeba.generate(tmp_path / "half", 100, 16, samples_per_shard=100, label_fraction=0.5)
    again = synthetic_celeba.generate(tmp_path / "again", 100, 16, samples_per_shard=100, label_fraction=0.5)
    assert full["splits"]["train"]["labels"] == dict.fromkeys(ATTRIBUTES, 80)
    kept = sum(half["splits"]["train"]["labels"].values()) / (80 * 40)
    assert 0.45 < kept < 0.55  # 3200 coin flips at 0.5
    assert half["label_fraction"] == 0.5 and half["splits"] == again["splits"]
    assert (tmp_path / "half" / "train-000000.tar").read_bytes() == (
        tmp_path / "again" / "train-000000.tar"
    ).read_bytes()
    full_samples, half_samples = (tar_members(tmp_path / name / "train-000000.tar") for name in ("full", "half"))
    for key, sample in half_samples.items():
        assert sample["png"] == full_samples[key]["png"] and "labels.json" not in full_samples[key]
        assert len(json.loads(sample["labels.json"])) >= 1
    with pytest.raises(ValueError, match="label fraction"):
        synthetic_celeba.generate(tmp_path / "bad", 10, 16, label_fraction=0.0)


def test_synthetic_taskonomy_label_fraction_counts_labels(tmp_path):
    manifest = synthetic_taskonomy.generate(tmp_path, 40, 16, samples_per_shard=40, label_fraction=0.2)
    train = manifest["splits"]["train"]
    members = tar_members(tmp_path / "train-000000.tar")
    assert train["labels"] == count_labels(TASKS, [json.loads(m["labels.json"]) for m in members.values()])
    assert all(len(json.loads(m["labels.json"])) >= 1 for m in members.values())
    assert sum(train["labels"].values()) < 0.5 * len(TASKS) * train["total"]


def test_cli_generators_take_label_fraction(tmp_path, capsys):
    out = tmp_path / "faces"
    assert (
        cli.main(
            ["data", "synthetic-celeba", "--out", str(out), "--n", "10", "--size", "16", "--label-fraction", "0.3"]
        )
        == 0
    )
    assert shards.read_manifest(out)["label_fraction"] == 0.3
    for command in ("synthetic-celeba", "synthetic-taskonomy"):
        args = ["data", command, "--out", str(tmp_path / command), "--n", "10", "--size", "16", "--label-fraction", "0"]
        assert cli.main(args) == 2
        assert "--label-fraction must lie in (0, 1]" in capsys.readouterr().err
        assert not (tmp_path / command).exists()


# ------------------------------------------------------------------------------------------------ eval.json
def test_eval_json_counts_the_labelled_test_examples(tmp_path):
    overrides = [
        "search.size=32",
        "retrain.size=32",
        "model.width=0.125",
        "search.batch_size=8",
        "retrain.batch_size=8",
        "search.epochs=1",
        "search.warmup_epochs=0",
        "retrain.epochs=1",
        "data.num_workers=0",
        "data.eval_batch_size=3",
    ]
    config = configs.load_config(preset="celeba-vgg", overrides=overrides)
    manifest = synthetic_celeba.generate(tmp_path / "data", 50, 32, samples_per_shard=10, label_fraction=0.3)
    pipeline.search(config, tmp_path / "run", tmp_path / "data", progress=False)
    tree = Tree.load(tmp_path / "run" / "tree.json")
    pipeline.retrain(config, tree, tmp_path / "run" / "retrain", tmp_path / "data", progress=False)
    pipeline.evaluate(tmp_path / "run", tmp_path / "data", split="test")
    written = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert written["samples"] == 5 and written["labelled"] == manifest["splits"]["test"]["labels"]
    for task, labelled in written["labelled"].items():
        accuracy = written["tasks"][task]["accuracy"]
        assert math.isnan(accuracy) if labelled == 0 else round(accuracy * labelled / 100, 6).is_integer()
