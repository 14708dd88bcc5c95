"""What every benchmark records beside its numbers: the device, the versions, and CSV + JSON files."""

from __future__ import annotations

import csv
import json
import platform
import time
from pathlib import Path

import torch

from l2b_fast import __version__, backends


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "l2b_fast": __version__,
        "backends": {name: reason is None for name, reason in backends.available(device.type).items()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_results(
    rows: list[dict], meta: dict, out_dir: Path, stem: str, tags: tuple[str, ...] = ("device", "torch", "triton")
) -> tuple[Path, Path]:
    """``{stem}.csv`` (every row plus the ``tags`` fields of ``meta``) and ``{stem}.json`` (meta + rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*fields, *tags])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{tag: meta.get(tag) for tag in tags}})
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return csv_path, json_path
