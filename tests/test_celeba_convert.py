"""Raw CelebA -> shards on fake raw trees in the three usual layouts: round trip, shuffling, bad images,
malformed annotations, resume, CLI and loader. Tiny random JPEGs, CPU only."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("webdataset")

from l2b_fast import cli  # noqa: E402
from l2b_fast.data import shards  # noqa: E402
from l2b_fast.datasets.celeba import convert as cc  # noqa: E402
from l2b_fast.datasets.celeba.synthetic import ATTRIBUTES  # noqa: E402

LAYOUTS = ("flat", "official", "kaggle")
HEIGHT, WIDTH = 21, 17
PARTITION = [0] * 18 + [1] * 6 + [2] * 6  # contiguous, as in the real list_eval_partition
SPLIT_NAMES = ("train", "val", "test")


def jpeg_bytes(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def input_paths(root, layout: str):
    """(image folder, attribute file, partition file) of a raw tree in ``layout``."""
    return {
        "flat": (root / "img_align_celeba", root / "list_attr_celeba.txt", root / "list_eval_partition.txt"),
        "official": (
            root / "Img" / "img_align_celeba",
            root / "Anno" / "list_attr_celeba.txt",
            root / "Eval" / "list_eval_partition.txt",
        ),
        "kaggle": (
            root / "img_align_celeba" / "img_align_celeba",
            root / "list_attr_celeba.csv",
            root / "list_eval_partition.csv",
        ),
    }[layout]


def make_raw(root, layout: str = "flat", seed: int = 0) -> dict[str, dict]:
    """A raw CelebA tree of len(PARTITION) images with annotation files in the real formats; returns
    {stem: {"jpg": bytes, "attributes": [-1/1 x 40], "split": str}}."""
    rng = np.random.default_rng(seed)
    images, attribute_file, partition_file = input_paths(root, layout)
    images.mkdir(parents=True)
    attribute_file.parent.mkdir(parents=True, exist_ok=True)
    partition_file.parent.mkdir(parents=True, exist_ok=True)
    expected = {}
    for index, partition in enumerate(PARTITION, start=1):
        stem = f"{index:06d}"
        data = jpeg_bytes(rng)
        (images / f"{stem}.jpg").write_bytes(data)
        expected[stem] = {
            "jpg": data,
            "attributes": rng.choice([-1, 1], len(ATTRIBUTES)).tolist(),
            "split": SPLIT_NAMES[partition],
            "partition": partition,
        }
    if layout == "kaggle":
        attribute_lines = [",".join(("image_id", *ATTRIBUTES))]
        attribute_lines += [",".join((f"{stem}.jpg", *map(str, e["attributes"]))) for stem, e in expected.items()]
        partition_lines = ["image_id,partition"] + [f"{stem}.jpg,{e['partition']}" for stem, e in expected.items()]
    else:  # count line, names line (with its trailing space), values right-aligned in 2 columns
        attribute_lines = [str(len(expected)), " ".join(ATTRIBUTES) + " "]
        attribute_lines += [
            f"{stem}.jpg " + " ".join(f"{v:2d}" for v in e["attributes"]) for stem, e in expected.items()
        ]
        partition_lines = [f"{stem}.jpg {e['partition']}" for stem, e in expected.items()]
    attribute_file.write_text("\n".join(attribute_lines) + "\n")
    partition_file.write_text("\n".join(partition_lines) + "\n")
    return expected


def read_shards(out, manifest) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """{split: [(key, {member: bytes}) in shard order]} of every shard the manifest lists."""
    splits = {}
    for split, entry in manifest["splits"].items():
        samples: dict[str, dict[str, bytes]] = {}
        for name in entry["shards"]:
            with tarfile.open(out / name) as tar:
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        splits[split] = list(samples.items())
    return splits


def shard_bytes(out, manifest) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for entry in manifest["splits"].values() for name in entry["shards"]}


@pytest.fixture(scope="module", params=LAYOUTS)
def raw(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"raw-{request.param}")
    return root, make_raw(root, request.param)


def test_round_trip_in_every_layout(raw, tmp_path):
    root, expected = raw
    manifest = cc.convert(root, tmp_path, samples_per_shard=7, progress=False)
    assert manifest == shards.read_manifest(tmp_path)
    assert manifest["dataset"] == "celeba" and manifest["size"] == [HEIGHT, WIDTH]
    assert manifest["attributes"] == list(ATTRIBUTES) and manifest["official_counts"] is False
    assert manifest["created_by"] == "l2b_fast.datasets.celeba.convert" and manifest["seed"] == 0
    contents = read_shards(tmp_path, manifest)
    seen = []
    for split, samples in contents.items():
        entry = manifest["splits"][split]
        assert entry["total"] == len(samples) == PARTITION.count(SPLIT_NAMES.index(split)) and entry["skipped"] == 0
        assert entry["samples"] == [min(7, entry["total"] - 7 * i) for i in range(len(entry["shards"]))]
        for key, members in samples:
            assert set(members) == {"jpg", "attr.json", "json"}
            assert members["jpg"] == expected[key]["jpg"]  # the original bytes, not re-encoded
            assert json.loads(members["attr.json"]) == {
                "attributes": [int(v == 1) for v in expected[key]["attributes"]]
            }
            assert (
                json.loads(members["json"]) == {"image": f"{key}.jpg", "split": split}
                and expected[key]["split"] == split
            )
            seen.append(key)
    assert sorted(seen) == sorted(expected)  # every image exactly once


def test_shuffle_is_deterministic_per_seed(raw, tmp_path):
    root, _ = raw
    first = cc.convert(root, tmp_path / "a", samples_per_shard=5, progress=False)
    again = cc.convert(root, tmp_path / "b", samples_per_shard=5, progress=False)
    other = cc.convert(root, tmp_path / "c", samples_per_shard=5, seed=1, progress=False)
    assert shard_bytes(tmp_path / "a", first) == shard_bytes(tmp_path / "b", again)
    order = [key for key, _ in read_shards(tmp_path / "a", first)["train"]]
    assert order != sorted(order)
    assert order != [key for key, _ in read_shards(tmp_path / "c", other)["train"]]


def test_missing_and_corrupt_images_are_skipped_and_logged(tmp_path):
    root = tmp_path / "raw"
    expected = make_raw(root)
    images = root / "img_align_celeba"
    (images / "000002.jpg").unlink()
    (images / "000003.jpg").write_bytes(expected["000003"]["jpg"][: len(expected["000003"]["jpg"]) // 2])
    (images / "000020.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT)).save(buffer, format="PNG")
    (images / "000030.jpg").write_bytes(buffer.getvalue())
    manifest = cc.convert(root, tmp_path / "out", samples_per_shard=4, progress=False)
    assert {split: entry["skipped"] for split, entry in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    keys = {key for samples in read_shards(tmp_path / "out", manifest).values() for key, _ in samples}
    assert keys == set(expected) - {"000002", "000003", "000020", "000030"}
    log = dict(line.split("\t") for line in (tmp_path / "out" / "skipped.tsv").read_text().splitlines())
    assert log.keys() == {"000002", "000003", "000020", "000030"}
    assert log["000002"] == "cannot read 000002.jpg: No such file or directory"
    assert log["000003"].startswith("cannot decode 000003.jpg: OSError")
    assert (
        log["000020"].startswith("cannot decode 000020.jpg: UnidentifiedImageError") and " at 0x" not in log["000020"]
    )
    assert log["000030"] == "000030.jpg is PNG, not JPEG"
    unchecked = cc.convert(root, tmp_path / "unchecked", samples_per_shard=4, progress=False, verify_images=False)
    assert sum(entry["skipped"] for entry in unchecked["splits"].values()) == 1  # only the missing file


MALFORMED = {
    "wrong count": (
        "attributes",
        lambda lines: ["29", *lines[1:]],
        r"list_attr_celeba\.txt:1: says 29 images but the file lists 30",
    ),
    "no count": ("attributes", lambda lines: lines[1:], r"list_attr_celeba\.txt:1: expected the number of images"),
    "39 names": (
        "attributes",
        lambda lines: [lines[0], lines[1].replace("Young", ""), *lines[2:]],
        r"list_attr_celeba\.txt:2: expected 40 attribute names, got 39",
    ),
    "names out of order": (
        "attributes",
        lambda lines: [lines[0], "Arched_Eyebrows 5_o_Clock_Shadow" + lines[1].split("Arched_Eyebrows")[1], *lines[2:]],
        r"list_attr_celeba\.txt:2: attribute 1 is 'Arched_Eyebrows', expected '5_o_Clock_Shadow'",
    ),
    "short row": (
        "attributes",
        lambda lines: [*lines[:4], lines[4][:-3], *lines[5:]],
        r"list_attr_celeba\.txt:5: expected 40 values after 000003\.jpg, got 39",
    ),
    "value 0": (
        "attributes",
        lambda lines: [*lines[:4], lines[4][:-2] + " 0", *lines[5:]],
        r"list_attr_celeba\.txt:5: attribute value '0' is not -1 or 1",
    ),
    "duplicate attribute row": (
        "attributes",
        lambda lines: ["31", *lines[1:], lines[2]],
        r"list_attr_celeba\.txt:33: duplicate image 000001\.jpg",
    ),
    "bad image name": (
        "attributes",
        lambda lines: [*lines[:2], "a.b" + lines[2][6:], *lines[3:]],
        r"list_attr_celeba\.txt:3: bad image name 'a\.b\.jpg'",
    ),
    "partition value 3": (
        "partition",
        lambda lines: [*lines[:6], lines[6][:-1] + "3", *lines[7:]],
        r"list_eval_partition\.txt:7: expected an image name and 0 \(train\), 1 \(val\) or 2 \(test\), got "
        r"'000007\.jpg 3'",
    ),
    "duplicate partition row": (
        "partition",
        lambda lines: [*lines, lines[0]],
        r"list_eval_partition\.txt:31: duplicate image 000001\.jpg",
    ),
    "image only in the attributes": (
        "partition",
        lambda lines: lines[:-1],
        r"list different images: 0 only in the partition \[\], 1 only in the attributes \['000030\.jpg'\]",
    ),
    "image only in the partition": (
        "partition",
        lambda lines: [*lines, "000031.jpg 2"],
        r"list different images: 1 only in the partition \['000031\.jpg'\], 0 only",
    ),
    "empty attribute file": ("attributes", lambda lines: [], r"list_attr_celeba\.txt: empty file"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_annotations_raise_with_file_and_line(case, tmp_path):
    which, edit, message = MALFORMED[case]
    make_raw(tmp_path)
    path = tmp_path / ("list_attr_celeba.txt" if which == "attributes" else "list_eval_partition.txt")
    path.write_text("".join(line + "\n" for line in edit(path.read_text().splitlines())))
    with pytest.raises(ValueError, match=message):
        cc.convert(tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # annotations are checked before anything is written


def test_malformed_kaggle_headers(tmp_path):
    make_raw(tmp_path, "kaggle")
    attribute_file = tmp_path / "list_attr_celeba.csv"
    attribute_file.write_text(attribute_file.read_text().replace("image_id,", "image,", 1))
    with pytest.raises(ValueError, match=r"list_attr_celeba\.csv:1: expected a header starting with image_id"):
        cc.read_attributes(attribute_file)
    partition_file = tmp_path / "list_eval_partition.csv"
    partition_file.write_text(partition_file.read_text().replace("partition", "split", 1))
    with pytest.raises(ValueError, match=r"list_eval_partition\.csv:1: expected the header image_id,partition"):
        cc.read_partition(partition_file)


def test_windows_line_endings_parse_the_same(tmp_path):
    make_raw(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    unix = cc.read_attributes(path)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert cc.read_attributes(path) == unix


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no raw CelebA directory"):
        cc.convert(tmp_path / "nothing", tmp_path / "out")
    make_raw(tmp_path, "official")
    (tmp_path / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=(
            "no CelebA partition file under .*: looked for list_eval_partition.txt, "
            "Eval/list_eval_partition.txt, list_eval_partition.csv"
        ),
    ):
        cc.convert(tmp_path, tmp_path / "out")
    shutil.rmtree(tmp_path / "Img")
    with pytest.raises(
        FileNotFoundError,
        match=(
            "no CelebA image folder under .*: looked for img_align_celeba/img_align_celeba, img_align_celeba, "
            "Img/img_align_celeba"
        ),
    ):
        cc.find_inputs(tmp_path)


def test_resume_after_interruption_matches_a_full_run(tmp_path):
    root = tmp_path / "raw"
    make_raw(root)
    for stem in ("000004", "000011", "000017", "000023"):  # skips before and after the first shard
        (root / "img_align_celeba" / f"{stem}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    full = cc.convert(root, tmp_path / "full", samples_per_shard=4, progress=False)
    cut = tmp_path / "cut"
    assert cc.convert(root, cut, samples_per_shard=4, progress=False, stop_after_shards=1) == {}
    (cut / "train-000001.tar.partial").write_bytes(b"half a shard")  # what a kill while writing leaves
    with (cut / "skipped.tsv").open("a") as log:  # a kill after logging a skip, before committing its shard
        log.write("000099\tlogged but not committed\n")
    with pytest.raises(ValueError, match="--resume"):
        cc.convert(root, cut, samples_per_shard=4, progress=False)
    resumed = cc.convert(root, cut, samples_per_shard=4, progress=False, resume=True)
    assert resumed == full and sum(entry["skipped"] for entry in full["splits"].values()) == 4
    assert shard_bytes(cut, resumed) == shard_bytes(tmp_path / "full", full)
    assert (cut / "skipped.tsv").read_text() == (tmp_path / "full" / "skipped.tsv").read_text()
    with pytest.raises(ValueError, match="other settings"):
        cc.convert(root, cut, samples_per_shard=4, seed=1, progress=False, resume=True)
    with pytest.raises(ValueError, match="other settings"):
        cc.convert(root, cut, samples_per_shard=4, verify_images=False, progress=False, resume=True)
    with pytest.raises(ValueError, match="already holds a conversion"):
        cc.convert(root, tmp_path / "full", samples_per_shard=4, progress=False)


def test_cli_end_to_end(tmp_path, capsys):
    make_raw(tmp_path / "raw", "kaggle")
    out = tmp_path / "shards"
    assert (
        cli.main(
            [
                "data",
                "celeba",
                "--root",
                str(tmp_path / "raw"),
                "--out",
                str(out),
                "--samples-per-shard",
                "8",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "train: 18 samples in 3 shard(s)",
        "val: 6 samples in 1 shard(s)",
        "test: 6 samples in 1 shard(s)",
        f"wrote {out}/manifest.json",
    ]
    assert "warning:" in captured.err and "train: train-000000.tar (8 images, 8/18 scanned)" in captured.err
    assert shards.read_manifest(out)["seed"] == 3
    assert (
        cli.main(["data", "celeba", "--root", str(tmp_path / "raw"), "--out", str(out), "--resume", "--no-verify"]) == 2
    )
    assert "other settings" in capsys.readouterr().err


def test_shards_load_through_the_celeba_loader(raw, tmp_path):
    from l2b_fast.datasets.celeba.loaders import celeba_loader

    root, expected = raw
    cc.convert(root, tmp_path, samples_per_shard=4, progress=False)
    loader = celeba_loader(
        shards.shard_paths(tmp_path, "val"),
        batch_size=4,
        train=False,
        size=(HEIGHT, WIDTH),
        rank=0,
        world_size=1,
        with_keys=True,
    )
    seen = []
    for rgb, targets, masks, keys in loader:
        assert bool(masks["attributes"].all())
        assert rgb.shape[1:] == (3, HEIGHT, WIDTH) and rgb.min() >= -1 and rgb.max() <= 1
        for image, attributes, key in zip(rgb.numpy(), targets["attributes"].numpy(), keys, strict=True):
            decoded = (
                np.asarray(Image.open(io.BytesIO(expected[key]["jpg"])).convert("RGB"), dtype=np.float32) * (2 / 255)
                - 1
            )
            np.testing.assert_allclose(image.transpose(1, 2, 0), decoded, atol=1e-6)
            np.testing.assert_array_equal(attributes, [float(v == 1) for v in expected[key]["attributes"]])
            seen.append(key)
    assert sorted(seen) == [key for key, e in expected.items() if e["split"] == "val"]
