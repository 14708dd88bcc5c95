"""Checkpoint files shared by the trainers: written atomically, read with one clear error, and the RNG
states they carry."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def atomic_save(state: dict, path: Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a kill leaves the old or the new checkpoint, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    return path


def read_checkpoint(path: str | Path, device: torch.device | str) -> dict:
    """The checkpoint at ``path`` on ``device``; FileNotFoundError when absent, ValueError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a checkpoint (it holds a {type(state).__name__})")
    return state


def rng_state(device: torch.device) -> dict:
    """This process's RNG states: CPU torch, python, numpy, and the CUDA generator of its own device only
    (``get_rng_state_all`` would touch every GPU of the node from every rank)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
