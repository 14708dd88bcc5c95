"""Every kernel path of the CUDA and compiled-Triton backends against the float64 reference (CUDA only).

The shapes are chosen to reach each launch path of the CUDA fused backward (csrc/cuda/branch_cuda.cu) and
the Triton kernels at least once, in fp16/bf16/fp32/fp64:

- 5 x 5 with N = 4M elements per parent: many tiles per thread block, i.e. the steady state of the
  cp.async pipeline, and the split-K reduction over hundreds of blocks;
- 30 x 40 and 5 x 40: more pair blocks than the small (4 x 4) register tiles allow, the 8 x 8 pair-block
  kernels; 46 x 46: more than 2048 pairs, the fallback path past what one fused launch takes;
- 1 x 1, 1 x 40, 40 x 1: a single parent, a single child;
- an odd N with data pointers one element off 16-byte alignment (the scalar, unvectorised kernels),
  channels_last parents, and a non-contiguous upstream gradient (copied into the children layout).

On CPU the same checks run at reduced sizes on the C++ CPU kernels and the interpreted Triton kernels
(``test_path_checks_on_cpu``), so the checking code itself is exercised by CI; the CUDA tests skip there.
``tools/gpu_validate.py`` runs this file first on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

from conftest import CUDA, DTYPE_TOLERANCES, fast_backends
from l2b_fast import backends, ops


@dataclasses.dataclass(frozen=True)
class PathCase:
    name: str
    parents: int
    children: int
    shape: tuple[int, ...]  # per-parent shape S on the GPU
    cpu_shape: tuple[int, ...]  # the reduced S of the CPU run of the same checks
    layout: str = "contiguous"  # or "channels_last", "misaligned"
    grad_layout: str = "contiguous"  # or "strided": a non-contiguous view of a larger tensor


CASES = [
    PathCase("pipeline-5x5-N4M", 5, 5, (4, 64, 128, 128), (2, 8, 9, 8)),
    PathCase("pairs8-30x40", 30, 40, (8, 64, 9, 9), (2, 3, 5, 4)),
    PathCase("pairs8-5x40", 5, 40, (8, 64, 9, 9), (2, 3, 5, 4)),
    PathCase("fallback-46x46", 46, 46, (4, 16, 7, 7), (2, 3, 7)),
    PathCase("single-1x1", 1, 1, (4, 32, 33, 32), (3, 5, 7)),
    PathCase("one-parent-1x40", 1, 40, (2, 16, 33, 32), (2, 3, 5)),
    PathCase("one-child-40x1", 40, 1, (2, 16, 33, 32), (2, 3, 5)),
    PathCase("odd-misaligned-5x7", 5, 7, (3, 33343), (3, 331), layout="misaligned"),
    PathCase("channels-last-5x5", 5, 5, (8, 24, 13, 13), (2, 6, 5, 3), layout="channels_last"),
    PathCase("strided-grad-5x5", 5, 5, (8, 16, 12, 12), (2, 3, 4, 6), grad_layout="strided"),
]
DTYPES = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype, _, _ in DTYPE_TOLERANCES]
TOLERANCES = {dtype: (atol, rtol) for dtype, atol, rtol in DTYPE_TOLERANCES}
TAU = 0.7

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def cuda_backend_params() -> list:
    """The compiled backends on CUDA, each skipped with its reason when it cannot run there."""
    params = []
    for name in ("cpp", "triton"):
        why = "needs a CUDA device" if not CUDA else backends.unavailable_reason(name, "cuda")
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return params


def case_seed(*parts) -> int:
    """A fixed seed per test (fresh inputs for every case, reproducible when a case fails)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` ([rows, *S], contiguous) copied into ``layout``, same logical values."""
    if layout == "contiguous":
        return values.clone()
    if layout == "channels_last":  # each row [B, C, H, W] channels_last, rows outermost
        rows = [row.contiguous(memory_format=torch.channels_last) for row in values]
        stacked = torch.stack(rows)
        assert stacked[0].is_contiguous(memory_format=torch.channels_last) and not stacked.is_contiguous()
        return stacked
    if layout == "misaligned":  # dense rows starting one element past a 16-byte boundary
        storage = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
        shifted = storage[1:].view(values.shape).copy_(values)
        assert shifted.data_ptr() % 16 != 0
        return shifted
    if layout == "strided":  # every other element of a tensor twice as wide in the last dimension
        wide = torch.empty((*values.shape[:-1], 2 * values.shape[-1]), dtype=values.dtype, device=values.device)
        view = wide[..., ::2]
        view.copy_(values)
        assert not view.is_contiguous()
        return view
    raise ValueError(f"unknown layout {layout!r}")


def make_inputs(case: PathCase, shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int):
    """parents [I, *S] and grad [J, *S] in the case's layouts, logits and gumbel noise [I, J]."""
    generator = torch.Generator(device).manual_seed(seed)
    logits_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    parents = torch.randn((case.parents, *shape), generator=generator, device=device, dtype=torch.float32).to(dtype)
    grad = torch.randn((case.children, *shape), generator=generator, device=device, dtype=torch.float32).to(dtype)
    logits = torch.randn((case.parents, case.children), generator=generator, device=device, dtype=logits_dtype)
    uniform = torch.rand((case.parents, case.children), generator=generator, device=device, dtype=torch.float64)
    noise = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-12))).to(logits_dtype)
    grad_layout = case.grad_layout if case.grad_layout != "contiguous" else case.layout
    return laid_out(parents, case.layout), logits, noise, laid_out(grad, grad_layout)


def poison_allocator(device: str, nbytes: int) -> None:
    """Fill freed CUDA cache memory with all-ones bytes (NaN in every float dtype), so that output
    elements a kernel never writes show up as NaN."""
    if device == "cuda":
        torch.full((nbytes,), 255, dtype=torch.uint8, device=device)  # freed at once, stays in the cache


def run_branch(parents, logits, noise, grad, backend):
    parents = parents.detach().requires_grad_(True)  # no copy: keeps the layout and the data pointer
    logits = logits.detach().clone().requires_grad_(True)
    out = ops.branch(parents, logits, TAU, noise=noise, backend=backend)
    out.backward(grad)
    return out.detach(), parents.grad, logits.grad


def logits_grad_bound(parents, grad, soft, dtype, ref) -> torch.Tensor:
    """Elementwise error bound of grad_logits = soft * (G - <soft, G>) / tau against the fp64 reference.

    G[i, j] = <grad[j], parents[i]> is accumulated in fp32 (fp64 for fp64 inputs; 16-bit products are
    exact there). Summing N terms in any order, even one sequential chain, errs by about
    0.2 * u * sqrt(N) * ||grad[j] * parents[i]||_2 (u the unit roundoff) on data like these: the bound
    allows 8 u sqrt(N) ||.||_2, tight enough that a tile left out of the sum fails. Then soft's rounding
    (fp32 logits; fp64 for fp64) and the output's.
    """
    rows_p = parents.detach().double().reshape(parents.shape[0], -1)
    rows_g = grad.detach().double().reshape(grad.shape[0], -1)
    numel = rows_p.shape[1]
    wide = dtype != torch.float64
    unit = 2.0**-24 if wide else 2.0**-53
    g_error = 8 * unit * math.sqrt(numel) * (rows_p.square() @ rows_g.square().T).sqrt()  # [I, J]
    g_exact = rows_p @ rows_g.T
    soft = soft.double()
    centred = (g_exact - (soft * g_exact).sum(0, keepdim=True)).abs()
    soft_error = (1e-6 if wide else 1e-14) * (centred + (soft * g_exact.abs()).sum(0, keepdim=True))
    accumulation = g_error + (soft * g_error).sum(0, keepdim=True)
    return soft * (accumulation + soft_error) / TAU + (1e-6 if wide else 1e-15) * ref.abs() + 1e-300


def check_against_reference(case: PathCase, shape, dtype, device: str, backend: str, seed: int) -> None:
    parents, logits, noise, grad = make_inputs(case, shape, dtype, device, seed)
    poison_allocator(device, 4 * parents.element_size() * (parents.numel() + grad.numel()))
    out, grad_parents, grad_logits = run_branch(parents, logits, noise, grad, backend)
    _, ref_grad_parents, ref_grad_logits = run_branch(
        parents.double(), logits.double(), noise.double(), grad.double(), "ref"
    )
    index = (logits + noise).argmax(0)  # the documented sample: argmax over parents of logits + noise

    # Forward: an exact copy of the sampled parent, in the parents' layout.
    assert out.dtype == dtype and out.shape == (case.children, *shape)
    assert torch.equal(out, parents[index]), "forward is not an exact copy of the sampled parents"
    if case.layout == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last)

    # grad_parents: every element written (no poison left), unsampled parents exactly zero, a parent
    # sampled by one child gets that child's gradient bit for bit, the rest within the dtype's rounding.
    assert grad_parents.shape == parents.shape and grad_parents.dtype == dtype
    assert torch.isfinite(grad_parents).all(), "grad_parents has unwritten (NaN) elements"
    counts = torch.bincount(index, minlength=case.parents).tolist()
    for i, count in enumerate(counts):
        if count == 0:
            assert not grad_parents[i].any(), f"parent {i} was sampled by no child but has a gradient"
        elif count == 1:
            j = int((index == i).nonzero()[0])
            assert torch.equal(grad_parents[i], grad[j]), (
                f"parent {i}: the single child's gradient is not copied exactly"
            )
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grad_parents.double(), ref_grad_parents, atol=atol, rtol=rtol)

    # grad_logits: within the accumulation error bound of the fp64 reference.
    assert grad_logits.dtype == logits.dtype and torch.isfinite(grad_logits).all()
    _, soft = ops.sample_branches(logits.double(), TAU, noise=noise.double(), backend="ref")
    bound = logits_grad_bound(parents, grad, soft, dtype, ref_grad_logits)
    error = (grad_logits.double() - ref_grad_logits).abs()
    worst = (error / bound).max().item()
    assert worst <= 1.0, (
        f"grad_logits off the fp64 reference by {worst:.3g} x its error bound (max error {error.max().item():.3g})"
    )


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", cuda_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_cuda_path_matches_fp64_reference(case, dtype, backend):
    check_against_reference(case, case.shape, dtype, "cuda", backend, case_seed(case.name, dtype, backend))
    torch.cuda.synchronize()  # a device-side assert or fault surfaces in this test, not the next


SMEM_SEQUENCE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
import test_gpu_paths as paths

cases = {{case.name: case for case in paths.CASES}}
for step, name in enumerate(("pairs8-30x40", "fallback-46x46", "pairs8-30x40")):
    case = cases[name]
    seed = paths.case_seed("smem-sequence", step)
    paths.check_against_reference(case, case.shape, torch.float32, "cuda", "cpp", seed)
    torch.cuda.synchronize()
"""


@needs_cuda
@pytest.mark.cuda
@pytest.mark.skipif(
    CUDA and backends.unavailable_reason("cpp", "cuda") is not None, reason="the cpp backend has no CUDA kernels"
)
def test_cuda_shared_memory_attribute_survives_a_smaller_launch():
    """fp32 30x40 (110 KB of shared memory on an H100), 46x46 (95 KB groups of the same kernel), 30x40 again,
    in a fresh process (the launch cache is per process): the smaller launch must not lower the kernel's
    opt-in shared-memory attribute below the larger one's, or CUDA rejects the third call."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = SMEM_SEQUENCE_SCRIPT.format(tests=str(tests))
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tests.parent)
    assert result.returncode == 0, result.stderr[-3000:]


DETERMINISM_CASES = [case for case in CASES if case.name in ("pipeline-5x5-N4M", "pairs8-30x40", "fallback-46x46")]


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", cuda_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=[case.name for case in DETERMINISM_CASES])
def test_cuda_backward_is_bitwise_deterministic(case, dtype, backend):
    """Two backward passes over the same inputs give the same bits (fixed-order reductions, no atomics)."""
    parents, logits, noise, grad = make_inputs(
        case, case.shape, dtype, "cuda", case_seed("determinism", case.name, dtype)
    )
    first = run_branch(parents, logits, noise, grad, backend)
    poison_allocator("cuda", 4 * parents.element_size() * parents.numel())
    second = run_branch(parents, logits, noise, grad, backend)
    for name, a, b in (("grad_parents", first[1], second[1]), ("grad_logits", first[2], second[2])):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), (
            f"{name} differs between two runs"
        )


@pytest.mark.parametrize("backend", fast_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_path_checks_on_cpu(case, dtype, backend):
    """The same checks at reduced sizes on the CPU backends (the C++ kernels; Triton's through its
    interpreter where no GPU is present): CI runs the checking code itself."""
    check_against_reference(case, case.cpu_shape, dtype, "cpu", backend, case_seed("cpu", case.name, dtype, backend))


def test_cases_reach_the_paths_they_name():
    """Guards the case table: sizes that select each CUDA path (the thresholds of branch_cuda.cu)."""
    by_name = {case.name: case for case in CASES}
    assert math.prod(by_name["pipeline-5x5-N4M"].shape) >= 4 * 2**20  # >> SMs x blocks per SM x tile
    for name in ("pairs8-30x40", "pairs8-5x40"):  # more than 16 pair blocks of 4 x 4
        case = by_name[name]
        assert math.ceil(case.parents / 4) * math.ceil(case.children / 4) > 16 and case.parents * case.children <= 2048
    assert by_name["fallback-46x46"].parents * by_name["fallback-46x46"].children > 2048
    assert math.prod(by_name["odd-misaligned-5x7"].shape) % 2 == 1
    for case in CASES:
        if case.layout == "channels_last":
            assert len(case.shape) == len(case.cpu_shape) == 4


def test_logits_bound_fails_a_tile_left_out():
    """The grad_logits bound passes fp32 blocked sums yet fails when one 256-element tile is missing."""
    generator = torch.Generator().manual_seed(3)
    parents, grad = torch.randn(3, 2**16, generator=generator), torch.randn(4, 2**16, generator=generator)
    logits = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    _, soft = ops.sample_branches(logits, TAU, noise=torch.zeros_like(logits), backend="ref")

    def grad_logits(g):
        return soft * (g - (soft * g).sum(0, keepdim=True)) / TAU

    exact = grad_logits(parents.double() @ grad.double().T)
    bound = logits_grad_bound(parents, grad, soft, torch.float32, exact)
    blocked = (parents.reshape(3, 1, -1, 512) * grad.reshape(1, 4, -1, 512)).sum(-1).sum(-1).double()
    assert ((grad_logits(blocked) - exact).abs() <= bound).all()
    missing = parents.double() @ grad.double().T - parents[:, :256].double() @ grad[:, :256].double().T
    assert ((grad_logits(missing) - exact).abs() > bound).any()
