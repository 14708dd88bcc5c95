"""The fused kernels' launch paths, small enough to run under compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool racecheck --error-exitcode 86 python3 tools/gpu_sanitize.py --backends cpp

Runs the branching op forward and backward (and the seeded sampling kernel) once per case and dtype on
CUDA: the cp.async pipeline in its steady state (many tiles per block), the 8 x 8 pair blocks, the fallback
(more than 2048 pairs), and the unvectorised kernels (odd N, data one element off 16-byte alignment). The
sanitizer checks the launches; the values are checked by tests/test_gpu_paths.py. Set
PYTORCH_NO_CUDA_MEMORY_CACHING=1 under memcheck, so that every tensor is its own allocation and an
access past its end is caught. tools/gpu_validate.py runs it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, when l2b_fast is not installed

from l2b_fast import ops  # noqa: E402

CASES = {  # name: (parents I, children J, per-parent shape S, misaligned)
    "pipeline-5x5": (5, 5, (2, 2**20), False),  # 2M elements: several tiles per block on any GPU
    "pairs8-30x40": (30, 40, (8, 64, 9, 9), False),
    "fallback-46x46": (46, 46, (4, 16, 7, 7), False),
    "odd-misaligned-5x7": (5, 7, (3, 33343), True),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def dense(shape, dtype, generator, misaligned: bool) -> torch.Tensor:
    values = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(dtype)
    if not misaligned:
        return values
    storage = torch.empty(values.numel() + 1, dtype=dtype, device=generator.device)
    return storage[1:].view(shape).copy_(values)


def run_case(name: str, dtype: torch.dtype, backend: str, device: str = "cuda") -> None:
    parents_count, children, shape, misaligned = CASES[name]
    generator = torch.Generator(device).manual_seed(0)
    parents = dense((parents_count, *shape), dtype, generator, misaligned).requires_grad_(True)
    grad = dense((children, *shape), dtype, generator, misaligned)
    logits_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    logits = torch.randn(
        parents_count, children, generator=generator, device=device, dtype=logits_dtype, requires_grad=True
    )
    out = ops.branch(parents, logits, 0.7, generator=generator, backend=backend)  # seeded Philox sampling kernel too
    out.backward(grad)
    if device == "cuda":
        torch.cuda.synchronize()
    if not (torch.isfinite(parents.grad).all() and torch.isfinite(logits.grad).all()):
        raise RuntimeError(f"{name} {dtype} {backend}: non-finite gradients")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cpp,triton", help="comma-separated CUDA backends (default cpp,triton)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, from {', '.join(DTYPES)}")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this driver (no sanitizer there)"
    )
    args = parser.parse_args(argv)
    backends_, dtypes, cases = args.backends.split(","), args.dtypes.split(","), args.cases.split(",")
    for value, known, what in ((dtypes, DTYPES, "dtype"), (cases, CASES, "case")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here (--device cpu runs the same calls on the CPU kernels)")
    for backend in backends_:
        for name in cases:
            for dtype_name in dtypes:
                begin = time.perf_counter()
                run_case(name, DTYPES[dtype_name], backend, args.device)
                print(
                    f"{backend:7s} {name:20s} {dtype_name:9s} ran in {time.perf_counter() - begin:6.2f} s", flush=True
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
