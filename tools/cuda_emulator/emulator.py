"""Build and run the CPU emulation of the CUDA fused backward (see cuda_emulation.h) against the reference.

``python tools/cuda_emulator/emulator.py`` runs the paths no CPU test of the real CUDA build can reach
(the cp.async pipeline in its steady state, the 8 x 8 pair blocks, dots-only groups for blocks too
large for one launch, the scalar path of misaligned data, the segment sum alone) in every dtype and
every copy timing, and prints one line per case. ``tests/test_cuda_emulation.py`` runs a subset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# An H100/H200: 132 SMs, 227 KB of shared memory per block (opt-in), 228 KB per SM: csrc/cuda/branch_cuda.cu
# gives one fused block 228 / 2 - 1 = 113 KB. Tests use fewer SMs so small N reaches many tiles per block.
H100_SMEM_BUDGET = 228 * 1024 // 2 - 1024
DEFAULT_SMEM = 48 * 1024
TIMINGS = {"at_wait": 0, "at_issue": 1, "random": 2}
PLAN_FIELDS = ("launches", "tile", "stages", "lanes", "pair_m", "blocks", "tiles_per_block", "vectorised")

_loaded = False


def load(verbose: bool = False) -> None:
    """Compile (once, cached by torch.utils.cpp_extension) and register torch.ops.l2b_emu."""
    global _loaded
    if _loaded:
        return
    from torch.utils import cpp_extension

    build = ROOT / "build" / "cuda_emulator"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="l2b_cuda_emulator",
        sources=[str(HERE / "emulate_backward.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(HERE)],
        extra_cflags=["-O1", "-std=c++20"],
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    _loaded = True


def branch_backward(
    grad,
    parents,
    index,
    *,
    sm_count=2,
    blocks_per_sm=1,
    smem_budget=H100_SMEM_BUDGET,
    timing="at_wait",
    need_grad_parents=True,
    need_grad_logits=True,
):
    """(grad_parents [I, N], G [I, J] float64, plan dict) from the emulated CUDA kernels."""
    load()
    grad_parents, dots, plan = torch.ops.l2b_emu.branch_backward(
        grad, parents, index, sm_count, blocks_per_sm, smem_budget, TIMINGS[timing], need_grad_parents, need_grad_logits
    )
    return grad_parents, dots, dict(zip(PLAN_FIELDS, plan.tolist()))


LOG_FIELDS = ("event", "device", "kernel", "bytes", "attribute")  # event: "set" the attribute, or "launch"


def reset_launch_state() -> None:
    """Forget every shared-memory attribute, cached occupancy and log row: as a fresh process."""
    load()
    torch.ops.l2b_emu.reset_launch_state()


def launch_log() -> list[dict]:
    """The fake CUDA runtime's log since the last reset: attribute sets (bytes = the new attribute) and fused
    launches (bytes = the launch's dynamic shared memory, attribute = the kernel's attribute at the launch)."""
    load()
    rows = torch.ops.l2b_emu.launch_log().tolist()
    return [dict(zip(LOG_FIELDS, (("set", "launch")[row[0]], *row[1:]))) for row in rows]


def make_case(parents: int, children: int, numel: int, dtype: torch.dtype, seed: int = 0, misaligned: bool = False):
    """Random grad [J, N], parents [I, N] and index [J] (every parent sampled when J >= I)."""
    generator = torch.Generator().manual_seed(seed)
    offset = 1 if misaligned else 0  # one element in: the data pointers are no longer 16-byte aligned
    grad = (
        torch.randn(children * numel + offset, generator=generator, dtype=torch.float64)
        .to(dtype)[offset:]
        .view(children, numel)
    )
    y = (
        torch.randn(parents * numel + offset, generator=generator, dtype=torch.float64)
        .to(dtype)[offset:]
        .view(parents, numel)
    )
    index = torch.randint(0, parents, (children,), generator=generator)
    index[: min(parents, children)] = torch.randperm(parents, generator=generator)[: min(parents, children)]
    return grad, y, index


def reference(grad, parents, index):
    """float64 segment sum and dot products of the same (rounded) inputs."""
    grad64, parents64 = grad.double(), parents.double()
    return torch.zeros_like(parents64).index_add_(0, index, grad64), parents64 @ grad64.T


def check(parents, children, numel, dtype, **options):
    """Run one case; returns (plan, max relative error of grad_parents (per summed child), of G)."""
    grad, y, index = make_case(parents, children, numel, dtype, misaligned=options.pop("misaligned", False))
    grad_parents, dots, plan = branch_backward(grad, y, index, **options)
    want_parents, want_dots = reference(grad, y, index)
    summed = max(1.0, children / parents) ** 0.5  # rounding error of a sum grows with its terms
    parents_error = (
        ((grad_parents.double() - want_parents).abs() / (want_parents.abs() + 1)).max().item() / summed
        if grad_parents.numel()
        else 0.0
    )
    dots_error = ((dots - want_dots).abs() / (want_dots.abs() + numel**0.5)).max().item() if dots.numel() else 0.0
    return plan, parents_error, dots_error


# (name, I, J, N, options): the untested CUDA paths, at sizes an emulator runs in seconds.
CASES = [
    ("pipeline steady state, 5x5", 5, 5, 64 * 1024 + 40, {}),
    ("8x8 pair blocks, 30x40", 30, 40, 3 * 1024, {}),
    ("8x8 pair blocks, 5x40", 5, 40, 4 * 1024, {}),
    ("groups (I*J > 2048), 46x46", 46, 46, 1024, {}),
    ("30x40 within the 48 KB default budget", 30, 40, 2048, {"smem_budget": DEFAULT_SMEM}),
    ("groups (rows beyond shared memory), 200x3", 200, 3, 512, {"smem_budget": DEFAULT_SMEM}),
    ("scalar path: odd N, misaligned", 3, 7, 4099, {"misaligned": True}),
    ("1x1", 1, 1, 5000, {}),
    ("1x40", 1, 40, 1000, {}),
    ("40x1", 40, 1, 1000, {}),
    ("no parents gradient, 5x5", 5, 5, 9000, {"need_grad_parents": False}),
    ("segment sum alone (frozen logits), 5x5", 5, 5, 9000, {"need_grad_logits": False}),
    ("segment sum alone, odd N, misaligned", 5, 7, 3001, {"need_grad_logits": False, "misaligned": True}),
]
# (grad_parents, G): grad_parents is rounded to the dtype once; G accumulates exact products in fp32 (fp64).
TOLERANCE = {
    torch.float64: (1e-13, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-5),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16,float16,float64")
    parser.add_argument("--timings", default="at_wait,at_issue,random")
    args = parser.parse_args()
    load(verbose=False)
    failures = 0
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for timing in args.timings.split(","):
            for name, parents, children, numel, options in CASES:
                plan, parents_error, dots_error = check(parents, children, numel, dtype, timing=timing, **options)
                ok = parents_error <= TOLERANCE[dtype][0] and dots_error <= TOLERANCE[dtype][1]
                failures += not ok
                print(
                    f"{'ok  ' if ok else 'FAIL'} {dtype_name:8s} {timing:8s} {name:45s} grad_parents err "
                    f"{parents_error:.2e}"
                    f"  G rel err {dots_error:.2e}  plan {plan}",
                    flush=True,
                )
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
