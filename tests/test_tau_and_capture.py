"""tau as a device tensor: compile once over a changing temperature, CUDA-graph capture, no host sync,
frozen logits skip the dot products, and the temperature is validated where it is set."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import CUDA, backend_cases, gumbel, runnable_backends
from l2b_fast import ops
from l2b_fast.nn import BlockSpec, Branching, TreeSupernet

NAMESPACES = {"cpp": "l2b_fast", "triton": "l2b_fast_triton"}


def namespace_ops(backend: str):
    if backend == "triton":
        from l2b_fast.ops import _triton  # noqa: F401  (defines the namespace)
    return getattr(torch.ops, NAMESPACES[backend])


@pytest.mark.parametrize("device, backend", backend_cases(include_ref=True))
@pytest.mark.parametrize("tau_dtype", [torch.float64, torch.float32])
def test_tau_tensor_gives_the_float_result(device, backend, tau_dtype):
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(4, 3, 7, generator=generator).to(device)
    logits = torch.randn(4, 5, generator=generator).to(device)
    noise = gumbel((4, 5), generator, dtype=torch.float32).to(device)
    grad = torch.randn(5, 3, 7, generator=generator).to(device)
    tau = 0.3  # exact in neither fp32 nor fp64: both tensor dtypes must reach the kernels unchanged
    results = []
    for given in (torch.tensor(tau, dtype=tau_dtype).item(), torch.tensor(tau, dtype=tau_dtype, device=device)):
        parents, weights = y.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        out = ops.branch(parents, weights, given, noise=noise, backend=backend)
        out.backward(grad)
        index, soft = ops.sample_branches(logits, given, noise=noise, backend=backend)
        results.append((out, parents.grad, weights.grad, index, soft))
    for from_float, from_tensor in zip(*results):
        torch.testing.assert_close(from_tensor, from_float, atol=0, rtol=0)


@pytest.mark.parametrize("device, backend", backend_cases(include_ref=True))
def test_bad_tau_tensor(device, backend):
    y, logits = torch.randn(3, 4, device=device), torch.randn(3, 2, device=device)
    for tau, message in [
        (torch.ones(2, device=device), "one-element"),
        (torch.tensor(1, device=device), "floating"),
        (torch.tensor(0.0, device=device), "finite positive"),
        (torch.tensor(math.nan, device=device), "finite positive"),
    ]:
        if device == "cuda" and "finite" in message:
            continue  # a device-side assert on CUDA (no host sync): see test_validation's CUDA test
        with pytest.raises(ValueError, match=message):
            ops.branch(y, logits, tau, backend=backend)
    if device == "cuda":
        with pytest.raises(ValueError, match="tau is on cpu"):
            ops.branch(y, logits, torch.tensor(1.0), backend=backend)


def test_branching_validates_tau_where_it_is_set():
    for bad in (0, -1.0, math.inf, math.nan, "1", True):
        with pytest.raises(ValueError, match="tau"):
            Branching(2, 3, tau=bad)
    block = Branching(2, 3, tau=2.0)
    with pytest.raises(ValueError, match="tau"):
        block.tau = 0.0
    assert block.tau == 2.0 and block.tau_tensor.item() == 2.0  # a rejected value changes nothing
    net = TreeSupernet([BlockSpec(2, lambda b, j: nn.Linear(3, 3))], ["a", "b"], tau=1.0)
    with pytest.raises(ValueError, match="tau"):
        net.set_tau(0)
    with pytest.raises(ValueError, match="tau"):
        TreeSupernet([BlockSpec(2, lambda b, j: nn.Linear(3, 3))], ["a", "b"], tau=0)


def test_branching_tau_buffer_is_updated_in_place_and_stays_float64():
    block = Branching(2, 3, tau=0.1)
    buffer = block.tau_tensor
    block.tau = 0.3
    assert block.tau_tensor is buffer and buffer.item() == 0.3  # same storage: compiled/captured graphs see it
    assert "tau_tensor" not in block.state_dict()  # old checkpoints load; the schedule sets tau
    block.to(torch.bfloat16)
    assert block.tau_tensor.dtype == torch.float64 and block.tau_tensor.item() == 0.3  # not rounded to bf16
    assert block.logits.dtype == torch.bfloat16


class _RecordBackwardCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.startswith("branch_backward"):
            flags = tuple(args[5:7])  # (need_grad_parents, need_grad_logits); defaults (True) may be left out
            self.calls.append(flags + (True, True)[len(flags) :])
        return func(*args, **kwargs)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_frozen_logits_skip_the_dot_products(device, backend):
    """Frozen mode (warmup) detaches the logits: the backward asks the kernel for grad_parents only."""
    generator = torch.Generator().manual_seed(1)
    block = Branching(3, 4, tau=0.7, backend=backend, mode="frozen").to(device)
    y = torch.randn(3, 2, 5, generator=generator).to(device).requires_grad_(True)
    grad = torch.randn(4, 2, 5, generator=generator).to(device)
    with _RecordBackwardCalls() as recorder:
        block(y, generator=torch.Generator(device).manual_seed(3)).backward(grad)
    assert recorder.calls == [(True, False)]
    assert block.logits.grad is None
    index, _ = ops.sample_branches(
        block.logits.detach(), 0.7, generator=torch.Generator(device).manual_seed(3), backend="ref"
    )
    torch.testing.assert_close(y.grad, torch.zeros_like(y).index_add_(0, index, grad))
    block.mode = "search"
    with _RecordBackwardCalls() as recorder:
        block(y.detach(), generator=torch.Generator(device).manual_seed(3)).backward(grad)  # parents need no grad
    assert recorder.calls == [(False, True)]
    assert block.logits.grad is not None


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backward_output_flags(device, backend, dtype):
    """An output not asked for comes back empty; the other equals the full backward's."""
    namespace = namespace_ops(backend)
    generator = torch.Generator().manual_seed(2)
    y = torch.randn(5, 3, 11, generator=generator).to(device=device, dtype=dtype)
    grad = torch.randn(6, 3, 11, generator=generator).to(device=device, dtype=dtype)
    tau = torch.tensor(0.6, dtype=torch.float64, device=device)
    soft, index = namespace.sample_branches(
        torch.randn(5, 6, generator=generator).to(device), tau, None, torch.tensor([4], device=device)
    )
    full_parents, full_logits = namespace.branch_backward(grad, y, index, soft, tau)
    parents_only = namespace.branch_backward(grad, y, index, soft, tau, True, False)
    logits_only = namespace.branch_backward(grad, y, index, soft, tau, False, True)
    assert parents_only[1].shape == (0,) and logits_only[0].shape == (0,)
    torch.testing.assert_close(parents_only[0], full_parents, atol=0, rtol=0)
    torch.testing.assert_close(logits_only[1], full_logits, atol=0, rtol=0)


def _tiny_supernet(backend: str, device: str) -> TreeSupernet:
    torch.manual_seed(0)
    blocks = [BlockSpec(2, lambda b, j: nn.Linear(6, 6)), BlockSpec(2, lambda b, j: nn.Linear(6, 6))]
    return TreeSupernet(blocks, ["a", "b"], tau=5.0, backend=backend).to(device)


def _search_steps(net: TreeSupernet, loss_fn, update, taus, x, target) -> list[torch.Tensor]:
    losses = []
    for tau in taus:
        net.set_tau(tau)
        loss = loss_fn(x, target)
        loss.backward()
        update()
        losses.append(loss.detach())
    return losses


def _slow_ref(cases):
    """The reference's traced Philox makes its compile case take ~15 s on 2 cores."""
    return [
        pytest.param(*case.values, id=case.id, marks=[*case.marks, pytest.mark.slow])
        if case.values[1] == "ref"
        else case
        for case in cases
    ]


@pytest.mark.parametrize("device, backend", _slow_ref(backend_cases(include_ref=True)))
def test_search_step_compiles_once_over_a_tau_schedule(device, backend):
    """forward + backward (fullgraph; the backward is AOT-compiled) and both optimizer steps (compiled;
    torch's optimizers graph-break around step() on purpose) over tau = 5 / sqrt(step): no recompile,
    and the same losses and parameters as eager."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []
    # Dynamo decides about graph breaks and recompiles; AOT autograd also traces the custom ops' backward.
    # The reference's traced Philox makes AOT tracing take ~25 s here, so it runs on Dynamo alone.
    compiler = lookup_backend("eager" if backend == "ref" else "aot_eager")

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return compiler(graph_module, example_inputs)

    taus = [5.0 / math.sqrt(step) for step in range(1, 4)]
    x, target = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    runs = []
    for compiled in (False, True):
        net = _tiny_supernet(backend, device)
        weights = torch.optim.Adam(net.weight_parameters(), 1e-2)
        logits = torch.optim.Adam(net.logits_parameters(), 0.05)

        def loss_fn(inputs, wanted):
            return sum(nn.functional.mse_loss(out, wanted) for out in net(inputs).values())

        def update():
            weights.step()
            logits.step()
            weights.zero_grad()
            logits.zero_grad()

        if compiled:
            torch._dynamo.reset()
            loss_fn = torch.compile(loss_fn, fullgraph=True, backend=counting_backend)
            update = torch.compile(update, backend=counting_backend)
        torch.manual_seed(7)  # the same sampling seeds in both runs
        losses = _search_steps(net, loss_fn, update, taus[:1], x, target)
        compiled_graphs = len(graphs)
        losses += _search_steps(net, loss_fn, update, taus[1:], x, target)
        runs.append((losses, [p.detach().clone() for p in net.parameters()]))
    assert compiled_graphs > 0 and len(graphs) == compiled_graphs, "a changing tau recompiled the step"
    for eager, compiled in zip(*[losses + params for losses, params in runs]):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_fullgraph_recompiles_for_a_new_batch_size():
    """A new batch size recompiles with dynamic shapes; the parents' layout check must not sort
    symbolic strides (that broke fullgraph)."""
    torch._dynamo.reset()
    net = _tiny_supernet("cpp" if "cpp" in runnable_backends("cpu") else "ref", "cpu")
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    for batch in (4, 6, 7):
        outputs = compiled(torch.randn(batch, 6))
        assert all(out.shape[0] == batch for out in outputs.values())
        sum(out.sum() for out in outputs.values()).backward()
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# CUDA only: capture in a CUDA graph and run with synchronisation reported as an error.
# ---------------------------------------------------------------------------------------------------

CUDA_BACKENDS = [case for case in backend_cases() if case.values[0] == "cuda"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("device, backend", CUDA_BACKENDS)
def test_cuda_graph_replays_new_tau_and_seed(device, backend):
    """Sample, forward and fused backward captured once; replays with tau and the seed changed in place
    equal eager calls with those values."""
    namespace = namespace_ops(backend)
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 7, generator=generator).to(device)
    y = torch.randn(5, 3, 33, generator=generator).to(device)
    grad = torch.randn(7, 3, 33, generator=generator).to(device)
    tau = torch.tensor(1.0, dtype=torch.float64, device=device)
    seed = torch.tensor([11], device=device)

    def step():
        soft, index = namespace.sample_branches(logits, tau, None, seed)
        out = namespace.straight_through_branch(y, logits, index, soft, tau)
        return (out, *namespace.branch_backward(grad, y, index, soft, tau))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up (Triton compiles, allocator pools) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for new_tau, new_seed in [(0.25, 3), (4.0, 99), (1e-3, 12345)]:
        tau.fill_(new_tau)
        seed.fill_(new_seed)
        graph.replay()
        expected = step()
        for got, want in zip(captured, expected):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("device, backend", CUDA_BACKENDS)
def test_no_host_sync(device, backend):
    """Forward and backward of a search step with a tensor tau and with a float tau: no synchronisation."""
    block = Branching(4, 6, tau=0.5, backend=backend).to(device)
    y = torch.randn(4, 2, 3, 9, device=device, requires_grad=True)
    grad = torch.randn(6, 2, 3, 9, device=device)
    block(y).backward(grad)  # warm up: compiles and allocations outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            block.tau = block.tau * 0.9
            block(y).backward(grad)
            ops.branch(y, block.logits, 0.3, backend=backend).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
