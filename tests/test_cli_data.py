"""`l2b data`: the failures a new user hit end with one clear line and exit 2, with nothing half-written; the
README's `l2b data` commands parse."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from l2b_fast import cli

pytest.importorskip("webdataset")

README = Path(__file__).resolve().parent.parent / "README.md"

# In a fresh interpreter in which `import webdataset` fails as if it were not installed: runs each `l2b` command
# line given as JSON, then imports the loader module; prints [[exit code, stderr], ...] and the import error.
WITHOUT_WEBDATASET = """
import contextlib, io, json, sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name == "webdataset" or name.startswith("webdataset."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from l2b_fast import cli
results = []
for argv in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        results.append([cli.main(argv), stderr.getvalue()])
try:
    import l2b_fast.data.loader
except ImportError as error:
    results.append(f"{type(error).__name__}: {error}")
print(json.dumps(results))
"""


def test_missing_webdataset_names_the_install_command(tmp_path):
    out = tmp_path / "shards"
    commands = [
        ["data", "synthetic-taskonomy", "--out", str(out), "--n", "4"],
        ["data", "taskonomy", "--root", str(tmp_path), "--out", str(out)],
    ]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_WEBDATASET, json.dumps(commands)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    *runs, import_error = json.loads(result.stdout)
    for code, stderr in runs:
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("l2b data: error:"), stderr
        assert (
            "'webdataset'" in lines[0]
            and "pip install --no-build-isolation -e '.[data]'" in lines[0]
            and "pip install webdataset pillow" in lines[0]
        )
    assert not out.exists()
    assert import_error.startswith("MissingDataDependency:") and "-e '.[data]'" in import_error


def test_converting_an_empty_root_fails_before_writing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert cli.main(["data", "taskonomy", "--root", str(empty), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        len(error.splitlines()) == 1
        and "no Taskonomy view of the tiny split's buildings" in error
        and "it is empty" in error
    )
    assert not out.exists()
    (empty / "some_building").mkdir()
    assert cli.main(["data", "taskonomy", "--root", str(empty), "--out", str(out)]) == 2
    assert "it holds some_building" in capsys.readouterr().err
    assert cli.main(["data", "celeba", "--root", str(empty), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no CelebA image folder" in error
    assert not out.exists()


def test_conversion_where_every_view_is_skipped_fails_without_a_manifest(tmp_path, capsys):
    root = tmp_path / "raw"
    view = root / "rgb" / "taskonomy" / "hanson" / "point_0_view_0_domain_rgb.png"
    view.parent.mkdir(parents=True)
    view.write_bytes(b"not a png")  # the only view: and its other five domains are missing
    out = tmp_path / "out"
    assert cli.main(["data", "taskonomy", "--root", str(root), "--out", str(out)]) == 2
    assert "no sample could be converted: all 1 were skipped" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == ["skipped.tsv"]  # no manifest, no progress file, no shard
    assert "cannot decode point_0_view_0_domain_rgb.png" in (out / "skipped.tsv").read_text()  # rgb comes first
    assert cli.main(["data", "taskonomy", "--root", str(root), "--out", str(out)]) == 2  # a rerun is not refused
    assert "no sample could be converted" in capsys.readouterr().err


def shard_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*.tar"))


def test_synthetic_into_a_non_empty_folder_refuses_or_overwrites_cleanly(tmp_path, capsys):
    out = tmp_path / "syn"
    make = ["data", "synthetic-celeba", "--out", str(out), "--size", "16"]
    assert cli.main([*make, "--n", "12", "--samples-per-shard", "2"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert len(shard_files(out)) == 7  # train 10 -> 5 shards, val 1, test 1
    capsys.readouterr()

    assert cli.main([*make, "--n", "4"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is not empty" in error and "--overwrite" in error
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # untouched

    assert cli.main([*make, "--n", "5", "--overwrite"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    listed = sorted(name for entry in manifest["splits"].values() for name in entry["shards"])
    assert shard_files(out) == listed and len(listed) < 7  # no stale shard left for a glob to pick up
    assert sum(entry["total"] for entry in manifest["splits"].values()) == 5

    (out / "notes.txt").write_text("mine")
    assert cli.main([*make, "--n", "4", "--overwrite"]) == 2
    assert "not shards (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and shard_files(out) == listed  # nothing deleted


def test_readme_data_commands_parse():
    """Every `l2b data ...` line of the README's and the docs' shell examples is a valid command line."""
    pages = [README, *sorted((README.parent / "docs").glob("*.md"))]
    blocks = [block for page in pages for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
    lines = [
        line.split("#")[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip().startswith("l2b data ")
    ]
    assert len(lines) >= 4
    parser = cli.build_parser()
    for line in lines:
        required_only = re.sub(r"\[[^\]]*\]", "", line)  # "[--resume]" marks an optional argument
        args = parser.parse_args(required_only.split()[1:])
        assert args.command == "data", line


@pytest.mark.parametrize(
    "kind, module", [("synthetic-celeba", "celeba.synthetic"), ("synthetic-taskonomy", "taskonomy.synthetic")]
)
def test_synthetic_size_has_one_minimum_the_generators(tmp_path, capsys, kind, module):
    import importlib

    minimum = importlib.import_module(f"l2b_fast.datasets.{module}").MIN_SIZE
    out = tmp_path / "syn"
    assert cli.main(["data", kind, "--out", str(out), "--n", "3", "--size", str(minimum - 1)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"size >= {minimum}" in error, error
    assert re.findall(r">= (\d+)", error) == [str(minimum)]  # one number, no second contradicting minimum
    assert not out.exists()
    assert cli.main(["data", kind, "--out", str(out), "--n", "3", "--size", str(minimum)]) == 0
    assert (out / "manifest.json").is_file()
    assert cli.main(["data", kind, "--out", str(tmp_path / "none"), "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
