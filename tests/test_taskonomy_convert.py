"""Raw Taskonomy -> shards on fake raw trees in every layout: missing/corrupt files, resume."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("webdataset")

from l2b_fast.data import shards  # noqa: E402
from l2b_fast.datasets.taskonomy import convert as tc  # noqa: E402
from l2b_fast.datasets.taskonomy.protocol import TASKS  # noqa: E402

OLD_NAMES = {
    "depth_zbuffer": "depth",
    "segment_semantic": "segmentsemantic",
    "edge_texture": "edge2d",
    "keypoints2d": "keypoint2d",
}


def raw_arrays(rng: np.random.Generator, size: int = 512) -> dict[str, np.ndarray]:
    depth = rng.integers(0, 60000, (size, size), dtype=np.uint16)
    depth[:8, :8] = 65535
    normal = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    normal[:8, :8] = 128
    return {
        "rgb": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "depth_zbuffer": depth,
        "normal": normal,
        "edge_texture": rng.integers(0, 9000, (size, size), dtype=np.uint16),
        "keypoints2d": rng.integers(0, 1100, (size, size), dtype=np.uint16),
        "segment_semantic": rng.integers(0, 18, (size, size), dtype=np.uint8),
    }


def write_raw(root, layout: str, building: str, point: int, view: int, arrays: dict, *, skip=(), corrupt=()):
    for domain, array in arrays.items():
        if domain in skip:
            continue
        name = OLD_NAMES.get(domain, domain) if layout == "2018" else domain
        folder = {
            "omnidata": root / name / "taskonomy" / building,
            "flat": root / name / building,
            "2018": root / building / name,
        }[layout]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"point_{point}_view_{view}_domain_{name}.png"
        if domain in corrupt:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        else:
            Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory):
    """3 train buildings (one per layout), 1 val, 1 test; in train, one view with a missing task file, one with a
    corrupt task file (both kept with the other tasks), one with a corrupt rgb and one with no task (skipped)."""
    root = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    expected = {}
    for layout, building in (
        ("omnidata", "hanson"),
        ("flat", "merom"),
        ("2018", "klickitat"),
        ("flat", "darden"),
        ("omnidata", "ihlen"),
    ):
        for view in range(2):
            arrays = raw_arrays(rng)
            write_raw(root, layout, building, 7, view, arrays)
            expected[f"{building}_point_7_view_{view}"] = arrays
    write_raw(root, "flat", "merom", 9, 0, raw_arrays(rng), skip=("normal",))
    write_raw(root, "2018", "klickitat", 9, 0, raw_arrays(rng), corrupt=("depth_zbuffer",))
    write_raw(root, "flat", "merom", 9, 1, raw_arrays(rng), corrupt=("rgb",))
    write_raw(root, "omnidata", "hanson", 9, 0, raw_arrays(rng), skip=tuple(TASKS))
    write_raw(root, "flat", "nothere", 1, 0, raw_arrays(rng))  # a building outside the split
    return root, expected


def read_shards(out, names):
    samples = {}
    for name in names:
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_converts_every_layout_keeps_partial_views_and_skips_bad_ones(raw_tree, tmp_path):
    root, expected = raw_tree
    manifest = tc.convert(root, tmp_path, size=256, samples_per_shard=4, progress=False)
    train = manifest["splits"]["train"]
    assert train["total"] == 8 and train["skipped"] == 2 and train["samples"] == [4, 4]
    assert manifest["splits"]["val"]["total"] == 2 and manifest["splits"]["test"]["total"] == 2
    assert train["labels"] == {
        task: 8 if task in ("segment_semantic", "keypoints2d", "edge_texture") else 7 for task in TASKS
    }
    assert manifest["splits"]["val"]["labels"] == dict.fromkeys(TASKS, 2)
    samples = read_shards(tmp_path, [s for split in manifest["splits"].values() for s in split["shards"]])
    assert set(samples) == set(expected) | {"merom_point_9_view_0", "klickitat_point_9_view_0"}
    for key, arrays in expected.items():
        assert "labels.json" not in samples[key]  # a view with every task has no labels.json
        for domain, array in arrays.items():
            decoded = np.asarray(Image.open(io.BytesIO(samples[key][f"{domain}.png"])))
            np.testing.assert_array_equal(decoded, array[::2, ::2])  # cv2 nearest, 16-bit kept
        meta = json.loads(samples[key]["json"])
        assert meta["size"] == 256 and key.startswith(meta["building"])
    assert (
        samples["hanson_point_7_view_0"]["depth_zbuffer.png"]
        and np.asarray(Image.open(io.BytesIO(samples["hanson_point_7_view_0"]["depth_zbuffer.png"]))).max() == 65535
    )
    for key, lost in (("merom_point_9_view_0", "normal"), ("klickitat_point_9_view_0", "depth_zbuffer")):
        assert json.loads(samples[key]["labels.json"]) == [task for task in TASKS if task != lost]
        assert f"{lost}.png" not in samples[key] and "rgb.png" in samples[key]
    log = (tmp_path / "skipped.tsv").read_text()
    assert "merom_point_9_view_1\tcannot decode" in log and "hanson_point_9_view_0\tno task label" in log
    assert "merom_point_9_view_0" not in log and "klickitat_point_9_view_0" not in log


def test_partial_views_load_with_their_task_unlabelled(raw_tree, tmp_path):
    from l2b_fast.datasets.taskonomy.loaders import taskonomy_eval_loader

    root, _ = raw_tree
    tc.convert(root, tmp_path, size=256, samples_per_shard=4, progress=False)
    loader = taskonomy_eval_loader(
        shards.shard_paths(tmp_path, "train"), batch_size=4, size=32, rank=0, world_size=1, with_keys=True
    )
    seen = {}
    for _, targets, masks, keys in loader:
        for index, key in enumerate(keys):
            seen[key] = {task: bool(mask[index].any()) for task, mask in masks.items()}
            if key == "klickitat_point_9_view_0":
                assert not seen[key]["depth_zbuffer"]
    assert seen["merom_point_9_view_0"] == {task: task != "normal" for task in TASKS}
    assert seen["klickitat_point_9_view_0"] == {task: task != "depth_zbuffer" for task in TASKS}
    assert seen["hanson_point_7_view_0"]["normal"] and len(seen) == 8


def test_resume_after_interruption_matches_a_full_run(raw_tree, tmp_path):
    root, _ = raw_tree
    full = tc.convert(root, tmp_path / "full", samples_per_shard=3, progress=False)
    assert tc.convert(root, tmp_path / "cut", samples_per_shard=3, progress=False, stop_after_shards=1) == {}
    (tmp_path / "cut" / "train-000001.tar.partial").write_bytes(b"half a shard")  # what a kill leaves behind
    with pytest.raises(ValueError, match="--resume"):
        tc.convert(root, tmp_path / "cut", samples_per_shard=3, progress=False)
    resumed = tc.convert(root, tmp_path / "cut", samples_per_shard=3, progress=False, resume=True)
    assert resumed == full
    for name in (s for split in full["splits"].values() for s in split["shards"]):
        assert read_shards(tmp_path / "full", [name]) == read_shards(tmp_path / "cut", [name])
    assert (tmp_path / "full" / "skipped.tsv").read_text() == (tmp_path / "cut" / "skipped.tsv").read_text()
    with pytest.raises(ValueError, match="other settings"):
        tc.convert(root, tmp_path / "cut", samples_per_shard=5, progress=False, resume=True)


def test_resume_of_a_progress_file_from_before_the_skip_log_length(raw_tree, tmp_path):
    """progress.json written by the first converter version has no skipped_log_bytes: it still resumes."""
    root, _ = raw_tree
    full = tc.convert(root, tmp_path / "full", samples_per_shard=3, progress=False)
    tc.convert(root, tmp_path / "cut", samples_per_shard=3, progress=False, stop_after_shards=1)
    progress = tmp_path / "cut" / "progress.json"
    state = json.loads(progress.read_text())
    del state["skipped_log_bytes"]
    progress.write_text(json.dumps(state))
    assert tc.convert(root, tmp_path / "cut", samples_per_shard=3, progress=False, resume=True) == full
    assert (tmp_path / "full" / "skipped.tsv").read_text() == (tmp_path / "cut" / "skipped.tsv").read_text()


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        tc.convert(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="size"):
        tc.convert(tmp_path, tmp_path / "out", size=300)
    with pytest.raises(ValueError, match="split"):
        tc.convert(tmp_path, tmp_path / "out", split="full")


def test_same_input_gives_byte_identical_shards(raw_tree, tmp_path):
    root, _ = raw_tree
    first = tc.convert(root, tmp_path / "a", samples_per_shard=4, progress=False)
    second = tc.convert(root, tmp_path / "b", samples_per_shard=4, progress=False)
    names = [name for split in first["splits"].values() for name in split["shards"]]
    assert first == second and all(
        (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() for name in names
    )
