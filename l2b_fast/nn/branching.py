"""The branching block's connectivity as a module: logits [I, J] and the three modes of the search."""

from __future__ import annotations

import torch
from torch import nn

from l2b_fast import ops
from l2b_fast.ops import _validation

MODES = ("search", "frozen", "eval")


class Branching(nn.Module):
    """Routes I parent outputs to J children; holds the logits ``[I, J]`` (the paper's log theta).

    Modes (``self.mode``; ``module.eval()`` always routes as ``"eval"``):

    - ``"search"``: every forward samples one parent per child (gumbel noise) and the straight-through
      gradient trains the logits.
    - ``"frozen"``: samples like search, but the logits receive no gradient (warmup: every node gets
      updates while the distribution stays uniform).
    - ``"eval"``: the derived architecture, argmax of the logits (paper Eq. 7), no noise, no logits gradient.

    Args:
        parents, children: I and J.
        tau: temperature used in search/frozen mode (a schedule updates it, see ``l2b_fast.train``): a finite
            positive number, checked here and by the ``tau`` setter (``ValueError`` at once, not at the
            next forward).
        backend: op backend (``None``: ``$L2B_BACKEND`` or the best available).

    The temperature lives in the buffer ``tau_tensor`` (0-d float64, on the module's device), which the
    kernels read from memory: setting ``tau`` fills it in place, so a schedule that changes it every step
    neither recompiles a ``torch.compile``d step nor invalidates a captured CUDA graph. The buffer is not
    persistent (``state_dict`` is unchanged, old checkpoints load); ``module.tau`` is the Python value.
    """

    def __init__(
        self, parents: int, children: int, *, tau: float = 1.0, backend: str | None = None, mode: str = "search"
    ):
        super().__init__()
        if parents < 1 or children < 1:
            raise ValueError(f"a branching block needs >= 1 parent and child, got {parents} x {children}")
        self.logits = nn.Parameter(torch.zeros(parents, children))  # uniform sampling distribution
        self.register_buffer("tau_tensor", torch.ones((), dtype=torch.float64), persistent=False)
        self.tau = tau
        self.backend = backend
        self.mode = mode

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau = _validation.check_tau_value(value)
        self.tau_tensor.fill_(self._tau)  # in place: compiled graphs and CUDA graphs keep reading this buffer

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # .half() / .to(dtype) cast floating buffers too: keep the temperature exact in float64.
        if self.tau_tensor.dtype != torch.float64:
            self.tau_tensor = torch.full((), self._tau, dtype=torch.float64, device=self.tau_tensor.device)
        return self

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    def forward(
        self, parents: torch.Tensor, generator: torch.Generator | None = None, *, seed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``parents`` ``[I, *S]`` -> children's inputs ``[J, *S]``. The sample's noise comes from ``generator``
        or from ``seed`` (an int64 one-element tensor on the logits' device: no graph break under
        ``torch.compile``, see :func:`l2b_fast.ops.sample_branches`); neither: the device's default generator."""
        if self.active_mode == "eval":
            return ops.branch(
                parents,
                self.logits,
                self.tau_tensor,
                training=False,
                generator=generator,
                seed=seed,
                backend=self.backend,
            )
        return ops.branch(
            parents, self.routed_logits(), self.tau_tensor, generator=generator, seed=seed, backend=self.backend
        )

    @property
    def active_mode(self) -> str:
        """The mode the block routes by: ``mode`` in training, always ``"eval"`` after ``module.eval()``."""
        return self.mode if self.training else "eval"

    def routed_logits(self) -> torch.Tensor:
        """The logits as the routing uses them: with their gradient in search mode only. Frozen (and eval):
        detached, so the backward takes none of the I x J dot products (only the segment sum)."""
        return self.logits if self.active_mode == "search" else self.logits.detach()

    def draw(
        self, generator: torch.Generator | None = None, *, seed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(index, soft)`` of the sample the forward would route by, without routing: in eval mode the
        argmax and no ``soft``; else :func:`l2b_fast.ops.sample_branches` of :meth:`routed_logits` (``soft``
        carries the logits' gradient in search mode), same noise as the forward for the same generator/seed."""
        if self.active_mode == "eval":
            return self.logits.detach().argmax(dim=0), None
        return ops.sample_branches(
            self.routed_logits(), self.tau_tensor, generator=generator, seed=seed, backend=self.backend
        )

    def probabilities(self) -> torch.Tensor:
        """Sampling distribution of every child over parents: softmax over dim 0 of the logits."""
        return torch.softmax(self.logits.detach().float(), dim=0)

    def derived_parents(self) -> list[int]:
        """Paper Eq. 7: each child's most probable parent."""
        return self.logits.detach().argmax(dim=0).tolist()

    def extra_repr(self) -> str:
        return f"parents={self.logits.shape[0]}, children={self.logits.shape[1]}, mode={self.mode!r}, tau={self.tau:g}"
