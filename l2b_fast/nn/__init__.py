"""Modules: the branching block, the tree supernet and the derived tree network."""

from l2b_fast.nn.branching import MODES, Branching
from l2b_fast.nn.supernet import BlockSpec, TreeSupernet
from l2b_fast.nn.treenet import TreeNet, parameter_count

__all__ = ["MODES", "BlockSpec", "Branching", "TreeNet", "TreeSupernet", "parameter_count"]
