"""Checkpoint files shared by the trainers: written atomically, read with one clear error, and the RNG
states they carry.

A checkpoint holds tensors and plain data only (dicts, lists, tuples, str, int, float, bool, None), so it is
read with ``torch.load(..., weights_only=True)``: a file that would need any other object to unpickle (which
is how a crafted ``.pt`` runs code) is refused, never executed. The RNG states are stored in that form too.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch


def atomic_save(state: dict, path: Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a kill leaves the old or the new checkpoint, never half of
    one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    return path


def _refused_by_weights_only(error: Exception) -> bool:
    # torch re-raises the restricted unpickler's refusal as UnpicklingError with this fixed preamble
    return isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)


def load_tensors_and_plain_data(path: str | Path, device: torch.device | str = "cpu"):
    """``torch.load`` of ``path`` that runs no code from the file: tensors and plain data only. ValueError (one line)
    for a file holding other objects, or one that cannot be read at all."""
    path = Path(path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        if _refused_by_weights_only(error):
            raise ValueError(
                f"{path} holds objects other than tensors and plain data; refusing to load it "
                "(unpickling such a file can run code)"
            ) from None
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {first_line}") from error


def read_checkpoint(path: str | Path, device: torch.device | str) -> dict:
    """The checkpoint at ``path`` on ``device``; FileNotFoundError when absent, ValueError when unreadable or when
    it holds objects other than tensors and plain data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    state = load_tensors_and_plain_data(path, device)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a checkpoint (it holds a {type(state).__name__})")
    return state


def rng_state(device: torch.device) -> dict:
    """This process's RNG states: CPU torch, python, numpy, and the CUDA generator of its own device only
    (``get_rng_state_all`` would touch every GPU of the node from every rank), all as tensors and plain data."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, python_words, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [int(version), [int(word) for word in python_words], gauss_next],
        # numpy's MT19937 words are uint32: int64 holds them exactly (torch's uint32 tensors lack many ops)
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restores what :func:`rng_state` returned (also after a round trip through a checkpoint file)."""
    # the generators take CPU byte tensors; a checkpoint read with map_location=cuda holds CUDA ones
    torch.set_rng_state(state["torch"].cpu())
    version, python_words, gauss_next = state["python"]
    random.setstate((version, tuple(python_words), gauss_next))
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(
        (
            numpy_state["algorithm"],
            keys,
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
