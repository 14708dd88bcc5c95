"""Public branching ops: ``sample_branches`` and ``branch``, dispatched to a backend.

The maths, for logits ``[I, J]`` (parents x children) and temperature tau:
``z = (logits + gumbel noise) / tau``, ``index[j] = argmax_i z[i, j]``, ``soft[:, j] = softmax_i z[:, j]``;
child j receives ``parents[index[j]]`` and the backward is the straight-through gumbel-softmax gradient.
"""

from __future__ import annotations

import types

import torch

from l2b_fast import backends
from l2b_fast.ops import _ref, _validation

_REF = types.SimpleNamespace(sample_branches=_ref.sample_branches_ref, branch=_ref.branch_ref)


def _implementation(name: str):
    if name == "cpp":
        from l2b_fast.ops import _cpp

        return _cpp.BACKEND
    if name == "triton":
        from l2b_fast.ops import _triton

        return _triton.BACKEND
    return _REF


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One int64 Philox seed on ``device``, drawn on the generator's device: no host synchronisation."""
    source = generator.device if generator is not None else device
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=source, generator=generator)
    return seed.to(device, non_blocking=True)


def sample_branches(
    logits: torch.Tensor,
    tau: float | torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one parent for every child in one launch.

    Args:
        logits: ``[I, J]`` connectivity logits (parents x children), fp16/bf16/fp32/fp64.
        tau: temperature, a finite positive number, or a one-element floating tensor on ``logits.device``
            (read by the kernels from memory: a schedule that ``fill_``s it every step recompiles nothing and
            keeps a captured CUDA graph valid; its value is checked by a device-side assert on CUDA).
        noise: optional ``[I, J]`` gumbel samples to use (reproducibility, tests); otherwise Philox noise is
            drawn from ``generator`` (or the default generator of ``logits.device``), identical on every backend.
        generator: ``torch.Generator`` the seed is drawn from.
        backend: ``"ref"``, ``"cpp"``, ``"triton"`` or ``"auto"``; default ``$L2B_BACKEND`` or the best available.

    Returns:
        ``(index, soft)``: ``index`` int64 ``[J]`` (argmax over parents of logits + noise) and ``soft`` ``[I, J]``
        in logits' dtype (softmax over parents of ``(logits + noise) / tau``, differentiable w.r.t. logits;
        computed in fp32, fp64 for fp64 logits).
    """
    _validation.check_logits(logits)
    tau = _validation.as_tau_tensor(tau, logits.device)
    _validation.check_noise(noise, logits)
    _validation.check_generator(generator)
    implementation = _implementation(backends.select(backend, logits.device))
    seed = _draw_seed(generator, logits.device) if noise is None else None
    return implementation.sample_branches(logits, tau, noise, seed)


def branch(
    parents,
    logits: torch.Tensor,
    tau: float | torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    training: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Route one parent to every child: the children's inputs of a branching block.

    Args:
        parents: ``[I, *S]`` tensor (contiguous or channels_last per parent), or a sequence of I tensors of
            shape S (stacked: one copy, so prefer writing the parents into one tensor).
        logits: ``[I, J]`` connectivity logits.
        tau: temperature, as in :func:`sample_branches` (a number or a one-element tensor).
        noise, generator, backend: as in :func:`sample_branches`.
        training: ``True`` samples ``index`` with gumbel noise and back-propagates the straight-through
            gumbel-softmax gradient to ``logits`` (exactly ``F.gumbel_softmax(hard=True)`` weights over all
            parents given the same noise) and the segment-sum gradient to ``parents``. ``False`` routes by
            ``argmax(logits)`` without noise and gives no gradient to ``logits``.

    Returns:
        ``[J, *S]`` tensor, ``out[j] = parents[index[j]]``, in the parents' layout.
    """
    parents = _validation.as_parents_tensor(parents)
    _validation.check_logits(logits, parents=parents.shape[0])
    if logits.device != parents.device:
        raise ValueError(f"logits are on {logits.device} but parents are on {parents.device}")
    tau = _validation.as_tau_tensor(tau, logits.device)
    _validation.check_noise(noise, logits)
    _validation.check_generator(generator)
    if not training:
        return parents.index_select(0, logits.detach().argmax(dim=0))
    implementation = _implementation(backends.select(backend, logits.device))
    seed = _draw_seed(generator, logits.device) if noise is None else None
    return implementation.branch(parents, logits, tau, noise, seed)
