"""pytest-benchmark suite: the Taskonomy sample transform, stage by stage, fast paths beside their references.

    python -m pytest benchmarks/test_data_benchmark.py --benchmark-only

Loader throughput with workers and the per-stage profile as CSV/JSON: ``python -m l2b_fast.bench.data_throughput``.
"""

from __future__ import annotations

import numpy as np
import pytest

from l2b_fast.data import shards
from l2b_fast.datasets.taskonomy import protocol as T
from l2b_fast.datasets.taskonomy import synthetic as synthetic_taskonomy

PROTOCOL = T.TaskonomyProtocol()


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """The members of one synthetic 256x256 view, as stored in a shard."""
    out = tmp_path_factory.mktemp("shards")
    synthetic_taskonomy.generate(out, 1, 256, splits=(("train", 1.0),))
    import webdataset as wds

    (sample,) = list(wds.DataPipeline(wds.SimpleShardList(shards.shard_paths(out, "train")), wds.tarfile_to_samples()))
    return {member: sample[f"{member}.png"] for member in PROTOCOL.members}


@pytest.fixture(scope="module")
def raw(encoded):
    return {member: shards.decode_png(data) for member, data in encoded.items()}


@pytest.mark.parametrize("decoder", ["pyspng", "pillow"])
def test_decode(benchmark, encoded, decoder):
    if decoder == "pyspng" and shards._pyspng is None:
        pytest.skip("pyspng not installed")
    benchmark(lambda: [shards.decode_png(data, decoder) for data in encoded.values()])


@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("implementation", ["augment", "augment_reference"])
def test_augment(benchmark, raw, size, implementation):
    resized = T.resize_raw(raw, size)
    function = getattr(T, implementation)
    rng = np.random.default_rng(0)
    benchmark(lambda: function(resized, rng, scale=PROTOCOL.train_scale, crop=size, flip=True))


@pytest.mark.parametrize("size", [128, 256])
def test_normalise(benchmark, raw, size):
    augmented = T.augment(T.resize_raw(raw, size), np.random.default_rng(0), crop=size)
    benchmark(lambda: PROTOCOL.to_targets(augmented))
