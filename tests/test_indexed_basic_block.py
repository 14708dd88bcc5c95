"""``conv_backend="triton"`` on blocks of residual BasicBlocks (the Taskonomy ResNet's nodes).

conv1 and a 1x1 downsample read the parents through the sampled index; an identity shortcut takes the
children's inputs from the straight-through branching op with the same sample. Held to ``per_child``
(same seed) on outputs, every parameter gradient (logits included) and the BatchNorm running buffers.
Without a GPU the kernels run in Triton's interpreter at tiny sizes; ``*cuda*`` tests run the compiled
kernels at Taskonomy-like sizes and skip without one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_compiled_step_matches_eager
from l2b_fast.models import taskonomy_resnet34
from l2b_fast.nn import BasicBlock, BlockSpec, TreeSupernet
from l2b_fast.nn.grouped import indexed
from l2b_fast.ops import indexed_conv as conv_op
from test_indexed_conv import TASKS, assert_same_step, interpreted_only, needs_cuda, search_step

pytestmark = pytest.mark.usefixtures("one_thread")


def basic_blocks():
    """Identity and downsample shortcuts, stride 1 and 2, a dilated block, two BasicBlocks in one node."""
    return [
        BlockSpec(2, lambda b, j: BasicBlock(4, 4)),  # one parent (the input), identity
        BlockSpec(3, lambda b, j: BasicBlock(4, 6, stride=2)),  # 2 -> 3, strided 1x1 downsample
        BlockSpec(2, lambda b, j: BasicBlock(6, 6, dilation=2)),  # 3 -> 2, identity
        BlockSpec(3, lambda b, j: nn.Sequential(BasicBlock(6, 5), BasicBlock(5, 5))),  # stride-1 downsample first
    ]


def supernets(blocks, dtype, device="cpu"):
    torch.manual_seed(0)
    reference = TreeSupernet(blocks, TASKS, execution="per_child").to(device, dtype)
    with torch.no_grad():
        for branching in reference.branchings:
            branching.logits.normal_()
    return reference, triton_copy(reference)


def triton_copy(reference):
    """A grouped copy of a per_child supernet whose blocks all gather and start through the index."""
    triton_net = copy.deepcopy(reference)
    triton_net.set_execution("grouped")
    triton_net.set_conv_backend("triton")
    return triton_net


def record_calls(monkeypatch):
    """Which blocks start through the index, how many indexed convolutions and straight-through gathers run."""
    calls = {"started": [], "convolutions": 0, "gathers": 0}
    real_start, real_conv, real_gather = indexed.start_block, indexed.indexed_conv2d, indexed.straight_through_branch_op

    def start(step, block, *args):
        result = real_start(step, block, *args)
        calls["started"].append((block, result is not None))
        return result

    def convolution(*args, **kwargs):
        calls["convolutions"] += 1
        return real_conv(*args, **kwargs)

    def gather(device):
        op = real_gather(device)
        return lambda *args: calls.__setitem__("gathers", calls["gathers"] + 1) or op(*args)

    monkeypatch.setattr(indexed, "start_block", start)
    monkeypatch.setattr(indexed, "indexed_conv2d", convolution)
    monkeypatch.setattr(indexed, "straight_through_branch_op", gather)
    return calls


def assert_close_in_range(reference, other, expected, got, tolerance):
    """Outputs, parameter gradients and floating buffers, each error relative to the tensor's range
    (ill-conditioned fp32 gradients, where elementwise tolerances mislead)."""
    scale = lambda t: float(t.detach().abs().max()) or 1.0  # noqa: E731
    close = lambda a, b, what: torch.testing.assert_close(  # noqa: E731
        a.double(), b.double(), atol=tolerance * scale(b), rtol=tolerance, msg=lambda m: f"{what}: {m}"
    )
    for task in expected:
        assert got[task].dtype == expected[task].dtype, task
        close(got[task], expected[task], task)
    for (name, p), (_, q) in zip(reference.named_parameters(), other.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            close(q.grad, p.grad, name)
    for (name, b), (_, c) in zip(reference.named_buffers(), other.named_buffers()):
        if b.is_floating_point():
            close(c, b, name)
        else:  # num_batches_tracked
            assert torch.equal(c, b), name


def bf16_errors(reference, triton_net, x, mode):
    """Relative L2 errors of per_child's and the triton path's bf16-autocast steps against per_child's
    fp32 step: outputs, logits' gradients and the other gradients, each group one vector. (Per tensor,
    bf16 with train-mode BatchNorm is too noisy to compare: per_child's own gradients were up to 0.3 of
    a tensor's range off the fp32 ones at these sizes.)"""
    fp32_net = copy.deepcopy(reference)
    fp32_out = search_step(fp32_net, x, mode, 1)
    flat = lambda tensors: torch.cat([t.detach().double().flatten() for t in tensors]) if tensors else None  # noqa: E731

    def vectors(net, out):
        grads = [(name, p.grad) for name, p in net.named_parameters() if p.grad is not None]
        return {
            "outputs": flat(list(out.values())),
            "logits": flat([g for name, g in grads if name.endswith("logits")]),
            "weights": flat([g for name, g in grads if not name.endswith("logits")]),
        }

    expected = vectors(fp32_net, fp32_out)
    errors = {}
    for name, net in (("per_child", reference), ("triton", triton_net)):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            got = vectors(net, search_step(net, x, mode, 1))
        errors[name] = {
            group: float((got[group] - v).norm() / v.norm())
            for group, v in expected.items()
            if v is not None and v.norm() > 0
        }
    return errors


def assert_as_accurate_as_per_child(errors):
    """The triton path's bf16 step at most twice per_child's error (+0.02) in every group: measured on
    CPU, the two errors were within a factor 2.1 of each other (0.8% on outputs, 2-12% on gradients)."""
    for group, per_child_error in errors["per_child"].items():
        assert errors["triton"][group] <= 2 * per_child_error + 0.02, (group, errors)


@interpreted_only
@pytest.mark.parametrize("mode", ["search", "frozen", "eval"])
def test_basic_blocks_through_the_index_equal_per_child(mode, monkeypatch):
    reference, triton_net = supernets(basic_blocks(), torch.float32)
    calls = record_calls(monkeypatch)
    x = torch.randn(2, 4, 7, 7)
    assert_same_step(reference, triton_net, x, mode, {"atol": 2e-4, "rtol": 2e-4})
    assert calls["started"] == [(0, True), (1, True), (2, True), (3, True)]
    # conv1 of every block, plus the downsample convolutions of blocks 1 and 3; identity: blocks 0 and 2
    assert (calls["convolutions"], calls["gathers"]) == (6, 2)
    if mode == "search":  # the two consumers' logits gradients summed: nonzero and equal to per_child's
        assert all(p.grad.abs().sum() > 0 for p in triton_net.logits_parameters()[1:])


@interpreted_only
def test_basic_blocks_channels_last():
    blocks = [BlockSpec(3, lambda b, j: BasicBlock(4, 6, stride=2)), BlockSpec(3, lambda b, j: BasicBlock(6, 6))]
    reference, triton_net = supernets(blocks, torch.float32)
    x = torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    reference.to(memory_format=torch.channels_last), triton_net.to(memory_format=torch.channels_last)
    expected, got = search_step(reference, x, "search", 3), search_step(triton_net, x, "search", 3)
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], atol=2e-4, rtol=2e-4)
    for (name, p), (_, q) in zip(reference.named_parameters(), triton_net.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=2e-4, rtol=2e-4, msg=lambda m: f"{name}: {m}")


@interpreted_only
def test_basic_blocks_in_fp64_keep_the_cudnn_path(monkeypatch):
    reference, triton_net = supernets(basic_blocks(), torch.float64)
    calls = record_calls(monkeypatch)
    assert_same_step(
        reference, triton_net, torch.randn(2, 4, 7, 7, dtype=torch.float64), "search", {"atol": 1e-10, "rtol": 1e-10}
    )
    assert calls["started"] == [(0, False), (1, False), (2, False), (3, False)]
    assert (calls["convolutions"], calls["gathers"]) == (0, 0)


@interpreted_only
def test_basic_blocks_under_autocast_compute_the_convolutions_in_the_autocast_dtype(monkeypatch):
    reference, triton_net = supernets(basic_blocks()[1:], torch.float32)  # block 2: identity with 3 parents
    dtypes = []
    real = conv_op._indexed_conv2d_op
    monkeypatch.setattr(
        conv_op, "_indexed_conv2d_op", lambda parents, *args: dtypes.append(parents.dtype) or real(parents, *args)
    )
    errors = bf16_errors(reference, triton_net, torch.randn(4, 4, 9, 9), "search")
    assert dtypes == [torch.bfloat16] * 5  # conv1 of every block, the downsamples of the first and last
    assert set(errors["per_child"]) == {"outputs", "logits", "weights"}
    assert_as_accurate_as_per_child(errors)
    for p in triton_net.parameters():
        assert p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()


@interpreted_only
def test_basic_blocks_step_compiles_fullgraph_with_a_seed_tensor():
    """The identity shortcut's straight-through op and the indexed convolutions trace as one graph
    (aot_eager: dynamo and AOT autograd) with a seed tensor, and match eager."""
    _, eager = supernets(basic_blocks()[:2], torch.float32)  # identity, then downsample
    assert_compiled_step_matches_eager(eager, torch.randn(2, 4, 5, 5), torch.tensor([5]), TASKS)


@interpreted_only
def test_taskonomy_resnet34_with_the_triton_backend_equals_per_child(monkeypatch):
    """The library's Taskonomy model (branching after every residual block, tiny width): the stem's Conv2d
    and all 16 BasicBlock blocks start through the index. 34 layers of train-mode BatchNorm over 2x2 maps
    make the fp32 gradients ill-conditioned (per_child's own differ from fp64 by up to ~1e-3 of a tensor's
    range), so errors are relative to each tensor's range; a wrong gradient path is off by O(1)."""
    torch.manual_seed(0)
    reference = taskonomy_resnet34(
        width=1 / 16, children=2, branching="block", input_size=16, aspp_channels=32, dropout=0.0, execution="per_child"
    )
    with torch.no_grad():
        for branching in reference.branchings:
            branching.logits.normal_()
    triton_net = triton_copy(reference)
    calls = record_calls(monkeypatch)
    x = torch.randn(2, 3, 16, 16)
    expected, got = search_step(reference, x, "search", 1), search_step(triton_net, x, "search", 1)
    assert calls["started"] == [(block, True) for block in range(17)]
    assert_close_in_range(reference, triton_net, expected, got, 2e-3)


# --- compiled kernels on a GPU -------------------------------------------------------------------------------


def taskonomy_like_blocks():
    """ResNet-34 layer1/layer2-like nodes at 1/4 resolution: 5 children, identity and strided downsample."""
    return [
        BlockSpec(5, lambda b, j: BasicBlock(64, 64)),
        BlockSpec(5, lambda b, j: BasicBlock(64, 128, stride=2)),
        BlockSpec(3, lambda b, j: BasicBlock(128, 128, dilation=2)),
    ]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["search", "frozen", "eval"])
def test_cuda_basic_blocks_through_the_index_equal_per_child(mode, dtype):
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # an fp32 reference, not TF32
    try:
        reference, triton_net = supernets(taskonomy_like_blocks(), torch.float32, "cuda")
        x = torch.randn(8, 64, 32, 32, device="cuda")
        if dtype == torch.bfloat16:  # autocast: both against per_child's fp32 step
            assert_as_accurate_as_per_child(bf16_errors(reference, triton_net, x, mode))
        else:
            expected, got = search_step(reference, x, mode, 1), search_step(triton_net, x, mode, 1)
            assert_close_in_range(reference, triton_net, expected, got, 2e-3)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
