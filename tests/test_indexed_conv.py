"""The Triton convolution that reads the parents through the sampled index (``conv_backend="triton"``).

Without a GPU the kernels run in Triton's interpreter at tiny sizes (conftest sets TRITON_INTERPRET=1),
held to the pure-PyTorch reference: the output, the weight and bias gradients, the parents' gradient and
the logits' gradient, on fresh random inputs. Tests named ``*cuda*`` run the compiled kernels on a GPU at
realistic first-layer sizes and skip without one (tools/gpu_validate.py runs them in its kernel stage).
"""

from __future__ import annotations

import copy
import inspect
import types

import pytest
import torch
from torch import nn

from conftest import assert_compiled_step_matches_eager
from l2b_fast import backends, ops
from l2b_fast.nn import BlockSpec, TreeSupernet
from l2b_fast.nn.grouped import indexed
from l2b_fast.ops import indexed_conv as conv_op

CUDA = torch.cuda.is_available()
INTERPRETED = backends.TRITON_INSTALLED and backends.triton_interpreting()
needs_triton = pytest.mark.skipif(not backends.TRITON_INSTALLED, reason="needs Triton (its kernels are faked)")
interpreted_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs the kernels in Triton's interpreter (CPU, TRITON_INTERPRET=1)"
)
needs_cuda = pytest.mark.skipif(not (CUDA and backends.TRITON_INSTALLED), reason="needs a CUDA device and Triton")

pytestmark = pytest.mark.usefixtures("one_thread")

# (kernel, stride, padding, dilation): 1x1 and 3x3, strided, padded, dilated, an even kernel with stride 3.
GEOMETRIES = [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 2, 2, 2), (2, 3, 0, 1), ((1, 3), (2, 1), (0, 1), (1, 2))]
TAU = 1.3


def make_inputs(
    num_parents, children, batch, channels, out_channels, size, kernel, *, dtype, device="cpu", seed=0, bias=True
):
    generator = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    parents = rand(num_parents, batch, channels, *size).to(device, dtype)
    logits = rand(num_parents, children).to(device, torch.float32)
    weight = (rand(children, out_channels, channels, kh, kw) / (channels * kh * kw) ** 0.5).to(device, dtype)
    bias_tensor = rand(children, out_channels).to(device, dtype) if bias else None
    index, soft = ops.sample_branches(logits, TAU, generator=torch.Generator(device).manual_seed(seed + 1))
    return parents, logits, index, soft, weight, bias_tensor


def run(
    function, parents, logits, index, soft, weight, bias, geometry, grad_seed=7, *, frozen=False, memory_format=None
):  # fmt: skip
    """Output and gradients (parents, logits unless ``frozen``, weight, bias) of ``function`` for a fixed random
    upstream gradient (in ``memory_format`` if given, as a following layer may send it)."""
    kernel, stride, padding, dilation = geometry
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (parents, logits, weight, bias)]
    leaves[1].requires_grad_(not frozen)
    out = function(
        leaves[0], leaves[1], index, soft, TAU, leaves[2], leaves[3], stride=stride, padding=padding, dilation=dilation
    )
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(
        out.device, out.dtype
    )
    if memory_format is not None:
        upstream = upstream.contiguous(memory_format=memory_format)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None and t.requires_grad], upstream)
    return out, grads


def as_reference(tensors):
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


def assert_matches_reference(inputs, geometry, atol, rtol):
    parents, logits, index, soft, weight, bias = inputs
    out, grads = run(conv_op.indexed_conv2d, *inputs, geometry)
    ref_out, ref_grads = run(conv_op.indexed_conv2d_ref, *as_reference(inputs), geometry)
    scale = lambda t: float(t.detach().abs().max()) or 1.0  # noqa: E731  error relative to the tensor's range
    torch.testing.assert_close(out.double(), ref_out, atol=atol * scale(ref_out), rtol=rtol)
    for name, got, expected in zip(("parents", "logits", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(
            got.double(), expected, atol=atol * scale(expected), rtol=rtol, msg=lambda m: f"grad {name}: {m}"
        )


@interpreted_only
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}d{}".format(*g))
def test_matches_reference_fp32(geometry):
    inputs = make_inputs(2, 3, 2, 3, 4, (7, 6), geometry[0], dtype=torch.float32, seed=len(str(geometry)))
    assert_matches_reference(inputs, geometry, atol=1e-5, rtol=1e-5)


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_half_precision(dtype):
    inputs = make_inputs(3, 4, 2, 5, 6, (5, 7), 3, dtype=dtype, seed=3, bias=dtype == torch.float16)
    tolerance = 4e-3 if dtype == torch.float16 else 3e-2
    assert_matches_reference(inputs, (3, 1, 1, 1), atol=tolerance, rtol=tolerance)


@interpreted_only
def test_channels_last_parents_and_one_parent():
    parents, *rest = make_inputs(1, 3, 2, 4, 5, (6, 5), 3, dtype=torch.float32, seed=5)
    channels_last = torch.stack([p.contiguous(memory_format=torch.channels_last) for p in parents])
    assert channels_last[0].is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference((channels_last, *rest), (3, 1, 1, 1), atol=1e-5, rtol=1e-5)
    out = conv_op.indexed_conv2d(channels_last, *rest[:3], TAU, *rest[3:], padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last)  # as the cudnn path's output


@interpreted_only
def test_transposed_bias_is_read_through_its_strides():
    """A [J, Co] bias that is a view of a [Co, J] tensor (not contiguous): the forward reads its strides."""
    parents, logits, index, soft, weight, bias = make_inputs(2, 3, 2, 3, 4, (5, 6), 3, dtype=torch.float32, seed=17)
    transposed = bias.T.contiguous().T  # bias's values, laid out as [Co, J]
    assert not transposed.is_contiguous() and torch.equal(transposed, bias)
    assert_matches_reference((parents, logits, index, soft, weight, transposed), (3, 1, 1, 1), atol=1e-5, rtol=1e-5)


@interpreted_only
def test_frozen_logits_skip_the_dots_and_input_without_grad_skips_the_input_gradient(monkeypatch):
    parents, logits, index, soft, weight, bias = make_inputs(3, 4, 2, 3, 4, (5, 5), 3, dtype=torch.float32, seed=9)
    calls = []
    real = conv_op.branch_backward_op

    def recording(device):
        op = real(device)

        def call(*args):
            calls.append(args[-2:])  # (need_grad_parents, need_grad_logits)
            return op(*args)

        return call

    monkeypatch.setattr(conv_op, "branch_backward_op", recording)
    frozen_parents = parents.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = conv_op.indexed_conv2d(frozen_parents, logits, index, soft, TAU, w, bias, padding=1)  # logits need no grad
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, [frozen_parents, w], upstream)
    assert calls == []  # the parent-major kernel writes grad_parents itself: no dX, no branch_backward
    monkeypatch.setattr(conv_op, "FUSED_BACKWARD", False)
    torch.autograd.grad(
        conv_op.indexed_conv2d(frozen_parents, logits, index, soft, TAU, w, bias, padding=1), frozen_parents, upstream
    )
    assert calls == [(True, False)]  # the reference path: segment sums only
    monkeypatch.setattr(conv_op, "FUSED_BACKWARD", True)
    ref_parents = parents.double().requires_grad_(True)
    ref_out = conv_op.indexed_conv2d_ref(
        ref_parents, logits.double(), index, soft.double(), TAU, weight.double(), bias.double(), padding=1
    )
    torch.testing.assert_close(
        got[0].double(), torch.autograd.grad(ref_out, ref_parents, upstream.double())[0], atol=1e-5, rtol=1e-5
    )

    calls.clear()
    w = weight.clone().requires_grad_(True)
    out = conv_op.indexed_conv2d(parents, logits, index, soft, TAU, w, None, padding=1)  # the network input
    out.backward(torch.randn_like(out))
    assert calls == [] and w.grad is not None  # no input gradient at all


def straight_through_grads(function, parents, logits, index, soft, weight, bias, geometry, mode):
    """(grad_parents, grad_logits or None) of ``function`` for a fixed upstream gradient; frozen: detached logits."""
    kernel, stride, padding, dilation = geometry
    parents = parents.detach().requires_grad_(True)
    logits = logits.detach().requires_grad_(mode == "search")
    out = function(parents, logits, index, soft, TAU, weight, bias, stride=stride, padding=padding, dilation=dilation)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(
        out.device, out.dtype
    )
    grads = torch.autograd.grad(out, [parents, logits] if mode == "search" else [parents], upstream)
    return grads if mode == "search" else (grads[0], None)


# (I, index, C, Co, size, geometry): odd sizes, stride 2 with dilation 2, one parent, parent 1 picked by no child.
FUSED_CASES = {
    "strided_dilated_unpicked_parent": (3, [2, 0, 2, 0, 2], 5, 3, (7, 5), (3, 2, 2, 2)),
    "one_parent": (1, [0, 0, 0], 3, 6, (5, 6), (3, 1, 1, 1)),
    "even_kernel_stride3": (2, [1, 1], 4, 5, (6, 7), (2, 3, 0, 1)),
}
FUSED_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@interpreted_only
@pytest.mark.parametrize("mode", ["search", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_straight_through_backward_matches_the_reference_path(case, dtype, mode, monkeypatch):
    """The fused backward (frozen: parent-major kernel; search: dots in the input gradient's epilogue) equals
    the dX + branch_backward path and the pure-PyTorch reference, and is bitwise deterministic."""
    num_parents, index, channels, out_channels, size, geometry = FUSED_CASES[case]
    children = len(index)
    parents, logits, _, soft, weight, bias = make_inputs(
        num_parents, children, 2, channels, out_channels, size, geometry[0], dtype=dtype, seed=len(case)
    )
    index = torch.tensor(index)
    inputs = (parents, logits, index, soft, weight, bias)
    fused = straight_through_grads(conv_op.indexed_conv2d, *inputs, geometry, mode)
    again = straight_through_grads(conv_op.indexed_conv2d, *inputs, geometry, mode)
    monkeypatch.setattr(conv_op, "FUSED_BACKWARD", False)
    reference_path = straight_through_grads(conv_op.indexed_conv2d, *inputs, geometry, mode)
    pytorch = straight_through_grads(conv_op.indexed_conv2d_ref, *as_reference(inputs), geometry, mode)
    tol = FUSED_TOLERANCE[dtype]
    for name, got, repeat, path, expected in zip(("parents", "logits"), fused, again, reference_path, pytorch):
        if expected is None:
            assert got is None
            continue
        assert got.dtype == path.dtype and got.shape == path.shape and got.stride() == path.stride(), name
        assert torch.equal(got, repeat), f"grad {name}: two runs differ"
        scale = float(expected.abs().max())
        torch.testing.assert_close(
            got.double(),
            path.double(),
            atol=tol * scale,
            rtol=tol,
            msg=lambda m: f"grad {name} vs dX + branch_backward: {m}",
        )
        torch.testing.assert_close(
            got.double(), expected, atol=tol * scale, rtol=tol, msg=lambda m: f"grad {name} vs reference: {m}"
        )
    unpicked = [i for i in range(num_parents) if i not in index.tolist()]
    assert all(fused[0][i].abs().max() == 0 for i in unpicked)


@interpreted_only
def test_search_mode_without_a_parents_gradient_writes_no_dx(monkeypatch):
    """Logits that need a gradient over parents that do not (the network input): only the dots, no dX."""
    parents, logits, index, soft, weight, bias = make_inputs(2, 3, 2, 3, 4, (5, 6), 3, dtype=torch.float32, seed=13)
    written = []
    real = conv_op._kernels().conv_input_grad
    monkeypatch.setattr(
        conv_op._kernels(),
        "conv_input_grad",
        lambda *args, **kw: written.append(kw.get("write_children", True)) or real(*args, **kw),
    )
    logits = logits.clone().requires_grad_(True)
    out = conv_op.indexed_conv2d(parents, logits, index, soft, TAU, weight, bias, padding=1)
    upstream = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, logits, upstream)
    assert written == [False]
    ref_logits = logits.detach().double().requires_grad_(True)
    ref_out = conv_op.indexed_conv2d_ref(
        parents.double(), ref_logits, index, soft.double(), TAU, weight.double(), bias.double(), padding=1
    )
    torch.testing.assert_close(
        got.double(), torch.autograd.grad(ref_out, ref_logits, upstream.double())[0], atol=1e-5, rtol=1e-5
    )


@interpreted_only
@pytest.mark.parametrize("parents_need_grad", [False, True], ids=["stem", "first_block"])
def test_one_parent_search_skips_the_zero_logits_gradient(parents_need_grad, monkeypatch):
    """One parent: the logits' gradient is exactly 0, so no child-major transposed convolution runs for it.
    A stem (parents = the network input) launches no input-gradient kernel at all; a first block only the
    parent-major one. Every gradient still equals the reference's."""
    parents, logits, index, soft, weight, bias = make_inputs(1, 3, 2, 3, 4, (5, 6), 3, dtype=torch.float32, seed=19)
    kernels, launches = conv_op._kernels(), []
    for launcher in ("conv_input_grad", "conv_parents_grad", "conv_weight_grad"):
        real = getattr(kernels, launcher)

        def recording(*args, _real=real, _name=launcher, **kwargs):
            launches.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, launcher, recording)
    leaves = [parents.clone().requires_grad_(parents_need_grad), logits.clone().requires_grad_(True)]
    leaves += [weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)]
    out = conv_op.indexed_conv2d(leaves[0], leaves[1], index, soft, TAU, *leaves[2:], padding=1)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    wanted = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad(out, wanted, upstream)
    expected_launches = ["conv_parents_grad", "conv_weight_grad"] if parents_need_grad else ["conv_weight_grad"]
    assert launches == expected_launches
    reference = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref_out = conv_op.indexed_conv2d_ref(*reference[:2], index, soft.double(), TAU, *reference[2:], padding=1)
    expected = torch.autograd.grad(ref_out, [t for t in reference if t.requires_grad], upstream.double())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    for got_grad, expected_grad in zip(got, expected):
        torch.testing.assert_close(got_grad.double(), expected_grad, atol=1e-5, rtol=1e-5)
    grad_logits = got[1] if parents_need_grad else got[0]
    assert grad_logits.shape == logits.shape and torch.count_nonzero(grad_logits) == 0


@interpreted_only
@pytest.mark.parametrize("mode", ["search", "frozen"])
def test_opcheck(mode):
    parents, logits, index, soft, weight, bias = make_inputs(2, 3, 2, 3, 4, (5, 5), 3, dtype=torch.float32, seed=11)
    (
        parents.requires_grad_(True),
        logits.requires_grad_(mode == "search"),
        weight.requires_grad_(True),
        bias.requires_grad_(True),
    )
    tau = torch.tensor(TAU, dtype=torch.float64)
    torch.library.opcheck(
        conv_op._indexed_conv2d_op,
        (parents, logits, index, soft, tau, weight, bias, [2, 1], [1, 0], [1, 2]),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@interpreted_only
def test_bad_inputs_raise_clear_errors(monkeypatch):
    parents, logits, index, soft, weight, bias = make_inputs(2, 3, 2, 3, 4, (5, 5), 3, dtype=torch.float32)
    call = lambda **changed: conv_op.indexed_conv2d(  # noqa: E731
        *[
            changed.get(name, value)
            for name, value in zip(("parents", "logits", "index", "soft"), (parents, logits, index, soft))
        ],
        TAU,
        changed.get("weight", weight),
        changed.get("bias", bias),
        **changed.get("geometry", {}),
    )
    with pytest.raises(TypeError, match="float64"):
        call(parents=parents.double(), weight=weight.double(), bias=bias.double())
    with pytest.raises(TypeError, match="weight is torch.float16"):
        call(weight=weight.half())
    with pytest.raises(ValueError, match=r"\[I, B, C, H, W\]"):
        call(parents=parents[:, 0])
    with pytest.raises(ValueError, match="input channels"):
        call(weight=weight[:, :, :2])  # a per-child groups > 1 weight
    with pytest.raises(ValueError, match="children"):
        call(weight=weight[:2], bias=bias[:2])
    with pytest.raises(ValueError, match="bias"):
        call(bias=bias[:, :2])
    with pytest.raises(ValueError, match="int64"):
        call(index=index.int())
    with pytest.raises(ValueError, match="stride"):
        call(geometry={"stride": 0})
    with pytest.raises(ValueError, match="padding"):
        call(geometry={"padding": (1, 1, 1)})
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: say what to use
    with pytest.raises(backends.BackendUnavailableError, match="cudnn"):
        call()


# --- host-side launch choices (TF32, compiles), with the kernels faked: what a GPU launch would get ---------------


class LaunchRecorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records {parameter name: value}, runs nothing."""

    def __init__(self, kernel, launches):
        self.name, self.launches = kernel.fn.__name__, launches
        self.params = list(inspect.signature(kernel.fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.setdefault(self.name, []).append({**dict(zip(self.params, args)), **kwargs})

        return launch


def record_gpu_launches(monkeypatch):
    """The four kernels replaced by recorders and the launchers told they run on a GPU with 132 SMs (no
    interpreter): kernel name -> one {parameter name: value} dict per launch."""
    kernels = conv_op._kernels()
    launches = {}
    monkeypatch.setattr(kernels, "_interpreted", lambda device: False)
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    for kernel in kernels.KERNELS:
        monkeypatch.setattr(kernels, kernel.fn.__name__, LaunchRecorder(kernel, launches))
    return launches


def launch_all(shape, batch, dtype=torch.float32):
    """Every launcher once (forward, both input gradients with the dots, the weight gradient) at ``shape``."""
    kernels = conv_op._kernels()
    num_parents, children, channels, out_channels, size, kernel, stride, padding = shape
    parents = torch.empty(num_parents, batch, channels, size, size, dtype=dtype)
    weight = torch.empty(children, out_channels, channels, kernel, kernel, dtype=dtype)
    index = torch.zeros(children, dtype=torch.int64)
    geometry = kernels.Geometry((stride, stride), (padding, padding), (1, 1))
    out = kernels.conv_forward(parents, index, weight, weight[:, :, 0, 0, 0], geometry)
    grad_out = torch.empty_like(out)
    kernels.conv_input_grad(grad_out, weight, parents, geometry, parents.stride(), dots=True)
    kernels.conv_parents_grad(grad_out, weight, parents, index, geometry)
    kernels.conv_weight_grad(grad_out, parents, index, weight.shape, geometry)


def compile_key(kernel_name, arguments, not_specialised):
    """What Triton keys a compiled variant on, as far as the arguments go: the constexprs' values, the
    tensors' dtypes and, for other ints, whether each is 1 or divisible by 16 (and needs 64 bits); ints in
    ``not_specialised`` are plain runtime values."""
    kernel = next(k for k in conv_op._kernels().KERNELS if k.fn.__name__ == kernel_name)
    params = inspect.signature(kernel.fn).parameters
    key = {}
    for name, value in arguments.items():
        if name in params and "constexpr" in str(params[name].annotation) or isinstance(value, (str, bool)):
            key[name] = value
        elif isinstance(value, torch.Tensor):
            key[name] = value.dtype
        elif name in not_specialised:
            key[name] = "runtime"
        else:
            key[name] = (value == 1, value % 16 == 0, abs(value) >= 2**31)
    return key


# (I, J, C, Co, size, kernel, stride, padding): the Taskonomy stem (64x64 here), a ResNet block's convolution,
# a strided convolution of odd-sized maps (strides not divisible by 16 for an odd batch), a late 4x4 layer (the
# weight gradient's split: 32 tiles at batch 64, 19 at 37).
LAUNCH_SHAPES = {
    "stem": (1, 2, 3, 64, 64, 7, 2, 3), "block": (5, 5, 64, 64, 16, 3, 1, 1), "odd": (3, 5, 5, 40, 15, 3, 2, 1),
    "late": (30, 40, 32, 32, 4, 3, 1, 1),
}  # fmt: skip


@needs_triton
def test_another_batch_size_reuses_the_compiled_kernels(monkeypatch):
    """A full batch of 64 and a short last batch of 37 launch every kernel with the same compile key: the batch
    size, the strides scaling with it and the weight gradient's split size are runtime values. Each of those
    is needed: specialising on any one of them gives another key for some shape."""
    kernels = conv_op._kernels()
    launches = record_gpu_launches(monkeypatch)
    needed = set()  # (kernel, argument) whose specialisation would change the key for some shape
    for shape in LAUNCH_SHAPES.values():
        launches.clear()
        launch_all(shape, 64)
        full = dict(launches)
        launches.clear()
        launch_all(shape, 37)
        assert sorted(full) == sorted(launches) == sorted(kernels.NOT_SPECIALISED)
        for name, unspecialised in kernels.NOT_SPECIALISED.items():
            for a, b in zip(full[name], launches[name], strict=True):
                assert (a["B"], b["B"]) == (64, 37)
                assert compile_key(name, a, unspecialised) == compile_key(name, b, unspecialised), (name, shape)
                for argument in unspecialised:
                    others = tuple(x for x in unspecialised if x != argument)
                    if compile_key(name, a, others) != compile_key(name, b, others):
                        needed.add((name, argument))
    assert needed == {(name, argument) for name, arguments in kernels.NOT_SPECIALISED.items() for argument in arguments}


@needs_triton
@pytest.mark.parametrize("allow_tf32", [True, False])
def test_fp32_launches_follow_cudnn_allow_tf32(allow_tf32, monkeypatch):
    """fp32 uses TF32 exactly where cuDNN convolutions may (torch.backends.cudnn.allow_tf32); bf16 is not upcast."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    launches = record_gpu_launches(monkeypatch)
    launch_all(LAUNCH_SHAPES["block"], 4)
    precisions = {launch["PRECISION"] for runs in launches.values() for launch in runs}
    assert len(launches) == 4 and precisions == {"tf32" if allow_tf32 else "ieee"}
    launches.clear()
    launch_all(LAUNCH_SHAPES["block"], 4, torch.bfloat16)
    assert {launch["UPCAST"] for runs in launches.values() for launch in runs} == {False}


@pytest.fixture
def fp32_precision_settings():
    """PyTorch's fp32 precision settings (global, cuDNN, cuDNN conv and RNN), restored after the test."""
    cudnn = torch.backends.cudnn
    settings = [(torch.backends, "fp32_precision"), (cudnn, "fp32_precision"), (cudnn.conv, "fp32_precision")]
    settings.append((cudnn.rnn, "fp32_precision"))
    saved = [getattr(owner, name) for owner, name in settings]
    yield
    for (owner, name), value in zip(settings, saved):
        setattr(owner, name, value)


@needs_triton
@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="PyTorch without the fp32_precision settings")
def test_tf32_choice_reads_the_fp32_precision_settings(fp32_precision_settings):
    kernels = conv_op._kernels()
    assert torch.backends.cudnn.allow_tf32 and kernels.cudnn_conv_allows_tf32()  # PyTorch's default: TF32
    assert kernels._dot_precision(torch.float32, interpreted=False) == "tf32"
    assert kernels._dot_precision(torch.float32, interpreted=True) == "ieee"  # numpy: IEEE whatever the setting
    assert kernels._dot_precision(torch.bfloat16, interpreted=True) == "ieee"  # upcast to fp32 tiles
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # conv and RNN now differ: reading allow_tf32 raises
    assert not kernels.cudnn_conv_allows_tf32()
    assert kernels._dot_precision(torch.float32, interpreted=False) == "ieee"
    torch.backends.cudnn.conv.fp32_precision = "none"  # inherit: cuDNN's, then the global setting
    torch.backends.fp32_precision = "tf32"
    assert kernels.cudnn_conv_allows_tf32()
    torch.backends.fp32_precision = "ieee"
    assert not kernels.cudnn_conv_allows_tf32()


@needs_triton
def test_compile_report_counts_new_variants_and_times_compiles():
    """Host logic of the compile report with a fake kernel and simulated compiler events: new cache entries
    are counted, compile times summed (disk-cache loads apart), other kernels ignored, a listener already
    installed keeps being called and is restored."""
    kernels = conv_op._kernels()
    compilation = kernels.triton.knobs.compilation

    def _fake_kernel():
        pass

    cache = {"variant 0": object()}
    fake = types.SimpleNamespace(fn=_fake_kernel, device_caches={0: (cache, None)})
    assert kernels.compiled_variants([fake]) == {"_fake_kernel": 1}
    seen = []
    previous, compilation.listener = compilation.listener, lambda **event: seen.append(event["src"].name)
    try:
        outer = compilation.listener
        with kernels.compile_report([fake]) as report:
            for name, microseconds, cache_hit in (("_fake_kernel", 2_500_000, False), ("other", 9e6, False),
                                                  ("_fake_kernel", 1_000, True)):  # fmt: skip
                compilation.listener(src=types.SimpleNamespace(name=name), metadata={}, metadata_group={},
                                     times=types.SimpleNamespace(total=microseconds), cache_hit=cache_hit)  # fmt: skip
            cache["variant 1"] = cache["variant 2"] = object()
        assert compilation.listener is outer
    finally:
        compilation.listener = previous
    assert seen == ["_fake_kernel", "other", "_fake_kernel"]
    assert (report.kernels, report.by_kernel, report.compiles, report.disk_cache_hits) == (2, {"_fake_kernel": 2}, 1, 1)
    assert report.seconds == pytest.approx(2.5)


@interpreted_only
def test_compile_report_under_the_interpreter_counts_nothing():
    """The interpreter compiles nothing: a real forward and backward leave the report at zero."""
    inputs = make_inputs(2, 3, 2, 3, 4, (5, 5), 3, dtype=torch.float32, seed=23)
    with conv_op._kernels().compile_report() as report:
        run(conv_op.indexed_conv2d, *inputs, (3, 1, 1, 1))
    assert (report.kernels, report.compiles, report.by_kernel) == (0, 0, {})


# --- the grouped block with conv_backend="triton" equals per_child ------------------------------------------

TASKS = ["a", "b", "c"]


def conv_blocks():
    """Every block starts with a Conv2d (bias or not, strided, dilated, 1x1); the last starts with a ReLU (cudnn
    path)."""
    return [
        BlockSpec(2, lambda b, j: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())),
        BlockSpec(
            3,
            lambda b, j: nn.Sequential(
                nn.Conv2d(4, 5, 3, stride=2, padding=2, dilation=2, bias=False), nn.BatchNorm2d(5), nn.ReLU()
            ),
        ),
        BlockSpec(2, lambda b, j: nn.Sequential(nn.Conv2d(5, 3, 1), nn.Tanh())),
        BlockSpec(3, lambda b, j: nn.Sequential(nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))),
    ]


def supernets(dtype, device="cpu"):
    torch.manual_seed(0)
    reference = TreeSupernet(conv_blocks(), TASKS, execution="per_child").to(device, dtype)
    with torch.no_grad():
        for branching in reference.branchings:
            branching.logits.normal_()
    triton_net = copy.deepcopy(reference)
    triton_net.set_execution("grouped")
    triton_net.set_conv_backend("triton")
    return reference, triton_net


def search_step(net, x, mode, seed):
    net.eval() if mode == "eval" else (net.train(), net.set_mode(mode))
    out = net(x, generator=torch.Generator(x.device).manual_seed(seed))
    loss = sum(
        (v * torch.linspace(-1, 2, v.numel(), dtype=v.dtype, device=v.device).view_as(v)).sum() for v in out.values()
    )
    loss.backward()
    return out


def assert_same_step(reference, other, x, mode, tolerance):
    expected, got = search_step(reference, x, mode, 1), search_step(other, x, mode, 1)
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], **tolerance)
    for (name, p), (_, q) in zip(reference.named_parameters(), other.named_parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, **tolerance, msg=lambda m: f"{name}: {m}")
    for (name, b), (_, c) in zip(reference.named_buffers(), other.named_buffers()):
        torch.testing.assert_close(c, b, **tolerance, msg=lambda m: f"{name}: {m}")


@interpreted_only
@pytest.mark.parametrize("mode", ["search", "frozen", "eval"])
def test_grouped_triton_equals_per_child(mode, monkeypatch):
    reference, triton_net = supernets(torch.float32)
    started = []
    real = indexed.start_block

    def recording(step, block, *args):
        result = real(step, block, *args)
        started.append((block, result is not None))
        return result

    monkeypatch.setattr(indexed, "start_block", recording)
    x = torch.randn(2, 3, 9, 7)
    assert_same_step(reference, triton_net, x, mode, {"atol": 2e-4, "rtol": 2e-4})
    assert started == [(0, True), (1, True), (2, True), (3, False)]  # block 3 (a ReLU first) gathers
    if mode == "search":
        assert all(p.grad.abs().sum() > 0 for p in triton_net.logits_parameters()[1:])


@interpreted_only
def test_grouped_triton_leaves_fp64_to_cudnn_and_is_selectable():
    reference, triton_net = supernets(torch.float64)
    assert_same_step(
        reference, triton_net, torch.randn(2, 3, 9, 7, dtype=torch.float64), "search", {"atol": 1e-10, "rtol": 1e-10}
    )
    triton_net.set_execution("auto")  # the choice survives a new execution
    assert all(block.conv_backend == "triton" for block in triton_net._grouped if block is not None)
    assert TreeSupernet(conv_blocks(), TASKS, conv_backend="triton").conv_backend == "triton"
    with pytest.raises(ValueError, match="conv_backend"):
        triton_net.set_conv_backend("cuda")
    with pytest.raises(ValueError, match="conv_backend"):
        TreeSupernet(conv_blocks(), TASKS, conv_backend="fast")


@interpreted_only
def test_grouped_triton_under_autocast_computes_in_the_autocast_dtype(monkeypatch):
    reference, triton_net = supernets(torch.float32)
    dtypes = []
    real = conv_op._indexed_conv2d_op
    monkeypatch.setattr(
        conv_op, "_indexed_conv2d_op", lambda parents, *args: dtypes.append(parents.dtype) or real(parents, *args)
    )
    x = torch.randn(2, 3, 9, 7)
    outputs = []
    for net in (reference, triton_net):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, generator=torch.Generator().manual_seed(0))
            loss = sum(v.float().square().mean() for v in out.values())
        loss.backward()
        outputs.append(out)
    assert dtypes == [torch.bfloat16] * 3
    for task in TASKS:
        torch.testing.assert_close(outputs[1][task].float(), outputs[0][task].float(), atol=0.1, rtol=0.1)
    for p, q in zip(reference.parameters(), triton_net.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if q.grad is not None:
            assert q.grad.dtype == q.dtype and torch.isfinite(q.grad).all()


@interpreted_only
def test_grouped_triton_step_compiles_fullgraph_with_a_seed_tensor():
    """The custom ops are opaque to dynamo: a search step with a seed tensor traces as one graph
    (aot_eager: dynamo and AOT autograd, without inductor's C++ compile) and matches eager."""
    _, eager = supernets(torch.float32)
    assert_compiled_step_matches_eager(eager, torch.randn(2, 3, 9, 7), torch.tensor([5]), TASKS)


def test_triton_conv_backend_on_cpu_without_interpreter_names_the_alternative(monkeypatch):
    _, triton_net = supernets(torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailableError, match="block 0: conv_backend='triton'.*cudnn"):
        triton_net(torch.randn(2, 3, 9, 7))


# --- compiled kernels on a GPU -------------------------------------------------------------------------------

# (I, J, B, C, Co, H, W, kernel, stride, padding): a ResNet stem, a ResNet block's conv, a strided odd-sized VGG conv.
CUDA_SHAPES = {
    "taskonomy_stem": (1, 2, 8, 3, 64, 128, 128, 7, 2, 3),
    "taskonomy_block": (5, 5, 16, 64, 64, 32, 32, 3, 1, 1),
    "celeba_vgg_strided_odd": (3, 5, 16, 32, 40, 57, 47, 3, 2, 1),
}
CUDA_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(CUDA_SHAPES))
def test_cuda_kernels_match_reference(shape, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # an fp32 reference, not TF32
    num_parents, children, batch, channels, out_channels, height, width, kernel, stride, padding = CUDA_SHAPES[shape]
    inputs = make_inputs(
        num_parents, children, batch, channels, out_channels, (height, width), kernel, dtype=dtype, device="cuda"
    )
    parents, logits, index, soft, weight, bias = inputs
    geometry = (kernel, stride, padding, 1)
    out, grads = run(conv_op.indexed_conv2d, *inputs, geometry)
    # fp32 reference on the same (rounded) inputs: fp64 convolutions are slow on a GPU
    ref_out, ref_grads = run(
        conv_op.indexed_conv2d_ref,
        *[t.float() if t is not None and t.is_floating_point() else t for t in inputs],
        geometry,
    )
    tol = CUDA_TOLERANCE[dtype]
    for name, got, expected in zip(
        ("out", "parents", "logits", "weight", "bias"), (out, *grads), (ref_out, *ref_grads)
    ):
        torch.testing.assert_close(
            got.float(),
            expected,
            atol=tol * float(expected.detach().abs().max()),
            rtol=tol,
            msg=lambda m: f"{shape} {name}: {m}",
        )


@needs_cuda
@pytest.mark.parametrize("mode", ["search", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["taskonomy_block", "celeba_vgg_strided_odd"])
def test_cuda_fused_straight_through_backward_matches_the_reference_path(shape, dtype, mode, monkeypatch):
    """Compiled fused backward (parent-major in frozen mode, epilogue dots in search mode) against the
    dX + branch_backward path, with a parent no child picked; two runs bitwise identical."""
    num_parents, children, batch, channels, out_channels, height, width, kernel, stride, padding = CUDA_SHAPES[shape]
    parents, logits, _, soft, weight, bias = make_inputs(
        num_parents, children, batch, channels, out_channels, (height, width), kernel, dtype=dtype, device="cuda"
    )
    index = torch.tensor([(j % 2) * (num_parents - 1) for j in range(children)], device="cuda")  # parent 1 unpicked
    inputs, geometry = (parents, logits, index, soft, weight, bias), (kernel, stride, padding, 1)
    fused = straight_through_grads(conv_op.indexed_conv2d, *inputs, geometry, mode)
    again = straight_through_grads(conv_op.indexed_conv2d, *inputs, geometry, mode)
    monkeypatch.setattr(conv_op, "FUSED_BACKWARD", False)
    reference_path = straight_through_grads(conv_op.indexed_conv2d, *inputs, geometry, mode)
    tol = CUDA_TOLERANCE[dtype]
    for name, got, repeat, expected in zip(("parents", "logits"), fused, again, reference_path):
        if expected is None:
            continue
        assert torch.equal(got, repeat), f"{shape} grad {name}: two runs differ"
        torch.testing.assert_close(
            got.float(),
            expected.float(),
            atol=tol * float(expected.abs().max()),
            rtol=tol,
            msg=lambda m: f"{shape} grad {name}: {m}",
        )
    assert fused[0][1].abs().max() == 0


@needs_cuda
@pytest.mark.parametrize("mode", ["search", "frozen", "eval"])
def test_cuda_grouped_triton_equals_per_child(mode):
    torch.backends.cudnn.allow_tf32, previous = False, torch.backends.cudnn.allow_tf32
    try:
        reference, triton_net = supernets(torch.float32, "cuda")
        x = torch.randn(4, 3, 33, 31, device="cuda")
        assert_same_step(reference, triton_net, x, mode, {"atol": 2e-4, "rtol": 2e-4})
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@needs_cuda
def test_cuda_forward_reads_the_index_on_the_device():
    """No host synchronisation: the index stays on the GPU (sync debug mode raises on a sync)."""
    inputs = make_inputs(3, 4, 4, 16, 16, (20, 20), 3, dtype=torch.bfloat16, device="cuda")
    parents, logits, index, soft, weight, bias = inputs
    leaves = [parents.requires_grad_(True), logits.requires_grad_(True), weight.requires_grad_(True)]
    conv_op.indexed_conv2d(parents, logits, index, soft, TAU, weight, bias, padding=1)  # compile outside the check
    tau = torch.tensor(TAU, dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = conv_op.indexed_conv2d(parents, logits, index, soft, tau, weight, bias, padding=1)
        torch.autograd.grad(out.float().square().sum(), leaves)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mode", ["search", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(CUDA_SHAPES))
def test_cuda_channels_last_matches_reference(shape, dtype, mode, monkeypatch):
    """channels_last parents and upstream gradient through the compiled kernels (the GPU tiles; the interpreter
    uses other block sizes and fp32 tiles for bf16): output and every gradient against the reference."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # an fp32 reference, not TF32
    num_parents, children, batch, channels, out_channels, height, width, kernel, stride, padding = CUDA_SHAPES[shape]
    sizes = (num_parents, children, batch, channels, out_channels, (height, width), kernel)
    parents, *rest = make_inputs(*sizes, dtype=dtype, device="cuda", seed=2)
    parents = torch.stack([p.contiguous(memory_format=torch.channels_last) for p in parents])
    assert parents[0].is_contiguous(memory_format=torch.channels_last) and not parents[0].is_contiguous()
    inputs, geometry = (parents, *rest), (kernel, stride, padding, 1)
    options = {"frozen": mode == "frozen", "memory_format": torch.channels_last}
    out, grads = run(conv_op.indexed_conv2d, *inputs, geometry, **options)
    as_fp32 = [t.float() if t is not None and t.is_floating_point() else t for t in inputs]  # same rounded inputs
    ref_out, ref_grads = run(conv_op.indexed_conv2d_ref, *as_fp32, geometry, **options)
    assert out.is_contiguous(memory_format=torch.channels_last)
    tol = CUDA_TOLERANCE[dtype]
    names = ("out", "parents", "weight", "bias") if mode == "frozen" else ("out", "parents", "logits", "weight", "bias")
    assert len(grads) == len(ref_grads) == len(names) - 1
    for name, got, expected in zip(names, (out, *grads), (ref_out, *ref_grads)):
        scale = float(expected.detach().abs().max()) or 1.0
        message = lambda m, name=name: f"{shape} {name}: {m}"  # noqa: E731
        torch.testing.assert_close(got.float(), expected, atol=tol * scale, rtol=tol, msg=message)


@pytest.mark.cuda
@needs_cuda
def test_cuda_short_last_batch_compiles_no_new_kernels(monkeypatch):
    """A full batch, then a short last one, in search and frozen mode: the second batch compiles nothing (the
    batch size and the weight gradient's split size are runtime values) and both match the reference."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    kernels = conv_op._kernels()
    num_parents, children, _, channels, out_channels, height, width, kernel, stride, padding = CUDA_SHAPES[
        "celeba_vgg_strided_odd"
    ]
    geometry = (kernel, stride, padding, 1)
    reports = []
    for batch in (16, 5):
        sizes = (num_parents, children, batch, channels, out_channels, (height, width), kernel)
        inputs = make_inputs(*sizes, dtype=torch.float32, device="cuda")
        with kernels.compile_report() as report:
            results = [run(conv_op.indexed_conv2d, *inputs, geometry, frozen=frozen) for frozen in (False, True)]
            torch.cuda.synchronize()
        reports.append(report)
        for frozen, (out, grads) in zip((False, True), results):
            ref_out, ref_grads = run(conv_op.indexed_conv2d_ref, *inputs, geometry, frozen=frozen)
            for got, expected in zip((out, *grads), (ref_out, *ref_grads)):
                scale = float(expected.detach().abs().max()) or 1.0
                torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=1e-4)
    assert all(count > 0 for count in kernels.compiled_variants().values())  # all four ran compiled
    assert (reports[1].kernels, reports[1].compiles) == (0, 0), reports
