"""A :class:`~l2b_fast.train.Trainer` step (forward, loss, backward, both optimizers' steps) captured
once in a CUDA graph and replayed at every step (``StreamConfig(cuda_graph=True)``).

A replay launches the recorded kernels on the recorded addresses, so everything that changes from step to step
is read from device memory that the trainer writes in place before the replay:

- the batch: static input, target and mask buffers, filled with ``copy_``;
- the tree: the step's sampling seed, the trainer's int64 seed tensor (``fill_``, so the model's forward must
  take ``seed=``: drawing from a ``torch.Generator`` would freeze the capture's tree);
- the temperature: every ``Branching.tau_tensor`` (the trainer sets ``Branching.tau``, a ``fill_``);
- the learning rates: each optimizer param group's ``lr`` becomes a device tensor that the trainer ``fill_``s,
  and on CUDA the optimizers run with ``capturable=True`` (step counts and bias corrections on the device) at
  every step, captured or not (:func:`optimizer_settings`).

Warmup (frozen logits: the blocks detach them, the logits optimizer does not step) and search record different
kernels, so each phase has its own graph: the frozen graph is dropped when the search starts, and the search
graph is captured then, after eager steps that create the logits optimizer's state. Each phase starts with
``eager_steps`` ordinary steps on a side stream (as PyTorch requires before a capture: lazy initialisation,
optimizer state, autotuning, compilation), then captures on a batch of the layout of those steps and replays it.

The epoch's short last batch (another shape) is never dropped or padded: it gets its own graph. Like the full
batch it first runs eagerly ``eager_steps`` times (once per epoch; compilation and autotuning of its shape happen
there, not in a capture), then it is captured into the same memory pool as the full batch's graph (the graphs
never run at once, so they reuse the same temporary memory) and replayed in later epochs. The two graphs share
the gradients (the second zeroes them in place and accumulates into them) and the optimizer state. At most
``CAPTURED_LAYOUTS_PER_PHASE`` (2) layouts are captured per phase; batches of any further shape run eagerly.

The per-task losses come back as a device tensor (the graph's output buffer, overwritten by its next replay); the
trainer adds it to its device-side sums and reads them on the host only when it logs, so replays never synchronise.

``GraphedStep(trainer, capture=False)`` runs the same step function, the same static buffers, the same tensor
learning rates and (on CUDA) the same capturable optimizers without capturing: on a CPU it gives the trainer's
results bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "GraphedStep",
    "CAPTURED_LAYOUTS_PER_PHASE",
    "EAGER_STEPS_BEFORE_CAPTURE",
    "check_config",
    "optimizer_settings",
]

EAGER_STEPS_BEFORE_CAPTURE = 2
# Batch layouts captured per phase: the full batch and the epoch's short last batch (further layouts run eagerly).
CAPTURED_LAYOUTS_PER_PHASE = 2
# torch.compile modes that record CUDA graphs themselves: a graph cannot be captured inside another capture.
_CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def check_config(config) -> None:
    """ValueError (one line) for settings a captured step cannot honour; device-independent (a ``StreamConfig``)."""
    if config.precision == "fp16":
        raise ValueError(
            "cuda_graph does not support precision='fp16': its GradScaler reads inf checks on the host at every "
            "step; use 'bf16' or 'fp32'"
        )
    if config.sampling != "step":
        raise ValueError("cuda_graph needs sampling='step' (the step's seed is a device tensor the graph reads)")
    if config.accumulation != 1:
        raise ValueError(
            f"cuda_graph needs accumulation=1 (one captured batch per optimizer step), got {config.accumulation}"
        )
    if isinstance(config.compile, dict):
        options = config.compile.get("options") or {}
        if config.compile.get("mode") in _CUDAGRAPH_COMPILE_MODES or options.get("triton.cudagraphs"):
            raise ValueError(
                f"cuda_graph cannot be combined with torch.compile's own CUDA graphs ({config.compile}): use "
                "compile=True or {'fullgraph': True}"
            )


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


class _Captured:
    """One captured batch layout of a phase: its static batch, its graph (None in the eager twin) and the buffer,
    allocated outside the graphs' memory pool, that its replays write the per-task losses into."""

    def __init__(self, buffers):
        self.buffers = buffers
        self.graph: torch.cuda.CUDAGraph | None = None
        self.losses: torch.Tensor | None = None


def optimizer_settings(device: torch.device) -> tuple[torch.dtype, bool]:
    """``(lr tensor dtype, capturable)`` of the optimizers a :class:`GraphedStep` drives on ``device``, the same
    whether or not it captures: torch's foreach Adam takes a tensor lr only with ``capturable=True`` (step counts
    and bias corrections on the device), so on CUDA the uncaptured steps (the eager steps before a capture, the
    eager twin, batches run eagerly) use capturable Adam too, and every step updates the same state the same way.
    On CUDA float32, the dtype of Adam's capturable step counts (torch's foreach kernels take their fast path when
    a tensor scalar has the list's dtype); on a CPU, where Adam refuses ``capturable=True``, float64: the precision
    a float lr is used in, so the eager twin gives the trainer's results bit for bit."""
    if device.type == "cuda":
        return torch.float32, True
    return torch.float64, False


class GraphedStep:
    """Runs one training step of ``trainer`` per call: eagerly for the first ``eager_steps`` steps of each batch
    layout in a phase, then as the replay of that layout's CUDA graph.

    At most :data:`CAPTURED_LAYOUTS_PER_PHASE` layouts are captured per phase, in the order they reach
    ``eager_steps`` eager steps: the full batch, then the epoch's short last batch (its own graph, in the same
    memory pool, after ``eager_steps`` epochs that run it eagerly); a batch of any further layout always runs
    eagerly. No sample is dropped and every batch runs the same step.

    Called by the trainer as ``task_losses = step(inputs, targets, masks, frozen)`` after it has written the
    step's seed, temperature and learning rates; returns the per-task losses (float64, on the device).
    ``capture=False`` never captures (any device): the eager twin of the captured step, for checks (on a CPU bit for
    bit against the trainer). Call :meth:`reset` after loading optimizer or model state (the graphs would keep the
    old tensors).
    """

    def __init__(self, trainer, *, capture: bool = True, eager_steps: int = EAGER_STEPS_BEFORE_CAPTURE):
        if not isinstance(eager_steps, int) or isinstance(eager_steps, bool) or eager_steps < 1:
            raise ValueError(
                "eager_steps must be an integer >= 1 (optimizer state and lazy set-up come before a capture), "
                f"got {eager_steps!r}"
            )
        check_config(trainer.config)
        if capture and trainer.device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, the trainer runs on {trainer.device}")
        if trainer.context.distributed:
            raise ValueError(
                "cuda_graph is not supported under DistributedDataParallel (its gradient all-reduce is not "
                "captured here): use one process"
            )
        if trainer.searching and not trainer._forward_takes_seed:
            raise ValueError(
                "cuda_graph needs a forward that takes seed= (a device tensor): "
                f"{type(trainer.module).__name__}.forward draws from a torch.Generator, which a graph would "
                "replay with the captured tree"
            )
        self.trainer = trainer
        self.capture = capture
        self.eager_steps = eager_steps
        self._side_stream = torch.cuda.Stream(trainer.device) if capture else None
        self._captured: dict[tuple, _Captured] = {}  # per batch layout of the current phase
        self._pool = None  # the memory pool every graph of the phase allocates from
        self._losses_like: tuple | None = None  # (shape, dtype) of a step's per-task losses
        # Steps run eagerly, steps run from the static buffers (replays), and captures (fixed buffers in the twin).
        self.counts = {"eager": 0, "static": 0, "captures": 0}
        self.reset()

    # ------------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Drop the graphs and start the phase's eager steps again; put the optimizers back in capturable form
        (``load_state_dict`` replaces their param groups: call this after loading a checkpoint)."""
        self._release_graphs()
        self._phase: bool | None = None  # frozen (True) or search (False): the mode the graphs record
        self._eager_done: dict[tuple, int] = {}  # eager steps per batch layout in this phase
        for optimizer in self._optimizers():
            self._prepare_optimizer(optimizer)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        trainer = self.trainer
        return [trainer.weight_optimizer] + ([trainer.logits_optimizer] if trainer.logits_optimizer is not None else [])

    def _prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        dtype, capturable = optimizer_settings(self.trainer.device)
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=self.trainer.device)
            group["capturable"] = capturable
            if not capturable:  # foreach Adam takes a tensor lr only when capturable: the for-loop update then
                group["foreach"] = False
        if capturable:
            # State made by uncaptured steps before (or loaded from a checkpoint written by a trainer without a
            # graph) keeps its step counts on the host; capturable Adam needs them beside the parameters.
            for parameter, state in optimizer.state.items():
                step = state.get("step")
                if isinstance(step, torch.Tensor) and step.device != parameter.device:
                    state["step"] = step.to(device=parameter.device, dtype=torch.float32)
            # Uncaptured steps of a capturable optimizer are meant here (eager steps, the twin, other layouts):
            # no "capturable=True, run uncaptured" warning.
            optimizer._warned_capturable_if_run_uncaptured = True

    def _release_graphs(self) -> None:
        if any(captured.graph is not None for captured in self._captured.values()):
            self._zero_grad()  # the gradients live in the graphs' pool: let it go
        for captured in self._captured.values():
            if captured.graph is not None:
                captured.graph.reset()
        self._captured, self._pool = {}, None

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
        # Once a graph exists the gradients are its tensors: zero them in place rather than replace them.
        self._zero_grad(set_to_none=not self._captured)
        if not (side_stream and self.capture):
            task_losses = self._step(*batch, frozen)
        else:
            current = torch.cuda.current_stream(self.trainer.device)
            self._side_stream.wait_stream(current)
            with torch.cuda.stream(self._side_stream):
                task_losses = self._step(*batch, frozen)
            current.wait_stream(self._side_stream)
            task_losses.record_stream(current)  # read on the current stream after its memory returns to the side one
        self._losses_like = (task_losses.shape, task_losses.dtype)
        return task_losses

    def _fix_buffers(self, batch, layout: tuple, frozen: bool) -> _Captured:
        """Static buffers holding ``batch`` for ``layout``; on CUDA the step on them is captured (recorded, not
        run) into the phase's memory pool."""
        captured = _Captured(_static_copy(batch))
        self.counts["captures"] += 1
        first = not self._captured
        self._captured[layout] = captured
        if not self.capture:
            return captured
        shape, dtype = self._losses_like
        captured.losses = torch.empty(shape, dtype=dtype, device=self.trainer.device)  # outside the pool
        # The first graph creates the gradients in the pool (backward assigns them); a later one (another batch
        # layout) zeroes the same gradients in place and accumulates into them, so the graphs share gradients
        # and optimizer state, and nothing a later capture allocates stays alive in the shared pool.
        self._zero_grad(set_to_none=first)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads (a DataLoader's pin-memory thread) may call CUDA during the capture,
            # as with inductor's CUDA graphs; the autograd engine's kernels still go to the capturing stream.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                if not first:
                    self._zero_grad(set_to_none=False)
                captured.losses.copy_(self._step(*captured.buffers, frozen))
        except RuntimeError as error:
            del self._captured[layout]
            message = str(error).strip()
            first_line = message.splitlines()[0] if message else type(error).__name__
            raise RuntimeError(
                f"cuda_graph: the training step could not be captured ({first_line}); a step that waits for the host "
                "(.item(), boolean-mask indexing, a torch.Generator) cannot be: set cuda_graph=False"
            ) from error
        captured.graph = graph
        if first:
            self._pool = graph.pool()
        return captured

    def __call__(self, inputs, targets, masks, frozen: bool) -> torch.Tensor:
        batch = (inputs, targets, masks)
        if self._phase != frozen:  # a new phase (or a reset): a graph records one mode
            self._release_graphs()
            self._phase, self._eager_done = frozen, {}
        layout = _layout(batch)
        captured = self._captured.get(layout)
        if captured is None:
            if len(self._captured) >= CAPTURED_LAYOUTS_PER_PHASE:  # a further layout: eagerly, never captured
                return self._eager(batch, frozen, side_stream=False)
            done = self._eager_done.get(layout, 0)
            if done < self.eager_steps:  # warm-up before this layout's capture (lazy set-up, compilation, state)
                self._eager_done[layout] = done + 1
                return self._eager(batch, frozen, side_stream=True)
            captured = self._fix_buffers(batch, layout, frozen)
        else:
            _copy_into(captured.buffers, batch)
        self.counts["static"] += 1
        if captured.graph is None:  # the eager twin: the same step on the same buffers
            self._zero_grad(set_to_none=False)
            return self._step(*captured.buffers, frozen)
        captured.graph.replay()
        return captured.losses
