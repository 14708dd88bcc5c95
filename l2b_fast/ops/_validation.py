"""Input checks of the public ops: bad input raises ValueError naming the problem."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tau_value(tau) -> float:
    """A Python temperature as a float, checked finite and positive."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise ValueError(f"tau must be a finite positive number or a one-element floating tensor, got {tau!r}")
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be a finite positive number, got {tau}")
    return tau


def as_tau_tensor(tau, device: torch.device) -> torch.Tensor:
    """The temperature as the 0-d tensor on ``device`` that every backend reads (csrc/ops.cpp).

    A tensor is used as it is (one element, floating, on ``device``): a schedule that updates it in place
    changes no compiled graph and no captured CUDA graph. A Python number becomes a float64 tensor
    (``torch.full``: a fill kernel, no host-to-device copy, so no synchronisation either).
    """
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1:
            raise ValueError(f"tau must be a number or a one-element tensor, got a tensor of shape {tuple(tau.shape)}")
        if tau.dtype not in FLOAT_DTYPES:
            raise ValueError(f"tau must be a floating tensor, got {tau.dtype}")
        if tau.device != device:
            raise ValueError(f"tau is on {tau.device} but logits are on {device}")
        tau = tau.detach().reshape(())
        _check_positive_finite(tau)
        return tau
    if torch.compiler.is_compiling():
        # A Python float that changes between calls is symbolic here: check it on the tensor, no graph break.
        tensor = torch.full((), tau, dtype=torch.float64, device=device)
        _check_positive_finite(tensor)
        return tensor
    return torch.full((), check_tau_value(tau), dtype=torch.float64, device=device)


def _check_positive_finite(tau: torch.Tensor) -> None:
    message = "tau must be a finite positive number"
    if tau.device.type == "cpu" and not torch.compiler.is_compiling():
        value = float(tau)
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"{message}, got {value}")
    else:
        # Device-side asynchronous check: no host synchronisation (raises at the next sync point).
        torch._assert_async(torch.isfinite(tau) & (tau > 0), message)


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    message = f"{what} contain NaN or inf"
    if tensor.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(message)
    else:
        # Device-side asynchronous check: no host synchronisation (raises at the next sync point).
        torch._assert_async(torch.isfinite(tensor).all(), message)


def check_logits(logits, parents: int | None = None) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a tensor [parents, children], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [parents, children], got shape {tuple(logits.shape)}")
    if logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one parent and one child, got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    if parents is not None and logits.shape[0] != parents:
        raise ValueError(f"logits have {logits.shape[0]} rows but there are {parents} parents")
    _check_finite(logits, "logits")


def check_noise(noise, logits: torch.Tensor) -> None:
    if noise is None:
        return
    if not isinstance(noise, torch.Tensor):
        raise ValueError(f"noise must be a tensor shaped like logits, got {type(noise).__name__}")
    if noise.shape != logits.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal logits shape {tuple(logits.shape)}")
    if noise.dtype not in FLOAT_DTYPES:
        raise ValueError(f"noise must be a floating tensor, got {noise.dtype}")
    if noise.device != logits.device:
        raise ValueError(f"noise is on {noise.device} but logits are on {logits.device}")
    _check_finite(noise, "noise")


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def check_seed(seed, *, generator=None, noise=None, device: torch.device) -> None:
    """``seed``: None, or the Philox seed itself as an int64 tensor of one element on ``device`` (read by the
    kernels from memory, so a step that ``fill_``s it compiles once and replays in a CUDA graph)."""
    if seed is None:
        return
    if not isinstance(seed, torch.Tensor):
        raise TypeError(
            f"seed must be an int64 tensor of one element, got {type(seed).__name__} (a Python int: use a "
            "torch.Generator)"
        )
    if generator is not None:
        raise ValueError("give either seed or generator, not both")
    if noise is not None:
        raise ValueError("give either seed or noise, not both (noise replaces the sampling)")
    if seed.dtype != torch.int64:
        raise ValueError(f"seed must be an int64 tensor, got {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"seed must have one element, got a tensor of shape {tuple(seed.shape)}")
    if seed.device != device:
        raise ValueError(f"seed is on {seed.device} but logits are on {device}")


def _dense(tensor: torch.Tensor) -> bool:
    """No gaps and no overlaps: some permutation of the dimensions is contiguous."""
    if tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)):
        return True
    if torch.compiler.is_compiling():
        # Sorting symbolic strides (dynamic shapes after a recompile) breaks fullgraph: the caller copies
        # the rare other dense permutations instead, which changes no value.
        return False
    expected = 1
    dims = sorted(((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def rows_dense(parents: torch.Tensor) -> bool:
    """Each parents[i] is its own dense block, parents outermost (what the kernels read as flat rows)."""
    rows = parents.shape[0]
    return _dense(parents) and (rows <= 1 or parents.stride(0) == parents.numel() // rows)


def as_parents_tensor(parents) -> torch.Tensor:
    """``[I, *S]`` with each parents[i] a dense block (contiguous or channels_last), checked.

    A sequence of I tensors is stacked (one copy); a stacked tensor in another layout is made contiguous.
    """
    if isinstance(parents, torch.Tensor):
        stacked = parents
        if stacked.dim() < 1 or stacked.shape[0] < 1:
            raise ValueError(f"parents must be a tensor [I, *S] with I >= 1, got shape {tuple(stacked.shape)}")
    elif isinstance(parents, Sequence) and not isinstance(parents, (str, bytes)):
        if len(parents) == 0:
            raise ValueError("parents is an empty sequence: need at least one parent")
        first = parents[0]
        for i, parent in enumerate(parents):
            if not isinstance(parent, torch.Tensor):
                raise ValueError(f"parents[{i}] is a {type(parent).__name__}, not a tensor")
            if parent.shape != first.shape:
                raise ValueError(
                    f"parents must share one shape: parents[0] is {tuple(first.shape)}, parents[{i}] is "
                    f"{tuple(parent.shape)}"
                )
            if parent.dtype != first.dtype:
                raise ValueError(
                    f"parents must share one dtype: parents[0] is {first.dtype}, parents[{i}] is {parent.dtype}"
                )
            if parent.device != first.device:
                raise ValueError(
                    f"parents must share one device: parents[0] is on {first.device}, parents[{i}] on {parent.device}"
                )
        stacked = torch.stack(list(parents))
    else:
        raise ValueError(f"parents must be a tensor [I, *S] or a sequence of tensors, got {type(parents).__name__}")
    if stacked.dtype not in FLOAT_DTYPES:
        raise ValueError(f"parents must be float16/bfloat16/float32/float64, got {stacked.dtype}")
    if not rows_dense(stacked):
        stacked = stacked.contiguous()
    return stacked
