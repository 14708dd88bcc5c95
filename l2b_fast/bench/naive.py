"""The naive branching block existing Learning-to-Branch code uses, the baseline of the benchmarks.

Per child: ``F.gumbel_softmax(hard=True)`` over the parents, then a weighted sum over ALL stacked parents.
Same value and gradients as ``l2b_fast.ops.branch`` in distribution, at ~3 I J N bytes per step
(docs/design.md, section 2) plus O(J) small launches. :class:`NaiveSupernet` runs a whole supernet that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def branch_naive(parents: Sequence[torch.Tensor], logits: torch.Tensor, tau: float) -> list[torch.Tensor]:
    stacked = torch.stack(list(parents))  # [I, *S]
    broadcast = (-1,) + (1,) * (stacked.dim() - 1)
    children = []
    for j in range(logits.shape[1]):
        weights = F.gumbel_softmax(logits[:, j], tau=tau, hard=True)  # [I], one-hot value, soft gradient
        children.append((weights.to(stacked.dtype).view(broadcast) * stacked).sum(dim=0))
    return children


class NaiveSupernet(torch.nn.Module):
    """A ``TreeSupernet``'s search step as existing Learning-to-Branch code runs it: the baseline.

    Every block: :func:`branch_naive` (per child ``F.gumbel_softmax(hard=True)`` and a weighted sum over
    all parents), then the child nodes one at a time. It uses the supernet's own nodes, logits, temperature
    and heads (no copies), so its optimizer steps update the same parameters as the supernet's.
    """

    def __init__(self, supernet: torch.nn.Module):
        super().__init__()
        self.supernet = supernet

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.supernet
        parents = [x]
        for branching, nodes in zip(net.branchings, net.nodes):
            inputs = branch_naive(parents, branching.logits, branching.tau)
            parents = [node(inputs[j]) for j, node in enumerate(nodes)]
        return {task: net.heads[task](parents[k]) for k, task in enumerate(net.tasks)}
