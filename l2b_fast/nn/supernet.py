"""The tree supernet of Learning to Branch: stacked branching blocks of arbitrary child nodes."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from l2b_fast.nn.branching import Branching
from l2b_fast.nn.grouped import GroupedBlock, UnsupportedNodeError, check_conv_backend
from l2b_fast.ops import _validation
from l2b_fast.ops.branching import derive_seed

NodeFactory = Callable[[int, int], nn.Module]  # (block index, child index) -> node
EXECUTIONS = ("auto", "grouped", "per_child")


class GroupedFallbackWarning(UserWarning):
    """``execution="auto"`` runs a block per child because its nodes cannot run grouped."""


def check_execution(execution: str | None, *, allow_none: bool = False) -> None:
    if execution is None and allow_none:
        return
    if not isinstance(execution, str) or execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}{' or None' if allow_none else ''}, got {execution!r}")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One branching block: ``children`` child nodes built by ``node(block_index, child_index)``.

    The nodes of one block must map inputs of one shape to outputs of one shape (they are stacked).
    ``execution`` overrides the supernet's ``execution`` for this block (``None``: the supernet's).
    """

    children: int
    node: NodeFactory
    execution: str | None = None

    def __post_init__(self):
        check_execution(self.execution, allow_none=True)


def make_heads(
    tasks: Sequence[str], heads: Mapping[str, nn.Module] | Callable[[str], nn.Module] | None
) -> nn.ModuleDict:
    if heads is None:
        return nn.ModuleDict({task: nn.Identity() for task in tasks})
    if callable(heads) and not isinstance(heads, Mapping):
        return nn.ModuleDict({task: heads(task) for task in tasks})
    missing = [task for task in tasks if task not in heads]
    if missing:
        raise ValueError(f"no head for tasks {missing}")
    return nn.ModuleDict({task: heads[task] for task in tasks})


def check_blocks(blocks: Sequence[BlockSpec], tasks: Sequence[str]) -> None:
    if not blocks:
        raise ValueError("a supernet needs at least one block")
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ValueError(f"tasks must be unique and non-empty, got {list(tasks)}")
    if blocks[-1].children != len(tasks):
        raise ValueError(
            f"the last block must have one child per task: {blocks[-1].children} children, {len(tasks)} tasks"
        )
    for b, spec in enumerate(blocks):
        if spec.children < 1:
            raise ValueError(f"block {b} has {spec.children} children")


def stack_outputs(block: int, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack the J node outputs of ``block``; nodes giving different shapes are a model error, named here."""
    shapes = [tuple(out.shape) for out in outputs]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(
            f"the nodes of block {block} give outputs of different shapes {shapes}; the nodes of one block must "
            "map one input shape to one output shape"
        )
    return torch.stack(list(outputs))


def run_per_child(
    block: int, branching: Branching, nodes: nn.ModuleList, parents: torch.Tensor, generator, seed=None
) -> torch.Tensor:
    """The reference execution: gather every child's input ``[J, *S]``, then run the nodes one by one."""
    inputs = branching(parents, generator=generator, seed=seed)
    return stack_outputs(
        block, [node(x) for node, x in zip(nodes, inputs.unbind(0))]
    )  # unbind: one backward, not J zero-filled selects


class TreeSupernet(nn.Module):
    """Every block samples each child's parent among the previous block's nodes; returns {task: output}.

    The first block's parent is the input itself (I = 1); the last block has one child per task, in the
    order of ``tasks``, followed by that task's head. All nodes of every block are computed (the logits'
    gradient needs every parent's output).

    Args:
        blocks: the blocks, input side first.
        tasks: task names (the last block's children, in order).
        heads: per-task modules after the last block (dict or factory ``task -> module``); default identity.
        tau, backend: initial temperature and op backend of every branching block.
        execution: how each block runs its children (a strategy: parameters and ``state_dict`` are the
            same for all): ``"per_child"`` runs the J nodes one after another on gathered inputs (the
            reference); ``"grouped"`` runs all J children of a block as one batched launch per layer;
            ``"auto"`` groups every block whose nodes are supported and runs the others per child (and,
            on CPU, blocks whose per-child inputs are large, where grouping measured slower).
        conv_backend: the first convolution of grouped blocks that gather (CUDA): ``"cudnn"`` (default) or
            ``"triton"`` (reads the parents through the sampled index; unmeasured on a GPU so far, see
            :class:`~l2b_fast.nn.grouped.GroupedBlock`); also :meth:`set_conv_backend`.
    """

    def __init__(
        self,
        blocks: Sequence[BlockSpec],
        tasks: Sequence[str],
        heads: Mapping[str, nn.Module] | Callable[[str], nn.Module] | None = None,
        *,
        tau: float = 1.0,
        backend: str | None = None,
        execution: str = "auto",
        conv_backend: str = "cudnn",
    ):
        super().__init__()
        check_execution(execution)
        check_blocks(blocks, tasks)
        self.tasks = list(tasks)
        widths = [1] + [spec.children for spec in blocks]
        self.branchings = nn.ModuleList(
            Branching(widths[b], widths[b + 1], tau=tau, backend=backend) for b in range(len(blocks))
        )
        self.nodes = nn.ModuleList(
            nn.ModuleList(spec.node(b, j) for j in range(spec.children)) for b, spec in enumerate(blocks)
        )
        self.heads = make_heads(self.tasks, heads)
        self._block_executions = [spec.execution for spec in blocks]
        self.set_conv_backend(conv_backend)
        self.set_execution(execution)

    def set_execution(self, execution: str) -> None:
        """Choose how blocks run (blocks whose ``BlockSpec`` named one keep it); call it again after
        replacing node submodules. ``self.executions`` lists what each block runs: grouped or per_child."""
        check_execution(execution)
        self._grouped: list[GroupedBlock | None] = []
        fallbacks = []
        for block, (own, nodes) in enumerate(zip(self._block_executions, self.nodes)):
            wanted = own or execution
            grouped = None
            if wanted != "per_child":
                try:
                    grouped = GroupedBlock(
                        nodes, block, automatic=wanted == "auto", conv_backend=getattr(self, "conv_backend", "cudnn")
                    )
                except UnsupportedNodeError as error:
                    if wanted == "grouped":
                        raise UnsupportedNodeError(f"execution='grouped': {error}") from None
                    fallbacks.append(str(error))
            self._grouped.append(grouped)
        self.executions = ["per_child" if grouped is None else "grouped" for grouped in self._grouped]
        if fallbacks:  # once, here, not on every forward
            warnings.warn(
                "execution='auto' runs these blocks per child: " + "; ".join(fallbacks),
                GroupedFallbackWarning,
                stacklevel=3,
            )

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, seed: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{task: output}``. Sampling noise (search and frozen modes): every block draws its own seed from
        ``generator`` (default: the device's default generator), or, with ``seed`` (one step seed, an int64
        one-element tensor on the logits' device), block b samples with ``ops.derive_seed(seed, b)``: derived
        on the device, so a ``torch.compile(fullgraph=True)``d step that ``fill_``s ``seed`` compiles once
        and a CUDA graph replays it with each step's seed. The same seed gives the same tree for every
        execution and backend."""
        _validation.check_seed(seed, generator=generator, device=self.branchings[0].logits.device)
        parents = x.unsqueeze(0)
        for block, (branching, nodes, grouped) in enumerate(zip(self.branchings, self.nodes, self._grouped)):
            block_seed = None if seed is None else derive_seed(seed, block)
            if grouped is None or not grouped.worth_grouping(parents):
                parents = run_per_child(block, branching, nodes, parents, generator, block_seed)
            else:
                parents = grouped(branching, parents, generator, block_seed)
        return {task: self.heads[task](x) for task, x in zip(self.tasks, parents.unbind(0))}

    def set_conv_backend(self, conv_backend: str) -> None:
        """The first convolution of every grouped block that gathers: ``"cudnn"`` or ``"triton"`` (kept
        across :meth:`set_execution`)."""
        check_conv_backend(conv_backend)
        self.conv_backend = conv_backend
        for grouped in getattr(self, "_grouped", []):
            if grouped is not None:
                grouped.conv_backend = conv_backend

    def set_tau(self, tau: float) -> None:
        for branching in self.branchings:
            branching.tau = tau

    def set_mode(self, mode: str) -> None:
        for branching in self.branchings:
            branching.mode = mode

    def logits_parameters(self) -> list[nn.Parameter]:
        return [branching.logits for branching in self.branchings]

    def weight_parameters(self) -> list[nn.Parameter]:
        logits = {id(p) for p in self.logits_parameters()}
        return [p for p in self.parameters() if id(p) not in logits]

    def probabilities(self) -> list[torch.Tensor]:
        return [branching.probabilities() for branching in self.branchings]

    def derived_parents(self) -> list[list[int]]:
        return [branching.derived_parents() for branching in self.branchings]
