"""Streaming loaders and transforms (l2b_fast.data.loader / .transforms) on tiny synthetic shards.

Synthetic samples use the exact raw Taskonomy encodings (docs/data-schema.md); no real data is used.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch

wds = pytest.importorskip("webdataset")
Image = pytest.importorskip("PIL.Image")

from l2b_fast.data import loader as L  # noqa: E402
from l2b_fast.datasets.celeba import loaders as CL  # noqa: E402
from l2b_fast.datasets.taskonomy import loaders as TL  # noqa: E402
from l2b_fast.datasets.taskonomy import protocol as T  # noqa: E402

S = 16  # stored size of the synthetic shards
SIZE = 8  # working resolution in the loader tests


# ------------------------------------------------------------------------------------------------ helpers
def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_raw(rng: np.random.Generator, size: int = S) -> dict[str, np.ndarray]:
    depth = rng.integers(0, 70000, (size, size)).clip(0, 65535).astype(np.uint16)
    depth[0, 0] = 65535
    normal = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    normal[depth == 65535] = 128  # invalid normals = the pixels without geometry
    return {
        "rgb": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "segment_semantic": rng.integers(0, 18, (size, size), dtype=np.uint8),
        "normal": normal,
        "depth_zbuffer": depth,
        "keypoints2d": rng.integers(0, 1200, (size, size)).astype(np.uint16),
        "edge_texture": rng.integers(0, 9000, (size, size)).astype(np.uint16),
    }


def sample_key(index: int) -> str:
    return f"bldg_point_{index}_view_0"


def key_index(key: str) -> int:
    return int(key.split("_")[2])


def write_shard(path, indices, *, seed=0, corrupt=None, missing=None) -> dict[str, dict]:
    """Write samples ``indices`` to a tar; ``corrupt``/``missing``: indices with garbage rgb / no depth member."""
    rng = np.random.default_rng(seed)
    raws = {}
    with wds.TarWriter(str(path)) as sink:
        for index in indices:
            raw = make_raw(rng)
            key = sample_key(index)
            raws[key] = raw
            sample = {
                "__key__": key,
                "json": json.dumps({"building": "bldg", "point": index, "view": 0, "size": S}).encode(),
            }
            sample.update({f"{name}.png": png(value) for name, value in raw.items()})
            if corrupt and index in corrupt:
                sample["rgb.png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
            if missing and index in missing:
                del sample["depth_zbuffer.png"]
            sink.write(sample)
    return raws


@pytest.fixture
def shards(tmp_path):
    """Three shards: 6 + 6 + 5 samples with indices 0..16."""
    paths, raws = [], {}
    for s, indices in enumerate([range(0, 6), range(6, 12), range(12, 17)]):
        path = tmp_path / f"train-{s:06d}.tar"
        raws.update(write_shard(path, indices, seed=s))
        paths.append(str(path))
    return paths, raws


# ------------------------------------------------------------------------------------------------ decoding
def test_decode_png_keeps_16_bit():
    array = np.array([[0, 1], [40000, 65535]], dtype=np.uint16)
    assert Image.fromarray(array).mode == "I;16"
    decoded = T.decode_png(png(array))
    assert decoded.dtype == np.uint16
    assert decoded[1, 1] == 65535 and decoded[1, 0] == 40000
    np.testing.assert_array_equal(decoded, array)
    target, mask = _single(decoded.reshape(1, 4), "depth_zbuffer")
    assert target[0, 0, 3] == pytest.approx(1.0) and not mask[0, 3]  # widened: no uint16 overflow


def test_decode_png_corrupt_raises_clear_error():
    with pytest.raises(T.CorruptSampleError, match="cannot decode depth"):
        T.decode_png(b"\x89PNG\r\n\x1a\nnot really", name="depth_zbuffer.png")


# ----------------------------------------------------------------------------------------- normalisation
def _single(raw_task, task, **protocol):
    """to_targets on a 1 x n sample where only ``task`` matters."""
    n = raw_task.shape[1]
    raw = {"rgb": np.zeros((1, n, 3), np.uint8), task: raw_task}
    rgb, targets, masks = T.TaskonomyProtocol(tasks=(task,), **protocol).to_targets(raw)
    return targets[task].numpy(), masks[task].numpy()


def test_rgb_normalisation():
    raw = {"rgb": np.array([[[0, 51, 255], [10, 20, 30]]], np.uint8)}
    rgb, _, _ = T.TaskonomyProtocol(tasks=()).to_targets(raw)
    assert rgb.shape == (3, 1, 2) and rgb.dtype == torch.float32
    np.testing.assert_allclose(rgb[:, 0, 0].numpy(), [-1.0, -0.6, 1.0], atol=1e-6)
    rgb, _, _ = T.TaskonomyProtocol(tasks=(), rgb_normalization="caffe_bgr").to_targets(raw)
    np.testing.assert_allclose(
        rgb[:, 0, 1].numpy(), [30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434], atol=1e-4
    )


def test_depth_normalisation_and_mask():
    d = np.array([[0, 511, 64499, 64500, 65535]], np.uint16)
    target, mask = _single(d, "depth_zbuffer")
    assert target.shape == (1, 1, 5)
    np.testing.assert_allclose(
        target[0, 0],
        [0.0, 0.5625, math.log(64500) / math.log(65536), math.log(64501) / math.log(65536), 1.0],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(mask[0], [True, True, True, False, False])


def test_normal_normalisation_and_mask():
    n = np.array([[[255, 0, 128], [128, 128, 128], [128, 128, 127]]], np.uint8)
    target, mask = _single(n, "normal")
    assert target.shape == (3, 1, 3)
    np.testing.assert_allclose(target[:, 0, 0], [1.0, -1.0, 1 / 255], atol=1e-6)
    assert mask.all()  # AdaShare's metric: no normal mask
    _, mask = _single(n, "normal", mask_invalid_normals=True)
    np.testing.assert_array_equal(mask[0], [True, False, True])


def test_keypoint_and_edge_normalisation():
    k = np.array([[0, 131, 327, 328, 65535]], np.uint16)
    target, mask = _single(k, "keypoints2d")
    # 131/65536 = 0.0019989 -> /0.005*2-1 = -0.2004395; 327/65536 = 0.0049896 -> 0.9958496; >= 0.005 -> 1
    np.testing.assert_allclose(target[0, 0], [-1.0, -0.2004395, 0.9958496, 1.0, 1.0], atol=1e-6)
    assert mask.all()
    e = np.array([[0, 2621, 5242, 5243, 9000]], np.uint16)
    target, mask = _single(e, "edge_texture")
    # 2621/65536 = 0.0399933 -> /0.08*2-1 = -0.00016785; 5242 -> 0.99966431; 5243/65536 = 0.0800018 -> clipped
    np.testing.assert_allclose(target[0, 0], [-1.0, -0.00016785, 0.99966431, 1.0, 1.0], atol=1e-6)


def test_segmentation_targets_and_mask_rules():
    s = np.array([[0, 1, 2, 17]], np.uint8)
    target, mask = _single(s, "segment_semantic")
    assert target.dtype == np.int64
    np.testing.assert_array_equal(target[0], [0, 0, 1, 16])
    assert mask.all()
    target, mask = _single(s, "segment_semantic", segmentation_mask="ignore_uncertain_background")
    np.testing.assert_array_equal(target[0], [0, 0, 1, 16])
    np.testing.assert_array_equal(mask[0], [False, False, True, True])
    assert T.TaskonomyProtocol(segmentation_mask="ignore_uncertain_background").mask_rule.startswith(
        "seg=ignore_uncertain_background"
    )
    with pytest.raises(ValueError):
        T.TaskonomyProtocol(segmentation_mask="paper")


# ------------------------------------------------------------------------------------------- augmentation
def test_flip_is_consistent_and_negates_normal_x():
    raw = make_raw(np.random.default_rng(1))
    protocol = T.TaskonomyProtocol()
    out = T.augment(raw, np.random.default_rng(0), scale=None, crop=None, flip=1.0)
    for key in raw:
        if key != "normal":
            np.testing.assert_array_equal(out[key], raw[key][:, ::-1], err_msg=key)
    invalid = np.all(raw["normal"] == 128, axis=-1)
    assert invalid.any()
    np.testing.assert_array_equal(np.all(out["normal"] == 128, axis=-1), invalid[:, ::-1])  # invalid stays invalid
    _, before, _ = protocol.to_targets(raw)
    _, after, _ = protocol.to_targets(out)
    valid = torch.from_numpy(~invalid[:, ::-1].copy())
    n0, n1 = before["normal"].flip(-1), after["normal"]
    torch.testing.assert_close(n1[0][valid], -n0[0][valid])  # decoded x negated
    torch.testing.assert_close(n1[1:], n0[1:])  # y, z only mirrored
    unflipped = T.augment(raw, np.random.default_rng(0), scale=None, crop=None, flip=False)
    for key in raw:
        np.testing.assert_array_equal(unflipped[key], raw[key])


def test_crop_pads_with_ignored_pixels():
    raw = make_raw(np.random.default_rng(2), size=8)
    out = T.augment(raw, np.random.default_rng(0), scale=None, crop=12, flip=False)
    assert out["rgb"].shape == (12, 12, 3) and out["segment_semantic"].shape == (12, 12)
    valid = out[T.VALID_KEY]
    assert valid[:8, :8].all() and valid.sum() == 64  # no room to move: padding at bottom/right
    rgb, targets, masks = T.TaskonomyProtocol().to_targets(out)
    for task, mask in masks.items():
        assert not mask.numpy()[~valid].any(), task
        if task != "depth_zbuffer":  # depth also drops d >= 64500 inside the image
            np.testing.assert_array_equal(mask.numpy(), valid, err_msg=task)
    assert (targets["segment_semantic"].numpy()[~valid] == 255).all()
    assert (targets["segment_semantic"].numpy()[valid] <= 16).all()
    assert (rgb.numpy()[:, ~valid] == 0).all()
    # smaller crops of a larger image: no padding
    small = T.augment(raw, np.random.default_rng(0), scale=None, crop=5, flip=False)
    assert small["rgb"].shape == (5, 5, 3) and small[T.VALID_KEY].all()


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_scale_keeps_labels_integer_valued(factor):
    raw = make_raw(np.random.default_rng(3))
    out = T.augment(raw, np.random.default_rng(0), scale=(factor, factor), crop=None, flip=False)
    n = int(round(S * factor))
    assert out["rgb"].shape == (n, n, 3) and out["depth_zbuffer"].shape == (n, n)
    for key in ("segment_semantic", "depth_zbuffer", "keypoints2d", "edge_texture"):
        assert out[key].dtype == raw[key].dtype
        assert set(np.unique(out[key])) <= set(np.unique(raw[key])), key
    triplets = {tuple(v) for v in raw["normal"].reshape(-1, 3)}
    assert {tuple(v) for v in out["normal"].reshape(-1, 3)} <= triplets
    assert out[T.VALID_KEY].all()


def test_resize_nearest_matches_cv2_convention():
    a = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    np.testing.assert_array_equal(T.resize_nearest(a, 8, 8), a[::2, ::2])
    raw = make_raw(np.random.default_rng(4))
    small = T.resize_raw(raw, 8)
    for key in raw:
        np.testing.assert_array_equal(small[key], raw[key][::2, ::2])
    assert T.resize_raw(raw, 8, "bilinear")["rgb"].shape == (8, 8, 3)


def test_celeba_targets_and_flip():
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, 0] = 255
    attrs = [1, 0, -1] + [1] * 37
    rgb, target = CL.celeba_to_targets(image, attrs)
    assert rgb.shape == (3, 4, 6) and rgb[0, 0, 0] == 1.0 and rgb[0, 0, 1] == -1.0
    assert target.dtype == torch.float32 and target.shape == (40,) and target[:3].tolist() == [1.0, 0.0, 0.0]
    flipped = CL.celeba_augment(image, np.random.default_rng(0), flip=True)
    assert (flipped == image).all() or (flipped == image[:, ::-1]).all()


# ------------------------------------------------------------------------------------------------ loaders
def _check_batch(batch, batch_size, size):
    rgb, targets, masks = batch[:3]
    assert rgb.shape == (batch_size, 3, size, size) and rgb.dtype == torch.float32
    assert set(targets) == set(T.TASKS) == set(masks)
    assert (
        targets["segment_semantic"].shape == (batch_size, size, size)
        and targets["segment_semantic"].dtype == torch.int64
    )
    assert targets["normal"].shape == (batch_size, 3, size, size)
    for task in ("depth_zbuffer", "keypoints2d", "edge_texture"):
        assert targets[task].shape == (batch_size, 1, size, size)
    for mask in masks.values():
        assert mask.shape == (batch_size, size, size) and mask.dtype == torch.bool
    assert rgb.abs().max() <= 1.0


def test_train_loader_shapes_and_epoch_length(shards):
    urls, _ = shards
    loader = TL.taskonomy_train_loader(
        urls, batch_size=4, size=SIZE, seed=1, epoch_samples=12, num_workers=0, shuffle_buffer=8, world_size=1
    )
    assert loader.batches_per_epoch == 3
    for _ in range(2):  # two epochs, each stops after with_epoch
        batches = list(loader)
        assert len(batches) == 3
        for batch in batches:
            _check_batch(batch, 4, SIZE)
    # DDP: the global epoch is shared by the ranks
    assert (
        TL.taskonomy_train_loader(
            urls, batch_size=4, size=SIZE, epoch_samples=16, world_size=2, rank=1
        ).batches_per_epoch
        == 2
    )
    # reproducible for a seed
    a = next(iter(TL.taskonomy_train_loader(urls, batch_size=4, size=SIZE, seed=5, epoch_samples=8, world_size=1)))
    b = next(iter(TL.taskonomy_train_loader(urls, batch_size=4, size=SIZE, seed=5, epoch_samples=8, world_size=1)))
    torch.testing.assert_close(a[0], b[0])


def test_train_loader_with_workers(shards):
    urls, _ = shards
    loader = TL.taskonomy_train_loader(
        urls, batch_size=2, size=SIZE, epoch_samples=8, num_workers=2, shuffle_buffer=4, world_size=1, with_keys=True
    )
    batches = list(loader)
    assert loader.batches_per_epoch == 4 and len(batches) == 4
    for batch in batches:
        _check_batch(batch, 2, SIZE)
        assert len(batch[3]) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_raw_batches_normalised_later_equal_normalised_batches(shards, num_workers):
    """normalize=False: the same samples and augmentations, normalised by to_targets_batch to the same values."""
    urls, _ = shards
    options = dict(
        batch_size=3,
        size=SIZE,
        seed=3,
        epoch_samples=12,
        num_workers=num_workers,
        shuffle_buffer=6,
        world_size=1,
        with_keys=True,
    )
    normalised = list(TL.taskonomy_train_loader(urls, **options))
    raw_batches = list(TL.taskonomy_train_loader(urls, normalize=False, **options))
    assert len(raw_batches) == len(normalised) == 4
    protocol = T.TaskonomyProtocol()
    for (raw, keys), (rgb, targets, masks, expected_keys) in zip(raw_batches, normalised):
        assert keys == expected_keys and raw["rgb"].dtype == torch.uint8 and raw["depth_zbuffer"].dtype == torch.int16
        batch = protocol.to_targets_batch(raw)
        torch.testing.assert_close(batch[0], rgb, rtol=0, atol=0)
        for task in T.TASKS:
            torch.testing.assert_close(batch[1][task], targets[task], rtol=0, atol=0)
            torch.testing.assert_close(batch[2][task], masks[task], rtol=0, atol=0)


def test_eval_loader_every_sample_once_deterministic(shards):
    urls, raws = shards
    protocol = T.TaskonomyProtocol()

    def run():
        keys, rgbs = [], []
        for rgb, targets, masks, batch_keys in TL.taskonomy_eval_loader(
            urls, batch_size=4, size=SIZE, rank=0, world_size=1, with_keys=True
        ):
            keys += batch_keys
            rgbs.append(rgb)
        return keys, torch.cat(rgbs)

    keys, rgb = run()
    assert sorted(keys, key=key_index) == [sample_key(i) for i in range(17)]
    assert keys == [sample_key(i) for i in range(17)]  # shard order, tar order
    assert run()[0] == keys
    expected = protocol.to_targets(T.resize_raw(raws[keys[5]], SIZE))[0]  # resize only, no augmentation
    torch.testing.assert_close(rgb[5], expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_rank(rank, world_size, port, urls, n, out_path):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        histogram = torch.zeros(n, dtype=torch.int64)  # exact per-sample counts
        checksum = torch.zeros((), dtype=torch.int64)
        count = 0
        loader = TL.taskonomy_eval_loader(urls, batch_size=3, size=SIZE, with_keys=True)  # rank/world from dist
        assert (loader.rank, loader.world_size) == (rank, world_size)
        for rgb, targets, masks, keys in loader:
            ids = torch.tensor([key_index(k) for k in keys])
            histogram += torch.bincount(ids, minlength=n)
            checksum += (ids * ids + 7).sum()
            count += len(keys)
        sums, total = L.reduce_metric_sums({"histogram": histogram, "checksum": checksum}, count)
        if rank == 0:
            torch.save(
                {"histogram": sums["histogram"], "checksum": sums["checksum"], "count": total, "local": count}, out_path
            )
    finally:
        dist.destroy_process_group()


def test_eval_two_ranks_count_every_sample_once(shards, tmp_path):
    urls, _ = shards
    out = tmp_path / "reduced.pt"
    torch.multiprocessing.spawn(_eval_rank, args=(2, _free_port(), urls, 17, str(out)), nprocs=2, join=True)
    result = torch.load(out)
    assert result["count"] == 17 and result["local"] == 11  # rank 0: shards 0 and 2 (6 + 5)
    assert (result["histogram"] == 1).all()
    assert int(result["checksum"]) == sum(i * i + 7 for i in range(17))


def test_reduce_metric_sums_identity_without_process_group():
    sums = {"loss": torch.tensor([1.5, 2.0])}
    new_sums, counts = L.reduce_metric_sums(sums, {"loss": 3})
    torch.testing.assert_close(new_sums["loss"], sums["loss"])
    assert counts == {"loss": 3} and new_sums["loss"] is not sums["loss"]


def test_corrupt_samples_and_shards_are_skipped(tmp_path):
    good = tmp_path / "s-000000.tar"
    write_shard(good, range(0, 4))
    bad = tmp_path / "s-000001.tar"
    write_shard(bad, range(4, 10), corrupt={5}, missing={7})
    truncated = tmp_path / "s-000002.tar"
    write_shard(truncated, range(10, 16))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    garbage = tmp_path / "s-000003.tar"
    garbage.write_bytes(b"this is not a tar file" * 50)
    urls = [str(good), str(bad), str(truncated), str(garbage)]

    with pytest.warns(L.SkippedDataWarning):
        loader = TL.taskonomy_eval_loader(urls, batch_size=4, size=SIZE, rank=0, world_size=1, with_keys=True)
        keys = [k for batch in loader for k in batch[3]]
    indices = sorted(key_index(k) for k in keys)
    assert indices[:6] == [0, 1, 2, 3, 4, 6] and 8 in indices and 9 in indices
    assert 5 not in indices and 7 not in indices  # garbage rgb, missing depth
    assert len(indices) == len(set(indices)) and max(indices) < 15  # truncated shard: only complete samples
    assert loader.skips.count >= 4  # 2 samples + truncated shard + garbage shard
    assert any("cannot decode rgb.png" in m for m in loader.skips.messages)

    # training over the same shards completes its epochs too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", L.SkippedDataWarning)
        train = TL.taskonomy_train_loader(
            urls, batch_size=2, size=SIZE, epoch_samples=10, world_size=1, shuffle_buffer=4
        )
        assert len(list(train)) == 5
        assert train.skips.count > 0
        # only broken shards: the epoch ends instead of looping forever
        counter = L.SkipCounter("broken", max_consecutive_failures=20)
        broken = TL.taskonomy_train_loader(
            [str(garbage)], batch_size=2, size=SIZE, epoch_samples=10, world_size=1, skip_counter=counter
        )
        assert list(broken) == []
        assert counter.count > 20


def test_celeba_loader(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "celeba-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            attrs = rng.integers(0, 2, 40).tolist()
            sink.write(
                {
                    "__key__": f"{i:06d}",
                    "png": png(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)),
                    "attr.json": json.dumps({"attributes": attrs}).encode(),
                    "json": json.dumps({"image": f"{i:06d}.jpg", "split": "train"}).encode(),
                }
            )
    batches = list(CL.celeba_loader([str(path)], batch_size=2, train=False, rank=0, world_size=1))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    rgb, targets, masks = batches[0]
    assert rgb.shape == (2, 3, 12, 10) and targets["attributes"].shape == (2, 40)
    assert masks["attributes"].dtype == torch.bool and bool(masks["attributes"].all())  # no labels.json: all labelled
    assert set(targets["attributes"].unique().tolist()) <= {0.0, 1.0}
    train = CL.celeba_loader(
        [str(path)], batch_size=2, train=True, size=8, epoch_samples=6, world_size=1, shuffle_buffer=4
    )
    batches = list(train)
    assert len(batches) == 3 and batches[0][0].shape == (2, 3, 8, 8)


def test_evaluation_reports_samples_against_the_manifest(tmp_path):
    from l2b_fast.data import shards as shard_files

    write_shard(tmp_path / "test-000000.tar", range(0, 4))
    write_shard(tmp_path / "test-000001.tar", range(4, 10), corrupt={5}, missing={7})
    truncated = tmp_path / "test-000002.tar"
    write_shard(truncated, range(10, 16))
    truncated.write_bytes(truncated.read_bytes()[:-3000])  # cuts the last sample(s): lost without a per-sample event
    (tmp_path / "test-000003.tar").write_bytes(b"not a tar file" * 40)  # unreadable: one event, three samples lost
    names = [f"test-{i:06d}.tar" for i in range(4)]
    shard_files.write_manifest(
        tmp_path, "taskonomy", S, {"test": {"shards": names, "samples": [4, 6, 6, 3], "total": 19}}, 0
    )
    urls = [str(tmp_path / name) for name in names]

    with pytest.warns(L.SkippedDataWarning):
        loader = TL.taskonomy_eval_loader(urls, batch_size=4, size=SIZE, rank=0, world_size=1)
        seen = sum(len(batch[0]) for batch in loader)
    skips = loader.skips
    assert loader.expected_samples == 19 and seen < 14
    assert (
        skips.skipped_samples >= 2
        and skips.shard_errors >= 1
        and skips.count == skips.skipped_samples + skips.shard_errors
    )
    assert seen + skips.skipped_samples < 19  # the skip events do not account for every lost sample
    listed = f"evaluated {seen} of the 19 samples the manifest lists: {19 - seen} missing"
    with pytest.warns(L.SkippedDataWarning, match=listed):
        report = L.sample_count_report(loader, seen)
    assert report == {
        "samples": seen,
        "manifest_samples": 19,
        "missing_samples": 19 - seen,
        "skipped_samples": skips.skipped_samples,
        "shard_errors": skips.shard_errors,
    }
    never_read = 19 - seen - skips.skipped_samples  # the numbers of the message add up to the manifest's
    assert (
        f"({skips.skipped_samples} corrupt sample(s) skipped, {never_read} never read ({skips.shard_errors} shard"
        in L.sample_count_message(report)
    )

    complete = TL.taskonomy_eval_loader(urls[:1], batch_size=4, size=SIZE, rank=0, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", L.SkippedDataWarning)  # a complete pass warns about nothing
        report = L.sample_count_report(complete, sum(len(batch[0]) for batch in complete))
    assert report == {
        "samples": 4,
        "manifest_samples": 4,
        "missing_samples": 0,
        "skipped_samples": 0,
        "shard_errors": 0,
    }
    assert L.sample_count_message(report) is None
    # rank 1 of 2 reads shards 1 and 3; shards outside any manifest cannot be compared
    assert TL.taskonomy_eval_loader(urls, batch_size=4, size=SIZE, rank=1, world_size=2).expected_samples == 6 + 3
    (tmp_path / "manifest.json").unlink()
    unlisted = TL.taskonomy_eval_loader(urls[:1], batch_size=4, size=SIZE, rank=0, world_size=1)
    assert unlisted.expected_samples is None
    assert L.sample_count_report(unlisted, 4)["manifest_samples"] is None
    assert L.sample_count_report(unlisted, 4)["missing_samples"] is None


def test_sample_count_message_adds_up_to_the_manifest():
    def message(samples, listed, skipped, shard_errors):
        return L.sample_count_message(
            {"samples": samples, "manifest_samples": listed, "skipped_samples": skipped, "shard_errors": shard_errors}
        )

    # one of two shards truncated: 1 sample evaluated, its partly read sample skipped, 4 never read
    assert message(1, 6, 1, 1) == (
        "evaluated 1 of the 6 samples the manifest lists: 5 missing "
        "(1 corrupt sample(s) skipped, 4 never read (1 shard read error(s)))"
    )
    assert message(4, 6, 2, 0) == (
        "evaluated 4 of the 6 samples the manifest lists: 2 missing (2 corrupt sample(s) skipped)"
    )
    assert message(3, 6, 0, 0) == (
        "evaluated 3 of the 6 samples the manifest lists: 3 missing (3 never read (absent from the shards))"
    )
    assert message(7, 6, 0, 0) == "evaluated 7 samples, more than the 6 the manifest lists for these shards"
    assert message(6, 6, 0, 0) is None and message(6, None, 0, 0) is None


def test_a_broken_shard_warns_once_however_often_it_is_read(tmp_path):
    good, truncated, corrupt = tmp_path / "s-000000.tar", tmp_path / "s-000001.tar", tmp_path / "s-000002.tar"
    write_shard(good, range(0, 4))
    write_shard(truncated, range(4, 10))
    truncated.write_bytes(truncated.read_bytes()[:-3000])
    write_shard(corrupt, range(10, 14), corrupt={10, 12})  # two bad samples: still one warning for the shard
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", L.SkippedDataWarning)
        train = TL.taskonomy_train_loader(
            [str(good), str(truncated), str(corrupt)],
            batch_size=2,
            size=SIZE,
            epoch_samples=12,
            world_size=1,
            shuffle_buffer=2,
        )
        for _ in range(3):  # resampling with replacement: each shard is drawn several times per epoch
            assert len(list(train)) == 6
    warned = [str(w.message) for w in caught if issubclass(w.category, L.SkippedDataWarning)]
    assert sum(f"in shard {truncated};" in m for m in warned) == 1, warned
    assert sum(f"in shard {corrupt};" in m for m in warned) == 1, warned
    assert len(warned) == 2 and "skipped so far" in warned[0] and "counted, not warned" in warned[0]
    assert train.skips.count > len(warned)  # every later event is still counted


def test_loader_workers_are_capped_at_the_usable_cpus(tmp_path, monkeypatch, capsys):
    shard = tmp_path / "s-000000.tar"
    write_shard(shard, range(0, 4))
    monkeypatch.setattr(L, "usable_cpus", lambda: 1)
    monkeypatch.setattr(L, "_capped_worker_notices", set())
    train = TL.taskonomy_train_loader(
        [str(shard)], batch_size=2, size=SIZE, epoch_samples=4, world_size=1, rank=0, num_workers=4
    )
    workers = lambda loader: loader.pipeline[0].num_workers  # noqa: E731 (the DataLoader inside the WebLoader)
    assert workers(train) == 1 and train.batches_per_epoch == 2  # the epoch length follows the capped count
    evaluation = TL.taskonomy_eval_loader([str(shard)], batch_size=2, size=SIZE, rank=0, world_size=1, num_workers=4)
    assert workers(evaluation) == 1
    notices = capsys.readouterr().err.strip().splitlines()
    assert notices == ["data: 4 loader workers asked for, 1 CPU(s) usable: using 1"]  # once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DataLoader's "too many workers" warning among them
        assert sum(len(batch[0]) for batch in evaluation) == 4
