"""l2b_fast.datasets: every loss and metric against hand-computed values (masks included), the class-weighted
cross-entropy against torch's reference, accumulation over batches and ranks, and bad input."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from l2b_fast import datasets
from l2b_fast.datasets.celeba.dataset import ATTRIBUTES
from l2b_fast.datasets.taskonomy import dataset as T

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def grid(values, dtype=torch.float64):
    """[1, 1, H, W] from a nested list (one image, one channel)."""
    return torch.tensor(values, dtype=dtype)[None, None]


# ------------------------------------------------------------------------------------------ L1 tasks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("task", ["depth_zbuffer", "keypoints2d", "edge_texture"])
def test_l1_loss_and_metric_by_hand(task, dtype):
    dataset = T.Taskonomy(tasks=(task,))
    # image 0: errors 1, 2, 3, 4 with pixel (0, 1) masked -> (1 + 3 + 4) / 3; image 1: errors 6 at one counted pixel
    pred = torch.cat([grid([[1, 2], [3, 4]], dtype), grid([[6, 0], [0, 0]], dtype)])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[True, False], [True, True]], [[True, False], [False, False]]])
    loss = dataset.loss(task, pred, target, mask)
    torch.testing.assert_close(
        loss, torch.tensor((1 + 3 + 4 + 6) / 4, dtype=dtype), **TOL[dtype]
    )  # pooled over the batch
    metrics = dataset.metrics()
    metrics.update({task: pred}, {task: target}, {task: mask})
    name = "mae_masked" if task == "depth_zbuffer" else "mae"
    assert metrics.compute()[task][name] == pytest.approx(
        ((1 + 3 + 4) / 3 + 6) / 2, rel=1e-6
    )  # mean of per-image means
    pixel = T.Taskonomy(tasks=(task,), average="pixel").metrics()
    pixel.update({task: pred}, {task: target}, {task: mask})
    assert pixel.compute()[task][name] == pytest.approx(14 / 4, rel=1e-6)
    assert metrics.samples == 2 and metrics.summary() == {task: metrics.compute()[task][name]}


def test_l1_without_mask_and_an_image_with_no_counted_pixel():
    dataset = T.Taskonomy(tasks=("depth_zbuffer",))
    pred, target = grid([[0.5, -0.5], [1.0, 0.0]]), grid([[0.0, 0.0], [0.0, 1.0]])
    assert float(dataset.loss("depth_zbuffer", pred, target)) == pytest.approx(3 / 4)
    metrics = dataset.metrics()
    nothing = torch.zeros(1, 2, 2, dtype=torch.bool)
    metrics.update({"depth_zbuffer": pred}, {"depth_zbuffer": target}, {"depth_zbuffer": nothing})
    assert math.isnan(metrics.compute()["depth_zbuffer"]["mae_masked"])  # no image counted yet
    metrics.update({"depth_zbuffer": pred}, {"depth_zbuffer": target}, None)
    assert metrics.compute()["depth_zbuffer"]["mae_masked"] == pytest.approx(3 / 4)  # the empty image does not count
    assert metrics.samples == 2


def test_loss_with_nothing_counted_is_zero_with_a_gradient_path():
    dataset = T.Taskonomy()
    nothing = torch.zeros(2, 3, 3, dtype=torch.bool)
    for task, channels in dataset.out_channels.items():
        pred = torch.randn(2, channels, 3, 3, requires_grad=True)
        target = torch.randint(0, 17, (2, 3, 3)) if task == "segment_semantic" else torch.randn(2, channels, 3, 3)
        loss = dataset.loss(task, pred, target, nothing)
        assert float(loss.detach()) == 0.0, task
        loss.backward()
        assert torch.equal(pred.grad, torch.zeros_like(pred)), task


# -------------------------------------------------------------------------------------------- normal
@pytest.mark.parametrize("dtype", DTYPES)
def test_normal_loss_and_cosine_by_hand(dtype):
    dataset = T.Taskonomy(tasks=("normal",))
    pred = torch.zeros(1, 3, 1, 3, dtype=dtype)
    target = torch.zeros(1, 3, 1, 3, dtype=dtype)
    pred[0, :, 0, 0] = torch.tensor([5.0, 0.0, 0.0])  # same direction as the target (length does not matter): cos 1
    target[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    pred[0, :, 0, 1] = torch.tensor([0.0, 2.0, 0.0])  # orthogonal: cos 0
    target[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])
    pred[0, :, 0, 2] = torch.tensor([-1.0, 0.0, 0.0])  # opposite: cos -1, masked out below
    target[0, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.tensor([[[True, True, False]]])
    torch.testing.assert_close(dataset.loss("normal", pred, target, mask), torch.tensor(0.5, dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(
        dataset.loss("normal", pred, target), torch.tensor((0 + 1 + 2) / 3, dtype=dtype), **TOL[dtype]
    )
    metrics = dataset.metrics()
    metrics.update({"normal": pred}, {"normal": target}, {"normal": mask})
    assert metrics.compute() == {"normal": {"cosine_similarity": pytest.approx(0.5)}}
    unmasked = dataset.metrics()
    unmasked.update({"normal": pred}, {"normal": target})
    assert unmasked.summary()["normal"] == pytest.approx(0.0)


# -------------------------------------------------------------------------------------- segmentation
def segmentation_example(dtype=torch.float64):
    """Four pixels: background (uniform logits), class 3 (logit 2), padding (255), class 5 (uniform logits)."""
    logits = torch.zeros(1, 17, 1, 4, dtype=dtype)
    logits[0, 3, 0, 1] = 2.0
    target = torch.tensor([[[0, 3, 255, 5]]])
    uniform = math.log(17)
    peaked = math.log(math.exp(2) + 16) - 2
    return logits, target, uniform, peaked


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmentation_loss_by_hand(dtype):
    logits, target, uniform, peaked = segmentation_example(dtype)
    background, objects = T.DEFAULT_CLASS_WEIGHTS[0], T.DEFAULT_CLASS_WEIGHTS[1]
    dataset = T.Taskonomy(tasks=("segment_semantic",))
    expected = (background * uniform + objects * peaked + objects * uniform) / (background + 2 * objects)
    torch.testing.assert_close(
        dataset.loss("segment_semantic", logits, target), torch.tensor(expected, dtype=dtype), **TOL[dtype]
    )
    mask = torch.tensor([[[True, True, True, False]]])  # the loader's mask drops the last pixel
    expected = (background * uniform + objects * peaked) / (background + objects)
    torch.testing.assert_close(
        dataset.loss("segment_semantic", logits, target, mask), torch.tensor(expected, dtype=dtype), **TOL[dtype]
    )
    unweighted = T.Taskonomy(tasks=("segment_semantic",), class_weights=None)
    torch.testing.assert_close(
        unweighted.loss("segment_semantic", logits, target),
        torch.tensor((2 * uniform + peaked) / 3, dtype=dtype),
        **TOL[dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 16, 9)])
@pytest.mark.parametrize("weighted", [True, False])
def test_segmentation_loss_matches_torch_cross_entropy(shape, dtype, weighted):
    generator = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape[0], 17, *shape[1:], dtype=dtype, generator=generator) * 3
    target = torch.randint(0, 17, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < 0.2] = 255
    dataset = T.Taskonomy(tasks=("segment_semantic",), class_weights=T.DEFAULT_CLASS_WEIGHTS if weighted else None)
    weight = torch.tensor(T.DEFAULT_CLASS_WEIGHTS, dtype=dtype) if weighted else None
    if (target == 255).all():
        target[0, 0, 0] = 4
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=255)
    torch.testing.assert_close(dataset.loss("segment_semantic", logits, target), expected, **TOL[dtype])


def test_segmentation_metric_mask_rules_by_hand():
    logits, target, uniform, peaked = segmentation_example()
    paper = T.Taskonomy(tasks=("segment_semantic",)).metrics()
    paper.update({"segment_semantic": logits}, {"segment_semantic": target})
    # the paper's rule masks background/uncertain (class 0) and padding: pixels 1 and 3, equal weights
    assert paper.compute() == {
        "segment_semantic": {
            "cross_entropy_mask_paper": pytest.approx((peaked + uniform) / 2),
            "pixel_accuracy_mask_paper": pytest.approx(1 / 2),
        }
    }
    adashare = T.Taskonomy(tasks=("segment_semantic",), segmentation_mask="adashare").metrics()
    # the loader's segmentation mask is not the metric's rule: passing one that drops everything changes nothing
    adashare.update(
        {"segment_semantic": logits},
        {"segment_semantic": target},
        {"segment_semantic": torch.zeros(1, 1, 4, dtype=torch.bool)},
    )
    background, objects = T.DEFAULT_CLASS_WEIGHTS[:2]
    assert adashare.compute()["segment_semantic"] == {
        "cross_entropy_mask_adashare": pytest.approx(
            (background * uniform + objects * peaked + objects * uniform) / (background + 2 * objects)
        ),
        "pixel_accuracy_mask_adashare": pytest.approx(2 / 3),  # argmax of uniform logits is class 0: right at pixel 0
    }
    assert adashare.summary() == {
        "segment_semantic": adashare.compute()["segment_semantic"]["cross_entropy_mask_adashare"]
    }


# -------------------------------------------------------------------------------------- accumulation
def random_taskonomy_batch(batch, height, width, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    outputs = {
        task: torch.randn(batch, channels, height, width, dtype=dtype, generator=generator)
        for task, channels in T.Taskonomy().out_channels.items()
    }
    targets = {
        task: torch.randn(batch, channels, height, width, dtype=dtype, generator=generator)
        for task, channels in T.Taskonomy().out_channels.items()
        if task != "segment_semantic"
    }
    targets["segment_semantic"] = torch.randint(0, 17, (batch, height, width), generator=generator)
    targets["segment_semantic"][torch.rand(batch, height, width, generator=generator) < 0.2] = 255
    masks = {task: torch.rand(batch, height, width, generator=generator) < 0.7 for task in T.TASKS}
    masks["depth_zbuffer"][0] = False  # an image without counted depth
    return outputs, targets, masks


def split(tree, start, stop):
    return {task: value[start:stop] for task, value in tree.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options", [{}, {"average": "pixel"}, {"segmentation_mask": "adashare", "class_weights": None}]
)
@pytest.mark.parametrize("size", [(5, 3, 4), (7, 5, 2)])
def test_taskonomy_accumulation_over_batches_equals_one_batch(options, dtype, size):
    dataset = T.Taskonomy(**options)
    outputs, targets, masks = random_taskonomy_batch(*size, dtype, seed=size[0])
    whole = dataset.metrics()
    whole.update(outputs, targets, masks)
    pieces, other = dataset.metrics(), dataset.metrics()  # two "ranks", each summing its own batches
    for start, stop, accumulator in ((0, 2, pieces), (2, 3, other), (3, size[0], pieces)):
        accumulator.update(split(outputs, start, stop), split(targets, start, stop), split(masks, start, stop))
    pieces.merge(other)
    assert pieces.samples == whole.samples == size[0]
    expected = whole.compute()
    for task, values in pieces.compute().items():
        for name, value in values.items():
            assert value == pytest.approx(expected[task][name], rel=1e-6 if dtype == torch.float32 else 1e-12), (
                task,
                name,
            )


def test_image_average_equals_mean_of_single_image_values():
    dataset = T.Taskonomy()
    outputs, targets, masks = random_taskonomy_batch(4, 3, 3, torch.float64, seed=3)
    together = dataset.metrics()
    together.update(outputs, targets, masks)
    singles = []
    for i in range(4):
        one = dataset.metrics()
        one.update(split(outputs, i, i + 1), split(targets, i, i + 1), split(masks, i, i + 1))
        singles.append(one.compute())
    for task, values in together.compute().items():
        for name, value in values.items():
            per_image = [s[task][name] for s in singles if not math.isnan(s[task][name])]
            assert value == pytest.approx(sum(per_image) / len(per_image), rel=1e-12), (task, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_celeba_batch(batch):
    generator = torch.Generator().manual_seed(5)
    dataset = datasets.get("celeba")
    targets, _ = dataset.task_targets({"attributes": (torch.rand(batch, 40, generator=generator) < 0.4).float()})
    return {task: torch.randn(batch, 1, generator=generator) for task in dataset.tasks}, targets


def _reduce_rank(rank, world, port, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dataset = T.Taskonomy()
        outputs, targets, masks = random_taskonomy_batch(5, 3, 3, torch.float64, seed=11)
        mine = dataset.metrics()
        if rank == 0:  # rank 1 sees three samples, rank 0 two
            mine.update(split(outputs, 0, 2), split(targets, 0, 2), split(masks, 0, 2))
        else:
            mine.update(split(outputs, 2, 5), split(targets, 2, 5), split(masks, 2, 5))
        mine.all_reduce()
        celeba_outputs, celeba_targets = _random_celeba_batch(5)
        celeba = datasets.get("celeba").metrics()  # no float sums: an empty table must reduce too
        rows = (0, 2) if rank == 0 else (2, 5)
        celeba.update(split(celeba_outputs, *rows), split(celeba_targets, *rows))
        celeba.all_reduce()
        if rank == 0:
            torch.save(
                {
                    "values": mine.compute(),
                    "samples": mine.samples,
                    "celeba": celeba.compute(),
                    "celeba_samples": celeba.samples,
                },
                out_path,
            )
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_ranks_equals_one_pass(tmp_path):
    out = tmp_path / "reduced.pt"
    torch.multiprocessing.spawn(_reduce_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    reduced = torch.load(out)
    whole = T.Taskonomy().metrics()
    whole.update(*random_taskonomy_batch(5, 3, 3, torch.float64, seed=11))
    assert reduced["samples"] == 5 and reduced["celeba_samples"] == 5
    celeba = datasets.get("celeba").metrics()
    celeba.update(*_random_celeba_batch(5))
    assert reduced["celeba"] == celeba.compute()
    for task, values in whole.compute().items():
        for name, value in values.items():
            assert reduced["values"][task][name] == pytest.approx(value, rel=1e-12), (task, name)


def test_all_reduce_without_process_group_is_identity():
    metrics = T.Taskonomy().metrics()
    metrics.update(*random_taskonomy_batch(2, 2, 2, torch.float64, seed=0))
    before = metrics.compute()
    assert metrics.all_reduce() is metrics and metrics.compute() == before


# -------------------------------------------------------------------------------- class weights
def test_class_weights_from_frequencies_by_hand():
    # p = (3/4, 1/4), K = 2, smoothing 1/2: 1/(3/8 + 1/4) = 8/5, 1/(1/8 + 1/4) = 8/3; E_p = 6/5 + 2/3 = 28/15
    weights = T.class_weights_from_frequencies([300, 100])
    assert weights == pytest.approx((8 / 5 * 15 / 28, 8 / 3 * 15 / 28))
    assert 0.75 * weights[0] + 0.25 * weights[1] == pytest.approx(1.0)
    # with Taskonomy-like shares (background ~94%) it lands near the published magnitudes
    shares = [94.0] + [6.0 / 16] * 16
    derived = T.class_weights_from_frequencies(shares)
    assert 0.5 < derived[0] < 0.6 and all(7 < w < 10 for w in derived[1:])
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="pixel_counts"):
            T.class_weights_from_frequencies(bad)
    with pytest.raises(ValueError, match="smoothing"):
        T.class_weights_from_frequencies([1, 1], smoothing=0)


def test_segmentation_pixel_counts_of_loader_batches():
    batches = [
        (None, {"segment_semantic": torch.tensor([[[0, 0, 3], [255, 16, 3]]])}, None),
        (None, {"segment_semantic": torch.tensor([[[255, 0]]])}, None),
    ]
    counts = T.segmentation_pixel_counts(batches)
    assert len(counts) == 17 and counts[0] == 3 and counts[3] == 2 and counts[16] == 1 and sum(counts) == 6
    with pytest.raises(ValueError, match="label 17"):
        T.segmentation_pixel_counts([(None, {"segment_semantic": torch.tensor([[[17]]])}, None)])


@pytest.mark.parametrize("task", T.TASKS)
def test_losses_of_bfloat16_predictions_are_computed_in_float32(task):
    dataset = T.Taskonomy()
    outputs, targets, masks = random_taskonomy_batch(2, 4, 4, torch.float32, seed=5)
    low = outputs[task].to(torch.bfloat16)
    loss = dataset.loss(task, low, targets[task], masks[task])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, dataset.loss(task, low.float(), targets[task], masks[task]))


def test_class_weights_from_a_npy_file(tmp_path):
    import numpy as np

    path = tmp_path / "semseg_prior_factor.npy"
    values = np.linspace(0.5, 9.0, 17)
    np.save(path, values)
    dataset = T.Taskonomy(class_weights=str(path))
    assert dataset.class_weights == pytest.approx(tuple(values))
    assert dataset.describe()["class_weights_source"] == "given"
    assert "approximation" in T.Taskonomy().describe()["class_weights_source"]
    np.save(tmp_path / "short.npy", values[:5])
    with pytest.raises(ValueError, match="17 values"):
        T.Taskonomy(class_weights=tmp_path / "short.npy")
    with pytest.raises(ValueError, match="no class-weight file"):
        T.Taskonomy(class_weights=tmp_path / "missing.npy")


# ------------------------------------------------------------------------------------------- CelebA
@pytest.mark.parametrize("dtype", DTYPES)
def test_celeba_loss_and_accuracy_by_hand(dtype):
    dataset = datasets.get("celeba", attributes=("Smiling", "Male"))
    assert dataset.tasks == ("Male", "Smiling") and dataset.out_channels == {"Male": 1, "Smiling": 1}  # standard order
    table = torch.zeros(3, 40)
    table[:, ATTRIBUTES.index("Male")] = torch.tensor([1.0, 0.0, 1.0])
    table[:, ATTRIBUTES.index("Smiling")] = torch.tensor([0.0, 0.0, 1.0])
    targets, masks = dataset.task_targets({"attributes": table})
    assert masks is None and targets["Male"].tolist() == [1.0, 0.0, 1.0]
    outputs = {
        "Male": torch.tensor([[0.0], [-2.0], [2.0]], dtype=dtype),
        "Smiling": torch.tensor([3.0, 1.0, -1.0], dtype=dtype),
    }
    losses = dataset.losses(outputs, targets)
    # BCE(logit, y) = log(1 + e^-logit) for y = 1, log(1 + e^logit) for y = 0
    male = (math.log(2) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-2))) / 3
    smiling = (math.log(1 + math.exp(3)) + math.log(1 + math.exp(1)) + math.log(1 + math.exp(1))) / 3
    torch.testing.assert_close(losses["Male"], torch.tensor(male, dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(losses["Smiling"], torch.tensor(smiling, dtype=dtype), **TOL[dtype])
    metrics = dataset.metrics()
    metrics.update(outputs, targets)
    # Male: logit 0 is "no" (wrong for label 1), -2 right, 2 right -> 2/3; Smiling: all three wrong -> 0
    assert metrics.compute() == {"Male": {"accuracy": pytest.approx(200 / 3)}, "Smiling": {"accuracy": 0.0}}
    assert metrics.summary() == {"mean_accuracy": pytest.approx(100 / 3)}


def test_celeba_accumulation_and_all_40_attributes():
    dataset = datasets.get("celeba")
    assert len(dataset.tasks) == 40 and dataset.tasks == ATTRIBUTES
    generator = torch.Generator().manual_seed(0)
    targets, _ = dataset.task_targets({"attributes": (torch.rand(9, 40, generator=generator) < 0.4).float()})
    outputs = {task: torch.randn(9, 1, generator=generator) for task in dataset.tasks}
    whole, pieces = dataset.metrics(), dataset.metrics()
    whole.update(outputs, targets)
    for start, stop in ((0, 4), (4, 5), (5, 9)):
        pieces.update(split(outputs, start, stop), split(targets, start, stop))
    assert pieces.compute() == whole.compute() and pieces.samples == 9
    expected = (
        sum(((outputs[t][:, 0] > 0) == (targets[t] > 0.5)).float().mean().item() for t in dataset.tasks) / 40 * 100
    )
    assert whole.summary()["mean_accuracy"] == pytest.approx(expected)


# ------------------------------------------------------------------------------------ paper and table
def test_paper_rows_and_table():
    taskonomy, celeba = datasets.get("taskonomy"), datasets.get("celeba")
    ours = {row.method: row for row in taskonomy.paper_rows}["LearnToBranch (Guo et al., 2020)"]
    assert ours.parameters_millions == 51 and dict(ours.values) == {
        "segment_semantic": 0.462,
        "normal": 0.709,
        "depth_zbuffer": 0.018,
        "keypoints2d": 0.122,
        "edge_texture": 0.136,
    }
    assert {row.method: row.values["mean_accuracy"] for row in celeba.paper_rows}[
        "LearnToBranch-VGG (Guo et al., 2020)"
    ] == 91.55
    assert [c.name for c in taskonomy.columns] == list(T.TASKS) and [c.higher_is_better for c in taskonomy.columns] == [
        False,
        True,
        False,
        False,
        False,
    ]
    table = datasets.format_table(taskonomy, {"segment_semantic": 0.5, "normal": 0.7}, 51_000_000)
    lines = table.splitlines()
    assert len(lines) == 2 + len(taskonomy.paper_rows) + 1
    assert "0.462" in lines[-2] and lines[-1].split()[-6:] == ["51", "0.500", "0.700", "-", "-", "-"]


# -------------------------------------------------------------------------------------- bad input
def test_bad_input_is_named():
    dataset = T.Taskonomy()
    target = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"prediction of shape \(2, 2, 4, 4\)"):
        dataset.loss("depth_zbuffer", torch.randn(2, 2, 4, 4), target)
    with pytest.raises(ValueError, match="upsample"):
        dataset.loss("depth_zbuffer", torch.randn(2, 1, 2, 2), target)
    with pytest.raises(TypeError, match="floating-point"):
        dataset.loss("depth_zbuffer", torch.ones(2, 1, 4, 4, dtype=torch.int64), target)
    with pytest.raises(ValueError, match="mask must be bool"):
        dataset.loss("depth_zbuffer", torch.randn(2, 1, 4, 4), target, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="integer class indices"):
        dataset.loss("segment_semantic", torch.randn(2, 17, 4, 4), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="unknown task"):
        dataset.loss("curvature", torch.randn(2, 1, 4, 4), target)
    with pytest.raises(ValueError, match="no target for"):
        dataset.task_targets({"normal": torch.zeros(1)})
    with pytest.raises(ValueError, match="distinct Taskonomy tasks"):
        T.Taskonomy(tasks=("depth",))
    with pytest.raises(ValueError, match="segmentation_mask"):
        T.Taskonomy(segmentation_mask="none")
    with pytest.raises(ValueError, match="finite and positive"):
        T.Taskonomy(class_weights=(0.0,) * 17)
    with pytest.raises(ValueError, match="unknown data set"):
        datasets.get("imagenet")
    with pytest.raises(ValueError, match="options: attributes"):
        datasets.get("celeba", tasks=("Male",))
    with pytest.raises(ValueError, match="distinct CelebA attributes"):
        datasets.get("celeba", attributes=("Beard",))
    celeba = datasets.get("celeba")
    with pytest.raises(ValueError, match=r"\{'attributes': \[B, 40\]\}"):
        celeba.task_targets({"attributes": torch.zeros(3, 39)})
    with pytest.raises(ValueError, match="target must be"):
        celeba.loss("Male", torch.zeros(3, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="merge"):
        T.Taskonomy().metrics().merge(T.Taskonomy(average="pixel").metrics())
    with pytest.raises(ValueError, match="hold .celeba. data"):
        dataset.check_manifest({"dataset": "celeba"})
    dataset.check_manifest({"dataset": "taskonomy"})


# ---------------------------------------------------------------------------- with the real loaders
def test_targets_of_the_taskonomy_loaders_fit(tmp_path):
    pytest.importorskip("webdataset")
    from l2b_fast.data import shards
    from l2b_fast.datasets.taskonomy import loaders as loader
    from l2b_fast.datasets.taskonomy import synthetic as synthetic_taskonomy

    synthetic_taskonomy.generate(tmp_path, 10, 16, samples_per_shard=4, splits=(("train", 0.5), ("test", 0.5)))
    dataset = T.Taskonomy(segmentation_mask="adashare")
    metrics = dataset.metrics()
    for rgb, targets, masks in loader.taskonomy_eval_loader(
        shards.shard_paths(tmp_path, "test"), batch_size=3, size=16, rank=0, world_size=1
    ):
        targets, masks = dataset.task_targets(targets, masks)
        perfect = {task: targets[task].clone() for task in dataset.tasks if task != "segment_semantic"}
        perfect["segment_semantic"] = F.one_hot(targets["segment_semantic"], 17).permute(0, 3, 1, 2).double() * 50
        metrics.update(perfect, targets, masks)
        assert all(
            float(loss) < 1e-6 for task, loss in dataset.losses(perfect, targets, masks).items() if task != "normal"
        )
    values = metrics.compute()
    assert metrics.samples == 5
    assert (
        values["depth_zbuffer"]["mae_masked"] == 0
        and values["keypoints2d"]["mae"] == 0
        and values["edge_texture"]["mae"] == 0
    )
    assert (
        values["normal"]["cosine_similarity"] == pytest.approx(1.0)
        and values["segment_semantic"]["pixel_accuracy_mask_adashare"] == 1.0
    )
    train = loader.taskonomy_train_loader(
        shards.shard_paths(tmp_path, "train"),
        batch_size=2,
        size=16,
        epoch_samples=4,
        world_size=1,
        rank=0,
        shuffle_buffer=2,
    )
    rgb, targets, masks = next(iter(train))  # augmented: padding is masked and segmentation 255
    outputs = {
        task: torch.randn(2, channels, 16, 16, requires_grad=True) for task, channels in dataset.out_channels.items()
    }
    total = sum(dataset.losses(outputs, *dataset.task_targets(targets, masks)).values())
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(o.grad).all() for o in outputs.values())
