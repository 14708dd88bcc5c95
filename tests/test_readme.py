"""The Python examples of the README and of every docs/*.md page run as written.

Examples that cannot run on a CPU in seconds (a GPU, real data) use another fence (```text, ```bash).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


BLOCKS = _blocks(README)
EXAMPLES = [(page, index) for page in PAGES for index in range(len(_blocks(page)))]


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


def test_docs_have_examples():
    assert any(page.parent.name == "docs" for page, _ in EXAMPLES)


@pytest.mark.parametrize("page, index", EXAMPLES, ids=[f"{page.relative_to(ROOT)}:{index}" for page, index in EXAMPLES])
def test_example_runs(page, index):
    namespace: dict = {}
    source = _blocks(page)[index]
    exec(compile(source, f"{page.relative_to(ROOT)} example {index}", "exec"), namespace)
    if "children" in namespace and "derived" in namespace:  # the op example
        assert namespace["children"].shape == (5, 8, 64, 16, 16)
        assert namespace["logits"].grad is not None and torch.isfinite(namespace["logits"].grad).all()
        assert namespace["derived"].shape == namespace["children"].shape
    if "retrained" in namespace:  # the module example
        out = namespace["retrained"](namespace["x"])
        assert {task: o.shape[1] for task, o in out.items()} == namespace["out_channels"]
