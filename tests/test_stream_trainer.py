"""The streaming trainer in one process: accumulation, warmup, precision, schedules, logs, exact resume."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from l2b_fast.nn import BlockSpec, TreeNet, TreeSupernet
from l2b_fast.train import StreamConfig, StreamTrainer, distributed, lr_schedules
from l2b_fast.train.trainer import branching_modules, unwrap_model
from l2b_fast.tree import derive

TASKS = ("a", "b")
IN, HIDDEN, OUT = 5, 7, 3  # odd sizes


def tiny_supernet(seed: int = 0, dtype=torch.float64, dropout: float = 0.0) -> TreeSupernet:
    """Three blocks of Linear nodes (1 -> 2 -> 3 -> 2 tasks), one output of 3 per task."""
    torch.manual_seed(seed)
    hidden = lambda b, j: nn.Sequential(nn.Linear(HIDDEN if b else IN, HIDDEN), nn.Tanh(), nn.Dropout(dropout))
    blocks = [BlockSpec(2, hidden), BlockSpec(3, hidden), BlockSpec(len(TASKS), lambda b, j: nn.Linear(HIDDEN, OUT))]
    return TreeSupernet(blocks, TASKS, tau=1.0).to(dtype)


def make_batches(count: int, size: int, seed: int, dtype=torch.float64) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, IN, generator=generator, dtype=dtype),
            {t: torch.randn(size, OUT, generator=generator, dtype=dtype) for t in TASKS},
        )
        for _ in range(count)
    ]


MSE = {task: nn.functional.mse_loss for task in TASKS}


def config(**overrides) -> StreamConfig:
    settings = dict(epochs=3, warmup_epochs=1, lr_weights=1e-2, lr_logits=0.2, log_every=1, progress=False)
    return StreamConfig(**{**settings, **overrides})


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_state(left: nn.Module, right: nn.Module, **tolerance) -> None:
    for (name, a), b in zip(left.state_dict().items(), right.state_dict().values()):
        if tolerance:
            torch.testing.assert_close(a, b, **tolerance, msg=name)
        else:
            assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float64, dict(rtol=1e-10, atol=1e-12)), (torch.float32, dict(rtol=2e-4, atol=2e-5))]
)
def test_accumulation_equals_a_bigger_batch(tmp_path, dtype, tolerance):
    """Accumulating 2 batches of 3 = one batch of 6 (one tree per step), the epoch's odd last batch included."""
    small = make_batches(5, 3, seed=1, dtype=dtype)  # steps of 2 + 2 + 1 batches
    big = [
        (
            torch.cat([x for x, _ in small[k : k + 2]]),
            {t: torch.cat([y[t] for _, y in small[k : k + 2]]) for t in TASKS},
        )
        for k in (0, 2)
    ]
    big.append(small[4])
    accumulated = StreamTrainer(
        tiny_supernet(dtype=dtype), MSE, small, config(accumulation=2), tmp_path / "accumulated"
    )
    whole = StreamTrainer(tiny_supernet(dtype=dtype), MSE, big, config(), tmp_path / "whole")
    assert accumulated.steps_per_epoch == whole.steps_per_epoch == 3
    accumulated.fit()
    whole.fit()
    assert accumulated.step == whole.step == 9
    assert_same_state(accumulated.module, whole.module, **tolerance)
    assert not torch.equal(accumulated.module.branchings[1].logits, torch.zeros(2, 3, dtype=dtype))  # logits trained
    for a, b in zip(read_csv(tmp_path / "accumulated" / "log.csv"), read_csv(tmp_path / "whole" / "log.csv")):
        assert math.isclose(float(a["loss"]), float(b["loss"]), rel_tol=1e-4)


# ------------------------------------------------------------------------------------------- warmup, logits
def test_warmup_freezes_logits_found_by_the_model(tmp_path):
    net = tiny_supernet()
    trainer = StreamTrainer(net, MSE, make_batches(3, 4, seed=2), config(epochs=2), tmp_path)
    assert [id(p) for p in trainer.logits_optimizer.param_groups[0]["params"]] == [id(b.logits) for b in net.branchings]
    assert not {id(p) for p in trainer.weight_optimizer.param_groups[0]["params"]} & {
        id(b.logits) for b in net.branchings
    }
    trainer.fit(stop_after_steps=3)  # the warmup epoch
    assert all(b.mode == "frozen" for b in net.branchings)
    assert all(torch.equal(b.logits.detach(), torch.zeros_like(b.logits)) for b in net.branchings)
    trainer.fit()
    assert all(b.mode == "search" for b in net.branchings)
    assert any(b.logits.detach().abs().sum() > 0 for b in net.branchings)


def test_unwrap_finds_logits_through_compile_wrapper():
    net = tiny_supernet()
    compiled = torch.compile(net, backend="eager")  # wrapping only; nothing is traced here
    assert unwrap_model(compiled) is net
    assert branching_modules(compiled) == list(net.branchings)


def test_retrain_treenet_has_no_logits_optimizer(tmp_path):
    supernet = tiny_supernet()
    tree = derive(supernet).pruned()
    torch.manual_seed(3)
    blocks = [
        BlockSpec(2, lambda b, j: nn.Linear(HIDDEN if b else IN, HIDDEN)),
        BlockSpec(3, lambda b, j: nn.Linear(HIDDEN, HIDDEN)),
        BlockSpec(2, lambda b, j: nn.Linear(HIDDEN, OUT)),
    ]
    net = TreeNet(tree, blocks).double()
    before = [p.detach().clone() for p in net.parameters()]
    trainer = StreamTrainer(net, MSE, make_batches(3, 4, seed=4), config(epochs=1, warmup_epochs=0), tmp_path)
    assert trainer.logits_optimizer is None and not trainer.searching
    trainer.fit()
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, net.parameters()))
    assert "p.b0.i0.j0" not in read_csv(tmp_path / "log.csv")[0]


# ------------------------------------------------------------------------------------------- precision, layout
def _conv_supernet(seed: int, dtype=torch.float32) -> TreeSupernet:
    torch.manual_seed(seed)
    conv = lambda b, j: nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    heads = {t: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, OUT)) for t in TASKS}
    return TreeSupernet([BlockSpec(2, conv), BlockSpec(2, conv)], TASKS, heads).to(dtype)


def _image_batches(count: int, dtype=torch.float32) -> list:
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(2, 3, 9, 7, generator=generator, dtype=dtype),
            {t: torch.randn(2, OUT, generator=generator, dtype=dtype) for t in TASKS},
        )
        for _ in range(count)
    ]


def test_bf16_autocast(tmp_path):
    net = _conv_supernet(0)
    seen = []
    net.heads["a"][2].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    trainer = StreamTrainer(net, MSE, _image_batches(3), config(epochs=2, precision="bf16"), tmp_path)
    result = trainer.fit()
    assert seen and set(seen) == {torch.bfloat16}  # the heads' Linear ran in bf16
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights stay fp32
    assert math.isfinite(result["loss"]) and not trainer.scaler.is_enabled()


def test_fp16_uses_a_gradient_scaler(tmp_path):
    trainer = StreamTrainer(
        _conv_supernet(0), MSE, _image_batches(2), config(epochs=1, warmup_epochs=0, precision="fp16"), tmp_path
    )
    assert trainer.scaler.is_enabled()
    trainer.fit()
    state = torch.load(trainer.checkpoint_path, weights_only=True)
    assert state["scaler"]["scale"] > 0  # the scaler's state is checkpointed


def test_channels_last_matches_contiguous(tmp_path):
    plain = StreamTrainer(
        _conv_supernet(1, torch.float64), MSE, _image_batches(3, torch.float64), config(epochs=2), tmp_path / "plain"
    )
    last = StreamTrainer(
        _conv_supernet(1, torch.float64),
        MSE,
        _image_batches(3, torch.float64),
        config(epochs=2, channels_last=True),
        tmp_path / "last",
    )
    assert last.module.nodes[0][0][0].weight.is_contiguous(memory_format=torch.channels_last)
    plain.fit()
    last.fit()
    assert_same_state(plain.module, last.module, rtol=1e-9, atol=1e-11)


@pytest.mark.slow  # dynamo's tracing takes ~10 s on this 2-core machine
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    """``compile`` (dynamo with the eager backend: tracing, graph breaks and guards without codegen time)."""
    batches = make_batches(3, 4, seed=12)
    eager = StreamTrainer(tiny_supernet(), MSE, batches, config(epochs=2), tmp_path / "eager")
    compiled = StreamTrainer(
        tiny_supernet(), MSE, batches, config(epochs=2, compile={"backend": "eager"}), tmp_path / "compiled"
    )
    assert compiled.model is not compiled.module and unwrap_model(compiled.model) is compiled.module
    eager.fit()
    compiled.fit()
    assert_same_state(eager.module, compiled.module, rtol=1e-12, atol=1e-14)
    saved = torch.load(compiled.checkpoint_path, weights_only=True)["model"]
    assert list(saved) == list(compiled.module.state_dict())  # no wrapper prefixes in checkpoints


COUNTING_BACKEND = "l2b_test_counting"  # by name: the config (compile options included) goes into checkpoints
_COUNTED_COMPILES: set = set()


@torch._dynamo.register_backend(name=COUNTING_BACKEND)
def _counting_backend(graph_module, example_inputs):
    compile_id = torch._guards.CompileContext.current_compile_id()  # restarts of one analysis share the id
    _COUNTED_COMPILES.add((compile_id.frame_id, compile_id.frame_compile_id))
    return graph_module.forward


def test_compiled_search_is_fullgraph_and_samples_the_eager_trees(tmp_path):
    """``compile={"fullgraph": True}``: the step seed is a device tensor filled in place and tau changes every
    step (inverse_sqrt), yet nothing breaks the graph and the only recompile is warmup's end (frozen ->
    search mode); the compiled run trains exactly as the eager one, so it sampled the same trees."""
    from torch._dynamo.utils import counters

    _COUNTED_COMPILES.clear()
    batches = make_batches(3, 4, seed=14)
    settings = dict(epochs=2, tau={"kind": "inverse_sqrt", "tau0": 5.0})
    eager = StreamTrainer(tiny_supernet(), MSE, batches, config(**settings), tmp_path / "eager")
    compiled = StreamTrainer(
        tiny_supernet(),
        MSE,
        batches,
        config(**settings, compile={"backend": COUNTING_BACKEND, "fullgraph": True}),
        tmp_path / "compiled",
    )
    assert compiled._step_seed is not None and compiled._generator is None  # TreeSupernet takes seed=
    torch._dynamo.reset()
    counters.clear()
    try:
        eager.fit()
        compiled.fit()
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert len(_COUNTED_COMPILES) == 2, (
            f"{len(_COUNTED_COMPILES)} compiles: expected one per mode (frozen warmup, search)"
        )
    finally:
        torch._dynamo.reset()
    assert_same_state(eager.module, compiled.module, rtol=1e-12, atol=1e-14)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reduce_overhead_compile_replays_cuda_graphs_like_eager(tmp_path):
    """``compile={"mode": "reduce-overhead", "fullgraph": True}`` on the GPU: inductor with CUDA graphs, the
    step seed and tau as device tensors read at replay; same trees and (up to inductor's rounding) weights as eager."""
    batches = [(x.cuda(), {t: y.cuda() for t, y in targets.items()}) for x, targets in make_batches(3, 4, seed=16)]
    settings = dict(epochs=2, tau={"kind": "inverse_sqrt", "tau0": 5.0})
    eager = StreamTrainer(tiny_supernet(), MSE, batches, config(**settings), tmp_path / "eager", device="cuda")
    compiled = StreamTrainer(
        tiny_supernet(),
        MSE,
        batches,
        config(**settings, compile={"mode": "reduce-overhead", "fullgraph": True}),
        tmp_path / "compiled",
        device="cuda",
    )
    torch._dynamo.reset()
    try:
        eager.fit()
        compiled.fit()
    finally:
        torch._dynamo.reset()
    assert_same_state(eager.module, compiled.module, rtol=1e-9, atol=1e-11)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile_options", [False, {"fullgraph": True}], ids=["eager", "compiled"])
def test_cuda_search_steps_between_logs_have_no_sync_debug_error(tmp_path, compile_options):
    """Steps between two log rows (new tau, new step seed, forward, backward, both optimizers) under
    ``set_sync_debug_mode("error")``: nothing waits for the GPU. The first step (compiles, allocations) and the
    epoch's end (logs, checkpoint) run outside the checked region."""
    batches = [(x.cuda(), {t: y.cuda() for t, y in targets.items()}) for x, targets in make_batches(5, 4, seed=17)]
    cfg = config(
        epochs=1, warmup_epochs=0, log_every=1000, tau={"kind": "inverse_sqrt", "tau0": 5.0}, compile=compile_options
    )
    trainer = StreamTrainer(tiny_supernet(dtype=torch.float32), MSE, batches, cfg, tmp_path, device="cuda")
    checked = []

    def on_step(run):
        if run.step == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        elif run.step == 4:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(run.step)

    torch._dynamo.reset()
    try:
        trainer.fit(on_step=on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch._dynamo.reset()
    assert checked == [1, 2, 3, 4, 5]


def test_model_with_generator_only_still_samples_per_step(tmp_path):
    """A forward that takes ``generator=`` but no ``seed=`` keeps the seeded generator: reproducible runs."""

    class GeneratorOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_supernet()
            self.tasks = self.net.tasks

        def forward(self, x, generator=None):
            return self.net(x, generator)

    batches = make_batches(3, 4, seed=15)
    runs = [StreamTrainer(GeneratorOnly(), MSE, batches, config(epochs=2), tmp_path / str(i)) for i in range(2)]
    assert runs[0]._generator is not None and runs[0]._step_seed is None
    for run in runs:
        run.fit()
    assert_same_state(runs[0].module, runs[1].module)


def test_prepare_batch_turns_raw_batches_into_inputs_and_targets(tmp_path):
    batches = make_batches(3, 4, seed=13)
    raw = [({"x": x, **y},) for x, y in batches]  # e.g. the raw Taskonomy batches, normalised where the model runs
    prepare = lambda batch, device: (batch[0]["x"].to(device), {t: batch[0][t].to(device) for t in TASKS})
    plain = StreamTrainer(tiny_supernet(), MSE, batches, config(epochs=2), tmp_path / "plain")
    prepared = StreamTrainer(
        tiny_supernet(), MSE, raw, config(epochs=2), tmp_path / "prepared", val_data=raw, prepare_batch=prepare
    )
    plain.fit()
    prepared.fit()
    assert_same_state(plain.module, prepared.module)
    assert prepared.evaluate(raw).samples == 12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_channels_last_and_resume(tmp_path, precision):
    """On the GPU: autocast, channels_last, accumulation, the CUDA generator's tree, and resume after a crash."""
    cfg = config(epochs=2, accumulation=2, checkpoint_every=1, precision=precision, channels_last=True)
    batches = _image_batches(5)
    whole = StreamTrainer(_conv_supernet(0), MSE, batches, cfg, tmp_path / "whole", device="cuda")
    assert whole.device.type == "cuda" and whole._step_seed.device.type == "cuda"
    whole.fit()
    part = StreamTrainer(_conv_supernet(0), MSE, batches, cfg, tmp_path / "part", device="cuda")
    with pytest.raises(Killed):
        part.fit(on_step=_kill_after(4))
    resumed = StreamTrainer(_conv_supernet(3), MSE, batches, cfg, tmp_path / "part", device="cuda")
    resumed.fit(resume=True)
    # cuDNN may pick other algorithms in a new trainer: equal up to rounding, not bit for bit.
    assert_same_state(whole.module, resumed.module, rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(p).all() for p in resumed.module.parameters())


# ------------------------------------------------------------------------------------------- schedules and logs
def test_learning_rate_schedules():
    cosine = lr_schedules.from_config({"kind": "cosine", "warmup_steps": 2, "min_factor": 0.1})
    assert [cosine(s, 0, 12) for s in (0, 1)] == [0.5, 1.0]
    assert math.isclose(cosine(7, 0, 12), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(cosine(12, 0, 12), 0.1)
    step = lr_schedules.from_config({"kind": "step", "milestones": [3, 1], "gamma": 0.5})
    assert [step(0, e, None) for e in range(4)] == [1.0, 0.5, 0.5, 0.25]
    assert lr_schedules.from_config(None)(5, 5, None) == 1.0
    assert lr_schedules.from_config({"kind": "constant", "warmup_steps": 4})(1, 0, None) == 0.5
    for bad in (
        {"kind": "nope"},
        {"kind": "cosine", "nope": 1},
        {"kind": "step", "gamma": -1.0, "milestones": [0]},
        "cosine",
        {"kind": "constant", "warmup_steps": -1},
    ):
        with pytest.raises(ValueError):
            lr_schedules.from_config(bad)


def test_logged_lr_tau_task_weights_and_probabilities(tmp_path):
    cfg = config(
        epochs=3,
        tau={"kind": "epoch_decay", "tau0": 10.0, "rate": 0.5},
        lr_schedule={"kind": "cosine", "warmup_steps": 2},
        task_weights={"a": 2.0},
    )
    trainer = StreamTrainer(tiny_supernet(), MSE, make_batches(4, 3, seed=6), cfg, tmp_path)
    trainer.fit()
    rows = read_csv(tmp_path / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert [float(r["tau"]) for r in rows] == [10.0] * 4 + [5.0] * 4 + [2.5] * 4  # decayed per epoch
    for index, row in enumerate(rows):
        expected = 1e-2 * trainer.lr_schedule(index, index // 4, 12)
        assert math.isclose(float(row["lr"]), expected)
        assert math.isclose(float(row["loss"]), 2 * float(row["loss.a"]) + float(row["loss.b"]), rel_tol=1e-12)
        assert math.isclose(float(row["p.b1.i0.j2"]) + float(row["p.b1.i1.j2"]), 1.0, rel_tol=1e-6)
    epochs = read_csv(tmp_path / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [0, 1, 2]


def test_validation_and_evaluate_count_samples(tmp_path):
    val = make_batches(3, 5, seed=7)[:2] + make_batches(1, 2, seed=8)  # 12 samples, a short last batch
    trainer = StreamTrainer(tiny_supernet(), MSE, make_batches(2, 4, seed=9), config(epochs=2), tmp_path, val_data=val)
    trainer.fit()
    row = read_csv(tmp_path / "epochs.csv")[-1]
    assert int(row["val_samples"]) == 12
    evaluation = trainer.evaluate(val)
    assert evaluation.samples == 12 and evaluation.metrics is None
    trainer.module.eval()
    with torch.no_grad():
        outputs = [trainer.module(x) for x, _ in val]
        expected = (
            sum(nn.functional.mse_loss(o["a"], y["a"], reduction="sum") / OUT for o, (_, y) in zip(outputs, val)) / 12
        )
    assert math.isclose(evaluation.losses["a"], float(expected), rel_tol=1e-12)
    assert math.isclose(float(row["val_loss.a"]), evaluation.losses["a"], rel_tol=1e-12)


# ------------------------------------------------------------------------------------------- exact resume
class Killed(RuntimeError):
    pass


def _kill_after(steps: int):
    def on_step(trainer):
        if trainer.step == steps:
            raise Killed

    return on_step


def _shuffled_loader(seed: int) -> torch.utils.data.DataLoader:
    inputs, targets = make_batches(1, 14, seed=seed)[0]
    dataset = torch.utils.data.TensorDataset(inputs, targets["a"], targets["b"])
    return torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=True)  # order drawn from the global RNG


def _data_kinds(kind: str):
    batches = make_batches(5, 3, seed=10)
    if kind == "list":
        return batches
    if kind == "dataloader":
        return _ShuffledTuples(_shuffled_loader(11))
    if kind == "factory":
        return lambda epoch: make_batches(5, 3, seed=100 + epoch)
    if kind == "factory_skip":
        return lambda epoch, skip: make_batches(5, 3, seed=100 + epoch)[skip:]
    raise AssertionError(kind)


class _ShuffledTuples:
    """A shuffling DataLoader whose rows become (inputs, {task: target}) batches."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, a, b in self.loader:
            yield x, {"a": a, "b": b}


@pytest.mark.parametrize("kind", ["list", "dataloader", "factory", "factory_skip"])
def test_resume_after_a_crash_is_bit_exact(tmp_path, kind):
    """Killed mid-epoch past a checkpoint, a fresh trainer resumes to the uninterrupted run's weights and logs
    (dropout and a shuffling DataLoader draw from the global RNG)."""
    cfg = config(epochs=3, accumulation=2, checkpoint_every=2, log_every=1)  # 3 steps per epoch
    whole = StreamTrainer(tiny_supernet(dropout=0.2), MSE, _data_kinds(kind), cfg, tmp_path / "whole")
    whole.fit()
    part = StreamTrainer(tiny_supernet(dropout=0.2), MSE, _data_kinds(kind), cfg, tmp_path / "part")
    with pytest.raises(Killed):
        part.fit(on_step=_kill_after(5))  # checkpoint at step 4 (epoch 1, one step in); step 5 is lost
    torch.manual_seed(12345)  # a new process: other RNG states, other initial weights
    resumed = StreamTrainer(tiny_supernet(seed=99, dropout=0.2), MSE, _data_kinds(kind), cfg, tmp_path / "part")
    resumed.fit(resume=True)
    assert resumed.step == whole.step == 9
    assert_same_state(whole.module, resumed.module)
    for name in ("log.csv", "epochs.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "part" / name).read_text()


def test_resume_of_webdataset_loaders_built_per_epoch(tmp_path):
    """CelebA shards through the real train loader, built per epoch with the epoch in its seed: exact resume."""
    pytest.importorskip("webdataset")
    from l2b_fast import datasets
    from l2b_fast.data import shards
    from l2b_fast.datasets.celeba import loaders as loader
    from l2b_fast.datasets.celeba import synthetic as synthetic_celeba

    synthetic_celeba.generate(tmp_path / "shards", 20, 16, samples_per_shard=4)
    urls = shards.shard_paths(tmp_path / "shards", "train")
    celeba = datasets.get("celeba", attributes=("Smiling", "Male", "Young"))

    def data(epoch):
        return loader.celeba_loader(
            urls, batch_size=2, train=True, epoch_samples=8, seed=1000 + epoch, shuffle_buffer=8, rank=0, world_size=1
        )

    def model(seed):
        torch.manual_seed(seed)
        node = lambda b, j: nn.Sequential(nn.Conv2d(4 if b else 3, 4, 3, padding=1), nn.ReLU())
        heads = lambda task: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
        return TreeSupernet([BlockSpec(2, node), BlockSpec(len(celeba.tasks), node)], celeba.tasks, heads)

    val = lambda: loader.celeba_loader(
        shards.shard_paths(tmp_path / "shards", "val"), batch_size=3, train=False, rank=0, world_size=1
    )
    cfg = config(epochs=2, batches_per_epoch=4, checkpoint_every=3)
    whole = StreamTrainer(model(0), celeba, data, cfg, tmp_path / "whole", val_data=val)
    whole.fit()
    part = StreamTrainer(model(0), celeba, data, cfg, tmp_path / "part", val_data=val)
    with pytest.raises(Killed):
        part.fit(on_step=_kill_after(6))
    resumed = StreamTrainer(model(7), celeba, data, cfg, tmp_path / "part", val_data=val)
    resumed.fit(resume=True)
    assert_same_state(whole.module, resumed.module)
    rows = read_csv(tmp_path / "part" / "epochs.csv")
    assert (tmp_path / "whole" / "epochs.csv").read_text() == (tmp_path / "part" / "epochs.csv").read_text()
    assert int(rows[-1]["val_samples"]) == 2 and 0 <= float(rows[-1]["val.mean_accuracy"]) <= 100


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_stream_trainer import MSE, config, make_batches, tiny_supernet
    from l2b_fast.train import StreamTrainer

    def kill(trainer):
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    model, data = tiny_supernet(dropout=0.2), make_batches(5, 3, seed=10)
    StreamTrainer(model, MSE, data, config(accumulation=2, checkpoint_every=2), sys.argv[1]).fit(on_step=kill)
""")


@pytest.mark.slow  # a fresh interpreter (~6 s here); the in-process crash tests above cover the same logic
def test_sigkilled_process_resumes_exactly(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cfg = config(accumulation=2, checkpoint_every=2)
    torch.manual_seed(4321)
    resumed = StreamTrainer(tiny_supernet(seed=5, dropout=0.2), MSE, make_batches(5, 3, seed=10), cfg, tmp_path / "run")
    resumed.fit(resume=True)
    whole = StreamTrainer(tiny_supernet(dropout=0.2), MSE, make_batches(5, 3, seed=10), cfg, tmp_path / "whole")
    whole.fit()
    assert_same_state(whole.module, resumed.module)
    assert (tmp_path / "whole" / "log.csv").read_text() == (tmp_path / "run" / "log.csv").read_text()


# ------------------------------------------------------------------------------------------- bad input
def test_bad_configs():
    for bad in (
        dict(epochs=0),
        dict(epochs=2, warmup_epochs=3),
        dict(epochs=1, accumulation=0),
        dict(epochs=1, precision="fp8"),
        dict(epochs=1, optimizer="sgd"),
        dict(epochs=1, lr_weights=-1.0),
        dict(epochs=1, lr_logits=math.nan),
        dict(epochs=1, batches_per_epoch=0),
        dict(epochs=1, tau=0.0),
        dict(epochs=1, lr_schedule={"kind": "x"}),
        dict(epochs=1, compile="yes"),
        dict(epochs=1, checkpoint_every=-1),
    ):
        with pytest.raises(ValueError):
            StreamConfig(**bad)


def test_bad_trainer_input(tmp_path):
    batches = make_batches(2, 3, seed=0)
    with pytest.raises(ValueError, match="unknown tasks"):
        StreamTrainer(tiny_supernet(), MSE, batches, config(task_weights={"nope": 1.0}), tmp_path)
    with pytest.raises(ValueError, match="no loss for the model's task"):
        StreamTrainer(tiny_supernet(), {"a": nn.functional.mse_loss}, batches, config(), tmp_path)
    with pytest.raises(TypeError, match="losses must be"):
        StreamTrainer(tiny_supernet(), [nn.functional.mse_loss], batches, config(), tmp_path)
    with pytest.raises(TypeError, match="iterable of batches"):
        StreamTrainer(tiny_supernet(), MSE, 3, config(), tmp_path)
    with pytest.raises(ValueError, match="set batches_per_epoch"):
        StreamTrainer(tiny_supernet(), MSE, lambda epoch: batches, config(lr_schedule={"kind": "cosine"}), tmp_path)
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        StreamTrainer(tiny_supernet(), MSE, [batches[0][0]], config(), tmp_path).fit()
    with pytest.raises(ValueError, match="gave no batch"):
        StreamTrainer(tiny_supernet(), MSE, lambda epoch: [], config(), tmp_path / "empty").fit()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        StreamTrainer(tiny_supernet(), MSE, batches, config(), tmp_path / "none").fit(resume=True)
    StreamTrainer(tiny_supernet(), MSE, batches, config(epochs=1, warmup_epochs=0), tmp_path / "done").fit()
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['lr_weights'\]\)"):
        StreamTrainer(
            tiny_supernet(), MSE, batches, config(epochs=1, warmup_epochs=0, lr_weights=0.5), tmp_path / "done"
        ).fit(resume=True)
    with pytest.raises(FloatingPointError, match="lower the learning rates"):
        StreamTrainer(
            tiny_supernet(), MSE, [(batches[0][0] * math.inf, batches[0][1])], config(), tmp_path / "inf"
        ).fit()


def test_devices():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert (
        distributed.resolve_device("auto") == torch.device("cuda", 0)
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            distributed.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        distributed.resolve_device("gpu0")


def test_single_process_setup_initialises_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = distributed.setup("cpu")
    assert (context.rank, context.world_size, context.distributed, context.is_main, context.backend) == (
        0,
        1,
        False,
        True,
        None,
    )
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT are missing"):
        distributed.setup("cpu")


def test_step_seeds_differ_and_repeat():
    seeds = [distributed.step_seed(0, step) for step in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [distributed.step_seed(0, step) for step in range(1000)]
    assert distributed.step_seed(1, 0) != seeds[0] and distributed.step_seed(0, 0, stream=1) != seeds[0]
