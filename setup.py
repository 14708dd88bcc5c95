"""Build of l2b_fast's compiled extension ``l2b_fast._C`` (sources: csrc/sources.txt).

Install with torch already present and without build isolation (so the build sees that torch and pip
never pulls another, possibly multi-GB CUDA, build): ``pip install --no-build-isolation -e .``

Environment switches:
  L2B_BUILD_EXTENSION=0   pure-Python install (the ``ref``/``triton`` backends only)
  L2B_BUILD_CUDA=1|0      force / skip the CUDA kernels (default: built when torch.version.cuda and CUDA_HOME
                          are both set; not based on a visible GPU, so a GPU-less build host works)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (e.g. "9.0"); MAX_JOBS: parallel compile jobs
  L2B_DEBUG=1             -O0 -g instead of -O3
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def env_switch(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.exit(f"setup.py: {name}={value!r}: use 1, 0 or auto")


def read_sources() -> list[str]:
    """csrc/sources.txt, the one list of sources shared with CMakeLists.txt."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [f"csrc/{line.strip()}" for line in lines if line.strip() and not line.lstrip().startswith("#")]


def extension_modules():
    if env_switch("L2B_BUILD_EXTENSION") is False:
        print("setup.py: L2B_BUILD_EXTENSION=0: pure-Python install, no compiled kernels")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "setup.py: PyTorch must be installed before l2b_fast is built, and the build must see it:\n"
            "  pip install torch==2.13.0   # or your CUDA build\n"
            "  pip install --no-build-isolation -e .\n"
            "(or L2B_BUILD_EXTENSION=0 for a pure-Python install)"
        )
    sources = read_sources()
    cuda_sources = [s for s in sources if s.endswith(".cu")]
    build_cuda = env_switch("L2B_BUILD_CUDA")
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if build_cuda is None:
        build_cuda = cuda_possible
    elif build_cuda and not cuda_possible:
        sys.exit(
            f"setup.py: L2B_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda} and "
            f"CUDA_HOME={cpp_extension.CUDA_HOME}: install a CUDA build of PyTorch and set CUDA_HOME"
        )
    optimisation = ["-O0", "-g"] if env_switch("L2B_DEBUG") else ["-O3"]
    cxx_flags = list(optimisation)
    if "backend: OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        # at::parallel_for is header-inline OpenMP: without -fopenmp it runs on one thread. Compile only;
        # the GOMP symbols resolve against the libgomp that torch has already loaded (as pytorch_scatter does).
        cxx_flags.append("-fopenmp")
    define_macros = [("L2B_PYTHON_MODULE", None)]
    if build_cuda:
        extension = cpp_extension.CUDAExtension(
            "l2b_fast._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": optimisation + ["--expt-relaxed-constexpr", "-lineinfo"]},
        )
    else:
        extension = cpp_extension.CppExtension(
            "l2b_fast._C",
            [s for s in sources if s not in cuda_sources],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    print(f"setup.py: building l2b_fast._C with {'CPU and CUDA' if build_cuda else 'CPU'} kernels")
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["l2b_fast", "l2b_fast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
