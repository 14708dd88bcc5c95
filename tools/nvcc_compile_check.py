"""Compile every .cu file of csrc/sources.txt with nvcc (compile only, no GPU or CUDA PyTorch needed).

Uses the installed torch's headers, so CUDA code cannot rot unseen on CPU-only machines.
Usage: python tools/nvcc_compile_check.py [--arch 90] [--arch 80]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent


def cuda_sources() -> list[Path]:
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [ROOT / "csrc" / line.strip() for line in lines if line.strip().endswith(".cu")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability without the dot (default: 90)")
    args = parser.parse_args()
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None
    )
    if nvcc is None:
        print("nvcc not found: cannot compile-check the CUDA sources", file=sys.stderr)
        return 1
    includes = [flag for path in cpp_extension.include_paths() for flag in ("-isystem", path)]
    includes += ["-isystem", sysconfig.get_paths()["include"]]
    flags = [
        "-std=c++20",
        "-O3",
        "-Xcompiler",
        "-fPIC",
        "--expt-relaxed-constexpr",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-Werror",
        "all-warnings",
    ]
    failed = 0
    for arch in args.arch or ["90"]:
        for source in cuda_sources():
            command = [
                nvcc,
                *flags,
                *includes,
                f"-gencode=arch=compute_{arch},code=sm_{arch}",
                "-c",
                str(source),
                "-o",
                os.devnull,
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            status = "ok" if result.returncode == 0 else "FAILED"
            print(f"nvcc sm_{arch} {source.relative_to(ROOT)}: {status}")
            if result.returncode != 0:
                failed += 1
                print(result.stdout + result.stderr, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
