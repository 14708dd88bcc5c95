"""The paper's models (l2b_fast.models): structure, output shapes, parameter counts, derive -> TreeNet."""

from __future__ import annotations

import pickle

import pytest
import torch

from l2b_fast.datasets.celeba.layers import CELEBA_ATTRIBUTES
from l2b_fast.datasets.taskonomy.resnet import TASK_CHANNELS
from l2b_fast.models import (
    celeba_branch_vgg,
    celeba_branch_vgg_spec,
    celeba_deep_wide_spec,
    counts,
    taskonomy_resnet34,
    taskonomy_resnet34_spec,
)
from l2b_fast.nn import TreeNet, parameter_count
from l2b_fast.tree import derive

pytestmark = pytest.mark.usefixtures("one_thread")


# Tiny versions: a few channels, small inputs, few children (odd sizes where the model allows them).
TINY = {
    "taskonomy-block": lambda: taskonomy_resnet34_spec(width=1 / 32, input_size=(24, 16), children=2, aspp_channels=48),
    "taskonomy-stage": lambda: taskonomy_resnet34_spec(
        width=1 / 16, input_size=16, children=3, branching="stage", aspp_channels=32
    ),
    "celeba-vgg": lambda: celeba_branch_vgg_spec(width=1 / 8, input_size=(37, 33), children=(2, 3, 2, 2, 3, 3, 4, 5)),
    "celeba-deep-wide": lambda: celeba_deep_wide_spec(width=1 / 8, input_size=(35, 41), children=(2, 3, 3, 4, 2)),
}


def expected_shape(spec, batch):
    if spec.name == "taskonomy_resnet34":
        return {task: (batch, channels, *spec.input_shape[1:]) for task, channels in TASK_CHANNELS.items()}
    return {task: (batch, 1) for task in CELEBA_ATTRIBUTES}


@pytest.mark.parametrize("name", list(TINY))
def test_search_step_shapes_and_gradients(name):
    spec = TINY[name]()
    torch.manual_seed(0)
    net = spec.supernet(execution="per_child", tau=2.0)
    x = spec.example_input(3, generator=torch.Generator().manual_seed(1))
    out = net(x, generator=torch.Generator().manual_seed(2))
    assert {task: tuple(o.shape) for task, o in out.items()} == expected_shape(spec, 3)
    sum(o.square().mean() for o in out.values()).backward()
    for b, logits in enumerate(net.logits_parameters()):
        if logits.shape[0] > 1:  # with a single parent there is nothing to choose (softmax over one is constant)
            assert logits.grad is not None and logits.grad.abs().sum() > 0, f"block {b} logits got no gradient"
    assert all(p.grad is not None for p in net.heads.parameters())


@pytest.mark.parametrize("name", list(TINY))
def test_parameter_counts_match_the_modules(name):
    spec = TINY[name]()
    net = spec.supernet(execution="per_child")
    logits = sum(p.numel() for p in net.logits_parameters())
    assert counts.logits_parameters(spec) == logits
    assert counts.supernet_parameters(spec) == parameter_count(net) - logits
    torch.manual_seed(3)
    for branching in net.branchings:
        branching.logits.data.normal_()
    for tree in (counts.all_shared_tree(spec), counts.all_separate_tree(spec), derive(net), derive(net).pruned()):
        assert counts.tree_parameters(spec, tree) == parameter_count(TreeNet(tree, spec.blocks, spec.heads))
    assert (
        counts.tree_parameters(spec, counts.all_shared_tree(spec))
        <= counts.tree_parameters(spec, derive(net).pruned())
        <= counts.supernet_parameters(spec)
    )


def test_derive_prune_retrain_and_carry_weights():
    spec = TINY["celeba-deep-wide"]()
    torch.manual_seed(0)
    net = spec.supernet(execution="per_child")
    for branching in net.branchings:
        branching.logits.data.normal_(std=2.0)
    x = spec.example_input(4, generator=torch.Generator().manual_seed(0))
    net(x)  # a training step's forward moves the BatchNorm statistics away from their initial values
    tree = derive(net).pruned()
    assert sum(tree.widths) < sum(block.children for block in spec.blocks)
    retrained = spec.treenet(tree)  # fresh weights: the retrain-from-scratch network
    assert {task: tuple(o.shape) for task, o in retrained(x).items()} == expected_shape(spec, 4)
    net.eval()
    carried = TreeNet.from_supernet(net, tree).eval()
    with torch.no_grad():
        expected, got = net(x), carried(x)
    for task in spec.tasks:
        torch.testing.assert_close(got[task], expected[task])


def test_specs_pickle_and_supernet_keeps_its_spec():
    for make in TINY.values():
        spec = make()
        assert pickle.loads(pickle.dumps(spec)) == spec  # node and head factories are plain picklable objects
    net = taskonomy_resnet34(
        width=1 / 32, children=2, branching="stage", aspp_channels=8, input_size=16, execution="per_child"
    )
    assert isinstance(net.model_spec, type(TINY["celeba-vgg"]()))
    assert net.executions == ["per_child"] * len(net.model_spec.blocks)


def test_full_size_structure():
    resnet = taskonomy_resnet34_spec()
    assert [block.children for block in resnet.blocks] == [1] + [5] * 16  # stem, then every residual block
    assert [block.children for block in taskonomy_resnet34_spec(branching="stage", children=4).blocks] == [
        1,
        4,
        4,
        4,
        5,
    ]
    assert resnet.tasks == tuple(TASK_CHANNELS)
    # The backbone alone (one node per block) is torchvision's ResNet-34 without its classifier:
    # 21,797,672 - 513,000 parameters; dilation changes no parameter count.
    backbone = counts.all_shared_tree(resnet)
    backbone_parameters = counts.tree_parameters(resnet, backbone) - counts.head_parameters(resnet)
    last_block_extra = 4 * (2 * 9 * 512 * 512 + 4 * 512)  # four more copies of the last basic block
    assert backbone_parameters - last_block_extra == 21_284_672
    vgg = celeba_branch_vgg_spec()
    assert [block.children for block in vgg.blocks] == [3, 3, 5, 5, 10, 20, 30, 40]
    assert vgg.tasks == CELEBA_ATTRIBUTES and vgg.input_shape == (3, 218, 178)
    assert [block.children for block in celeba_deep_wide_spec().blocks] == [2, 4, 8, 16, 40]


def test_dilated_output_stride_is_8():
    spec = taskonomy_resnet34_spec(width=1 / 32, input_size=32, children=1, aspp_channels=8)
    net = spec.supernet(execution="per_child").eval()
    features = spec.example_input(1)
    with torch.no_grad():
        for nodes in net.nodes:
            features = nodes[0](features)
    assert features.shape[-2:] == (4, 4)  # 32 / 8: stages 3 and 4 dilate instead of striding
    dilations = [node.conv1.dilation[0] for node in (nodes[0] for nodes in net.nodes[1:])]
    assert dilations == [1] * 3 + [1] * 4 + [2] * 6 + [4] * 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: taskonomy_resnet34_spec(width=0), "width"),
        (lambda: taskonomy_resnet34_spec(branching="layer"), "branching"),
        (lambda: taskonomy_resnet34_spec(tasks=("depth_zbuffer", "curvature")), "curvature"),
        (lambda: taskonomy_resnet34_spec(children=0), "children"),
        (lambda: taskonomy_resnet34_spec(input_size=4), "input_size"),
        (lambda: celeba_branch_vgg_spec(children=(3, 3, 5)), "children"),
        (lambda: celeba_deep_wide_spec(input_size=(16, 64)), "input_size"),
        (lambda: celeba_branch_vgg(execution="fast"), "execution"),
    ],
)
def test_bad_arguments_name_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_custom_task_channels():
    spec = taskonomy_resnet34_spec(
        tasks=("depth_zbuffer", "curvature"),
        out_channels={"curvature": 2},
        width=1 / 32,
        input_size=16,
        children=2,
        aspp_channels=8,
    )
    out = spec.supernet(execution="per_child")(spec.example_input(1))
    assert out["curvature"].shape == (1, 2, 16, 16) and out["depth_zbuffer"].shape == (1, 1, 16, 16)


@pytest.mark.parametrize("name", list(TINY))
def test_grouped_execution_equals_per_child(name):
    """The zoo's nodes (stem, basic blocks, VGG stages, FC layers) all run grouped, with per_child's results."""
    spec = TINY[name]()
    torch.manual_seed(0)
    reference = spec.supernet(execution="per_child").double()
    grouped = spec.supernet(execution="grouped").double()
    grouped.load_state_dict(reference.state_dict())
    assert grouped.executions == ["grouped"] * len(spec.blocks)
    x = spec.example_input(2, generator=torch.Generator().manual_seed(4)).double()
    results = []
    for net in (reference, grouped):
        torch.manual_seed(5)  # the ASPP heads' dropout
        out = net(x, generator=torch.Generator().manual_seed(6))
        sum(o.square().mean() for o in out.values()).backward()
        # A one-parent block's logits gradient is exactly 0: per_child computes the zeros, grouped may skip them (None).
        results.append((out, {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in net.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    for task in spec.tasks:
        torch.testing.assert_close(got[task], want[task])
    assert want_grads.keys() == got_grads.keys()
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, msg=key)
