"""l2b_fast.viz: tree pictures, text trees, schema checks and branching-probability heatmaps (CPU, fast)."""

from __future__ import annotations

import copy
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from l2b_fast import viz  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SYNTHETIC_A_TASKS = [f"{group}-{i}" for group in ("bent", "square", "sinc") for i in range(5)]
# Paper Fig. 3(a), pruned: one branch per activation; layers permuted so the drawing must reorder them.
SYNTHETIC_A = {
    "tasks": SYNTHETIC_A_TASKS,
    "layers": [
        {"parents": [0, 0, 0]},
        {"parents": [0, 1, 2]},
        {"parents": [1, 0, 2]},
        {"parents": [0, 2, 1]},
        {"parents": [1] * 5 + [0] * 5 + [2] * 5},
    ],
}
# Unpruned: L1.n1 (and its child L2.n2) and L1.n2, L3.n2 feed no task; square and sinc share a trunk to L3.
UNPRUNED = {
    "tasks": SYNTHETIC_A_TASKS,
    "layers": [
        {"parents": [0, 0, 0]},
        {"parents": [0, 0, 1]},
        {"parents": [0, 1, 1]},
        {"parents": [0, 1, 1]},
        {"parents": [0] * 5 + [2] * 5 + [1] * 5},
    ],
    "supernet_nodes_note": "extra keys are ignored",
}
CHAIN = {"tasks": ["only"], "layers": [{"parents": [0]}, {"parents": [0]}, {"parents": [0]}]}
CELEBA = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male "
    "Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
FORTY = {
    "tasks": CELEBA,
    "layers": [
        {"parents": [0, 0, 0, 0]},
        {"parents": [0, 1, 2, 3]},
        {"parents": [0, 0, 1, 2, 3, 3]},
        {"parents": [i % 6 for i in range(40)]},
    ],
}
TREES = {"synthetic_a": SYNTHETIC_A, "unpruned": UNPRUNED, "chain": CHAIN, "forty": FORTY}


def assert_png_and_svg(paths: list[Path], stem: Path) -> None:
    assert [p.name for p in paths] == [stem.name + ".png", stem.name + ".svg"]
    png, svg = paths
    assert png.is_file() and svg.is_file()
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "<svg" in svg.read_text()


# ----------------------------------------------------------------------------------------- trees
@pytest.mark.parametrize("name", TREES)
def test_draw_tree_writes_png_and_svg(tmp_path, name):
    stem = tmp_path / "out" / f"{name}.tree"  # missing folder and a dot in the stem
    paths = viz.draw_tree(TREES[name], stem, title=name)
    assert_png_and_svg(paths, stem)
    svg = paths[1].read_text()
    for task in TREES[name]["tasks"]:
        assert task in svg  # every task label is drawn


def test_draw_tree_accepts_str_stem_and_no_title(tmp_path):
    paths = viz.draw_tree(CHAIN, str(tmp_path / "chain"))
    assert_png_and_svg(paths, tmp_path / "chain")


def test_draw_tree_writes_only_the_file_a_png_or_svg_path_names(tmp_path):
    png = viz.draw_tree(CHAIN, tmp_path / "out" / "tree.png")
    assert png == [tmp_path / "out" / "tree.png"] and png[0].read_bytes()[:8] == PNG_MAGIC
    svg = viz.draw_tree(CHAIN, str(tmp_path / "out" / "tree.SVG"))  # any case
    assert svg == [tmp_path / "out" / "tree.SVG"] and "<svg" in svg[0].read_text()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["tree.SVG", "tree.png"]  # no tree.png.png
    assert viz.picture_paths("out/run.v2") == [Path("out/run.v2.png"), Path("out/run.v2.svg")]  # other dots: a stem


def test_tree_text_and_draw_tree_take_a_tree_or_its_dict(tmp_path):
    from l2b_fast.tree import Tree

    tree = Tree(CHAIN["tasks"], [layer["parents"] for layer in CHAIN["layers"]])
    assert viz.tree_text(tree) == viz.tree_text(CHAIN)
    assert_png_and_svg(viz.draw_tree(tree, tmp_path / "chain"), tmp_path / "chain")
    with pytest.raises(ValueError, match="a tree must be a dict, got list"):
        viz.tree_text([CHAIN])


def test_matplotlib_is_lazy_and_pyplot_untouched(tmp_path):
    # one fresh interpreter: importing viz needs no matplotlib, drawing never imports pyplot (no backend switch).
    # viz.py is loaded from its file so the check skips the (slow, torch-importing) package __init__.
    script = (
        "import sys, importlib.util; "
        f"spec = importlib.util.spec_from_file_location('viz', {viz.__file__!r}); "
        "viz = importlib.util.module_from_spec(spec); spec.loader.exec_module(viz); "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'; "
        f"viz.draw_tree({CHAIN!r}, {str(tmp_path / 't')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / "t.png").is_file()


@pytest.mark.parametrize("name", TREES)
def test_tree_text_names_every_task_and_is_deterministic(name):
    tree = TREES[name]
    text = viz.tree_text(tree)
    assert text == viz.tree_text(copy.deepcopy(tree))
    lines = text.splitlines()
    assert lines[1].startswith("input")
    for task in tree["tasks"]:
        assert any(line.endswith("-- " + task) for line in lines), task
    assert text.isascii()


def test_tree_text_structure_synthetic_a():
    text = viz.tree_text(SYNTHETIC_A)
    assert text.splitlines()[0] == "tree: 15 tasks, 5 layers (widths 3-3-3-3-15), 3 task groups"
    assert "input [15 tasks: bent:5 square:5 sinc:5]" in text
    assert "(unused)" not in text
    # leaves appear in task order within each group, groups in task order
    order = [
        line.rsplit("-- ", 1)[1]
        for line in text.splitlines()
        if line.rstrip().rsplit("-- ", 1)[-1] in SYNTHETIC_A_TASKS
    ]
    assert order == SYNTHETIC_A_TASKS


def test_tree_text_marks_unused_nodes():
    text = viz.tree_text(UNPRUNED)
    unused = sorted(line.split("-- ")[1].split()[0] for line in text.splitlines() if "(unused)" in line)
    assert unused == ["L1.n1", "L1.n2", "L2.n2", "L3.n2"]
    assert "L3.n1 [10 tasks: square:5 sinc:5]" in text


def test_tree_text_chain():
    assert viz.tree_text(CHAIN) == (
        "tree: 1 task, 3 layers (widths 1-1-1), 1 task group\ninput [1 task]\n"
        "`-- L1.n0 [1 task]\n    `-- L2.n0 [1 task]\n        `-- only\n"
    )


def test_layout_trunks_sit_above_their_leaves_and_edges_do_not_cross():
    s = viz._Structure(UNPRUNED)
    x = s.layout()
    leaf = s.depth - 1
    for key, tasks in s.below.items():
        if tasks:
            assert math.isclose(x[key], sum(x[(leaf, t)] for t in tasks) / len(tasks))
    # no crossings: within every layer, the order of nodes matches the order of their parents
    for layer in range(s.depth):
        nodes = sorted(range(len(s.parents[layer])), key=lambda n: x[(layer, n)])
        parent_x = [x[(layer - 1, s.parents[layer][n])] for n in nodes]
        assert parent_x == sorted(parent_x)
    # task groups are contiguous in the leaf order
    leaves = sorted(range(len(s.tasks)), key=lambda t: x[(leaf, t)])
    assert leaves == list(range(15))


def test_task_groups():
    assert viz.task_groups(["bent-0", "sin_x2-4", "bent-1", "a-b-c-7", "plain", "-3"]) == {
        "bent": [0, 2],
        "sin_x2": [1],
        "a-b-c": [3],
        "plain": [4],
        "-3": [5],
    }
    assert list(viz.task_groups(SYNTHETIC_A_TASKS)) == ["bent", "square", "sinc"]


# ---------------------------------------------------------------------------------- validation
def _broken(**changes):
    tree = copy.deepcopy(SYNTHETIC_A)
    for key, value in changes.items():
        if value is None:
            del tree[key]
        else:
            tree[key] = value
    return tree


@pytest.mark.parametrize(
    "tree, message",
    [
        ([1, 2], "must be a dict"),
        (_broken(tasks=None), '"tasks" is missing'),
        (_broken(layers=None), '"layers" is missing'),
        (_broken(tasks=[]), "non-empty list"),
        (_broken(tasks=SYNTHETIC_A_TASKS[:-1] + ["bent-0"]), "unique"),
        (_broken(layers=[]), "non-empty list"),
        (_broken(layers=[{"parents": [0]}, {"children": [0]}]), 'layer 1 must be an object with a "parents" list'),
        (_broken(layers=[{"parents": [0, 0, 1]}] + SYNTHETIC_A["layers"][1:]), "layer 0 child 2: parent 1 must be 0"),
        (
            _broken(layers=SYNTHETIC_A["layers"][:2] + [{"parents": [0, 3, 1]}] + SYNTHETIC_A["layers"][3:]),
            "layer 2 child 1: parent 3 is out of range",
        ),
        (
            _broken(layers=SYNTHETIC_A["layers"][:2] + [{"parents": [0, -1, 1]}] + SYNTHETIC_A["layers"][3:]),
            "out of range",
        ),
        (
            _broken(layers=SYNTHETIC_A["layers"][:2] + [{"parents": [0, 1.0, 1]}] + SYNTHETIC_A["layers"][3:]),
            "is not an int",
        ),
        (
            _broken(layers=SYNTHETIC_A["layers"][:2] + [{"parents": [0, True, 1]}] + SYNTHETIC_A["layers"][3:]),
            "is not an int",
        ),
        (
            _broken(layers=SYNTHETIC_A["layers"][:4] + [{"parents": [0] * 14}]),
            "task layer (layer 4) has 14 nodes for 15 tasks",
        ),
    ],
)
def test_validate_tree_errors(tree, message, tmp_path):
    with pytest.raises(ValueError) as error:
        viz.validate_tree(tree)
    assert message in str(error.value)
    with pytest.raises(ValueError):
        viz.tree_text(tree)
    with pytest.raises(ValueError):
        viz.draw_tree(tree, tmp_path / "bad")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", TREES)
def test_validate_tree_accepts_valid_trees(name):
    viz.validate_tree(TREES[name])


# ------------------------------------------------------------------------------------ heatmaps
def write_log(path: Path, shapes, steps=(10, 20, 30, 40), extra_rows=()) -> Path:
    """A trainer-like log.csv: blocks of (parents I, children J); probabilities softmaxed over parents."""
    columns = ["step", "epoch", "tau", "loss", "loss.bent-0"]
    for b, (parents, children) in enumerate(shapes):
        columns += [f"p.b{b}.i{i}.j{j}" for j in range(children) for i in range(parents)]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for n, step in enumerate(steps):
            row = [step, n // 2, 50 / math.sqrt(step), 1.0 / step, 0.5]
            for parents, children in shapes:
                for j in range(children):
                    logits = [(n + 1) * (1.0 if i == j % parents else 0.0) for i in range(parents)]
                    total = sum(math.exp(v) for v in logits)
                    row += [math.exp(v) / total for v in logits]
            writer.writerow(row)
        for row in extra_rows:
            writer.writerow(row)
    return path


def test_heatmaps_write_png_and_svg(tmp_path):
    log = write_log(tmp_path / "log.csv", [(1, 3), (3, 3), (3, 2)])
    stem = tmp_path / "plots" / "probabilities"
    paths = viz.draw_probability_heatmaps(log, stem)
    assert_png_and_svg(paths, stem)
    svg = paths[1].read_text()
    assert "block 1" in svg and "block 2" in svg and "block 0 (" not in svg  # single-parent block 0 skipped
    assert "j1\u2190i2" in svg  # row labels j<child>←i<parent>


def test_heatmaps_task_names_and_title(tmp_path):
    log = write_log(tmp_path / "log.csv", [(1, 2), (2, 3)])
    paths = viz.draw_probability_heatmaps(str(log), str(tmp_path / "p"), title="run a", tasks=["x-0", "x-1", "y-0"])
    svg = paths[1].read_text()
    assert "run a" in svg and "y-0" in svg


def test_heatmaps_unordered_duplicate_and_blank_rows(tmp_path):
    # a resumed run may log a step twice and out of order; blank cells are drawn as gaps
    log = write_log(
        tmp_path / "log.csv", [(2, 2)], steps=(30, 10, 20), extra_rows=[[20, 1, 1.0, 0.1, 0.2, "", "", "", ""]]
    )
    steps, blocks, has_step = viz._read_probabilities(log)
    assert has_step and list(steps) == [10.0, 20.0, 30.0]
    parents, children, pairs = blocks[0]
    assert (parents, children) == (2, 2)
    assert math.isnan(pairs[(0, 0)][1])  # the later step-20 row (blank) wins
    assert_png_and_svg(viz.draw_probability_heatmaps(log, tmp_path / "p"), tmp_path / "p")


def test_heatmaps_single_step_and_many_rows(tmp_path):
    log = write_log(tmp_path / "log.csv", [(1, 4), (4, 20)], steps=(5,))
    assert_png_and_svg(viz.draw_probability_heatmaps(log, tmp_path / "p"), tmp_path / "p")


def test_heatmaps_all_single_parent_still_writes_a_figure(tmp_path):
    log = write_log(tmp_path / "log.csv", [(1, 1), (1, 1)])
    paths = viz.draw_probability_heatmaps(log, tmp_path / "p")
    assert_png_and_svg(paths, tmp_path / "p")
    assert "single parent" in paths[1].read_text()


def test_heatmaps_no_rows_yet(tmp_path):
    log = write_log(tmp_path / "log.csv", [(1, 2), (2, 2)], steps=())
    assert_png_and_svg(viz.draw_probability_heatmaps(log, tmp_path / "p"), tmp_path / "p")


def test_heatmaps_errors(tmp_path):
    no_probabilities = tmp_path / "epochs.csv"
    no_probabilities.write_text("step,epoch,tau,loss,loss.bent-0\n1,0,50,1.0,1.0\n")
    with pytest.raises(ValueError, match="no branching-probability columns"):
        viz.draw_probability_heatmaps(no_probabilities, tmp_path / "p")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        viz.draw_probability_heatmaps(empty, tmp_path / "p")
    bad = write_log(tmp_path / "bad.csv", [(2, 1)], extra_rows=[[50, 0, 1.0, 0.1, 0.2, "oops", 0.5]])
    with pytest.raises(ValueError, match="not a number"):
        viz.draw_probability_heatmaps(bad, tmp_path / "p")
    with pytest.raises(FileNotFoundError):
        viz.draw_probability_heatmaps(tmp_path / "missing.csv", tmp_path / "p")
    assert not (tmp_path / "p.png").exists()
