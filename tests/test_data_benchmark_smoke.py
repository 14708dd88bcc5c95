"""The data-throughput benchmark runs end to end on tiny synthetic shards and writes consistent results."""

from __future__ import annotations

import csv
import json

from l2b_fast.bench import data_throughput


def test_data_throughput_writes_profile_loader_and_estimate(tmp_path, capsys):
    argv = [
        "--samples",
        "16",
        "--stored-size",
        "48",
        "--sizes",
        "32",
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--batches",
        "2",
        "--gpu-samples-per-s",
        "500",
        "--out",
        str(tmp_path),
    ]
    assert data_throughput.main(argv) == 0
    (csv_path,) = tmp_path.glob("data_taskonomy_*cores.csv")
    rows = list(csv.DictReader(csv_path.open()))
    stages = {row["stage"]: row for row in rows if row["kind"] == "stage"}
    assert set(stages) == {*data_throughput.STAGES, "total"}
    assert all(float(stages[s]["ms_per_sample"]) > 0 for s in data_throughput.STAGES)
    total = sum(float(stages[s]["ms_per_sample"]) for s in data_throughput.STAGES)
    assert abs(total - float(stages["total"]["ms_per_sample"])) < 1e-2
    loaders = {row["normalise_in"]: row for row in rows if row["kind"] == "loader"}
    assert sorted(loaders) == ["device", "worker"]
    loader = loaders["worker"]
    assert all(
        row["workers"] == "0" and float(row["samples_per_s"]) > 0 and row["skipped"] == "0" for row in loaders.values()
    )
    (estimate,) = [row for row in rows if row["kind"] == "estimate" and row["normalise_in"] == "worker"]
    per_core = float(estimate["samples_per_s_per_core"])
    assert per_core == float(loader["samples_per_s"]) and int(estimate["cores_per_gpu"]) == -(-500 // per_core)
    meta = json.loads(csv_path.with_suffix(".json").read_text())["meta"]
    assert meta["cores"] >= 1 and meta["png_decoder"] in ("pyspng", "pillow") and meta["profiled_samples"] == 16
    assert rows[0]["device"] == meta["device"]
    assert "cores to feed one GPU" in capsys.readouterr().out
