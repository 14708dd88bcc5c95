"""Branching modules, the tree supernet, derive/prune and the derived TreeNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from l2b_fast.nn import BasicBlock, BlockSpec, Branching, TreeNet, TreeSupernet, parameter_count
from l2b_fast.tree import Tree, derive

TASKS = ["a-0", "a-1", "b-0", "b-1"]


def mlp_blocks(widths=(3, 3, 4), features=6, inputs=5):
    def fc(block, child):
        return nn.Sequential(nn.Linear(inputs if block == 0 else features, features), nn.Tanh())

    return [BlockSpec(width, fc) for width in widths]


def supernet(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TreeSupernet(mlp_blocks(), TASKS, heads=lambda task: nn.Linear(6, 2), **kwargs)


def test_branching_modes():
    torch.manual_seed(0)
    block = Branching(3, 5, tau=0.5)
    assert torch.equal(block.logits.detach(), torch.zeros(3, 5))  # uniform initialisation
    parents = torch.randn(3, 4, requires_grad=True)
    block(parents).sum().backward()
    assert block.logits.grad is not None and block.logits.grad.abs().sum() > 0  # search: logits learn

    block.logits.grad = None
    block.mode = "frozen"
    out = block(parents)
    out.sum().backward()
    assert block.logits.grad is None  # warmup: sampled but frozen
    assert parents.grad is not None

    with torch.no_grad():
        block.logits.copy_(torch.randn(3, 5))
    block.mode = "eval"
    expected = parents[block.logits.argmax(0)]
    for _ in range(3):  # deterministic: no noise
        torch.testing.assert_close(block(parents), expected)
    block.mode = "search"
    block.eval()  # module.eval() routes by argmax too
    torch.testing.assert_close(block(parents), expected)
    with pytest.raises(ValueError, match="mode"):
        block.mode = "sample"


def test_search_mode_samples_vary_and_follow_generator():
    block = Branching(4, 30)
    parents = torch.arange(4.0)[:, None]
    first = block(parents, generator=torch.Generator().manual_seed(1))
    again = block(parents, generator=torch.Generator().manual_seed(1))
    other = block(parents, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)


def test_supernet_forward_backward_and_state_dict():
    net = supernet()
    out = net(torch.randn(7, 5))
    assert list(out) == TASKS and all(v.shape == (7, 2) for v in out.values())
    sum(v.square().sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in net.logits_parameters())
    # every node of every block is computed, so every node gets a gradient when sampled... and all
    # parents appear in the logits gradient
    assert all(p.grad.abs().sum() > 0 for p in net.logits_parameters()[1:])
    clone = supernet(seed=1)
    clone.load_state_dict(net.state_dict())
    net.eval(), clone.eval()
    x = torch.randn(3, 5)
    for task in TASKS:
        torch.testing.assert_close(net(x)[task], clone(x)[task])
    assert {id(p) for p in net.weight_parameters()}.isdisjoint({id(p) for p in net.logits_parameters()})


def test_supernet_rejects_bad_specs():
    with pytest.raises(ValueError, match="one child per task"):
        TreeSupernet(mlp_blocks(widths=(3, 3)), TASKS)
    with pytest.raises(ValueError, match="unique"):
        TreeSupernet(mlp_blocks(widths=(3, 2)), ["x", "x"])
    with pytest.raises(ValueError, match="no head"):
        TreeSupernet(mlp_blocks(), TASKS, heads={"a-0": nn.Identity()})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_supernet_autocast(dtype):
    net = supernet()
    with torch.autocast("cpu", dtype=dtype):
        out = net(torch.randn(4, 5))
        loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.logits_parameters())


def test_supernet_compiles():
    net = supernet()
    net.eval()
    x = torch.randn(4, 5)
    compiled = torch.compile(net)
    eager, result = net(x), compiled(x)
    for task in TASKS:
        torch.testing.assert_close(result[task], eager[task])


def set_logits(net, values):
    with torch.no_grad():
        for branching, matrix in zip(net.branchings, values):
            branching.logits.copy_(torch.tensor(matrix, dtype=torch.float32))


HAND_LOGITS = [
    [[0.0, 0.0, 0.0]],  # input -> 3 nodes
    [[5.0, 5.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]],  # L1: nodes 0, 1 <- 0; node 2 <- 2
    [[5.0, 0.0, 0.0, 5.0], [0.0, 5.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # tasks: a-0 <- 0, a-1 <- 1, b-0 <- 1, b-1 <- 0
]


def test_derive_and_prune_hand_built_logits():
    net = TreeSupernet(mlp_blocks(widths=(3, 3, 4)), TASKS)
    set_logits(net, HAND_LOGITS)
    tree = derive(net)
    assert tree.parents == [[0, 0, 0], [0, 0, 2], [0, 1, 1, 0]]
    assert tree.used_nodes() == [[True, False, False], [True, True, False], [True] * 4]
    pruned = tree.pruned()
    assert pruned.parents == [[0], [0, 0], [0, 1, 1, 0]]
    assert pruned.supernet_nodes == [[0], [0, 1], [0, 1, 2, 3]]
    assert pruned.to_dict() == {
        "tasks": TASKS,
        "layers": [
            {"parents": [0], "supernet_nodes": [0]},
            {"parents": [0, 0], "supernet_nodes": [0, 1]},
            {"parents": [0, 1, 1, 0], "supernet_nodes": [0, 1, 2, 3]},
        ],
    }


def test_tree_json_roundtrip_and_errors(tmp_path):
    tree = Tree(TASKS, [[0, 0], [1, 1, 0, 0]])
    path = tree.save(tmp_path / "tree.json")
    assert Tree.load(path) == tree
    with pytest.raises(ValueError, match="must be 0"):
        Tree(TASKS, [[0, 1], [0, 0, 0, 0]])  # the first layer's parent is the input (0)
    with pytest.raises(ValueError, match="task layer"):
        Tree(TASKS, [[0, 0], [0, 0, 0]])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tree.load(tmp_path / "bad.json")
    (tmp_path / "schema.json").write_text('{"tasks": ["x"]}')
    with pytest.raises(ValueError, match="layers"):
        Tree.load(tmp_path / "schema.json")
    with pytest.raises(FileNotFoundError):
        Tree.load(tmp_path / "missing.json")


def test_treenet_equals_supernet_in_eval_mode():
    """The derived TreeNet carrying the supernet's weights computes the same outputs."""
    net = supernet()
    set_logits(net, HAND_LOGITS)
    net.eval()
    tree = derive(net).pruned()
    compact = TreeNet.from_supernet(net, tree)
    x = torch.randn(9, 5)
    expected, got = net(x), compact(x)
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task])
    assert parameter_count(compact) < parameter_count(net)


def test_treenet_computes_shared_nodes_once():
    calls = []

    def counting(block, child):
        layer = nn.Linear(5 if block == 0 else 6, 6)
        layer.register_forward_hook(lambda *args: calls.append((block, child)))
        return layer

    tree = Tree(TASKS, [[0], [0, 0], [0, 1, 1, 0]])
    net = TreeNet(tree, [BlockSpec(3, counting), BlockSpec(3, counting), BlockSpec(4, counting)])
    net(torch.randn(2, 5))
    assert len(calls) == 1 + 2 + 4  # the trunk once, not once per task


def test_treenet_fresh_initialisation_differs():
    net = supernet()
    set_logits(net, HAND_LOGITS)
    tree = derive(net).pruned()
    fresh = TreeNet(tree, mlp_blocks())
    carried = TreeNet.from_supernet(net, tree)
    assert not torch.equal(fresh.nodes[0][0][0].weight, carried.nodes[0][0][0].weight)


def test_supernet_search_mode_compiles_fullgraph():
    """A search step (gumbel sampling + straight-through backward) traces without graph breaks."""
    net = supernet()
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(torch.randn(4, 5))
    sum(v.square().sum() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.logits_parameters())


def test_execution_argument_is_validated():
    with pytest.raises(ValueError, match="execution must be one of"):
        supernet(execution="fast")
    with pytest.raises(ValueError, match="execution must be one of"):
        BlockSpec(3, lambda b, j: nn.Identity(), execution="batched")
    assert supernet(execution="per_child").executions == ["per_child"] * 3


def test_nodes_of_different_output_shapes_raise_naming_the_block():
    def uneven(block, child):
        return nn.Linear(5 if block == 0 else 6, 6 if block == 0 else 6 + child)

    net = TreeSupernet([BlockSpec(2, uneven), BlockSpec(4, uneven)], TASKS, execution="per_child")
    with pytest.raises(ValueError, match=r"block 1 give outputs of different shapes \[\(3, 6\), \(3, 7\)"):
        net(torch.randn(3, 5))


@pytest.mark.parametrize(("stride", "in_channels", "dilation"), [(1, 4, 1), (2, 4, 1), (1, 3, 2)])
def test_basic_block_matches_its_definition(stride, in_channels, dilation):
    torch.manual_seed(0)
    block = BasicBlock(in_channels, 4, stride=stride, dilation=dilation)
    assert (block.downsample is None) == (stride == 1 and in_channels == 4)
    x = torch.randn(2, in_channels, 9, 7)
    out = block(x)
    f = nn.functional
    body = f.relu(block.bn1(f.conv2d(x, block.conv1.weight, stride=stride, padding=dilation, dilation=dilation)))
    body = block.bn2(f.conv2d(body, block.conv2.weight, padding=dilation, dilation=dilation))
    shortcut = (
        x if block.downsample is None else block.downsample[1](f.conv2d(x, block.downsample[0].weight, stride=stride))
    )
    torch.testing.assert_close(out, f.relu(body + shortcut))
    assert out.shape == (2, 4, (9 - 1) // stride + 1, (7 - 1) // stride + 1)
    with pytest.raises(ValueError, match="stride"):
        BasicBlock(4, 4, stride=0)


def test_derive_refuses_a_treenet_with_one_line():
    tree = derive(supernet()).pruned()
    with pytest.raises(TypeError, match="derive takes a TreeSupernet .*not a TreeNet") as refused:
        derive(TreeNet(tree, mlp_blocks()))
    assert len(str(refused.value).splitlines()) == 1
