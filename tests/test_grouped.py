"""Grouped execution of a block's children is held to the per-child reference: outputs, every parameter
gradient, the logits gradient and the BatchNorm running buffers, with the same generator."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from l2b_fast.nn import BasicBlock, BlockSpec, GroupedFallbackWarning, TreeNet, TreeSupernet, UnsupportedNodeError
from l2b_fast.tree import derive

TASKS = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_thread")


def cnn_blocks():
    """Convolutions with and without bias, strided, dilated; pooling; BasicBlock with a downsample;
    Flatten into Linear, Dropout(p=0), BatchNorm1d; odd sizes everywhere."""

    def first(block, child):
        return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())

    def middle(block, child):
        return nn.Sequential(
            nn.Conv2d(5, 6, 3, stride=2, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(6, momentum=None),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2, ceil_mode=True),
        )

    def last(block, child):
        return nn.Sequential(
            BasicBlock(6, 4, stride=2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 7),
            nn.Dropout(0.0),
            nn.GELU(),
            nn.BatchNorm1d(7),
            nn.Linear(7, 3),
        )

    return [BlockSpec(3, first), BlockSpec(4, middle), BlockSpec(3, last)]


def resnet_blocks():
    """BasicBlocks: identity shortcut (routed straight from the parents), dilation, a 1x1 downsample."""
    return [
        BlockSpec(2, lambda b, j: BasicBlock(3, 4)),
        BlockSpec(5, lambda b, j: BasicBlock(4, 4, dilation=2)),
        BlockSpec(3, lambda b, j: BasicBlock(4, 6, stride=2)),
    ]


def mlp_blocks():
    """Linear first (routed), activations, BatchNorm1d without affine, Linear without bias."""
    return [
        BlockSpec(3, lambda b, j: nn.Sequential(nn.Linear(5, 6), nn.Tanh())),
        BlockSpec(
            4, lambda b, j: nn.Sequential(nn.Linear(6, 7, bias=False), nn.BatchNorm1d(7, affine=False), nn.SiLU())
        ),
        BlockSpec(3, lambda b, j: nn.Sequential(nn.Linear(7, 2), nn.Sigmoid())),
    ]


def conv1d_blocks():
    """Conv1d with reflect padding and groups (started by the gather), BatchNorm without running stats,
    average pooling, a block of pure activations (an empty program start)."""
    return [
        BlockSpec(
            2,
            lambda b, j: nn.Sequential(
                nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect", groups=2),
                nn.BatchNorm1d(6, track_running_stats=False),
                nn.ReLU(),
            ),
        ),
        BlockSpec(
            3, lambda b, j: nn.Sequential(nn.ReLU(), nn.Conv1d(6, 6, 2, stride=2), nn.AvgPool1d(2, ceil_mode=True))
        ),
        BlockSpec(3, lambda b, j: nn.Sequential(nn.Conv1d(6, 3, 1), nn.Tanh())),
    ]


MODELS = {
    "cnn": (cnn_blocks, (3, 3, 11, 9)),
    "resnet": (resnet_blocks, (2, 3, 7, 5)),
    "mlp": (mlp_blocks, (5, 5)),
    "conv1d": (conv1d_blocks, (3, 4, 9)),
}
TOLERANCES = {torch.float64: {"atol": 1e-10, "rtol": 1e-10}, torch.float32: {"atol": 2e-4, "rtol": 2e-4}}


def reference_and_grouped(model: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    reference = TreeSupernet(MODELS[model][0](), TASKS, execution="per_child").to(dtype)
    with torch.no_grad():
        for branching in reference.branchings:  # uneven probabilities: children pick different parents
            branching.logits.normal_()
    grouped = copy.deepcopy(reference)
    grouped.set_execution("grouped")
    return reference, grouped


def step(
    net: TreeSupernet, x: torch.Tensor, mode: str, seed: int, *, default_generator: bool = False
) -> dict[str, torch.Tensor]:
    if mode == "eval":
        net.eval()
    else:
        net.train()
        net.set_mode(mode)
    if default_generator:  # a compiled module takes no Generator argument
        torch.manual_seed(seed)
        out = net(x)
    else:
        out = net(x, generator=torch.Generator().manual_seed(seed))
    # a loss that weights every output element differently, so every gradient path is exercised
    loss = sum((v * torch.linspace(-1, 2, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in out.values())
    loss.backward()
    return out


def assert_equivalent(reference, grouped, x, mode, tolerance, steps=2):
    for seed in range(steps):  # two steps: running buffers and momentum=None counts carry over
        expected, got = step(reference, x, mode, seed), step(grouped, x, mode, seed)
        for task in TASKS:
            torch.testing.assert_close(got[task], expected[task], **tolerance)
    for (name, p), (_, q) in zip(reference.named_parameters(), grouped.named_parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, **tolerance, msg=lambda m: f"{name}: {m}")
    for (name, b), (_, c) in zip(reference.named_buffers(), grouped.named_buffers()):
        torch.testing.assert_close(c, b, **tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["search", "frozen", "eval"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_equals_per_child(model, mode, dtype):
    reference, grouped = reference_and_grouped(model, dtype)
    x = torch.randn(MODELS[model][1], dtype=dtype)
    if mode != "frozen":
        x.requires_grad_(True)
    assert_equivalent(reference, grouped, x, mode, TOLERANCES[dtype])
    if mode == "search":
        assert any(p.grad.abs().sum() > 0 for p in grouped.logits_parameters())


@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_grouped_equals_per_child_channels_last(model):
    reference, grouped = reference_and_grouped(model, torch.float64)
    x = torch.randn(MODELS[model][1], dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    reference.to(memory_format=torch.channels_last), grouped.to(memory_format=torch.channels_last)
    assert_equivalent(reference, grouped, x, "search", TOLERANCES[torch.float64])


@pytest.mark.parametrize(
    ("node", "shape"),
    [
        (lambda: BasicBlock(2, 2), (3, 2, 2, 4, 3)),
        (lambda: BasicBlock(2, 3, stride=2), (2, 2, 2, 3, 3)),
        (lambda: nn.Sequential(nn.Linear(3, 2, bias=False), nn.Tanh()), (3, 4, 3)),
    ],
)
def test_grouped_block_passes_gradcheck(node, shape):
    """Search mode: the parents' gradient of a grouped block is the true derivative of its outputs for the sampled
    index."""
    from l2b_fast.nn import Branching
    from l2b_fast.nn.grouped import GroupedBlock

    torch.manual_seed(0)
    nodes = nn.ModuleList(node() for _ in range(5)).double()
    branching = Branching(shape[0], 5).double()
    with torch.no_grad():
        branching.logits.normal_()
    block = GroupedBlock(nodes, 0)
    parents = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    run = lambda p: block(branching, p, torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.autograd.gradcheck(run, (parents,))


def test_autocast_runs_close_to_per_child():
    reference, grouped = reference_and_grouped("cnn", torch.float32)
    x = torch.randn(MODELS["cnn"][1])
    outputs = []
    for net in (reference, grouped):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, generator=torch.Generator().manual_seed(0))
            loss = sum(v.float().square().mean() for v in out.values())
        loss.backward()
        outputs.append(out)
    for task in TASKS:
        torch.testing.assert_close(outputs[1][task].float(), outputs[0][task].float(), atol=0.1, rtol=0.1)
    assert all(torch.isfinite(p.grad).all() for p in grouped.parameters() if p.grad is not None)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def scale_blocks():
    return [
        BlockSpec(2, lambda b, j: nn.Sequential(nn.Linear(5, 6), Scale())),
        BlockSpec(3, lambda b, j: nn.Sequential(nn.Linear(6, 2), nn.ReLU())),
    ]


def test_auto_falls_back_per_block_with_one_warning_naming_the_module():
    with pytest.warns(GroupedFallbackWarning, match=r"block 0 node\.1 is a .*Scale"):
        net = TreeSupernet(scale_blocks(), ["a", "b", "c"])
    assert net.executions == ["per_child", "grouped"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.randn(4, 5))  # no warning per forward
        net = TreeSupernet(scale_blocks(), ["a", "b", "c"], execution="per_child")


def test_grouped_raises_for_unsupported_or_unequal_nodes():
    with pytest.raises(UnsupportedNodeError, match=r"execution='grouped': block 0 node\.1 is a .*Scale"):
        TreeSupernet(scale_blocks(), ["a", "b", "c"], execution="grouped")
    uneven = [BlockSpec(2, lambda b, j: nn.Linear(5, 6 + j)), BlockSpec(3, lambda b, j: nn.LazyLinear(2))]
    with pytest.raises(UnsupportedNodeError, match="block 0: child 1 differs in structure"):
        TreeSupernet(uneven, ["a", "b", "c"], execution="grouped")
    hooked = nn.Linear(5, 2)
    hooked.register_forward_hook(lambda *args: None)
    with pytest.raises(UnsupportedNodeError, match="forward hooks"):
        TreeSupernet([BlockSpec(3, lambda b, j: copy.deepcopy(hooked))], ["a", "b", "c"], execution="grouped")
    # a BlockSpec's own execution wins over the supernet's
    blocks = scale_blocks()
    blocks[0] = BlockSpec(2, blocks[0].node, execution="per_child")
    assert TreeSupernet(blocks, ["a", "b", "c"], execution="grouped").executions == ["per_child", "grouped"]


def test_unbatched_convolution_inputs_are_rejected_clearly():
    net = TreeSupernet([BlockSpec(3, lambda b, j: nn.Conv2d(2, 2, 1))], TASKS, execution="grouped")
    with pytest.raises(ValueError, match="batched inputs"):
        net(torch.randn(2, 4, 4))


def test_state_dict_is_the_same_for_every_execution_and_loads_across():
    reference, grouped = reference_and_grouped("cnn")
    assert {k: v.shape for k, v in reference.state_dict().items()} == {
        k: v.shape for k, v in grouped.state_dict().items()
    }
    step(grouped, torch.randn(MODELS["cnn"][1], dtype=torch.float64), "search", 0)  # moves the buffers
    torch.manual_seed(1)
    loaded = TreeSupernet(cnn_blocks(), TASKS, execution="per_child").double()
    loaded.load_state_dict(grouped.state_dict())
    grouped.eval(), loaded.eval()
    x = torch.randn(MODELS["cnn"][1], dtype=torch.float64)
    for task in TASKS:
        torch.testing.assert_close(loaded(x)[task], grouped(x)[task], atol=1e-12, rtol=1e-12)


def test_treenet_from_grouped_supernet():
    _, grouped = reference_and_grouped("resnet")
    step(grouped, torch.randn(MODELS["resnet"][1], dtype=torch.float64), "search", 0)
    grouped.eval()
    compact = TreeNet.from_supernet(grouped, derive(grouped).pruned())
    compact.eval()
    x = torch.randn(MODELS["resnet"][1], dtype=torch.float64)
    expected, got = grouped(x), compact(x)
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], atol=1e-12, rtol=1e-12)


def test_synthetic_model_runs_grouped_including_bias_heads():
    from l2b_fast.datasets.synthetic import tasks as synthetic

    torch.manual_seed(0)
    blocks = synthetic.blocks(3, input_dim=6, hidden=5, output_dim=4, fc_blocks=2, nodes=3)
    reference = TreeSupernet(blocks, TASKS, execution="per_child").double()
    with torch.no_grad():
        for node in reference.nodes[-1]:
            node.bias.normal_()
    grouped = copy.deepcopy(reference)
    grouped.set_execution("auto")
    assert grouped.executions == ["grouped"] * 3
    assert_equivalent(reference, grouped, torch.randn(7, 6, dtype=torch.float64), "search", TOLERANCES[torch.float64])


@pytest.mark.slow
def test_grouped_cnn_search_step_compiles_fullgraph():
    """Under torch.compile the block starts from the gather (no host read of the index)."""
    blocks = [
        BlockSpec(2, lambda b, j: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU())),
        BlockSpec(3, lambda b, j: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))),
    ]
    torch.manual_seed(0)
    reference = TreeSupernet(blocks, TASKS, execution="per_child")
    grouped = copy.deepcopy(reference)
    grouped.set_execution("grouped")
    compiled = torch.compile(grouped, fullgraph=True)
    x = torch.randn(2, 3, 6, 5)
    expected = step(reference, x, "search", 0, default_generator=True)
    torch._dynamo.reset()  # fresh: other tests compile the same code at other shapes (automatic dynamic)
    try:
        with torch._inductor.config.patch(fallback_random=True):  # eager's random numbers
            got = step(compiled, x, "search", 0, default_generator=True)
    finally:
        torch._dynamo.reset()
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], **TOLERANCES[torch.float32])
    for p, q in zip(reference.parameters(), grouped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOLERANCES[torch.float32])
    for b, c in zip(reference.buffers(), grouped.buffers()):
        torch.testing.assert_close(c, b, **TOLERANCES[torch.float32])


def test_dropout_is_random_per_child_and_position():
    """Train-mode dropout draws one mask for the whole stack: equal to per_child in distribution only,
    so the grouped children still drop independently (different masks)."""
    net = TreeSupernet(
        [BlockSpec(3, lambda b, j: nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5)))], TASKS, execution="grouped"
    )
    with torch.no_grad():
        for node in net.nodes[0]:
            node[0].weight.copy_(net.nodes[0][0][0].weight)
            node[0].bias.fill_(1.0)
    out = net(torch.ones(8, 4))
    masks = [out[task] == 0 for task in TASKS]
    assert not torch.equal(masks[0], masks[1])
    fraction = torch.stack(masks).float().mean().item()
    assert 0.35 < fraction < 0.65


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_grouped_on_cuda_equals_per_child_without_host_sync(model):
    """On CUDA every block starts from the gather (device-side index): no host synchronisation."""
    reference, grouped = reference_and_grouped(model, torch.float32)
    reference.cuda(), grouped.cuda()
    x = torch.randn(MODELS[model][1], device="cuda")
    reference.train(), grouped.train()
    torch.manual_seed(0)
    expected = reference(x)
    torch.manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = grouped(x)
        sum(v.square().sum() for v in got.values()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sum(v.square().sum() for v in expected.values()).backward()
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], atol=1e-3, rtol=1e-3)
    for p, q in zip(reference.parameters(), grouped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-3, rtol=1e-3)


def test_auto_leaves_large_cpu_blocks_per_child(monkeypatch):
    from l2b_fast.nn.grouped import block as grouped_block

    torch.manual_seed(0)
    auto = TreeSupernet(cnn_blocks(), TASKS, execution="auto").double()
    reference = copy.deepcopy(auto)
    reference.set_execution("per_child")
    calls = []
    original = grouped_block.GroupedBlock.__call__
    monkeypatch.setattr(
        grouped_block.GroupedBlock, "__call__", lambda self, *args: calls.append(self.block) or original(self, *args)
    )
    x = torch.randn(MODELS["cnn"][1], dtype=torch.float64)  # 891 elements per child in block 0, 1485 in block 1
    step(auto, x, "search", 0)
    assert calls == [0, 1, 2]
    monkeypatch.setattr(grouped_block, "CPU_GROUPING_MAX_ELEMENTS", 1000)
    calls.clear()
    expected, got = step(reference, x, "search", 1), step(auto, x, "search", 1)
    assert calls == [0, 2]  # block 1's children read 1485 elements each: per child
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task])
    explicit = copy.deepcopy(auto)
    explicit.set_execution("grouped")
    calls.clear()
    step(explicit, x, "search", 2)
    assert calls == [0, 1, 2]  # execution="grouped" always groups


class WeightScale(nn.Module):
    """A user's layer type: ``x * weight`` over the last dim."""

    def __init__(self, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return x * self.weight


def test_a_registered_layer_type_runs_grouped_as_per_child(monkeypatch):
    from l2b_fast.nn.grouped import CHILDREN, GROUPED_STEPS, Step, register_grouped_step

    class ScaleStep(Step):
        layout = CHILDREN

        def __call__(self, x):
            x = x.to(CHILDREN)
            weight = torch.stack([module.weight for module in self.modules])  # [J, F]
            return x.with_tensor(x.tensor * weight.view(x.children, *[1] * (x.tensor.dim() - 2), -1))

    monkeypatch.setitem(GROUPED_STEPS, WeightScale, None)  # restored after the test
    del GROUPED_STEPS[WeightScale]
    blocks = [
        BlockSpec(3, lambda b, c: nn.Sequential(nn.Linear(4, 5), WeightScale(5), nn.Tanh())),
        BlockSpec(3, lambda b, c: WeightScale(5)),
    ]
    torch.manual_seed(0)
    reference = TreeSupernet(blocks, TASKS, execution="per_child").double()
    with pytest.raises(UnsupportedNodeError, match=r"block 0 node\.1 is a .*WeightScale.*register_grouped_step"):
        copy.deepcopy(reference).set_execution("grouped")
    register_grouped_step(WeightScale, ScaleStep)
    grouped = copy.deepcopy(reference)
    grouped.set_execution("grouped")
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert_equivalent(reference, grouped, x, "search", TOLERANCES[torch.float64])
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_grouped_step(int, ScaleStep)


def test_a_mis_shaped_layer_names_the_users_module():
    blocks = [
        BlockSpec(2, lambda b, c: nn.Sequential(nn.Linear(4, 5), nn.ReLU())),
        BlockSpec(3, lambda b, c: nn.Linear(7, 2)),
    ]
    net = TreeSupernet(blocks, TASKS, execution="grouped")
    with pytest.raises(ValueError, match=r"block 1 node \(Linear\): expected 7 input features, got 5"):
        net(torch.randn(3, 4))
    conv = [
        BlockSpec(2, lambda b, c: nn.Conv2d(3, 4, 3, padding=1)),
        BlockSpec(3, lambda b, c: nn.Sequential(nn.ReLU(), nn.Conv2d(6, 2, 1))),
    ]
    with pytest.raises(ValueError, match=r"block 1 node\.1 \(Conv2d\): expected 6 input channels, got 4"):
        TreeSupernet(conv, TASKS, execution="grouped")(torch.randn(2, 3, 5, 5))
