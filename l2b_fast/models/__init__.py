"""The paper's models as tree supernets: Taskonomy ResNet-34 (Sec. 4.3) and the two CelebA networks (Sec. 4.2).

Each family has a ``*_spec(...)`` function returning a :class:`ModelSpec` (blocks, tasks, heads: enough
to build the supernet and, after the search, ``TreeNet(tree, spec.blocks, spec.heads)``) and a function
of the family's name returning the ``TreeSupernet`` directly (``net.model_spec`` is its spec). All take a
``width`` multiplier and ``execution=`` like ``TreeSupernet``. The builders live beside their data set
(``l2b_fast.datasets.<name>``); this module gathers them. Parameter counts: ``l2b_fast.models.counts``.
"""

from l2b_fast.datasets.celeba import (
    celeba_branch_vgg,
    celeba_branch_vgg_spec,
    celeba_deep_wide,
    celeba_deep_wide_spec,
)
from l2b_fast.datasets.taskonomy import ASPPHead, taskonomy_resnet34, taskonomy_resnet34_spec
from l2b_fast.nn.spec import ModelSpec

# name -> spec function, for the benchmark and the command line
SPECS = {
    "taskonomy_resnet34": taskonomy_resnet34_spec,
    "celeba_branch_vgg": celeba_branch_vgg_spec,
    "celeba_deep_wide": celeba_deep_wide_spec,
}

__all__ = [
    "SPECS",
    "ASPPHead",
    "ModelSpec",
    "celeba_branch_vgg",
    "celeba_branch_vgg_spec",
    "celeba_deep_wide",
    "celeba_deep_wide_spec",
    "taskonomy_resnet34",
    "taskonomy_resnet34_spec",
]
