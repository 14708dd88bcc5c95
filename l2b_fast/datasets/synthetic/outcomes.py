"""What the paper's synthetic experiment should find (Fig. 3) and whether every task learned."""

from __future__ import annotations

from l2b_fast.tree import Tree
from l2b_fast.viz import task_group

DEFAULT_LEARNED_THRESHOLD = 0.5  # a task learned when its final loss on z-scored targets is below this


def learning_report(final: dict[str, float], tasks: list[str], threshold: float) -> dict:
    """Per-task final losses (validation when there is a validation split) and whether each task learned:
    its loss on z-scored targets below ``threshold`` (predicting the mean scores 1)."""
    split = "validation" if all(f"val_{task}" in final for task in tasks) else "training"
    losses = {task: final[f"val_{task}"] if split == "validation" else final[task] for task in tasks}
    not_learned = [task for task in tasks if not losses[task] < threshold]
    return {
        "task_losses_split": split,
        "task_losses": losses,
        "group_losses": group_means(losses),
        "learned_threshold": threshold,
        "all_tasks_learned": not not_learned,
        "tasks_not_learned": not_learned,
    }


def group_means(losses: dict[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for task, value in losses.items():
        groups.setdefault(task_group(task), []).append(value)
    return {group: sum(values) / len(values) for group, values in groups.items()}


def learning_line(summary: dict) -> str:
    """One line: did every task learn (final loss below the threshold), and which did not."""
    threshold, split = summary["learned_threshold"], summary["task_losses_split"]
    if summary["all_tasks_learned"]:
        worst = max(summary["task_losses"].values())
        return (
            f"all {len(summary['task_losses'])} tasks learned ({split} loss < {threshold:g}; worst {worst:.3f}; "
            "predicting the mean scores 1)"
        )
    missed = ", ".join(f"{task} {summary['task_losses'][task]:.3f}" for task in summary["tasks_not_learned"])
    return f"NOT every task learned ({split} loss >= {threshold:g}): {missed}"


def _paths(tree: Tree) -> dict[str, tuple[int, ...]]:
    """Each task's ancestors in the fully-connected layers (layer 0 .. the last before the task layer)."""
    paths = {}
    for k, task in enumerate(tree.tasks):
        node, path = tree.parents[-1][k], []
        for layer in range(len(tree.parents) - 2, -1, -1):
            path.append(node)
            node = tree.parents[layer][node]
        paths[task] = tuple(reversed(path))
    return paths


def check_outcome(tree: Tree, expected: str) -> bool:
    """Paper Fig. 3: (a) each group has its own leaf branch; (b) every task shares every layer;
    (c) cos and sinc share a leaf, square has its own and splits from them before the leaf layer."""
    paths = _paths(tree)
    leaves: dict[str, set[int]] = {}
    for task, path in paths.items():
        leaves.setdefault(task_group(task), set()).add(path[-1])
    if expected == "a":
        return all(len(nodes) == 1 for nodes in leaves.values()) and len(set().union(*leaves.values())) == len(leaves)
    if expected == "b":
        return len(set(paths.values())) == 1
    if expected == "c":
        if not {"cos", "sinc", "square"} <= set(leaves) or any(len(leaves[g]) != 1 for g in ("cos", "sinc", "square")):
            return False
        if leaves["cos"] != leaves["sinc"] or leaves["square"] == leaves["cos"]:
            return False
        square = next(p for t, p in paths.items() if task_group(t) == "square")
        cos = next(p for t, p in paths.items() if task_group(t) == "cos")
        return len(square) >= 2 and square[-2] != cos[-2]
    raise ValueError(f"unknown expected outcome {expected!r} (a, b or c)")
