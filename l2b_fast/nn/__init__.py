"""Modules: the branching block, the tree supernet and the derived tree network."""

from l2b_fast.nn.blocks import BasicBlock, Bias
from l2b_fast.nn.branching import MODES, Branching
from l2b_fast.nn.grouped import UnsupportedNodeError
from l2b_fast.nn.supernet import EXECUTIONS, BlockSpec, GroupedFallbackWarning, TreeSupernet
from l2b_fast.nn.treenet import TreeNet, parameter_count

__all__ = [
    "EXECUTIONS",
    "MODES",
    "BasicBlock",
    "Bias",
    "BlockSpec",
    "Branching",
    "GroupedFallbackWarning",
    "TreeNet",
    "TreeSupernet",
    "UnsupportedNodeError",
    "parameter_count",
]
