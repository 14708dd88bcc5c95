"""A :class:`~l2b_fast.train.Trainer` step (forward, loss, backward, both optimizers' steps) captured
once in a CUDA graph and replayed at every step (``StreamConfig(cuda_graph=True)``).

A replay launches the recorded kernels on the recorded addresses, so everything that changes from step to step
is read from device memory that the trainer writes in place before the replay:

- the batch: static input, target and mask buffers, filled with ``copy_``;
- the tree: the step's sampling seed, the trainer's int64 seed tensor (``fill_``, so the model's forward must
  take ``seed=``: drawing from a ``torch.Generator`` would freeze the capture's tree);
- the temperature: every ``Branching.tau_tensor`` (the trainer sets ``Branching.tau``, a ``fill_``);
- the learning rates: each optimizer param group's ``lr`` becomes a device tensor that the trainer ``fill_``s,
  and the optimizers run with ``capturable=True`` (step counts and bias corrections on the device).

Warmup (frozen logits: the blocks detach them, the logits optimizer does not step) and search record different
kernels, so each phase has its own graph: the frozen graph is dropped when the search starts, and the search
graph is captured then, after eager steps that create the logits optimizer's state. Each phase starts with
``eager_steps`` ordinary steps on a side stream (as PyTorch requires before a capture: lazy initialisation,
optimizer state, autotuning, compilation), then captures on a batch of the layout of those steps and replays it.
A batch of another shape (the epoch's short last batch) runs the same step eagerly: no sample is dropped.

The per-task losses come back as a device tensor (the graph's output, overwritten by the next call); the trainer
adds it to its device-side sums and reads them on the host only when it logs, so replays never synchronise.

``GraphedStep(trainer, capture=False)`` runs the same step function, the same static buffers and the same
tensor learning rates without capturing: on a CPU it gives the trainer's results bit for bit (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

__all__ = ["GraphedStep", "EAGER_STEPS_BEFORE_CAPTURE", "check_config"]

EAGER_STEPS_BEFORE_CAPTURE = 2
# torch.compile modes that record CUDA graphs themselves: a graph cannot be captured inside another capture.
_CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def check_config(config) -> None:
    """ValueError (one line) for settings a captured step cannot honour; device-independent (a ``StreamConfig``)."""
    if config.precision == "fp16":
        raise ValueError("cuda_graph does not support precision='fp16': its GradScaler reads inf checks on the host at every step; use 'bf16' or 'fp32'")
    if config.sampling != "step":
        raise ValueError("cuda_graph needs sampling='step' (the step's seed is a device tensor the graph reads)")
    if config.accumulation != 1:
        raise ValueError(f"cuda_graph needs accumulation=1 (one captured batch per optimizer step), got {config.accumulation}")
    if isinstance(config.compile, dict):
        options = config.compile.get("options") or {}
        if config.compile.get("mode") in _CUDAGRAPH_COMPILE_MODES or options.get("triton.cudagraphs"):
            raise ValueError(f"cuda_graph cannot be combined with torch.compile's own CUDA graphs ({config.compile}): use compile=True or {{'fullgraph': True}}")


def _layout(value, path: str = "batch") -> tuple:
    """What a static buffer must match: the nesting, keys, and every tensor's shape, dtype and device."""
    if isinstance(value, torch.Tensor):
        return (path, tuple(value.shape), value.dtype, value.device)
    if isinstance(value, Mapping):
        return (path, "mapping", tuple((key, _layout(item, f"{path}[{key!r}]")) for key, item in value.items()))
    if isinstance(value, (tuple, list)):
        return (path, type(value).__name__, tuple(_layout(item, f"{path}[{k}]") for k, item in enumerate(value)))
    if value is None or isinstance(value, (bool, int, float, str)):
        return (path, "value", type(value).__name__, value)
    return (path, "object", id(value))  # anything else matches only itself


def _static_copy(value):
    """Buffers of ``value``'s structure and layout (``empty_like`` keeps channels_last), holding its values."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value).copy_(value)
    if isinstance(value, Mapping):
        return {key: _static_copy(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_static_copy(item) for item in value)
    return value


def _copy_into(static, value) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, Mapping):
        for key, item in static.items():
            _copy_into(item, value[key])
    elif isinstance(static, (tuple, list)):
        for item, given in zip(static, value):
            _copy_into(item, given)


class GraphedStep:
    """Runs one training step of ``trainer`` per call: eagerly for the first ``eager_steps`` steps of a phase
    (and for batches of another layout), then as the replay of a CUDA graph captured once per phase.

    Called by the trainer as ``task_losses = step(inputs, targets, masks, frozen)`` after it has written the
    step's seed, temperature and learning rates; returns the per-task losses (float64, on the device).
    ``capture=False`` never captures (any device): the eager twin of the captured step, for checks on a CPU.
    Call :meth:`reset` after loading optimizer or model state (the graph would keep the old tensors).
    """

    def __init__(self, trainer, *, capture: bool = True, eager_steps: int = EAGER_STEPS_BEFORE_CAPTURE):
        if not isinstance(eager_steps, int) or isinstance(eager_steps, bool) or eager_steps < 1:
            raise ValueError(f"eager_steps must be an integer >= 1 (optimizer state and lazy set-up come before a capture), got {eager_steps!r}")
        check_config(trainer.config)
        if capture and trainer.device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, the trainer runs on {trainer.device}")
        if trainer.context.distributed:
            raise ValueError("cuda_graph is not supported under DistributedDataParallel (its gradient all-reduce is not captured here): use one process")
        if trainer.searching and not trainer._forward_takes_seed:
            raise ValueError(f"cuda_graph needs a forward that takes seed= (a device tensor): {type(trainer.module).__name__}.forward draws from a torch.Generator, which a graph would replay with the captured tree")
        self.trainer = trainer
        self.capture = capture
        self.eager_steps = eager_steps
        self._side_stream = torch.cuda.Stream(trainer.device) if capture else None
        self._buffers = None  # (inputs, targets, masks): the static batch the graph reads
        self._buffers_layout = None
        self._graph: torch.cuda.CUDAGraph | None = None
        # Steps run eagerly, steps run from the static buffers (replays), and captures (fixed buffers in the twin).
        self.counts = {"eager": 0, "static": 0, "captures": 0}
        self.reset()

    # ------------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Drop the graph and start the phase's eager steps again; put the optimizers back in capturable form
        (``load_state_dict`` replaces their param groups: call this after loading a checkpoint)."""
        self._release_graph()
        self._phase: bool | None = None  # frozen (True) or search (False): the mode the graph records
        self._reference_layout = None  # the layout of the eager steps that lead to a capture
        self._eager_done = 0
        for optimizer in self._optimizers():
            self._make_capturable(optimizer)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        trainer = self.trainer
        return [trainer.weight_optimizer] + ([trainer.logits_optimizer] if trainer.logits_optimizer is not None else [])

    def _make_capturable(self, optimizer: torch.optim.Optimizer) -> None:
        # The lr tensor's dtype: on CUDA float32, the dtype of Adam's capturable step counts (torch's foreach
        # kernels take their fast path when a tensor scalar has the list's dtype); on a CPU float64, the
        # precision a float lr is used in, so the eager twin gives the trainer's results bit for bit.
        dtype = torch.float32 if self.trainer.device.type == "cuda" else torch.float64
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=self.trainer.device)
            group["capturable"] = self.capture  # torch's Adam refuses capturable=True for CPU tensors
        if self.capture:  # the eager steps before a capture are meant: no "capturable=True, run uncaptured" warning
            optimizer._warned_capturable_if_run_uncaptured = True

    def _release_graph(self) -> None:
        if self._graph is not None:
            self._zero_grad()  # the gradients live in the graph's pool: let it go
            self._graph.reset()
        self._graph, self._graph_losses, self._ready = None, None, False

    # ------------------------------------------------------------------------------------------- step
    def _step(self, inputs, targets, masks, frozen: bool) -> torch.Tensor:
        """The step's work, the same code eager and under capture: the trainer's forward and loss, backward,
        and the trainer's optimizer step (accumulation 1, no gradient scaling: neither synchronises)."""
        trainer = self.trainer
        loss, task_losses = trainer._forward_losses(inputs, targets, masks, frozen)
        loss.backward()
        trainer._optimizer_step(1, frozen)
        return task_losses

    def _zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self._optimizers():
            optimizer.zero_grad(set_to_none=set_to_none)

    def _eager(self, batch, frozen: bool, *, side_stream: bool) -> torch.Tensor:
        self.counts["eager"] += 1
        # After a capture the gradients are the graph's tensors: zero them in place rather than replace them.
        self._zero_grad(set_to_none=not self._ready)
        if not (side_stream and self.capture):
            return self._step(*batch, frozen)
        current = torch.cuda.current_stream(self.trainer.device)
        self._side_stream.wait_stream(current)
        with torch.cuda.stream(self._side_stream):
            task_losses = self._step(*batch, frozen)
        current.wait_stream(self._side_stream)
        task_losses.record_stream(current)  # read on the current stream after its memory returns to the side one
        return task_losses

    def _fix_buffers(self, batch, frozen: bool) -> None:
        """The static buffers hold ``batch``; on CUDA the step on them is captured (recorded, not run)."""
        layout = _layout(batch)
        if self._buffers is None or self._buffers_layout != layout:
            self._buffers, self._buffers_layout = _static_copy(batch), layout
        else:
            _copy_into(self._buffers, batch)
        self._ready = True
        self.counts["captures"] += 1
        if not self.capture:
            return
        self._zero_grad()  # backward creates the gradients in the graph's private pool
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads (a DataLoader's pin-memory thread) may call CUDA during the capture,
            # as with inductor's CUDA graphs; the autograd engine's kernels still go to the capturing stream.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._graph_losses = self._step(*self._buffers, frozen)
        except RuntimeError as error:
            self._ready = False
            message = str(error).strip()
            first_line = message.splitlines()[0] if message else type(error).__name__
            raise RuntimeError(f"cuda_graph: the training step could not be captured ({first_line}); a step that waits for the host "
                               "(.item(), boolean-mask indexing, a torch.Generator) cannot be: set cuda_graph=False") from error
        self._graph = graph

    def __call__(self, inputs, targets, masks, frozen: bool) -> torch.Tensor:
        batch = (inputs, targets, masks)
        if self._phase != frozen:  # a new phase (or a reset): a graph records one mode
            self._release_graph()
            self._phase, self._eager_done = frozen, 0
        layout = _layout(batch)
        if not self._ready:
            if layout != self._reference_layout:  # count eager steps of one layout: the one to capture
                self._reference_layout, self._eager_done = layout, 0
            if self._eager_done < self.eager_steps:
                self._eager_done += 1
                return self._eager(batch, frozen, side_stream=True)
            self._fix_buffers(batch, frozen)
        elif layout != self._buffers_layout:  # e.g. the epoch's short last batch: the same step, eagerly
            return self._eager(batch, frozen, side_stream=False)
        else:
            _copy_into(self._buffers, batch)
        self.counts["static"] += 1
        if self._graph is None:  # the eager twin: the same step on the same buffers
            self._zero_grad(set_to_none=False)
            return self._step(*self._buffers, frozen)
        self._graph.replay()
        return self._graph_losses
