"""python -m l2b_fast.demo (`make op-demo`): the branching op on built-in data, checked, then benchmarked.

Shows which backends run here, samples a branching block, checks every backend's forward and backward
against ``ref``, and times the fused op against the naive Learning-to-Branch implementation, writing CSV/JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from l2b_fast import backends, ops
from l2b_fast.bench import __main__ as bench_cli


def show_backends(device: str) -> list[str]:
    print(f"backends for {device} tensors:")
    runnable = []
    for name, why in backends.available(device).items():
        print(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
        if why is None and not (name == "triton" and device == "cpu"):
            runnable.append(name)
    return runnable


def check_against_reference(names: list[str], device: str) -> None:
    """A 3-parent, 4-child block on built-in data: each backend's out and gradients versus ref."""
    generator = torch.Generator().manual_seed(0)
    parents = torch.randn(3, 8, 16, 12, 12, generator=generator).to(device)
    logits = torch.randn(3, 4, generator=generator).to(device)
    grad = torch.randn(4, 8, 16, 12, 12, generator=generator).to(device)
    index, soft = ops.sample_branches(logits, 1.0, generator=torch.Generator(device).manual_seed(1))
    print(f"\nsampled parents per child: {index.tolist()}  (soft sample, column sums 1):")
    print(soft.cpu().numpy().round(3))
    results = {}
    for name in ["ref", *[n for n in names if n != "ref"]]:
        y, w = parents.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        out = ops.branch(y, w, 1.0, generator=torch.Generator(device).manual_seed(1), backend=name)
        out.backward(grad)
        results[name] = (out.detach(), y.grad, w.grad)
    print("\nmax |difference| from ref (out, d parents, d logits):")
    for name, tensors in results.items():
        if name != "ref":
            diffs = [f"{(a - b).abs().max().item():.2e}" for a, b in zip(tensors, results["ref"])]
            print(f"  {name:7s} {'  '.join(diffs)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2b_fast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("demo-results"), help="where the benchmark CSV/JSON go")
    args = parser.parse_args(argv)
    names = show_backends(args.device)
    check_against_reference(names, args.device)
    print("\nbenchmark (forward + backward, median):")
    shapes = "taskonomy,celeba" if args.device == "cuda" else "cpu-target"
    return bench_cli.main(["--device", args.device, "--shapes", shapes, "--out", str(args.out)])


if __name__ == "__main__":
    raise SystemExit(main())
