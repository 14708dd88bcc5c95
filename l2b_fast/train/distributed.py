"""Process groups for ``torchrun``: initialise from the environment, pick the device, share per-step seeds.

``setup()`` reads what ``torchrun`` (or SLURM's ``srun`` with the same variables) sets: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` (env:// rendezvous). Without them it is a
single process and initialises nothing, so one script runs alike with ``python`` and with ``torchrun``.
The backend is NCCL for CUDA devices and gloo for the CPU.

Every rank of a search must sample the same tree at every step (DistributedDataParallel averages the
gradients of one architecture). :func:`step_seed` derives the sampling generator's seed from the run's
seed and the step, identically on every rank, so no rank has to tell the others anything.
"""

from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import gc
import os
import sys

import torch
import torch.distributed as dist

from l2b_fast.ops.branching import derive_seed_value

__all__ = [
    "DistContext",
    "setup",
    "cleanup",
    "release_ddp_reducers",
    "resolve_device",
    "step_seed",
    "all_gather_objects",
    "barrier",
    "is_main_process",
]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process runs: ``rank`` of ``world_size``, ``local_rank`` on its node, ``device``, ``backend``
    (None: single process, no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints and pictures and shows progress."""
        return self.rank == 0


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:<local_rank>`` when CUDA is available, else the CPU; ``"cuda"``: this node's GPU
    ``local_rank``; ``"cuda:N"``/``"cpu"`` as given. ValueError (one line) for a device that is not there."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from error
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise ValueError(f"device {device!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        built = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here ({built}); use --device cpu")
    index = local_rank if resolved.index is None else resolved.index
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device cuda:{index} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return torch.device("cuda", index)


def _environment_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup(
    device: str | torch.device = "auto", *, backend: str | None = None, timeout_minutes: float = 30.0
) -> DistContext:
    """Initialise the default process group from the torchrun environment (env:// rendezvous) and pick the device.

    Single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``): nothing is initialised. An already initialised
    process group is reused. ``backend`` defaults to ``nccl`` on CUDA and ``gloo`` on the CPU.
    """
    present = [name for name in _TORCHRUN_VARIABLES if name in os.environ]
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = (
            _environment_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank % max(1, torch.cuda.device_count())
        )
        resolved = resolve_device(device, local_rank)
        _select_cuda(resolved)
        return DistContext(rank, world_size, local_rank, resolved, dist.get_backend())
    if not present or ("WORLD_SIZE" in os.environ and _environment_int("WORLD_SIZE") == 1):
        local_rank = _environment_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        resolved = resolve_device(device, local_rank)
        _select_cuda(resolved)
        return DistContext(0, 1, local_rank, resolved, None)
    missing = [name for name in (*_TORCHRUN_VARIABLES, "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"distributed launch: environment variables {', '.join(missing)} are missing (start the processes "
            "with torchrun)"
        )
    rank, world_size, local_rank = (_environment_int(name) for name in _TORCHRUN_VARIABLES)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} outside WORLD_SIZE={world_size}")
    if not dist.is_available():
        raise ValueError("torch.distributed is not available in this build of torch")
    resolved = resolve_device(device, local_rank)
    backend = backend or ("nccl" if resolved.type == "cuda" else "gloo")
    if backend == "nccl" and resolved.type != "cuda":
        raise ValueError("backend nccl needs CUDA devices; use gloo on the CPU")
    _select_cuda(resolved)
    options = {"device_id": resolved} if resolved.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **options,
    )
    return DistContext(rank, world_size, local_rank, resolved, backend)


def _select_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the default CUDA stream follow the current device


TEARDOWN_TIMEOUT_SECONDS = 120.0


def cleanup(*, failed: bool = False, timeout_seconds: float = TEARDOWN_TIMEOUT_SECONDS) -> None:
    """Leaves the default process group, if one is initialised (call it at the end of a torchrun script), in a
    fixed order that cannot hang:

    1. A barrier (unless ``failed``) that gives up after ``timeout_seconds`` (gloo: ``monitored_barrier``, which
       names the ranks that did not arrive): every rank's collectives have finished and none is still to come. A
       rank leaving after an error skips it: the others may be inside another collective it must not pair with.
    2. ``gc.collect()`` and the release of every DistributedDataParallel reducer still alive. A reducer holds the
       process group; were it the last holder, the group would be destroyed inside the reducer's destructor with
       the GIL held while gloo's worker threads may need the GIL to free their last tensors: a deadlock at exit
       (pytorch/pytorch#56297). Dropping DDP models before (the trainers holding them too) remains good practice.
    3. ``destroy_process_group()`` while the group is still alive in Python (its last release frees the GIL).

    Steps 1 to 3 run under a watchdog thread outside the interpreter (``faulthandler``): should they not return
    within twice ``timeout_seconds``, every thread's stack is printed and the process exits with status 1.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    watchdog = _start_watchdog(2 * timeout_seconds)
    try:
        if not failed:
            _barrier_within(timeout_seconds)
    finally:
        try:
            gc.collect()  # reducers held only by reference cycles die here, while the process group is alive
            release_ddp_reducers()
            dist.destroy_process_group()
        finally:
            if watchdog:
                faulthandler.cancel_dump_traceback_later()


def _barrier_within(timeout_seconds: float) -> None:
    if dist.get_world_size() == 1:
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_seconds))
    else:  # NCCL: the group's own timeout applies, the watchdog bounds it
        dist.barrier()


def release_ddp_reducers() -> int:
    """Drops the C++ reducer (and its logger) of every DistributedDataParallel model still alive, so that none
    can outlive the process group (see :func:`cleanup`); those models cannot run again. Returns their count."""
    from torch.nn.parallel import DistributedDataParallel

    released = 0
    for candidate in gc.get_objects():
        if issubclass(type(candidate), DistributedDataParallel) and "reducer" in candidate.__dict__:
            candidate.__dict__.pop("logger", None)  # the logger holds the reducer too
            del candidate.__dict__["reducer"]
            released += 1
    return released


def _start_watchdog(seconds: float) -> bool:
    """Arms faulthandler's timer (a C thread that needs no GIL) on the real stderr; False where it cannot be."""
    try:
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    except (AttributeError, OSError, RuntimeError, ValueError):  # no usable stderr file descriptor
        return False
    return True


def is_main_process() -> bool:
    """Rank 0 of the process group; before it is initialised, the torchrun rank (``RANK``) decides, so a command
    under torchrun can tell its writer before any collective."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0").strip() in ("0", "")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(value) -> list:
    """``[value of rank 0, value of rank 1, ...]`` (``[value]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One SplitMix64 step as an unsigned 64-bit int: the ops' per-block seed mixing for stream 0."""
    return derive_seed_value(value, 0) & _MASK64


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed from (run seed, step, stream): the same on every rank, unrelated between neighbours
    (SplitMix64 mixing, so seeds of consecutive steps give independent Philox streams)."""
    mixed = _splitmix64(_splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(step) & _MASK64)) ^ (int(stream) & _MASK64))
    return mixed >> 1  # torch.Generator.manual_seed takes any int; keep it non-negative
