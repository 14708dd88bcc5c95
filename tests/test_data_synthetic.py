"""Synthetic Taskonomy/CelebA generators and the shard writer (l2b_fast.data.shards / synthetic_*): encodings,
label consistency, determinism, manifest vs tar contents, manifest errors. CPU only, tiny sizes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("webdataset")
Image = pytest.importorskip("PIL.Image")

from l2b_fast.data import shards as SH  # noqa: E402
from l2b_fast.datasets.celeba import synthetic as SC  # noqa: E402
from l2b_fast.datasets.taskonomy import synthetic as ST  # noqa: E402


def _scenes(count=6, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [ST.make_scene(rng, size) for _ in range(count)]


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Members grouped by key (basename up to the first '.', as webdataset does), no decoders."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


# ------------------------------------------------------------------------------------------------ PNG codec
def test_png_roundtrip_keeps_16_bit_and_8_bit():
    depth = np.array([[0, 1, 65535], [512, 40000, 65534]], dtype=np.uint16)
    data = SH.encode_png(depth)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "I;16"
        assert np.asarray(image).max() == 65535  # the raw PIL path the loaders use
    back = SH.decode_png(data)
    assert back.dtype == np.uint16 and np.array_equal(back, depth)
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = np.arange(36, dtype=np.uint8).reshape(3, 4, 3)
    assert np.array_equal(SH.decode_png(SH.encode_png(grey)), grey)
    assert np.array_equal(SH.decode_png(SH.encode_png(rgb)), rgb)
    with pytest.raises(ValueError):
        SH.encode_png(depth.astype(np.int32))
    with pytest.raises(ValueError):
        SH.decode_png(b"not a png")


# ------------------------------------------------------------------------------------------------ Taskonomy
def test_modalities_dtypes_shapes_encodings():
    for scene in _scenes():
        assert set(scene) == set(ST.DOMAINS)
        assert scene["rgb"].dtype == np.uint8 and scene["rgb"].shape == (64, 64, 3)
        assert scene["normal"].dtype == np.uint8 and scene["normal"].shape == (64, 64, 3)
        for name in ("depth_zbuffer", "edge_texture", "keypoints2d"):
            assert scene[name].dtype == np.uint16 and scene[name].shape == (64, 64)
        assert scene["segment_semantic"].dtype == np.uint8 and scene["segment_semantic"].shape == (64, 64)
        seg = scene["segment_semantic"]
        assert seg.max() <= 17 and (seg == 1).any()
        depth = scene["depth_zbuffer"].astype(np.int64)
        valid = depth != 65535
        assert depth[valid].max() < 20 * 512 and depth[valid].min() > 0.1 * 512  # metres in a room, 1/512 m units
        # valid normals decode to unit vectors
        n = scene["normal"][valid].astype(np.float64) / 255 * 2 - 1
        assert np.allclose(np.linalg.norm(n, axis=1), 1.0, atol=0.02)
        assert 0 < scene["edge_texture"].max() < 20000
        assert 300 < scene["keypoints2d"].max() < 3000 or scene["keypoints2d"].max() == 0


def test_depth_holes_match_normal_128_and_uncertain_segmentation():
    scenes = _scenes(8)
    assert any((s["depth_zbuffer"] == 65535).any() for s in scenes), "some views must have holes (windows)"
    for s in scenes:
        hole = s["depth_zbuffer"] == 65535
        normal128 = (s["normal"] == 128).all(-1)
        assert np.array_equal(hole, normal128)  # exactly the depth holes, nowhere else
        assert (s["segment_semantic"][hole] == 0).all()


def test_boxes_visible_in_segmentation_depth_and_keypoints():
    scenes = _scenes(8)
    with_boxes = [s for s in scenes if (s["segment_semantic"] >= 2).any()]
    assert len(with_boxes) >= 4
    for s in with_boxes:
        seg, depth = s["segment_semantic"], s["depth_zbuffer"].astype(np.int64)
        assert (depth[seg >= 2] != 65535).all()
        assert s["keypoints2d"].max() > 0
        # silhouettes are depth discontinuities: box pixel two columns away from background, > 5 cm jump
        left, right = seg[:, :-2], seg[:, 2:]
        edge = ((left >= 2) & (right == 1)) | ((left == 1) & (right >= 2))
        if edge.sum() >= 5:
            jumps = np.abs(depth[:, :-2] - depth[:, 2:])[edge]
            assert (jumps > 0.05 * 512).mean() > 0.5
        # the uncertain rim: box classes are surrounded by 0 (a box pixel never touches background directly)
        inner = seg[1:-1, 1:-1]
        assert not ((inner >= 2) & (seg[1:-1, 2:] == 1)).any()


def test_rgb_follows_class_colour():
    """The same class looks alike across scenes (so segmentation is learnable from rgb)."""
    scenes = _scenes(12, seed=3)
    for label in range(2, 18):
        means = [
            s["rgb"][s["segment_semantic"] == label].mean(0)
            for s in scenes
            if (s["segment_semantic"] == label).sum() > 20
        ]
        if len(means) >= 2:
            assert np.abs(means[0] - means[1]).max() < 120


def test_make_scene_deterministic():
    a, b = _scenes(2, seed=7), _scenes(2, seed=7)
    for x, y in zip(a, b):
        for name in ST.DOMAINS:
            assert np.array_equal(x[name], y[name])
    c = _scenes(1, seed=8)[0]
    assert not np.array_equal(a[0]["rgb"], c["rgb"])


def test_taskonomy_generate_shards_and_manifest(tmp_path):
    manifest = ST.generate(tmp_path / "a", 23, size=16, seed=1, samples_per_shard=7)
    assert manifest == SH.read_manifest(tmp_path / "a")
    assert manifest["dataset"] == "taskonomy" and manifest["size"] == 16 and manifest["seed"] == 1
    splits = manifest["splits"]
    assert {k: v["total"] for k, v in splits.items()} == {"train": 19, "val": 2, "test": 2}
    assert splits["train"]["samples"] == [7, 7, 5] and splits["train"]["shards"][0] == "train-000000.tar"
    buildings = {}
    for split, entry in splits.items():
        for name, count in zip(entry["shards"], entry["samples"]):
            samples = _tar_samples(tmp_path / "a" / name)
            assert len(samples) == count
            for key, members in samples.items():
                assert "." not in key
                assert set(members) == {f"{d}.png" for d in ST.DOMAINS} | {"json"}
                meta = json.loads(members["json"])
                assert key == f"{meta['building']}_point_{meta['point']}_view_{meta['view']}" and meta["size"] == 16
                buildings.setdefault(split, set()).add(meta["building"])
                depth = SH.decode_png(members["depth_zbuffer.png"])
                assert depth.dtype == np.uint16 and depth.shape == (16, 16)
                assert SH.decode_png(members["normal.png"]).shape == (16, 16, 3)
    assert not buildings["train"] & buildings["val"] and not buildings["val"] & buildings["test"]
    # deterministic to the byte; another seed differs
    ST.generate(tmp_path / "b", 23, size=16, seed=1, samples_per_shard=7)
    ST.generate(tmp_path / "c", 23, size=16, seed=2, samples_per_shard=7)
    digest = lambda d: [hashlib.sha256((d / n).read_bytes()).hexdigest() for n in splits["train"]["shards"]]  # noqa: E731
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_taskonomy_shards_readable_by_webdataset(tmp_path):
    import webdataset as wds

    ST.generate(tmp_path, 5, size=16, splits=(("train", 1.0),))
    urls = SH.shard_paths(tmp_path, "train")
    samples = list(wds.WebDataset(urls, shardshuffle=False))  # no decoders: raw bytes
    assert len(samples) == 5
    assert SH.decode_png(samples[0]["depth_zbuffer.png"]).dtype == np.uint16


# ------------------------------------------------------------------------------------------------ CelebA
def test_celeba_attributes_binary_and_correlated():
    rng = np.random.default_rng(0)
    attrs = np.array([SC.sample_attributes(rng) for _ in range(2000)])
    assert attrs.shape == (2000, 40) and set(np.unique(attrs)) <= {0, 1}
    assert len(SC.ATTRIBUTES) == 40 and SC.ATTRIBUTES[0] == "5_o_Clock_Shadow" and SC.ATTRIBUTES[-1] == "Young"
    assert (attrs.mean(0) > 0.01).all() and (attrs.mean(0) < 0.99).all()
    corr = np.corrcoef(attrs.T.astype(np.float64))
    i = {name: k for k, name in enumerate(SC.ATTRIBUTES)}
    assert corr[i["Male"], i["Goatee"]] > 0.2 and corr[i["Male"], i["Heavy_Makeup"]] < -0.3
    assert corr[i["Smiling"], i["Mouth_Slightly_Open"]] > 0.3 and corr[i["Young"], i["Gray_Hair"]] < -0.2


@pytest.mark.parametrize("base", ["zeros", "ones", "sampled"])
def test_celeba_each_attribute_changes_the_image(base):
    a = {
        "zeros": np.zeros(40, np.int64),
        "ones": np.ones(40, np.int64),
        "sampled": SC.sample_attributes(np.random.default_rng(11)),
    }[base]
    for k, name in enumerate(SC.ATTRIBUTES):
        off, on = a.copy(), a.copy()
        off[k], on[k] = 0, 1
        img_off = SC.render_face(off, 64, np.random.default_rng(5)).astype(np.int64)
        img_on = SC.render_face(on, 64, np.random.default_rng(5)).astype(np.int64)
        assert img_on.shape == (64, 64, 3)
        assert (np.abs(img_on - img_off).sum(-1) > 30).sum() >= 3, f"{name} is not visible ({base})"


def test_celeba_generate(tmp_path):
    manifest = SC.generate(tmp_path, 10, size=32, seed=4, samples_per_shard=4)
    assert manifest == SH.read_manifest(tmp_path)
    assert manifest["dataset"] == "celeba" and manifest["attributes"] == list(SC.ATTRIBUTES)
    keys = []
    for split, entry in manifest["splits"].items():
        for name, count in zip(entry["shards"], entry["samples"]):
            samples = _tar_samples(tmp_path / name)
            assert len(samples) == count
            for key, members in samples.items():
                assert set(members) == {"png", "attr.json", "json"}
                attributes = json.loads(members["attr.json"])["attributes"]
                assert len(attributes) == 40 and set(attributes) <= {0, 1}
                assert json.loads(members["json"]) == {"image": f"{key}.png", "split": split}
                image = SH.decode_png(members["png"])
                assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
                keys.append(key)
    assert sorted(keys) == [f"{i:06d}" for i in range(1, 11)]
    again = SC.generate(tmp_path / "again", 10, size=32, seed=4, samples_per_shard=4)
    first = manifest["splits"]["train"]["shards"][0]
    assert (tmp_path / first).read_bytes() == (tmp_path / "again" / first).read_bytes()
    assert again["splits"] == manifest["splits"]


# ------------------------------------------------------------------------------------------------ manifest
def test_read_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match="no manifest"):
        SH.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        SH.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "taskonomy", "size": 16}))
    with pytest.raises(ValueError, match="splits"):
        SH.read_manifest(tmp_path)
    entry = SH.write_split(
        ({"__key__": f"k{i}", "json": {"i": i}} for i in range(5)), tmp_path, "train", samples_per_shard=2
    )
    assert entry == {
        "shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"],
        "samples": [2, 2, 1],
        "total": 5,
    }
    SH.write_manifest(tmp_path, "taskonomy", 16, {"train": entry}, 0)
    assert SH.read_manifest(tmp_path)["splits"]["train"]["total"] == 5
    bad = dict(entry, total=6)
    SH.write_manifest(tmp_path, "taskonomy", 16, {"train": bad}, 0)
    with pytest.raises(ValueError, match="total"):
        SH.read_manifest(tmp_path)
    SH.write_manifest(tmp_path, "taskonomy", 16, {"train": entry}, 0)
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(ValueError, match="missing shard"):
        SH.read_manifest(tmp_path)


def test_write_split_rejects_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="key"):
        SH.write_split([{"__key__": "a.b", "json": {}}], tmp_path, "train")
    with pytest.raises(ValueError, match="duplicate"):
        SH.write_split([{"__key__": "a", "json": {}}, {"__key__": "a", "json": {}}], tmp_path, "train")
