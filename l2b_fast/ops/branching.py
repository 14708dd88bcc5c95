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


# SplitMix64 (Steele et al. 2014; the constants of distributed.step_seed), as signed int64 tensor arithmetic.
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _signed64(value: int) -> int:
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


def _logical_shift_right(value: torch.Tensor, bits: int) -> torch.Tensor:
    """``>>`` of the 64 bits as unsigned: int64 tensors shift arithmetically, so clear the copied sign bits."""
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def derive_seed(seed: torch.Tensor, stream: int) -> torch.Tensor:
    """The seed of sub-stream ``stream`` (e.g. a supernet's block index) of one step ``seed``, on the seed's device.

    SplitMix64 of ``seed + (stream + 1) * golden_gamma`` in int64 arithmetic (wrapping, as two's complement):
    distinct streams get distinct, well-mixed seeds (the finaliser is a bijection of 64-bit words), and it is a
    few elementwise kernels, so no host synchronisation and nothing for ``torch.compile`` to break on. The
    same function of the 64-bit pattern as :func:`derive_seed_value` (the Python version the tests compare).
    """
    if not isinstance(stream, int) or isinstance(stream, bool) or stream < 0:
        raise ValueError(f"stream must be a non-negative int, got {stream!r}")
    value = seed.reshape(1) + _signed64((stream + 1) * _GOLDEN_GAMMA)
    for shift, multiplier in zip((30, 27), _MIX_MULTIPLIERS):
        value = (value ^ _logical_shift_right(value, shift)) * _signed64(multiplier)
    return value ^ _logical_shift_right(value, 31)


def derive_seed_value(seed: int, stream: int) -> int:
    """:func:`derive_seed` on Python ints (the int64 value it returns)."""
    value = (seed + (stream + 1) * _GOLDEN_GAMMA) & (2**64 - 1)
    for shift, multiplier in zip((30, 27), _MIX_MULTIPLIERS):
        value = ((value ^ (value >> shift)) * multiplier) & (2**64 - 1)
    return _signed64(value ^ (value >> 31))


def _philox_seed(seed, generator, noise, device: torch.device) -> torch.Tensor | None:
    """The seed tensor the kernels read: the given one, none with explicit noise, or one drawn from the generator."""
    if noise is not None:
        return None
    return seed.reshape(1) if seed is not None else _draw_seed(generator, device)


def sample_branches(
    logits: torch.Tensor,
    tau: float | torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
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
        seed: instead of ``generator``, the Philox seed itself: an int64 tensor of one element on
            ``logits.device``, read by the kernels from memory. A step that ``fill_``s it (e.g. from the run
            seed and the step) compiles with ``torch.compile(fullgraph=True)`` once, where drawing from a
            generator breaks the graph, and replays in a CUDA graph. The same seed gives the same sample on
            every backend. Exclusive with ``generator`` and ``noise``.
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
    _validation.check_seed(seed, generator=generator, noise=noise, device=logits.device)
    implementation = _implementation(backends.select(backend, logits.device))
    return implementation.sample_branches(logits, tau, noise, _philox_seed(seed, generator, noise, logits.device))


def branch(
    parents,
    logits: torch.Tensor,
    tau: float | torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    training: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Route one parent to every child: the children's inputs of a branching block.

    Args:
        parents: ``[I, *S]`` tensor (contiguous or channels_last per parent), or a sequence of I tensors of
            shape S (stacked: one copy, so prefer writing the parents into one tensor).
        logits: ``[I, J]`` connectivity logits.
        tau: temperature, as in :func:`sample_branches` (a number or a one-element tensor).
        noise, generator, seed, backend: as in :func:`sample_branches`.
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
    _validation.check_seed(seed, generator=generator, noise=noise, device=logits.device)
    if not training:
        return parents.index_select(0, logits.detach().argmax(dim=0))
    implementation = _implementation(backends.select(backend, logits.device))
    return implementation.branch(parents, logits, tau, noise, _philox_seed(seed, generator, noise, logits.device))
