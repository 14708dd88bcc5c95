"""Compile the Triton kernels ahead of time for a GPU target, without a GPU, and report their cost.

For the backward's partials kernel, each shape and dtype uses the launch configuration
``l2b_fast.triton.branch`` would pick on that GPU (``--sms`` multiprocessors) and prints registers per
thread, spilled bytes, shared memory, the programs per SM the registers allow, and whether the tile loop
was software-pipelined (``cp.async`` in the PTX). The logits and sampling kernels are compiled too (with
libdevice, as on the GPU), so a Triton version that cannot lower them fails here, and so are the grouped
blocks' index-reading convolution kernels (``l2b_fast.triton.indexed_conv``) at the tiles and warps their
launchers pick for a few of the paper's layers. Needs only Triton with
its bundled ptxas/cuobjdump.

Usage: python tools/triton_aot_report.py [--arch 90] [--sms 132] [--out report.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from l2b_fast.triton import branch

SHAPES = [
    (5, 5, 64 * 64 * 32 * 32),
    (30, 40, 64 * 64 * 8 * 8),
    (5, 40, 64 * 64 * 8 * 8),
    (46, 46, 1 << 16),
    (1, 40, 1 << 16),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
REGISTERS_PER_SM = 65536


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED of the kernel in a cubin, from the cuobjdump bundled with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True, check=True
        ).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED):(\d+)", text)}


def compile_partials(
    arch: int, sms: int, parents: int, children: int, numel: int, dtype: torch.dtype, dots: bool = True
):
    acc_bytes = 8 if dtype == torch.float64 else 4
    block_i, block_n, _, num_chunks, tiles_per_program = branch._partials_config(
        parents, children, numel, acc_bytes, False, sms
    )
    pointer = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}[dtype]
    acc_pointer = "*fp64" if dtype == torch.float64 else "*fp32"
    signature = {
        "grad_ptr": pointer,
        "parents_ptr": pointer,
        "index_ptr": "*i64",
        "grad_parents_ptr": pointer,
        "partials_ptr": acc_pointer,
        "num_parents": "i32",
        "J": "i32",
        "N": "i32",
        "num_i_blocks": "i32",
    }
    constexprs = {
        "TILES_PER_PROGRAM": tiles_per_program,
        "NUM_STAGES": branch._NUM_STAGES,
        "WRITE_GRAD_PARENTS": True,
        "COMPUTE_DOTS": dots,
        "ACC_F64": dtype == torch.float64,
        "BLOCK_I": block_i,
        "BLOCK_J": max(2, branch._next_pow2(children)),
        "BLOCK_N": block_n,
    }
    signature.update({name: "constexpr" for name in constexprs})
    # What a launch specialises on: torch allocations are 16-byte aligned, N when 16 divides it.
    divisible = [name for name in signature if name.endswith("_ptr")] + (["N"] if numel % 16 == 0 else [])
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = triton.compiler.ASTSource(
        fn=branch._branch_backward_partials_kernel, signature=signature, constexprs=constexprs, attrs=attrs
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": branch._NUM_WARPS})
    usage = resource_usage(compiled.asm["cubin"])
    threads = 32 * branch._NUM_WARPS
    return {
        "I": parents,
        "J": children,
        "N": numel,
        "BLOCK_I": block_i,
        "BLOCK_N": block_n,
        "programs": num_chunks,
        "tiles_per_program": tiles_per_program,
        "registers": usage.get("reg"),
        "spill_bytes": usage.get("stack", 0),
        "shared_bytes": compiled.metadata.shared,
        "programs_per_sm_by_registers": REGISTERS_PER_SM // max(1, usage.get("reg", 1) * threads),
        "pipelined": "cp.async" in compiled.asm["ptx"],
    }


def compile_small_kernels(arch: int) -> list[dict]:
    """The logits-gradient and sampling kernels in fp32 and fp64 at a 30 x 40 block: registers and spills."""
    from l2b_fast.triton import sample_branches

    rows = []
    for f64 in (False, True):
        float_pointer = "*fp64" if f64 else "*fp32"
        logits_kernel = (
            branch._branch_backward_logits_kernel,
            {
                "partials_ptr": float_pointer,
                "soft_ptr": float_pointer,
                "grad_logits_ptr": float_pointer,
                "num_parents": "i32",
                "J": "i32",
                "stride_si": "i32",
                "stride_sj": "i32",
                "tau_ptr": "*fp64",
            },
            {"NUM_CHUNKS": 35, "OUT_F64": f64, "BLOCK_I": 32, "BLOCK_J": 64},
        )
        sample_kernel = (
            sample_branches._sample_branches_kernel,
            {
                "logits_ptr": float_pointer,
                "noise_ptr": float_pointer,
                "seed_ptr": "*i64",
                "index_ptr": "*i64",
                "soft_ptr": float_pointer,
                "num_parents": "i32",
                "J": "i32",
                "stride_li": "i32",
                "stride_lj": "i32",
                "stride_ni": "i32",
                "stride_nj": "i32",
                "tau_ptr": "*fp64",
            },
            {"HAS_NOISE": False, "F64": f64, "USE_LIBDEVICE": True, "BLOCK_I": 32, "BLOCK_J": 64},
        )
        for fn, signature, constexprs in (logits_kernel, sample_kernel):
            signature = {**signature, **{name: "constexpr" for name in constexprs}}
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
            usage = resource_usage(compiled.asm["cubin"])
            rows.append(
                {"kernel": fn.__name__, "f64": f64, "registers": usage.get("reg"), "spill_bytes": usage.get("stack", 0)}
            )
    return rows


# (name, parents I, children J, batch, C, H=W, Co, kernel, stride): a Taskonomy stem, a ResNet-34 block conv
# and its 1x1 downsample at 128x128 input, and a CelebA-VGG conv with 40 children.
CONV_LAYERS = [
    ("taskonomy stem 7x7/2", 1, 5, 64, 3, 128, 64, 7, 2),
    ("resnet block 3x3", 5, 5, 64, 64, 32, 64, 3, 1),
    ("resnet downsample 1x1/2", 5, 5, 64, 64, 32, 128, 1, 2),
    ("celeba-vgg 3x3, 40 children", 30, 40, 64, 32, 8, 32, 3, 1),
]


def compile_indexed_conv_kernels(arch: int, sms: int) -> list[dict]:
    """The four indexed-convolution kernels (forward, child-major input gradient with the logits' dots,
    parent-major input gradient, weight gradient) per layer and dtype: registers, spills, shared memory."""
    from l2b_fast.triton import indexed_conv as conv

    rows = []
    pointer = {"fp32": "*fp32", "fp32-ieee": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
    for name, parents, children, batch, channels, size, out_channels, kernel, stride in CONV_LAYERS:
        padding = kernel // 2
        out_size = (size + 2 * padding - kernel) // stride + 1
        # fp32: TF32 products by default (as cuDNN), IEEE ones under torch.backends.cudnn.allow_tf32 = False
        for dtype in ("fp32", "fp32-ieee", "bf16", "fp16"):
            taps = dict(SH=stride, SW=stride, PH=padding, PW=padding, DH=1, DW=1, KH=kernel, KW=kernel)
            common = dict(PRECISION="ieee" if dtype == "fp32-ieee" else "tf32", UPCAST=False)
            fwd = conv._blocks(batch * out_size * out_size, out_channels, channels * kernel * kernel, False)
            bwd = conv._blocks(batch * size * size, channels, out_channels * kernel * kernel, False)
            wgt = (32, *conv._blocks(batch * out_size * out_size, out_channels, channels * kernel * kernel, False)[1:])
            cases = [
                (
                    "forward",
                    conv._indexed_conv_forward_kernel,
                    fwd,
                    conv._num_warps(False, fwd[0], fwd[1]),
                    {"K_TILES": triton.cdiv(channels * kernel * kernel, fwd[2]), "HAS_BIAS": True},
                ),
                (
                    "input_grad+dots",
                    conv._indexed_conv_input_grad_kernel,
                    bwd,
                    conv._num_warps(False, bwd[0], bwd[1]),
                    {
                        "K_TILES": triton.cdiv(out_channels * kernel * kernel, bwd[2]),
                        "WRITE_DX": True,
                        "NUM_PARENTS": parents,
                    },
                ),
                (
                    "parents_grad",
                    conv._indexed_conv_parent_grad_kernel,
                    bwd,
                    8,
                    {"K_TILES": triton.cdiv(out_channels * kernel * kernel, bwd[2]), "NUM_CHILDREN": children},
                ),
                (
                    "weight_grad",
                    conv._indexed_conv_weight_grad_kernel,
                    wgt,
                    conv._num_warps(False, wgt[0], wgt[1]),
                    {},
                ),  # the split size is a runtime value
            ]
            for kernel_name, fn, (block_m, block_n, block_k), warps, extra in cases:
                constexprs = {**taps, **common, **extra, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
                params = list(inspect.signature(fn.fn).parameters)
                signature = {
                    p: "constexpr" if p in constexprs else "*i64" if p == "index_ptr"
                    else "*fp32" if p in ("dots_ptr", "partials_ptr") else pointer[dtype] if p.endswith("_ptr")
                    else "i32"
                    for p in params
                }  # fmt: skip
                attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in params if p.endswith("_ptr")}
                source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                usage = resource_usage(compiled.asm["cubin"])
                rows.append({
                    "layer": name, "dtype": dtype, "kernel": kernel_name, "block": [block_m, block_n, block_k],
                    "warps": warps, "registers": usage.get("reg"), "spill_bytes": usage.get("stack", 0),
                    "shared_bytes": compiled.metadata.shared,
                    "programs_per_sm_by_registers": REGISTERS_PER_SM // max(1, usage.get("reg", 1) * 32 * warps),
                })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors of the target GPU (H100/H200 SXM: 132)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = []
    for name, dtype in DTYPES.items():
        for parents, children, numel in SHAPES:
            row = {"dtype": name, **compile_partials(args.arch, args.sms, parents, children, numel, dtype)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    small = compile_small_kernels(args.arch)
    for row in small:
        print(json.dumps(row), flush=True)
    convolutions = compile_indexed_conv_kernels(args.arch, args.sms)
    for row in convolutions:
        print(json.dumps(row), flush=True)
    if args.out:
        report = {
            "arch": args.arch, "sms": args.sms, "triton": triton.__version__, "partials": rows, "other_kernels": small,
            "indexed_conv": convolutions,
        }  # fmt: skip
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
