"""The reference backend: the obviously-correct pure-PyTorch formulas every other backend is held to."""

from __future__ import annotations

import torch

from l2b_fast.ops._philox import gumbel_noise


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def noise_or_seeded(logits: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None) -> torch.Tensor:
    """The gumbel noise a sample uses: the given tensor, or Philox noise drawn from ``seed``."""
    if noise is None:
        noise = gumbel_noise(seed, logits.shape[0], logits.shape[1])
    return noise.to(_acc_dtype(logits.dtype))


def sample_branches_ref(
    logits: torch.Tensor, tau: float, noise: torch.Tensor | None, seed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """index[j] = argmax_i (logits + noise)[i, j]; soft = softmax_i((logits + noise) / tau), differentiable.

    The maximum is subtracted before dividing by tau (softmax is shift-invariant): ``(logits + noise) / tau``
    itself can overflow for huge logits and tiny tau, the shifted difference only reaches -inf (exp = 0).
    """
    perturbed = logits.to(_acc_dtype(logits.dtype)) + noise_or_seeded(logits, noise, seed)
    best = perturbed.detach().max(dim=0, keepdim=True).values
    return perturbed.argmax(dim=0), torch.softmax((perturbed - best) / tau, dim=0).to(logits.dtype)


def branch_ref(
    parents: torch.Tensor, logits: torch.Tensor, tau: float, noise: torch.Tensor | None, seed: torch.Tensor | None
) -> torch.Tensor:
    """Straight-through gumbel-softmax over all parents, exactly ``F.gumbel_softmax(hard=True)`` weights.

    out[j] = sum_i weights[i, j] * parents[i] with weights = hard - soft.detach() + soft: the value of
    the hard one-hot sample, the gradient of the soft one.
    """
    index, soft = sample_branches_ref(logits, tau, noise, seed)
    hard = torch.nn.functional.one_hot(index, num_classes=parents.shape[0]).T.to(soft.dtype)
    weights = (hard - soft.detach() + soft).to(parents.dtype)
    return torch.tensordot(weights.T, parents, dims=1)
