"""Pictures and text renderings of learned trees and of branching probabilities over training.

* :func:`draw_tree` draws a ``tree.json`` tree like the paper's Fig. 3 (PNG and SVG).
* :func:`tree_text` renders the same tree as indented text for terminals (``l2b show``).
* :func:`draw_probability_heatmaps` draws the ``p.b<b>.i<i>.j<j>`` columns of a trainer ``log.csv``.
* :func:`validate_tree` (from :mod:`l2b_fast.tree`) checks a parsed ``tree.json`` dict; :func:`task_groups`
  groups ``<group>-<index>`` names.

The ``tree.json`` schema (see :mod:`l2b_fast.tree`)::

    {"tasks": [task names in order],
     "layers": [{"parents": [one int per child: index of its parent node in the previous layer]}, ...]}

from the first branching block (parents: the single input, so all 0) to the task layer (one child per
task, in ``tasks`` order); other keys are ignored. matplotlib is imported only inside the drawing
functions (Agg canvas, no pyplot, no global backend switch), so importing this module never needs it;
the drawing functions raise ``ImportError`` when it is missing.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from l2b_fast.tree import validate_tree  # the schema lives with the Tree; re-exported here

__all__ = ["draw_probability_heatmaps", "draw_tree", "task_group", "task_groups", "tree_text", "validate_tree"]

_SHARED_COLOUR = "#5a5a5a"  # nodes above tasks of several groups
_UNUSED_COLOUR = "#d4d4d4"  # nodes no task descends from
_INPUT_COLOUR = "#1f1f1f"
_PROBABILITY_COLUMN = re.compile(r"^p\.b(\d+)\.i(\d+)\.j(\d+)$")


# ----------------------------------------------------------------------------------------- schema
def task_group(name: str) -> str:
    """The group of ``<group>-<index>``: the text before the last ``-`` (``sin_x2-4`` -> ``sin_x2``);
    a name without ``-`` is its own group."""
    head = name.rsplit("-", 1)[0]
    return head if "-" in name and head else name


def task_groups(tasks: Sequence[str]) -> dict[str, list[int]]:
    """Task indices by group (:func:`task_group`), groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(tasks):
        groups.setdefault(task_group(name), []).append(index)
    return groups


# ------------------------------------------------------------------------------------ tree structure
def _tree_dict(tree) -> dict:
    """A parsed ``tree.json`` from a :class:`l2b_fast.tree.Tree`; anything else as given (validate_tree judges it)."""
    if not isinstance(tree, dict) and callable(getattr(tree, "to_dict", None)):
        return tree.to_dict()
    return tree


class _Structure:
    """Children, tasks below and DFS order of every node; node keys are ``(layer, index)``, the input ``(-1, 0)``."""

    ROOT = (-1, 0)

    def __init__(self, tree) -> None:
        tree = _tree_dict(tree)
        validate_tree(tree)
        self.tasks: list[str] = list(tree["tasks"])
        self.parents: list[list[int]] = [list(layer["parents"]) for layer in tree["layers"]]
        self.depth = len(self.parents)
        self.children: dict[tuple[int, int], list[tuple[int, int]]] = {self.ROOT: []}
        for layer, entries in enumerate(self.parents):
            for node in range(len(entries)):
                self.children[(layer, node)] = []
            for node, parent in enumerate(entries):
                self.children[(layer - 1, parent)].append((layer, node))
        # tasks below every node, bottom-up
        self.below: dict[tuple[int, int], list[int]] = {}
        for node in range(len(self.parents[-1])):
            self.below[(self.depth - 1, node)] = [node]
        for layer in range(self.depth - 2, -2, -1):
            width = 1 if layer == -1 else len(self.parents[layer])
            for node in range(width):
                key = (layer, node)
                self.below[key] = sorted(t for child in self.children[key] for t in self.below[child])
        # children ordered by their first task (task order where possible), unused ones last
        for key, kids in self.children.items():
            kids.sort(key=lambda c: (min(self.below[c]) if self.below[c] else math.inf, c[1]))
        self.groups = task_groups(self.tasks)
        self.group_of = {t: g for g, members in self.groups.items() for t in members}

    def used(self, key: tuple[int, int]) -> bool:
        return bool(self.below[key])

    def node_group(self, key: tuple[int, int]) -> str | None:
        """The single group of the tasks below, or None (several groups, or unused)."""
        groups = {self.group_of[t] for t in self.below[key]}
        return groups.pop() if len(groups) == 1 else None

    def preorder(self) -> list[tuple[int, int]]:
        order, stack = [], [self.ROOT]
        while stack:
            key = stack.pop()
            order.append(key)
            stack.extend(reversed(self.children[key]))
        return order

    def name(self, key: tuple[int, int]) -> str:
        if key == self.ROOT:
            return "input"
        if key[0] == self.depth - 1:
            return self.tasks[key[1]]
        return f"L{key[0] + 1}.n{key[1]}"

    def layout(self, dead_end_width: float = 1.0) -> dict[tuple[int, int], float]:
        """Horizontal positions: leaves in DFS order (tasks one slot each, dead ends a narrower slot);
        every used node sits at the mean of the tasks below it, an unused one at the mean of its children."""
        x: dict[tuple[int, int], float] = {}
        cursor = 0.0
        for key in self.preorder():
            if not self.children[key]:
                width = 1.0 if key[0] == self.depth - 1 else dead_end_width
                x[key] = cursor + width / 2
                cursor += width
        self.slots = cursor
        for layer in range(self.depth - 2, -2, -1):
            width = 1 if layer == -1 else len(self.parents[layer])
            for node in range(width):
                key = (layer, node)
                if key in x:
                    continue
                if self.below[key]:
                    x[key] = sum(x[(self.depth - 1, t)] for t in self.below[key]) / len(self.below[key])
                else:
                    kids = self.children[key]
                    x[key] = sum(x[c] for c in kids) / len(kids)
        return x


# ------------------------------------------------------------------------------------------- text
def tree_text(tree) -> str:
    """An indented rendering of ``tree`` (a :class:`~l2b_fast.tree.Tree` or a parsed ``tree.json``) from the input
    down: internal nodes ``L<layer>.n<node>`` with the groups of the tasks below them, leaves with task names,
    unused nodes marked ``(unused)``. Deterministic, ASCII."""
    s = _Structure(tree)
    widths = "-".join(str(len(p)) for p in s.parents)
    grouped = any(len(members) > 1 for members in s.groups.values())

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    lines = [
        f"tree: {plural(len(s.tasks), 'task')}, {plural(s.depth, 'layer')} (widths {widths}), "
        f"{plural(len(s.groups), 'task group')}"
    ]

    def describe(key: tuple[int, int]) -> str:
        if key[0] == s.depth - 1:
            return s.tasks[key[1]]
        label = s.name(key)
        if not s.used(key):
            return f"{label} (unused)"
        count = len(s.below[key])
        text = f"{label} [{count} task{'s' if count != 1 else ''}"
        if grouped:
            counts: dict[str, int] = {}
            for t in s.below[key]:
                counts[s.group_of[t]] = counts.get(s.group_of[t], 0) + 1
            text += ": " + " ".join(f"{g}:{n}" for g, n in counts.items())
        return text + "]"

    lines.append(describe(s.ROOT))

    def walk(key: tuple[int, int], prefix: str) -> None:
        kids = s.children[key]
        for position, child in enumerate(kids):
            last = position == len(kids) - 1
            lines.append(prefix + ("`-- " if last else "|-- ") + describe(child))
            walk(child, prefix + ("    " if last else "|   "))

    walk(s.ROOT, "")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- matplotlib
def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("l2b_fast.viz drawing needs matplotlib: pip install matplotlib") from error
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # Agg, without touching pyplot's global backend
    return figure


_PICTURE_SUFFIXES = (".png", ".svg")


def picture_paths(path: str | Path) -> list[Path]:
    """Where a drawing goes: a path ending in ``.png`` or ``.svg`` is that one file; any other path is a stem
    that gets both (``out/tree`` -> ``out/tree.png``, ``out/tree.svg``; ``out/run.v2`` -> ``out/run.v2.png``, ...)."""
    path = Path(path)
    if path.suffix.lower() in _PICTURE_SUFFIXES:
        return [path]
    return [path.with_name(path.name + suffix) for suffix in _PICTURE_SUFFIXES]


def _save(figure, path_stem: str | Path) -> list[Path]:
    paths = picture_paths(path_stem)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        raster = path.suffix.lower() == ".png"
        figure.savefig(
            path,
            format=path.suffix[1:].lower(),
            bbox_inches="tight",
            facecolor="white",
            **({"dpi": 150} if raster else {}),
        )
    return paths


def _group_colours(groups: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    n = len(groups)
    if n <= 10:
        palette = [colormaps["tab10"](i) for i in range(n)]
    else:  # qualitative colours: tab20 (pairs apart first), then tab20b and tab20c, cycling past 60
        tab20 = [colormaps["tab20"](2 * i) for i in range(10)] + [colormaps["tab20"](2 * i + 1) for i in range(10)]
        pool = tab20 + [colormaps["tab20b"](i) for i in range(20)] + [colormaps["tab20c"](i) for i in range(20)]
        palette = [pool[i % len(pool)] for i in range(n)]
    return dict(zip(groups, palette))


def draw_tree(tree, path_stem: str | Path, *, title: str | None = None) -> list[Path]:
    """Draws ``tree`` (a :class:`~l2b_fast.tree.Tree` or a parsed ``tree.json``) like the paper's Fig. 3 and writes
    ``<stem>.png`` and ``<stem>.svg``, or the one file named when ``path_stem`` ends in ``.png`` or ``.svg``
    (:func:`picture_paths`); returns the paths written. The input is at the top, one row per layer, the task
    layer at the bottom labelled with task names; nodes are coloured by the group of the tasks below them (grey when
    they serve several groups, light grey and dashed when no task uses them), edge widths grow with the
    number of tasks they carry, and every node sits at the mean position of its tasks."""
    from matplotlib.lines import Line2D

    s = _Structure(tree)
    x = s.layout()
    colours = _group_colours(list(s.groups))
    leaf_layer = s.depth - 1
    n_tasks = len(s.tasks)

    # sizes: roughly 0.36 in per leaf slot, legible up to ~40 task names
    slot_in = 0.36 if s.slots > 8 else 0.6
    width = max(2.5, s.slots * slot_in + 1.5)
    fontsize = 9.0
    longest = max(len(t) for t in s.tasks)
    label_in = longest * fontsize * 0.62 / 72
    rotate = label_in > 0.92 * min(slot_in, (width - 1.5) / max(s.slots, 1))
    row_in = 0.75
    height = row_in * (s.depth + 1) + (label_in if rotate else 0.25) + 0.4
    figure = _figure(width, height)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    axes.set_axis_off()

    def y(layer: int) -> float:
        return -(layer + 1.0)

    def colour(key: tuple[int, int]):
        if key == s.ROOT:
            return _INPUT_COLOUR
        if not s.used(key):
            return _UNUSED_COLOUR
        group = s.node_group(key)
        return _SHARED_COLOUR if group is None else colours[group]

    # edges, parent -> child; width by the share of tasks carried
    for key in s.preorder():
        for child in s.children[key]:
            carried = len(s.below[child])
            used = carried > 0
            axes.plot(
                [x[key], x[child]],
                [y(key[0]), y(child[0])],
                color=colour(child) if used else _UNUSED_COLOUR,
                linewidth=(0.9 + 3.2 * math.sqrt(carried / n_tasks)) if used else 0.9,
                linestyle="-" if used else (0, (3, 2)),
                solid_capstyle="round",
                zorder=1,
            )

    # nodes
    slot_pt = 72 * (width - 1.5) / max(s.slots, 1)
    diameter = max(6.0, min(17.0, 0.55 * slot_pt))
    keys = s.preorder()
    axes.scatter(
        [x[k] for k in keys],
        [y(k[0]) for k in keys],
        s=[(diameter * (1.25 if k == s.ROOT else 1.0)) ** 2 for k in keys],
        c=[colour(k) for k in keys],
        edgecolors=["#9a9a9a" if not s.used(k) else "#202020" for k in keys],
        linewidths=0.8,
        zorder=3,
    )
    axes.annotate(
        "input",
        (x[s.ROOT], y(-1)),
        xytext=(0, diameter * 0.75 + 3),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=fontsize + 1,
        fontweight="bold",
    )

    # task names under the leaves, coloured by group
    for t, name in enumerate(s.tasks):
        key = (leaf_layer, t)
        axes.annotate(
            name,
            (x[key], y(leaf_layer)),
            xytext=(0, -(diameter / 2 + 4)),
            textcoords="offset points",
            ha="center",
            va="top",
            rotation=90 if rotate else 0,
            fontsize=fontsize,
            color=colours[s.group_of[t]] if len(s.groups) <= 20 else "#202020",
            fontweight="bold" if len(s.groups) <= 20 else "normal",
        )

    # row labels at the left
    left = -0.35
    for layer in range(s.depth):
        label = f"L{layer + 1}\ntasks" if layer == leaf_layer else f"L{layer + 1}"
        axes.text(left, y(layer), label, ha="right", va="center", fontsize=fontsize - 0.5, color="#707070")
    axes.set_xlim(left - 0.9, s.slots + 0.2)
    axes.set_ylim(y(leaf_layer) - 0.35, y(-1) + 0.45)

    # legend of groups (+ shared / unused when present)
    grouped = any(len(members) > 1 for members in s.groups.values())  # singleton groups: the leaf labels say it all
    handles = []
    if grouped:
        handles = [
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markersize=8,
                markerfacecolor=colours[g],
                markeredgecolor="#202020",
                label=f"{g} ({len(members)})",
            )
            for g, members in s.groups.items()
        ]
    internal = [k for k in keys if k != s.ROOT and k[0] != leaf_layer]
    if any(s.used(k) and s.node_group(k) is None for k in internal):
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markersize=8,
                markerfacecolor=_SHARED_COLOUR,
                markeredgecolor="#202020",
                label="shared (several groups)",
            )
        )
    if any(not s.used(k) for k in internal):
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                linestyle=(0, (3, 2)),
                color=_UNUSED_COLOUR,
                markersize=8,
                markerfacecolor=_UNUSED_COLOUR,
                markeredgecolor="#9a9a9a",
                label="unused",
            )
        )
    if handles:
        columns = 1 if len(handles) <= 14 else math.ceil(len(handles) / 14)
        axes.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
            fontsize=fontsize - 0.5,
            title="task groups" if grouped else None,
            title_fontsize=fontsize,
            ncols=columns,
            handletextpad=0.3,
            columnspacing=1.0,
        )
    if title:
        axes.set_title(title, fontsize=fontsize + 3, pad=4)
    return _save(figure, path_stem)


# ------------------------------------------------------------------------------------ heatmaps
def _read_probabilities(history_csv: Path):
    """(steps, {block: (parents I, children J, {(i, j): column values})}) from a trainer log."""
    import numpy as np

    with open(history_csv, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{history_csv} is empty (no CSV header)")
        rows = [row for row in reader if row]
    header = [h.strip() for h in header]
    probability = {}
    for column, name in enumerate(header):
        match = _PROBABILITY_COLUMN.match(name)
        if match:
            probability[tuple(int(g) for g in match.groups())] = column
    if not probability:
        raise ValueError(
            f"{history_csv} has no branching-probability columns (p.b<block>.i<parent>.j<child>); columns: "
            f"{header[:8]}{' ...' if len(header) > 8 else ''}"
        )

    def number(text: str) -> float:
        text = text.strip()
        if not text:
            return math.nan
        try:
            return float(text)
        except ValueError as error:
            raise ValueError(f"{history_csv}: {text!r} is not a number") from error

    def cell(row: list[str], column: int) -> float:
        return number(row[column]) if column < len(row) else math.nan

    if "step" in header:
        column = header.index("step")
        steps = [cell(row, column) for row in rows]
    else:
        steps = [float(n) for n in range(len(rows))]
    # keep the last row of each step (a resumed run may log a step twice), in step order
    latest = {}
    for index, step in enumerate(steps):
        if not math.isnan(step):
            latest[step] = index
    order = sorted(latest)
    picked = [rows[latest[step]] for step in order]
    blocks: dict[int, dict[tuple[int, int], np.ndarray]] = {}
    for (b, i, j), column in probability.items():
        blocks.setdefault(b, {})[(i, j)] = np.array([cell(row, column) for row in picked], dtype=float)
    result = {}
    for b in sorted(blocks):
        pairs = blocks[b]
        result[b] = (max(i for i, _ in pairs) + 1, max(j for _, j in pairs) + 1, pairs)
    return np.array(order, dtype=float), result, "step" in header


def draw_probability_heatmaps(
    history_csv: str | Path,
    path_stem: str | Path,
    *,
    title: str | None = None,
    tasks: Sequence[str] | None = None,
) -> list[Path]:
    """Draws the branching probabilities of a trainer ``log.csv`` over training and writes
    ``<stem>.png`` and ``<stem>.svg``; returns both paths. One panel per block with more than one parent
    (x: step, rows: ``j<j>←i<i>`` pairs grouped by child, colour: probability in [0, 1]); single-parent
    blocks are constant 1 and skipped (a figure saying so is written when every block is). ``tasks``
    (optional) labels the children of the last block with task names. Raises ``ValueError`` for a CSV
    without ``p.b<b>.i<i>.j<j>`` columns, ``FileNotFoundError`` for a missing file."""
    import numpy as np

    history_csv = Path(history_csv)
    steps, blocks, has_step = _read_probabilities(history_csv)
    shown = {b: v for b, v in blocks.items() if v[0] > 1}
    last_block = max(blocks)

    def message_figure(text: str) -> list[Path]:
        figure = _figure(6.0, 1.6)
        axes = figure.add_axes((0, 0, 1, 1))
        axes.set_axis_off()
        axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, wrap=True)
        if title:
            axes.set_title(title)
        return _save(figure, path_stem)

    if not shown:
        return message_figure(
            f"branching probabilities: all {len(blocks)} block(s) have a single parent,\n"
            "so every probability is constant 1 (nothing to draw)"
        )
    if len(steps) == 0:
        return message_figure("branching probabilities: the log has no rows yet")

    heights = []
    for b, (parents, children, _) in shown.items():
        heights.append(max(1.1, 0.13 * parents * children + 0.5))
    gap, top, bottom = 0.55, 0.7, 0.55  # inches: between panels (room for a panel title), above, below
    total = sum(heights) + gap * (len(heights) - 1) + top + bottom
    figure = _figure(9.0, total)
    grid = figure.add_gridspec(
        len(shown),
        2,
        height_ratios=heights,
        width_ratios=(1.0, 0.018),
        hspace=gap / (sum(heights) / len(heights)),
        wspace=0.02,
        top=1 - top / total,
        bottom=bottom / total,
        left=0.14,
        right=0.93,
    )
    mappable = None
    axes_list = []
    if len(steps) > 1:
        gaps = np.diff(steps)
        edges = np.concatenate([[steps[0] - gaps[0] / 2], steps[:-1] + gaps / 2, [steps[-1] + gaps[-1] / 2]])
    else:
        edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    for panel, (b, (parents, children, pairs)) in enumerate(shown.items()):
        axes = figure.add_subplot(grid[panel, 0], sharex=axes_list[0] if axes_list else None)
        axes_list.append(axes)
        order = [(i, j) for j in range(children) for i in range(parents)]
        values = np.vstack([pairs.get(pair, np.full(len(steps), np.nan)) for pair in order])
        mappable = axes.pcolormesh(
            edges,
            np.arange(len(order) + 1) - 0.5,
            np.ma.masked_invalid(values),
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            shading="flat",
            rasterized=True,
        )
        axes.set_ylim(len(order) - 0.5, -0.5)
        named = tasks is not None and b == last_block and len(tasks) == children
        child_name = (lambda j: str(tasks[j])) if named else (lambda j: f"j{j}")
        rows = len(order)
        if rows <= 60:
            axes.set_yticks(
                range(rows), [f"{child_name(j)}\u2190i{i}" for i, j in order], fontsize=6.5 if rows > 24 else 8
            )
        else:  # too many rows to name each: one tick per child
            axes.set_yticks(
                [j * parents + (parents - 1) / 2 for j in range(children)],
                [child_name(j) for j in range(children)],
                fontsize=6.5,
            )
        for j in range(1, children):
            axes.axhline(j * parents - 0.5, color="white", linewidth=1.2)
        axes.set_title(
            f"block {b} (layer L{b + 1}): {parents} parents \u2192 {children} children", fontsize=9.5, loc="left"
        )
        axes.tick_params(axis="x", labelsize=8)
        if panel < len(shown) - 1:
            axes.tick_params(axis="x", labelbottom=False)
    axes_list[-1].set_xlabel("step" if has_step else "log row", fontsize=9)
    colorbar_axes = figure.add_subplot(grid[:, 1])
    colorbar = figure.colorbar(mappable, cax=colorbar_axes)
    colorbar.set_label("branching probability", fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    skipped = sorted(set(blocks) - set(shown))
    heading = title or "branching probabilities over training"
    if skipped:
        heading += (
            f"  (single-parent block{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))} "
            "omitted: constant 1)"
        )
    figure.suptitle(heading, fontsize=11, x=0.02, y=1 - 0.15 / total, ha="left", va="top")
    return _save(figure, path_stem)


def draw_search_pictures(tree: dict, out: str | Path, name: str) -> None:
    """A search's pictures in ``out``: the tree and the branching probabilities of ``out/log.csv``. Without
    matplotlib, or before any logged row, says so on stderr: the tree and logs are what a search must leave."""
    out = Path(out)
    try:
        draw_tree(tree, out / "tree", title=name)
        draw_probability_heatmaps(
            out / "log.csv", out / "probabilities", title=f"{name}: branching probabilities", tasks=tree["tasks"]
        )
    except (ImportError, ValueError) as error:
        print(f"no pictures ({error}); tree.json and logs are written", file=sys.stderr)
