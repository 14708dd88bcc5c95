"""What a derived tree saves over the supernet it was searched in, for the paper's models at a reduced size:
parameters, forward FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix
products) and CPU latency at batch 1 and 32 (``torch.utils.benchmark``, one thread) of the supernet in eval mode
(every node computed), the derived tree in eager mode, and the same tree exported (``torch.export``, loaded back
from a ``.pt2`` file). Outputs of the exported tree are checked against the eager tree before timing.

The tree is derived as after a search (argmax of the branching distributions, then pruned) from branching logits
drawn at random (seed 0): a stand-in for a searched tree; its widths are recorded. Writes
``export_<device>.{csv,json}`` tagged with device, versions and thread count.

    python benchmarks/export_benchmark.py --out benchmarks/results [--models celeba-vgg] [--min-run-time 0.5]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from l2b_fast import config as configs
from l2b_fast import pipeline
from l2b_fast.bench.report import environment, write_results
from l2b_fast.export import export_program
from l2b_fast.nn import parameter_count
from l2b_fast.tree import derive

SIZE = 64  # pixels per side: the paper's sizes (218 x 178, 256) cost minutes per timing on two CPU cores
# preset: the --set overrides that make the reduced model (CelebA at full width; Taskonomy narrower)
MODELS = {
    "celeba-vgg": [f"retrain.size={SIZE}"],
    "celeba-deepwide": [f"retrain.size={SIZE}"],
    "taskonomy-resnet34": [f"retrain.size={SIZE}", "model.width=0.25", "model.aspp_channels=256"],
}
BATCHES = (1, 32)


def build(preset: str, overrides: list[str]):
    """(config, spec, supernet, derived tree, tree net), both nets wrapped as the trainer runs them, in eval mode."""
    config = configs.load_config(preset=preset, overrides=overrides)
    recipe = pipeline.recipe_of(config)
    spec = recipe.model_spec(config, config["retrain"])
    torch.manual_seed(0)
    supernet = recipe.supernet(config, spec)
    with torch.no_grad():
        for logits in supernet.logits_parameters():
            logits.normal_()
    tree = derive(supernet).pruned()
    treenet = recipe.treenet(config, spec, tree)
    return config, spec, recipe.wrap(supernet).eval(), tree, recipe.wrap(treenet).eval()


def flops_per_image(net: torch.nn.Module, images: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(images)
    return counter.get_total_flops() // images.shape[0]


def latency_ms(net, images: torch.Tensor, min_run_time: float) -> float:
    """Median milliseconds per forward, one thread."""
    timer = benchmark.Timer(
        stmt="with torch.no_grad(): net(images)",
        globals={"net": net, "images": images, "torch": torch},
        num_threads=1,
    )
    with torch.no_grad():
        net(images)  # warm-up
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per latency measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for preset in args.models:
        config, spec, supernet, tree, treenet = build(preset, MODELS[preset])
        generator = torch.Generator().manual_seed(0)
        example = spec.example_input(2, generator=generator)
        with tempfile.TemporaryDirectory() as folder:  # the exported program as a user loads it: from a file
            path = Path(folder) / "tree.pt2"
            torch.export.save(export_program(treenet, example), path)
            exported = torch.export.load(path).module()
        check = spec.example_input(3, generator=generator)
        with torch.no_grad():
            expected, got = treenet(check), exported(check)
        error = max((expected[task] - got[task]).abs().max().item() for task in expected)
        if error > 1e-4:
            raise RuntimeError(f"{preset}: the exported tree differs from the eager tree by {error}")
        one = spec.example_input(1, generator=generator)
        supernet_weights = sum(p.numel() for p in supernet.net.weight_parameters())
        nets = {"supernet": (supernet, supernet_weights), "tree": (treenet, parameter_count(treenet))}
        nets["tree_exported"] = (exported, nets["tree"][1])
        for name, (net, parameters) in nets.items():
            row = {
                "model": spec.name,
                "preset": preset,
                "input": "x".join(str(side) for side in spec.input_shape),
                "width": config["model"].get("width", 1.0),
                "net": name,
                "tree_widths": " ".join(map(str, tree.widths)),
                "parameters": parameters,
                "gflops_per_image": round(flops_per_image(net, one) / 1e9, 4),
                "max_abs_error_vs_eager": error if name == "tree_exported" else 0.0,
            }
            for batch in BATCHES:
                images = spec.example_input(batch, generator=generator)
                row[f"latency_ms_batch{batch}"] = round(latency_ms(net, images, args.min_run_time), 3)
            rows.append(row)
            print(row, flush=True)
    meta = {**environment(torch.device("cpu")), "threads": 1, "size": SIZE, "models": MODELS}
    meta["cpu_cores"] = len(os.sched_getaffinity(0))
    paths = write_results(rows, meta, args.out, f"export_cpu_{slug(meta['device'])}", ("device", "torch", "threads"))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
