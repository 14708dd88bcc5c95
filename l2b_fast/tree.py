"""The derived tree: architecture selection (paper Eq. 7), pruning, and the ``tree.json`` format.

``tree.json`` (read by external tools; keep it)::

    {"tasks": [task names in order],
     "layers": [{"parents": [one int per child: index of its parent node in the previous layer]}, ...]}

from the first branching block (whose parents are the single input, so all 0) to the task layer (one
child per task, in ``tasks`` order). Pruned trees add ``"supernet_nodes"`` per layer: the index of every
kept node in the supernet's block, so weights can be carried over.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass
class Tree:
    tasks: list[str]
    parents: list[list[int]]  # parents[l][j]: parent of node j of layer l in layer l - 1 (layer -1: the input)
    supernet_nodes: list[list[int]] | None = None  # supernet index of every node (None: identity)

    def __post_init__(self) -> None:
        validate_tree({"tasks": self.tasks, "layers": [{"parents": parents} for parents in self.parents]})
        if self.supernet_nodes is not None:
            if [len(layer) for layer in self.supernet_nodes] != [len(layer) for layer in self.parents]:
                raise ValueError("supernet_nodes must have one entry per node of every layer")

    @property
    def widths(self) -> list[int]:
        return [len(layer) for layer in self.parents]

    def node_origin(self, layer: int, node: int) -> int:
        return node if self.supernet_nodes is None else self.supernet_nodes[layer][node]

    def used_nodes(self) -> list[list[bool]]:
        """Which nodes have a descendant task (the task layer always does)."""
        used = [[False] * width for width in self.widths]
        used[-1] = [True] * self.widths[-1]
        for layer in range(len(self.parents) - 1, 0, -1):
            for child, parent in enumerate(self.parents[layer]):
                if used[layer][child]:
                    used[layer - 1][parent] = True
        return used

    def pruned(self) -> Tree:
        """The tree without nodes that feed no task, renumbered; ``supernet_nodes`` maps back."""
        used = self.used_nodes()
        kept = [[n for n, flag in enumerate(layer) if flag] for layer in used]
        parents = []
        for layer, nodes in enumerate(kept):
            if layer == 0:
                parents.append([0] * len(nodes))
            else:
                renumber = {old: new for new, old in enumerate(kept[layer - 1])}
                parents.append([renumber[self.parents[layer][n]] for n in nodes])
        origin = [[self.node_origin(layer, n) for n in nodes] for layer, nodes in enumerate(kept)]
        return Tree(list(self.tasks), parents, origin)

    @classmethod
    def all_shared(cls, tasks: list[str], layers: int) -> Tree:
        """Every task on one trunk: one node in each of ``layers`` layers, then the task layer."""
        return cls(list(tasks), [[0]] * layers + [[0] * len(tasks)])

    @classmethod
    def independent(cls, tasks: list[str], layers: int) -> Tree:
        """Every task alone: one path of ``layers`` nodes per task, branching at the input."""
        paths = list(range(len(tasks)))
        return cls(list(tasks), [[0] * len(tasks)] + [paths] * layers)

    def to_dict(self) -> dict:
        layers = []
        for layer, parents in enumerate(self.parents):
            entry = {"parents": list(parents)}
            if self.supernet_nodes is not None:
                entry["supernet_nodes"] = list(self.supernet_nodes[layer])
            layers.append(entry)
        return {"tasks": list(self.tasks), "layers": layers}

    @classmethod
    def from_dict(cls, data: dict) -> Tree:
        validate_tree(data)
        layers = data["layers"]
        origins = [layer.get("supernet_nodes") for layer in layers]
        return cls(
            list(data["tasks"]),
            [list(layer["parents"]) for layer in layers],
            origins if all(o is not None for o in origins) else None,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tree:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tree file at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


def validate_tree(tree: dict) -> None:
    """Raises ``ValueError`` naming the problem when ``tree`` is not a valid parsed ``tree.json``."""
    if not isinstance(tree, dict):
        raise ValueError(f"a tree must be a dict, got {type(tree).__name__}")
    for key in ("tasks", "layers"):
        if key not in tree:
            raise ValueError(f'a tree needs "tasks" and "layers"; "{key}" is missing')
    tasks = tree["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise ValueError('"tasks" must be a non-empty list of task names')
    if not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f'"tasks" must hold non-empty strings, got {tasks!r}')
    if len(set(tasks)) != len(tasks):
        duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
        raise ValueError(f'"tasks" must be unique; repeated: {duplicates}')
    layers = tree["layers"]
    if not isinstance(layers, list) or not layers:
        raise ValueError('"layers" must be a non-empty list of {"parents": [...]} objects')
    previous = 1  # the input
    for number, layer in enumerate(layers):
        if not isinstance(layer, dict) or "parents" not in layer:
            raise ValueError(f'layer {number} must be an object with a "parents" list')
        parents = layer["parents"]
        if not isinstance(parents, list) or not parents:
            raise ValueError(f'layer {number}: "parents" must be a non-empty list of ints')
        for child, parent in enumerate(parents):
            if isinstance(parent, bool) or not isinstance(parent, int):
                raise ValueError(f"layer {number} child {child}: parent {parent!r} is not an int")
            if number == 0 and parent != 0:
                raise ValueError(
                    f"layer 0 child {child}: parent {parent} must be 0 (the first layer's parent is the single input)"
                )
            if not 0 <= parent < previous:
                raise ValueError(
                    f"layer {number} child {child}: parent {parent} is out of range (the previous layer has "
                    f"{previous} nodes: 0..{previous - 1})"
                )
        previous = len(parents)
    if previous != len(tasks):
        raise ValueError(f"the task layer (layer {len(layers) - 1}) has {previous} nodes for {len(tasks)} tasks")


def derive(supernet) -> Tree:
    """Paper Eq. 7 on a ``TreeSupernet``: every child keeps its most probable parent (unpruned)."""
    if not callable(getattr(supernet, "derived_parents", None)):  # e.g. a TreeNet: its tree is already fixed
        raise TypeError(f"derive takes a TreeSupernet (the searched supernet), not a {type(supernet).__name__}")
    return Tree(list(supernet.tasks), supernet.derived_parents())
