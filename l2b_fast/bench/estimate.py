"""FLOPs and memory of a search step at any size, counted on the ``meta`` device (no memory, no data).

``estimate(spec, batch, precision)`` builds the supernet on ``meta`` and runs one training step's forward
and backward at batch 1 and batch 2:

- FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` at batch 1 (forward + backward) times the
  batch (convolutions and matrix products are linear in the batch);
- saved activations per image: the bytes of the distinct storages autograd saves for the backward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded; batch 2 minus batch 1, so what is saved
  once per step (e.g. the grouped execution's concatenated weights) is kept apart as ``saved_fixed_bytes``;
- peak memory per GPU: parameters + gradients + Adam's two moments (fp32) + the bf16 weight copies autocast
  saves (bf16 only) + fixed saved tensors + saved activations x batch + a workspace margin
  (``WORKSPACE_FRACTION`` of the activations, for transient gradients and convolution workspaces, plus
  ``WORKSPACE_FIXED_BYTES`` for the CUDA context and allocator fragmentation).

Autocast has no ``meta`` kernels, so ``precision="bf16"`` runs the model in bf16: autocast's saved
activations are bf16 as well (its casts of the weights are saved once per step and counted apart).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from l2b_fast.models import ModelSpec

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORKSPACE_FRACTION = 0.2  # of the saved activations: activation gradients alive during the backward, workspaces
WORKSPACE_FIXED_BYTES = 2**30  # CUDA context, cuDNN/cuBLAS handles, allocator fragmentation
FP32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One search step of ``model`` at ``batch`` x ``input_size`` in ``precision``; bytes unless named otherwise."""

    model: str
    batch: int
    precision: str
    input_size: tuple[int, int]
    execution: str
    parameters: int  # supernet weights and branching logits (elements)
    flops_per_image: int  # forward + backward
    saved_bytes_per_image: int
    saved_fixed_bytes: int  # saved once per step, whatever the batch
    device_memory_bytes: int | None = None

    @property
    def flops_per_step(self) -> int:
        return self.flops_per_image * self.batch

    @property
    def weight_state_bytes(self) -> int:
        """fp32 parameters, their gradients and Adam's two moments; with bf16, the weight copies autocast saves."""
        copies = self.parameters * 2 if self.precision == "bf16" else 0
        return 4 * self.parameters * FP32_BYTES + copies

    @property
    def activation_bytes(self) -> int:
        return self.saved_bytes_per_image * self.batch + self.saved_fixed_bytes

    @property
    def workspace_bytes(self) -> int:
        return int(WORKSPACE_FRACTION * self.activation_bytes) + WORKSPACE_FIXED_BYTES

    @property
    def peak_bytes(self) -> int:
        return self.weight_state_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def fits(self) -> bool | None:
        """Whether the estimated peak fits ``device_memory_bytes`` (None when no device memory was given)."""
        return None if self.device_memory_bytes is None else self.peak_bytes <= self.device_memory_bytes


def _check_arguments(spec, batch, precision, input_size, device_memory_gib) -> None:
    if not isinstance(spec, ModelSpec):
        raise TypeError(
            f"spec must be a l2b_fast.models.ModelSpec (e.g. SPECS['celeba_branch_vgg']()), got {type(spec).__name__}"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {precision!r}")
    if input_size is not None and "input_size" not in spec.config:
        raise ValueError(f"{spec.name} has no input_size option")
    memory_ok = (
        isinstance(device_memory_gib, (int, float)) and math.isfinite(device_memory_gib) and device_memory_gib > 0
    )
    if device_memory_gib is not None and not memory_ok:
        raise ValueError(f"device_memory_gib must be a positive number, got {device_memory_gib!r}")


def _resized(spec: ModelSpec, input_size) -> ModelSpec:
    """The same model built for another input size (every other option as in ``spec.config``)."""
    from l2b_fast.models import SPECS

    return SPECS[spec.name](**{**spec.config, "tasks": spec.tasks, "input_size": input_size})


def count_step(
    spec: ModelSpec, batch: int, precision: str = "fp32", execution: str = "per_child"
) -> tuple[int, int, int]:
    """``(flops, saved activation bytes, parameters)`` of one training forward + backward at ``batch``, on meta.

    Saved bytes count each storage autograd saves once, parameters excluded (they are resident anyway).
    """
    dtype = PRECISION_DTYPES[precision]
    with torch.device("meta"):
        model = spec.supernet(execution=execution, backend="ref").to(dtype)  # compiled kernels have no meta ones
    model.train()
    parameter_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    kept = []  # holds the saved tensors until counted, so no storage address is reused by another

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameter_storages:
            saved[storage._cdata] = storage.nbytes()
        kept.append(tensor)
        return tensor

    inputs = torch.empty((batch, *spec.input_shape), device="meta", dtype=dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = model(inputs)
        sum(output.float().mean() for output in outputs.values()).backward()
    parameters = sum(p.numel() for p in model.parameters())
    return counter.get_total_flops(), sum(saved.values()), parameters


def estimate(
    spec: ModelSpec,
    batch: int,
    precision: str = "fp32",
    input_size: int | tuple[int, int] | None = None,
    *,
    execution: str = "per_child",
    device_memory_gib: float | None = None,
) -> Estimate:
    """FLOPs and memory of one search step of ``spec``'s supernet (see the module docstring).

    Args:
        spec: a model of the zoo, e.g. ``l2b_fast.models.SPECS["taskonomy_resnet34"](aspp_channels=192)``.
        batch: images per step on one GPU.
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        input_size: the image side (or ``(height, width)``); default the spec's.
        execution: the supernet's execution whose saved tensors are counted (``"per_child"`` or ``"grouped"``).
        device_memory_gib: the GPU's memory in GiB, to say whether the step fits.
    """
    _check_arguments(spec, batch, precision, input_size, device_memory_gib)
    if input_size is not None:
        spec = _resized(spec, input_size)
    flops_one, saved_one, parameters = count_step(spec, 1, precision, execution)
    _, saved_two, _ = count_step(spec, 2, precision, execution)
    per_image = saved_two - saved_one
    device_memory = int(device_memory_gib * 2**30) if device_memory_gib is not None else None
    return Estimate(
        spec.name,
        batch,
        precision,
        tuple(spec.input_shape[1:]),
        execution,
        parameters,
        flops_one,
        per_image,
        max(0, saved_one - per_image),
        device_memory,
    )


def format_estimate(result: Estimate) -> str:
    """The estimate as lines for the user."""
    gib, mib = 2**30, 2**20
    size = "x".join(str(side) for side in result.input_size) or "vector inputs"
    lines = [
        f"{result.model}, batch {result.batch}, {size}, {result.precision}, execution {result.execution}:",
        f"  supernet parameters      {result.parameters / 1e6:.2f}M",
        f"  FLOPs per step           {result.flops_per_step / 1e12:.2f} TFLOP (forward + backward; "
        f"{result.flops_per_image / 1e9:.1f} GFLOP per image)",
        f"  saved activations        {result.saved_bytes_per_image / mib:.1f} MiB per image"
        + (f" + {result.saved_fixed_bytes / mib:.1f} MiB per step" if result.saved_fixed_bytes >= 0.05 * mib else ""),
        f"  weights, grads, Adam     {result.weight_state_bytes / gib:.2f} GiB"
        + (" (with autocast's bf16 weight copies)" if result.precision == "bf16" else ""),
        f"  workspace margin         {result.workspace_bytes / gib:.2f} GiB "
        f"({WORKSPACE_FRACTION:.0%} of activations + {WORKSPACE_FIXED_BYTES / gib:.0f} GiB)",
        f"  estimated peak per GPU   {result.peak_bytes / gib:.2f} GiB",
    ]
    if result.device_memory_bytes is not None:
        verdict = "fits" if result.fits else "does NOT fit"
        lines.append(
            f"  {verdict} in {result.device_memory_bytes / gib:.0f} GiB "
            f"({100 * result.peak_bytes / result.device_memory_bytes:.0f}% of it)"
        )
    return "\n".join(lines)


# Dense (non-sparse) tensor-core peaks in TFLOP/s, from NVIDIA's datasheets: H100 SXM5 / PCIe
# ("NVIDIA H100 Tensor Core GPU" datasheet) and H200 SXM ("NVIDIA H200 Tensor Core GPU" datasheet). The sheets
# print the tensor-core rates with 2:4 sparsity; the dense rate is half of it (H100 SXM / H200 SXM:
# BF16/FP16 1,979 -> 989.4, TF32 989 -> 494.7, the sheets rounding; H100 PCIe: BF16/FP16 1,513 -> 756.5,
# TF32 756 -> 378). "fp32" is the non-tensor-core FP32 rate (67 SXM / 51 PCIe), used when TF32 is off.
DENSE_PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
}


def peak_key(device_name: str) -> str | None:
    """The ``DENSE_PEAK_TFLOPS`` entry of a ``torch.cuda.get_device_name`` (None for other devices)."""
    name = device_name.upper()
    if "H200" in name and "NVL" not in name:  # the H200 NVL runs at a lower clock: not in the table
        return "H200"
    if "H100" in name and "PCIE" in name:
        return "H100 PCIe"
    if "H100" in name and ("SXM" in name or "HBM3" in name):  # the SXM part reports "NVIDIA H100 80GB HBM3"
        return "H100 SXM"
    return None


def peak_tflops(device_name: str, precision: str, tf32: bool = True) -> float | None:
    """The device's dense peak for a step run in ``precision`` ("fp32", "bf16", "fp16"); None if not in the table.

    fp32 steps run their convolutions and matrix products on TF32 tensor cores when ``tf32`` (PyTorch's default
    for cuDNN convolutions), so their peak is the TF32 one.
    """
    key = peak_key(device_name)
    if key is None:
        return None
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return DENSE_PEAK_TFLOPS[key]["tf32" if precision == "fp32" and tf32 else precision]


def main(argv=None) -> int:
    """``python -m l2b_fast.bench.estimate --model taskonomy_resnet34 --option aspp_channels=192 --batch 64``."""
    import argparse
    import json

    from l2b_fast.models import SPECS

    parser = argparse.ArgumentParser(
        prog="python -m l2b_fast.bench.estimate", description="FLOPs and estimated peak GPU memory of one search step"
    )
    parser.add_argument("--model", required=True, choices=sorted(SPECS))
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model option, the value as JSON (e.g. aspp_channels=192, width=0.5); repeatable",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=sorted(PRECISION_DTYPES), default="fp32")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="input side, or height width")
    parser.add_argument("--execution", choices=("per_child", "grouped"), default="per_child")
    parser.add_argument("--device-memory-gib", type=float, default=80.0)
    args = parser.parse_args(argv)
    options = {}
    for item in args.option:
        key, separator, value = item.partition("=")
        if not separator:
            parser.error(f"--option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    size = None if args.size is None else (args.size[0] if len(args.size) == 1 else tuple(args.size))
    try:
        spec = SPECS[args.model](**options)
        result = estimate(
            spec, args.batch, args.precision, size, execution=args.execution, device_memory_gib=args.device_memory_gib
        )
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    print(format_estimate(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
