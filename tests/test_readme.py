"""The README's usage example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_usage_example_runs():
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md usage", "exec"), namespace)
    assert namespace["children"].shape == (5, 8, 64, 16, 16)
    assert namespace["logits"].grad is not None and torch.isfinite(namespace["logits"].grad).all()
    assert namespace["parents"].grad.shape == namespace["parents"].shape
    assert namespace["derived"].shape == namespace["children"].shape
