"""The naive branching block existing Learning-to-Branch code uses, the baseline of the benchmarks.

Per child: ``F.gumbel_softmax(hard=True)`` over the parents, then a weighted sum over ALL stacked parents.
Same value and gradients as ``l2b_fast.ops.branch`` in distribution, at ~3 I J N bytes per step
(DESIGN.md section 2) plus O(J) small launches.
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
