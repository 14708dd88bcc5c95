"""Shared fixtures. Without a CUDA device, TRITON_INTERPRET=1 runs the ``triton`` backend on CPU tensors
through Triton's interpreter; it must be set before the kernels are decorated, so it is set here, before
l2b_fast (or triton) is imported. With a CUDA device the compiled Triton kernels are what the tests check,
so the interpreter stays off (unless TRITON_INTERPRET is set by hand)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import pytest
import torch  # importing torch does not import triton; torch.cuda.is_available() creates no CUDA context

CUDA = torch.cuda.is_available()
if importlib.util.find_spec("triton") is not None and not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("L2B_BACKEND", None)  # tests choose backends explicitly

import l2b_fast  # noqa: E402
from l2b_fast import backends  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]

# (dtype, atol, rtol) against the float64 reference on the same (upcast) inputs.
DTYPE_TOLERANCES = [
    (torch.float64, 1e-10, 1e-10),
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]


def runnable_backends(device: str) -> list[str]:
    return [name for name, reason in backends.available(device).items() if reason is None]


def fast_backends(device: str) -> list[str]:
    """Every backend except the reference, the ones held to it."""
    return [name for name in runnable_backends(device) if name != "ref"]


@pytest.fixture
def one_thread():
    """Tiny models are launch-bound: on a loaded 2-core machine a second intra-op thread only adds
    synchronisation (measured up to ~30x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, l2b_fast {l2b_fast.__version__}"]
    if importlib.util.find_spec("triton") is not None:
        mode = "interpreter (TRITON_INTERPRET=1)" if backends.triton_interpreting() else "compiled kernels"
        lines.append(f"triton {importlib.metadata.version('triton')}: {mode}")
    for device_type in ("cpu", "cuda"):
        status = ", ".join(
            f"{name}: {'yes' if why is None else 'no'}" for name, why in backends.available(device_type).items()
        )
        lines.append(f"l2b_fast backends on {device_type}: {status}")
    return lines


def backend_cases(include_ref: bool = False) -> list:
    """(device, backend) pairs for parametrize: CPU backends that run here, CUDA ones skipped without a GPU."""
    cases = [
        pytest.param("cpu", name, id=f"cpu-{name}") for name in runnable_backends("cpu") if include_ref or name != "ref"
    ]
    for name in ("ref", "cpp", "triton"):
        if name == "ref" and not include_ref:
            continue
        why = "needs a CUDA device" if not CUDA else backends.unavailable_reason(name, "cuda")
        cases.append(
            pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.skipif(why is not None, reason=str(why)))
        )
    return cases


def gumbel(shape, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Gumbel(0, 1) samples drawn on the CPU from ``generator`` (test noise)."""
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(uniform))).to(dtype)


def bent_square_toml(
    *, tasks: int, samples: int, hidden: int, validation: float, search: dict, retrain: dict | None = None
) -> str:
    """A small synthetic config (bent vs square families, two 2-node blocks) as TOML text."""

    def table(values: dict) -> str:
        return "\n".join(f"{key} = {value}" for key, value in values.items())

    text = f"""
name = "bent-square"
expected = "a"
[data]
kind = "synthetic"
groups = [{{ activation = "bent", tasks = {tasks} }}, {{ activation = "square", tasks = {tasks} }}]
samples = {samples}
validation_fraction = {validation}
[model]
fc_blocks = 2
nodes = 2
hidden = {hidden}
[search]
{table(search)}
"""
    return text + (f"[retrain]\n{table(retrain)}\n" if retrain else "")


def assert_compiled_step_matches_eager(
    eager: torch.nn.Module, x: torch.Tensor, seed: torch.Tensor, tasks, *, tol: float = 1e-5
) -> None:
    """A search step of ``eager`` and of a ``torch.compile(fullgraph=True, backend="aot_eager")`` copy (dynamo and
    AOT autograd, no inductor C++ compile) with the same seed tensor: same outputs, same gradients."""
    import copy

    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True, backend="aot_eager")
    outputs = []
    for module in (eager, compiled):
        out = module(x, seed=seed)
        sum((v * torch.linspace(-1, 2, v.numel()).view_as(v)).sum() for v in out.values()).backward()
        outputs.append(out)
    for task in tasks:
        torch.testing.assert_close(outputs[1][task], outputs[0][task], atol=tol, rtol=tol)
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled_net.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
