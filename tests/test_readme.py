"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index):
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), namespace)
    if "children" in namespace:  # the op example
        assert namespace["children"].shape == (5, 8, 64, 16, 16)
        assert namespace["logits"].grad is not None and torch.isfinite(namespace["logits"].grad).all()
        assert namespace["derived"].shape == namespace["children"].shape
    if "retrained" in namespace:  # the module example
        out = namespace["retrained"](namespace["x"])
        assert {task: o.shape[1] for task, o in out.items()} == namespace["out_channels"]
