"""Two CPU ranks under a real ``torchrun`` (gloo, env:// rendezvous): shared trees, identical weights, frozen
logits under DDP, rank-0-only files, exact resume after a crash, every evaluation sample counted once.

The ranks run once (a module fixture launches this file under torchrun); each test checks part of what they
saved. The global RNG is seeded differently on each rank, so equal trees can only come from the shared
per-step seed, not from identical RNG states.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from l2b_fast import datasets  # noqa: E402
from l2b_fast.nn import BlockSpec, Branching, TreeSupernet  # noqa: E402
from l2b_fast.train import StreamTrainer, distributed  # noqa: E402
from test_stream_trainer import HIDDEN, IN, MSE, TASKS, Killed, _kill_after, config, make_batches, tiny_supernet  # noqa: E402

WORLD = 2
PER_RANK = 3  # samples per rank and batch; the global batch is WORLD * PER_RANK


def _rank_part(batches: list, rank: int) -> list:
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return [(x[rows], {t: y[t][rows] for t in TASKS}) for x, y in batches]


def _record_trees(net) -> list:
    """Each training forward's sampled parent per child of every block with more than one parent (deduced from
    which parent each child's input equals)."""
    records = []

    def hook(module, args, output):
        if module.training and module.mode != "eval":
            parents = args[0]
            records.append(
                [
                    next(i for i in range(parents.shape[0]) if torch.equal(output[j], parents[i]))
                    for j in range(output.shape[0])
                ]
            )

    for module in net.modules():
        if isinstance(module, Branching) and module.logits.shape[0] > 1:
            module.register_forward_hook(hook)
    return records


def _attribute_batches(sizes: list[int], seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, IN, generator=generator, dtype=torch.float64),
            {"attributes": torch.randint(0, 2, (size, 40), generator=generator).double()},
        )
        for size in sizes
    ]


def _attribute_supernet(tasks) -> TreeSupernet:
    torch.manual_seed(0)
    blocks = [
        BlockSpec(2, lambda b, j: nn.Linear(IN, HIDDEN)),
        BlockSpec(len(tasks), lambda b, j: nn.Linear(HIDDEN, 1)),
    ]
    return TreeSupernet(blocks, tasks).double()


def run_rank(out: Path) -> None:
    context = distributed.setup("cpu")
    rank = context.rank
    assert (context.world_size, context.backend, context.distributed) == (WORLD, "gloo", True)
    torch.manual_seed(1000 + rank)  # different global RNG states on the ranks
    results = {}

    # A user-wrapped DDP supernet: warmup (frozen logits) then search, with accumulation.
    global_batches = make_batches(4, WORLD * PER_RANK, seed=3)
    net = tiny_supernet(seed=0)
    trees = _record_trees(net)
    ddp = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=False)
    settings = dict(epochs=2, warmup_epochs=1, accumulation=2, log_every=1)
    trainer = StreamTrainer(ddp, MSE, _rank_part(global_batches, rank), config(**settings), out / f"wrapped-rank{rank}")
    warm_logits = []
    trainer.fit(
        on_step=lambda t: (
            warm_logits.append([b.logits.detach().clone() for b in net.branchings]) if t.step == 2 else None
        )
    )
    results.update(
        trees=trees,
        state=net.state_dict(),
        warm_logits=warm_logits[0],
        wrapped_files=sorted(os.listdir(out / "wrapped-rank0")) if rank == 0 else None,
    )
    if rank == 0:  # one process on the global batches: what the two ranks together must compute
        single = StreamTrainer(
            tiny_supernet(seed=0),
            MSE,
            global_batches,
            config(**settings),
            out / "single",
            context=distributed.DistContext(),
        )
        single.fit()
        results["single_state"] = single.module.state_dict()

    # Crash and exact resume; the trainer wraps the model itself. Dropout differs per rank.
    cfg = config(epochs=3, accumulation=2, checkpoint_every=2)
    own = make_batches(5, PER_RANK, seed=20 + rank)
    whole = StreamTrainer(tiny_supernet(dropout=0.2), MSE, own, cfg, out / "whole")
    whole.fit()
    part = StreamTrainer(tiny_supernet(dropout=0.2), MSE, own, cfg, out / "part")
    try:
        part.fit(on_step=_kill_after(5))
    except Killed:
        pass
    torch.manual_seed(777 + rank)
    resumed = StreamTrainer(tiny_supernet(seed=5 + rank, dropout=0.2), MSE, own, cfg, out / "part")
    resumed.fit(resume=True)
    results.update(whole=whole.module.state_dict(), resumed=resumed.module.state_dict(), resumed_step=resumed.step)

    # Evaluation: ranks hold different numbers of samples (8 + 1 and 2), each counted once.
    val = (
        [make_batches(2, 4, seed=30)[0], make_batches(2, 4, seed=30)[1], make_batches(1, 1, seed=31)[0]]
        if rank == 0
        else make_batches(1, 2, seed=32)
    )
    evaluation = whole.evaluate(val)
    results.update(val_samples=evaluation.samples, val_losses=evaluation.losses)
    if rank == 0:
        everything = val + make_batches(1, 2, seed=32)
        alone = StreamTrainer(whole.module, MSE, own, cfg, out / "alone", context=distributed.DistContext())
        results["val_alone"] = alone.evaluate(everything).losses

    # A data set's metrics (CelebA accuracy, whose accumulator has counts only) over uneven ranks: 3 + 3 and 2 samples.
    celeba = datasets.get("celeba", attributes=("Smiling", "Male", "Young"))
    val = _attribute_batches([3, 3], seed=40) if rank == 0 else _attribute_batches([2], seed=41)
    evaluator = StreamTrainer(_attribute_supernet(celeba.tasks), celeba, val, config(epochs=1), out / "celeba")
    evaluation = evaluator.evaluate(val)
    results.update(
        celeba_samples=(evaluation.samples, evaluation.metrics.samples),
        celeba=evaluation.metrics.compute(),
        celeba_losses=evaluation.losses,
    )
    if rank == 0:
        alone = StreamTrainer(
            _attribute_supernet(celeba.tasks),
            celeba,
            val,
            config(epochs=1),
            out / "celeba-alone",
            context=distributed.DistContext(),
        )
        everything = alone.evaluate(val + _attribute_batches([2], seed=41))
        results.update(celeba_alone=everything.metrics.compute(), celeba_alone_losses=everything.losses)
    torch.save(results, out / f"rank{rank}.pt")
    # DDP reducers must die before the process group (see distributed.cleanup), not at the return.
    del ddp, trainer, whole, part, resumed, evaluator
    distributed.cleanup()


def _run_ranks(out: Path, timeout: float) -> subprocess.CompletedProcess:
    """``torchrun`` of this file with WORLD CPU ranks writing to ``out``; TimeoutExpired after ``timeout`` s."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        __file__,
        str(out),
    ]
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("torchrun")
    finished = _run_ranks(out, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    results = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    results[0]["out"] = out
    return results


def test_ranks_sample_the_same_tree_every_step(ranks):
    trees = [result["trees"] for result in ranks]
    assert len(trees[0]) == 2 * 4 * 2  # 2 epochs x 4 batches x 2 blocks with several parents
    assert trees[0] == trees[1]
    assert len({tuple(tree) for tree in trees[0]}) > 2  # the trees do change from step to step
    steps = [trees[0][k : k + 2] for k in range(0, len(trees[0]), 2)]
    assert steps[0::2] == steps[1::2]  # both accumulated batches of a step route through one tree


def test_ddp_wrapped_supernet_keeps_its_logits_frozen_in_warmup(ranks):
    for result in ranks:
        assert all(torch.equal(logits, torch.zeros_like(logits)) for logits in result["warm_logits"])
        assert any(value.abs().sum() > 0 for key, value in result["state"].items() if key.endswith(".logits"))


def test_ranks_end_identical_and_equal_one_process_on_the_global_batch(ranks):
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        torch.testing.assert_close(value, ranks[0]["single_state"][key], rtol=1e-10, atol=1e-12, msg=key)


def test_only_rank_zero_writes(ranks):
    out = ranks[0]["out"]
    assert {"log.csv", "epochs.csv", "checkpoints"} <= set(ranks[0]["wrapped_files"])
    assert not (out / "wrapped-rank1").exists()


def test_crashed_distributed_run_resumes_exactly(ranks):
    out = ranks[0]["out"]
    for result in ranks:
        assert result["resumed_step"] == 9
        for key, value in result["whole"].items():
            assert torch.equal(value, result["resumed"][key]), key
    for name in ("log.csv", "epochs.csv"):
        assert (out / "whole" / name).read_text() == (out / "part" / name).read_text()


def test_evaluation_counts_every_sample_once(ranks):
    assert ranks[0]["val_samples"] == ranks[1]["val_samples"] == 11
    for task, value in ranks[0]["val_alone"].items():
        assert ranks[0]["val_losses"][task] == pytest.approx(value, rel=1e-12)
        assert ranks[1]["val_losses"][task] == ranks[0]["val_losses"][task]


def test_metrics_are_summed_over_ranks(ranks):
    for result in ranks:
        assert result["celeba_samples"] == (8, 8)
        assert result["celeba"] == ranks[0]["celeba_alone"]
        for task, value in ranks[0]["celeba_alone_losses"].items():
            assert result["celeba_losses"][task] == pytest.approx(value, rel=1e-12)


# ------------------------------------------------------------------------------------------- teardown
STRESS_RUNS = 10


@pytest.mark.slow  # about 15 s a run on two CPU cores
def test_two_rank_job_exits_every_time(tmp_path):
    """The teardown (barrier, reducers released, group destroyed) ends every run: a hang at exit would be
    stopped by the hard timeout and fail the test, naming the run."""
    for run in range(STRESS_RUNS):
        try:
            finished = _run_ranks(tmp_path / f"run{run}", timeout=180)
        except subprocess.TimeoutExpired as expired:
            pytest.fail(f"run {run + 1} of {STRESS_RUNS} hung (killed after {expired.timeout} s)")
        assert finished.returncode == 0, f"run {run + 1}: " + finished.stderr[-3000:]
        assert all((tmp_path / f"run{run}" / f"rank{rank}.pt").is_file() for rank in range(WORLD))


def test_cleanup_releases_a_surviving_ddp_model_and_destroys_the_group(tmp_path):
    """A real one-rank gloo group: a DDP model still referenced at cleanup loses its reducer while the group is
    alive, so the group's last holder is Python (whose release frees the GIL), not a reducer's destructor."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        ddp(torch.randn(4, 3)).sum().backward()  # a reducer that has run
        assert "reducer" in ddp.__dict__
    finally:
        distributed.cleanup()
    assert not dist.is_initialized()
    assert "reducer" not in ddp.__dict__ and "logger" not in ddp.__dict__
    distributed.cleanup()  # nothing initialised: a no-op


class _FakeGroup:
    """The torch.distributed calls cleanup makes, recorded in order."""

    def __init__(self, barrier_error: Exception | None = None):
        self.calls: list[str] = []
        self.barrier_error = barrier_error

    def install(self, monkeypatch) -> None:
        fake = distributed.dist
        monkeypatch.setattr(fake, "is_available", lambda: True)
        monkeypatch.setattr(fake, "is_initialized", lambda: "destroy" not in self.calls)
        monkeypatch.setattr(fake, "get_world_size", lambda group=None: WORLD)
        monkeypatch.setattr(fake, "get_backend", lambda group=None: "gloo")
        monkeypatch.setattr(fake, "monitored_barrier", self._barrier)
        monkeypatch.setattr(fake, "destroy_process_group", lambda group=None: self.calls.append("destroy"))
        monkeypatch.setattr(distributed, "release_ddp_reducers", lambda: self.calls.append("release") or 0)

    def _barrier(self, group=None, timeout=None, wait_all_ranks=False):
        self.calls.append(f"barrier {timeout.total_seconds():g}s")
        if self.barrier_error is not None:
            raise self.barrier_error


def test_cleanup_order_barrier_release_destroy(monkeypatch):
    group = _FakeGroup()
    group.install(monkeypatch)
    distributed.cleanup(timeout_seconds=7)
    assert group.calls == ["barrier 7s", "release", "destroy"]


def test_cleanup_after_a_failure_skips_the_barrier(monkeypatch):
    group = _FakeGroup()
    group.install(monkeypatch)
    distributed.cleanup(failed=True)  # the other ranks may be inside another collective
    assert group.calls == ["release", "destroy"]


def test_a_barrier_timeout_still_destroys_the_group_and_is_raised(monkeypatch):
    group = _FakeGroup(barrier_error=RuntimeError("rank 1 failed to pass monitoredBarrier in 7000 ms"))
    group.install(monkeypatch)
    with pytest.raises(RuntimeError, match="rank 1 failed to pass"):
        distributed.cleanup(timeout_seconds=7)
    assert group.calls == ["barrier 7s", "release", "destroy"]


if __name__ == "__main__":  # one rank, started by torchrun from the fixture above
    run_rank(Path(sys.argv[1]))
