"""The whole training step captured in a CUDA graph (``StreamConfig(cuda_graph=True)``).

On a CPU: the same step function, static buffers and tensor learning rates run eagerly
(``GraphedStep(capture=False)``) give the trainer's results bit for bit across warmup and search, resume
exactly, and what a graph cannot do is refused in one line. On CUDA (skipped here): a captured run equals the
eager trainer, replays never synchronise with the host, and a resumed captured run ends where the whole one does.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from l2b_fast import config as configs
from l2b_fast import datasets
from l2b_fast.nn import BlockSpec, TreeSupernet
from l2b_fast.train import StreamConfig, StreamTrainer
from l2b_fast.train.graphed_step import GraphedStep, _copy_into, _layout, _static_copy, optimizer_settings

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.cuda.is_available()
TASKS = ("a", "b")
IN, HIDDEN, OUT = 5, 7, 3  # odd sizes
MSE = {task: nn.functional.mse_loss for task in TASKS}


def tiny_supernet(seed: int = 0, dtype=torch.float64, dropout: float = 0.0) -> TreeSupernet:
    torch.manual_seed(seed)
    hidden = lambda b, j: nn.Sequential(nn.Linear(HIDDEN if b else IN, HIDDEN), nn.Tanh(), nn.Dropout(dropout))
    blocks = [BlockSpec(2, hidden), BlockSpec(3, hidden), BlockSpec(len(TASKS), lambda b, j: nn.Linear(HIDDEN, OUT))]
    return TreeSupernet(blocks, TASKS, tau=1.0).to(dtype)


def epoch_batches(sizes, seed: int, dtype=torch.float64, device="cpu") -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, IN, generator=generator, dtype=dtype).to(device),
            {t: torch.randn(size, OUT, generator=generator, dtype=dtype).to(device) for t in TASKS},
        )
        for size in sizes
    ]


SIZES = (4, 4, 4, 4, 4, 3)  # five full batches and the epoch's short last one


def config(**overrides) -> StreamConfig:
    settings = dict(
        epochs=3,
        warmup_epochs=1,
        batches_per_epoch=len(SIZES),
        lr_weights=1e-2,
        lr_logits=0.2,
        log_every=1,
        progress=False,
        tau={"kind": "inverse_sqrt", "tau0": 5.0},
        lr_schedule={"kind": "cosine", "warmup_steps": 2},
        weight_decay_weights=1e-3,
        weight_decay_logits=1e-3,
    )
    return StreamConfig(**{**settings, **overrides})


def with_eager_twin(trainer: StreamTrainer) -> StreamTrainer:
    trainer.graphed_step = GraphedStep(trainer, capture=False)
    return trainer


def assert_same_training_state(left: StreamTrainer, right: StreamTrainer, **tolerance) -> None:
    pairs = list(zip(left.module.state_dict().items(), right.module.state_dict().values()))
    for optimizer_left, optimizer_right in [
        (left.weight_optimizer, right.weight_optimizer),
        (left.logits_optimizer, right.logits_optimizer),
    ]:
        for k, (a, b) in enumerate(zip(optimizer_left.state.values(), optimizer_right.state.values())):
            pairs += [
                ((f"optimizer state {k} {key}", a[key]), b[key].to(a[key].device))
                for key in ("exp_avg", "exp_avg_sq", "step")
            ]
    for (name, a), b in pairs:
        if tolerance:
            torch.testing.assert_close(
                a.float() if name.endswith("step") else a,
                b.float() if name.endswith("step") else b,
                **tolerance,
                msg=name,
            )
        else:
            assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------- CPU: the eager twin
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eager_twin_gives_the_trainers_results_bit_for_bit(tmp_path, dtype):
    """Warmup (frozen) and search, a per-step tau and a cosine lr (written into tensors), dropout, short last
    batches (run eagerly): the static-buffer step equals the trainer's ordinary step in every bit."""
    data = lambda epoch: epoch_batches(SIZES, seed=10 + epoch, dtype=dtype)
    plain = StreamTrainer(tiny_supernet(dtype=dtype, dropout=0.2), MSE, data, config(), tmp_path / "plain")
    twin = with_eager_twin(
        StreamTrainer(tiny_supernet(dtype=dtype, dropout=0.2), MSE, data, config(), tmp_path / "twin")
    )
    plain.fit()
    twin.fit()
    assert twin.step == plain.step == 18
    # Per phase: 2 eager steps, then the static buffers; every short batch eagerly (frozen, search, search).
    assert twin.graphed_step.counts == {"eager": 2 + 1 + 2 + 1 + 1, "static": 3 + 3 + 5, "captures": 2}
    assert all(
        isinstance(group["lr"], torch.Tensor)
        for group in twin.weight_optimizer.param_groups + twin.logits_optimizer.param_groups
    )
    assert_same_training_state(plain, twin)
    assert not torch.equal(
        twin.module.branchings[1].logits, torch.zeros_like(twin.module.branchings[1].logits)
    )  # searched
    for name in ("log.csv", "epochs.csv"):
        assert (tmp_path / "plain" / name).read_text() == (tmp_path / "twin" / name).read_text()


def test_eager_twin_captures_the_short_last_batch_after_its_eager_steps(tmp_path):
    """The short-batch rule: the short last batch runs eagerly ``eager_steps`` times (once per epoch), then gets
    its own static buffers (its own graph on CUDA) in the same phase; a third layout always runs eagerly. Every
    sample is used and the results equal the trainer's bit for bit."""
    sizes = (4, 4, 3, 2)  # full, full, then two shorter batches: the second short layout is one too many
    data = lambda epoch: epoch_batches(sizes, seed=60 + epoch)
    cfg = config(epochs=3, warmup_epochs=0, batches_per_epoch=len(sizes))
    plain = StreamTrainer(tiny_supernet(dropout=0.2), MSE, data, cfg, tmp_path / "plain")
    twin = StreamTrainer(tiny_supernet(dropout=0.2), MSE, data, cfg, tmp_path / "twin")
    twin.graphed_step = GraphedStep(twin, capture=False, eager_steps=1)
    plain.fit()
    twin.fit()
    # epoch 0: 4 eager, 4 fixed, 3 eager, 2 eager; epoch 1: 4, 4 static, 3 fixed, 2 eager; epoch 2: 3 static, 2 eager.
    assert twin.graphed_step.counts == {"eager": 5, "static": 7, "captures": 2}
    assert twin.step == plain.step == 12
    assert_same_training_state(plain, twin)
    assert (tmp_path / "plain" / "log.csv").read_text() == (tmp_path / "twin" / "log.csv").read_text()


def test_short_batch_waits_for_its_own_eager_steps(tmp_path):
    """With the default two eager steps, SIZES' short batch is captured in the third search epoch, not before."""
    data = lambda epoch: epoch_batches(SIZES, seed=70 + epoch)
    twin = with_eager_twin(StreamTrainer(tiny_supernet(), MSE, data, config(epochs=4), tmp_path))
    twin.fit()
    # frozen epoch: 2 eager + 3 static + short eager; search: 2 + 3 + 1, 5 + 1, then 5 static + the short one fixed.
    assert twin.graphed_step.counts == {"eager": 3 + 3 + 1, "static": 3 + 3 + 5 + 6, "captures": 1 + 2}


def test_optimizers_are_capturable_on_cuda_whether_or_not_captured(tmp_path):
    """Foreach Adam takes a tensor lr only with capturable=True: on CUDA every step (captured or not) runs
    capturable with a float32 lr, on a CPU (where Adam refuses capturable) uncapturable with a float64 lr."""
    assert optimizer_settings(torch.device("cuda", 0)) == (torch.float32, True)
    assert optimizer_settings(torch.device("cpu")) == (torch.float64, False)
    trainer = with_eager_twin(StreamTrainer(tiny_supernet(), MSE, epoch_batches(SIZES, seed=1), config(), tmp_path))
    for group in trainer.weight_optimizer.param_groups + trainer.logits_optimizer.param_groups:
        assert group["capturable"] is False and group["lr"].dtype == torch.float64


class Killed(Exception):
    pass


def kill_after(step: int):
    def on_step(trainer):
        if trainer.step == step:
            raise Killed

    return on_step


def test_eager_twin_resumes_exactly(tmp_path):
    """Killed past a checkpoint in the search phase, a fresh trainer resumes (tensor lrs back from the
    checkpoint, new static buffers and eager steps) to the uninterrupted run's state and logs."""
    data = lambda epoch: epoch_batches(SIZES, seed=20 + epoch)
    cfg = config(checkpoint_every=4)
    whole = with_eager_twin(StreamTrainer(tiny_supernet(), MSE, data, cfg, tmp_path / "whole"))
    whole.fit()
    part = with_eager_twin(StreamTrainer(tiny_supernet(), MSE, data, cfg, tmp_path / "part"))
    with pytest.raises(Killed):
        part.fit(on_step=kill_after(10))  # checkpoint at step 8 (search, epoch 1); steps 9-10 are lost
    resumed = with_eager_twin(StreamTrainer(tiny_supernet(seed=5), MSE, data, cfg, tmp_path / "part"))
    resumed.fit(resume=True)
    assert resumed.step == whole.step == 18
    assert_same_training_state(whole, resumed)
    for name in ("log.csv", "epochs.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "part" / name).read_text()


def test_static_buffers_keep_structure_and_layout():
    inputs = torch.randn(2, 3, 5, 4).contiguous(memory_format=torch.channels_last)
    batch = (inputs, {"a": torch.randn(2, 3), "b": torch.arange(2)}, None)
    static = _static_copy(batch)
    assert static[0].is_contiguous(memory_format=torch.channels_last) and static[0] is not inputs
    assert _layout(static) == _layout(batch) and static[2] is None
    fresh = (torch.randn(2, 3, 5, 4), {"a": torch.randn(2, 3), "b": torch.arange(2) + 7}, None)  # contiguous: copied in
    _copy_into(static, fresh)
    assert (
        torch.equal(static[0], fresh[0])
        and torch.equal(static[1]["a"], fresh[1]["a"])
        and torch.equal(static[1]["b"], fresh[1]["b"])
    )
    for other in [
        (torch.randn(3, 3, 5, 4), batch[1], None),
        (inputs.double(), batch[1], None),
        (inputs, {"a": batch[1]["a"]}, None),
        (inputs, {"b": batch[1]["b"], "a": batch[1]["a"]}, None),
        (inputs, batch[1], {"a": torch.ones(2)}),
    ]:
        assert _layout(other) != _layout(batch)


def test_refusals():
    for overrides, message in [
        (dict(precision="fp16"), "fp16"),
        (dict(accumulation=2), "accumulation=1"),
        (dict(compile={"mode": "reduce-overhead"}), "own CUDA graphs"),
        (dict(compile={"options": {"triton.cudagraphs": True}}), "own CUDA graphs"),
    ]:
        with pytest.raises(ValueError, match=message):
            config(cuda_graph=True, **overrides)
    with pytest.raises(ValueError, match="cuda_graph must be True or False"):
        config(cuda_graph=1)
    config(cuda_graph=True, precision="bf16", compile={"fullgraph": True})  # accepted


def test_trainer_refusals(tmp_path):
    data = epoch_batches(SIZES, seed=1)
    if not CUDA:
        with pytest.raises(ValueError, match="cuda_graph needs a CUDA device, the trainer runs on cpu"):
            StreamTrainer(tiny_supernet(), MSE, data, config(cuda_graph=True), tmp_path)

    class GeneratorOnly(nn.Module):  # a supernet whose forward takes generator=, not seed=
        def __init__(self):
            super().__init__()
            self.net = tiny_supernet()
            self.tasks = self.net.tasks

        def forward(self, inputs, generator=None):
            return self.net(inputs, generator=generator)

    trainer = StreamTrainer(GeneratorOnly(), MSE, data, config(), tmp_path)
    with pytest.raises(ValueError, match="needs a forward that takes seed="):
        GraphedStep(trainer, capture=False)
    trainer = StreamTrainer(tiny_supernet(), MSE, data, config(), tmp_path)
    with pytest.raises(ValueError, match="eager_steps must be an integer >= 1"):
        GraphedStep(trainer, capture=False, eager_steps=0)
    fake_ddp = types.SimpleNamespace(
        config=trainer.config,
        device=trainer.device,
        context=types.SimpleNamespace(distributed=True),
        searching=True,
        _forward_takes_seed=True,
    )
    with pytest.raises(ValueError, match="not supported under DistributedDataParallel"):
        GraphedStep(fake_ddp, capture=False)


def test_pipeline_setting_and_older_checkpoints(tmp_path):
    """``--set search.cuda_graph=true`` reaches the StreamConfig; a checkpoint written before the setting
    existed resumes as cuda_graph=False."""
    assert "cuda_graph" in configs.TRAINER_FIELDS
    section = {"size": 8, "batch_size": 4, "epochs": 1, "cuda_graph": True}
    assert configs.train_config(section, datasets.recipe("taskonomy"), seed=0, progress=False).cuda_graph is True
    data = epoch_batches(SIZES[:2], seed=3)
    trainer = StreamTrainer(tiny_supernet(), MSE, data, config(epochs=1), tmp_path)
    trainer.fit()
    state = torch.load(trainer.checkpoint_path, weights_only=True)
    del state["config"]["cuda_graph"]
    torch.save(state, trainer.checkpoint_path)
    StreamTrainer(tiny_supernet(), MSE, data, config(epochs=1), tmp_path).load_checkpoint()


# ------------------------------------------------------------------------------------------- CUDA: captured
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
PRECISIONS = [
    "fp32",
    pytest.param(
        "bf16",
        marks=pytest.mark.skipif(not (CUDA and torch.cuda.is_bf16_supported()), reason="needs bf16 on a CUDA device"),
    ),
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.cuda
@cuda_only
def test_cuda_graph_run_equals_the_eager_trainer(tmp_path, precision):
    """Captured warmup and search graphs (short last batches eager) against the ordinary trainer: the same
    trees and, up to capturable Adam's on-device bias correction, the same weights, logits and losses."""
    data = lambda epoch: epoch_batches(SIZES, seed=30 + epoch, dtype=torch.float32, device="cuda")
    eager = StreamTrainer(
        tiny_supernet(dtype=torch.float32), MSE, data, config(precision=precision), tmp_path / "eager", device="cuda"
    )
    graphed = StreamTrainer(
        tiny_supernet(dtype=torch.float32),
        MSE,
        data,
        config(precision=precision, cuda_graph=True),
        tmp_path / "graphed",
        device="cuda",
    )
    eager.fit()
    graphed.fit()
    assert graphed.graphed_step.counts == {"eager": 7, "static": 11, "captures": 2}
    tolerance = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    assert_same_training_state(eager, graphed, **tolerance)
    eager_log = (tmp_path / "eager" / "log.csv").read_text().splitlines()
    graphed_log = (tmp_path / "graphed" / "log.csv").read_text().splitlines()
    assert len(eager_log) == len(graphed_log) == 19
    for row_eager, row_graphed in zip(eager_log[1:], graphed_log[1:]):
        values_eager, values_graphed = (
            torch.tensor([float(v) for v in row.split(",")]) for row in (row_eager, row_graphed)
        )
        torch.testing.assert_close(values_graphed, values_eager, **tolerance)


@pytest.mark.cuda
@cuda_only
def test_cuda_graph_replays_have_no_host_sync(tmp_path):
    """The trainer's whole step between two on_step calls (tau, lr and seed writes, the batch copy, the replay,
    the device-side loss sums) under ``set_sync_debug_mode("error")``: nothing waits for the GPU."""
    data = epoch_batches((4,) * 8, seed=40, dtype=torch.float32, device="cuda")
    cfg = config(epochs=1, warmup_epochs=0, batches_per_epoch=8, log_every=1000, cuda_graph=True)
    trainer = StreamTrainer(tiny_supernet(dtype=torch.float32), MSE, data, cfg, tmp_path, device="cuda")
    checked = []

    def on_step(run):
        if run.step == 3:  # steps 1-2 eager, step 3 captured (capturing synchronises) and replayed
            assert run.graphed_step.counts["captures"] == 1
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        elif run.step == 7:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(run.graphed_step.counts["static"])

    try:
        trainer.fit(on_step=on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checked == [5]  # steps 4-7: replays under the check


@pytest.mark.cuda
@cuda_only
def test_cuda_graph_run_resumes_like_the_whole_run(tmp_path):
    data = lambda epoch: epoch_batches(SIZES, seed=50 + epoch, dtype=torch.float32, device="cuda")
    cfg = config(checkpoint_every=4, cuda_graph=True)
    whole = StreamTrainer(tiny_supernet(dtype=torch.float32), MSE, data, cfg, tmp_path / "whole", device="cuda")
    whole.fit()
    part = StreamTrainer(tiny_supernet(dtype=torch.float32), MSE, data, cfg, tmp_path / "part", device="cuda")
    with pytest.raises(Killed):
        part.fit(on_step=kill_after(10))
    resumed = StreamTrainer(
        tiny_supernet(seed=5, dtype=torch.float32), MSE, data, cfg, tmp_path / "part", device="cuda"
    )
    resumed.fit(resume=True)
    assert resumed.step == whole.step == 18
    assert_same_training_state(whole, resumed, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@cuda_only
def test_cuda_uncaptured_step_runs_like_the_captured_one(tmp_path):
    """``GraphedStep(capture=False)`` on CUDA: capturable Adam with tensor lrs, uncaptured; it follows the eager
    trainer and, closer still, the captured run (the same kernels and the same on-device optimizer arithmetic)."""
    data = lambda epoch: epoch_batches(SIZES, seed=80 + epoch, dtype=torch.float32, device="cuda")
    make = lambda name, **overrides: StreamTrainer(
        tiny_supernet(dtype=torch.float32), MSE, data, config(**overrides), tmp_path / name, device="cuda"
    )
    eager, twin, graphed = make("eager"), with_eager_twin(make("twin")), make("graphed", cuda_graph=True)
    for trainer in (eager, twin, graphed):
        trainer.fit()
    assert twin.graphed_step.counts == graphed.graphed_step.counts == {"eager": 7, "static": 11, "captures": 2}
    assert all(group["capturable"] for group in twin.weight_optimizer.param_groups + twin.logits_optimizer.param_groups)
    assert_same_training_state(eager, twin, rtol=1e-4, atol=1e-5)
    assert_same_training_state(graphed, twin, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@cuda_only
def test_cuda_short_last_batch_is_captured_and_equals_the_eager_trainer(tmp_path):
    """Four epochs: the short last batch runs eagerly in epochs 0-2 and from its own graph (the full batch's
    memory pool, shared gradients) in epoch 3; the run still equals the ordinary trainer."""
    data = lambda epoch: epoch_batches(SIZES, seed=90 + epoch, dtype=torch.float32, device="cuda")
    net = lambda: tiny_supernet(dtype=torch.float32, dropout=0.2)
    eager = StreamTrainer(net(), MSE, data, config(epochs=4), tmp_path / "eager", device="cuda")
    graphed = StreamTrainer(net(), MSE, data, config(epochs=4, cuda_graph=True), tmp_path / "graphed", device="cuda")
    eager.fit()
    graphed.fit()
    assert graphed.graphed_step.counts == {"eager": 7, "static": 17, "captures": 3}
    assert_same_training_state(eager, graphed, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ CUDA: convolutional supernets
CONV_IN, CONV_SIZE = 3, 8


def conv_supernet(execution: str, conv_backend: str, seed: int = 0) -> TreeSupernet:
    """Conv + BatchNorm + ReLU + dropout blocks (a strided, dilated one too), per-task pooling heads."""
    torch.manual_seed(seed)
    blocks = [
        BlockSpec(
            2,
            lambda b, j: nn.Sequential(
                nn.Conv2d(CONV_IN, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2)
            ),
        ),
        BlockSpec(
            3,
            lambda b, j: nn.Sequential(
                nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, bias=False),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Dropout2d(0.1),
            ),
        ),
        BlockSpec(len(TASKS), lambda b, j: nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())),
    ]
    heads = lambda task: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, OUT))
    return TreeSupernet(blocks, TASKS, heads, tau=1.0, execution=execution, conv_backend=conv_backend).cuda()


def conv_batches(epoch: int) -> list:
    generator = torch.Generator().manual_seed(100 + epoch)
    return [
        (
            torch.randn(size, CONV_IN, CONV_SIZE, CONV_SIZE, generator=generator).cuda(),
            {t: torch.randn(size, OUT, generator=generator).cuda() for t in TASKS},
        )
        for size in SIZES
    ]


def _triton_reason():
    from l2b_fast import backends

    return backends.unavailable_reason("triton", "cuda") if CUDA else "needs a CUDA device"


needs_triton = pytest.mark.skipif(CUDA and _triton_reason() is not None, reason=str(_triton_reason()))
bf16_only = pytest.mark.skipif(not (CUDA and torch.cuda.is_bf16_supported()), reason="needs bf16 on a CUDA device")


@pytest.mark.parametrize(
    "execution, conv_backend, precision",
    [
        ("per_child", "cudnn", "fp32"),
        ("grouped", "cudnn", "fp32"),
        pytest.param("grouped", "triton", "fp32", marks=needs_triton),
        pytest.param("grouped", "cudnn", "bf16", marks=bf16_only),
        pytest.param("grouped", "triton", "bf16", marks=[needs_triton, bf16_only]),
    ],
)
@pytest.mark.cuda
@cuda_only
def test_cuda_graph_conv_supernet_equals_the_eager_trainer(tmp_path, execution, conv_backend, precision):
    """Conv, BatchNorm (running statistics in the state compared) and dropout nodes, run per child, grouped with
    cuDNN or with the Triton index-reading convolution, fp32 and bf16: warmup and search graphs against the
    ordinary trainer over two epochs (12 steps, short last batches eager)."""
    cfg = lambda **overrides: config(epochs=2, precision=precision, **overrides)
    net = lambda: conv_supernet(execution, conv_backend)
    eager = StreamTrainer(net(), MSE, conv_batches, cfg(), tmp_path / "eager", device="cuda")
    graphed = StreamTrainer(net(), MSE, conv_batches, cfg(cuda_graph=True), tmp_path / "graphed", device="cuda")
    eager.fit()
    graphed.fit()
    assert graphed.graphed_step.counts == {"eager": 6, "static": 6, "captures": 2}
    assert any("running_mean" in name for name in graphed.module.state_dict())
    tolerance = dict(rtol=1e-3, atol=1e-4) if precision == "fp32" else dict(rtol=5e-2, atol=5e-3)
    assert_same_training_state(eager, graphed, **tolerance)
