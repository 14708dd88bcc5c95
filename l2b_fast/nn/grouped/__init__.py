"""Grouped execution of a branching block's children: all J children of a block in one launch per layer.

``TreeSupernet(..., execution="grouped")`` builds a :class:`GroupedBlock` per block; it holds no
parameters (the per-child modules keep theirs, so ``state_dict`` is the same for every execution).
"""

from l2b_fast.nn.grouped.block import CONV_BACKENDS, GroupedBlock, check_conv_backend
from l2b_fast.nn.grouped.layers import GROUPED_STEPS, Step, UnsupportedNodeError, plan_steps, register_grouped_step
from l2b_fast.nn.grouped.stacked import CHANNELS, CHILDREN, Stacked

__all__ = [
    "CHANNELS",
    "CHILDREN",
    "CONV_BACKENDS",
    "GROUPED_STEPS",
    "GroupedBlock",
    "Stacked",
    "Step",
    "UnsupportedNodeError",
    "check_conv_backend",
    "plan_steps",
    "register_grouped_step",
]
