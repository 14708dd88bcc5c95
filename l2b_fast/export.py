"""The retrained tree of a run, exported for deployment: a ``torch.export`` program (``.pt2``) or an ONNX model.

What is exported is the network the trainer ran, in eval mode: the :class:`~l2b_fast.nn.treenet.TreeNet` (each
shared node computed once) wrapped as the data set's recipe wraps it (image recipes resize dense predictions to the
input's size). The batch size is dynamic; the rest of the input shape is the one the tree was retrained at. Both
formats return ``{task: tensor}`` (ONNX: one output per task, named after it, in the run's task order).

    l2b export runs/a --out tree.pt2                      # torch.export.load("tree.pt2").module()(images)
    l2b export runs/a --out tree.onnx --format onnx       # needs: pip install 'l2b_fast[export]'
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

FORMATS = {"pt2": ".pt2", "onnx": ".onnx"}
#: The ONNX opset written by default, and the lowest the exporter (``torch.onnx.export(dynamo=True)``) translates to.
DEFAULT_OPSET = 18
MIN_OPSET = 18
#: The name of the metadata stored beside the program (pt2: an extra file; ONNX: a metadata property).
METADATA_NAME = "l2b_fast.json"
#: ONNX files over 2 GiB must keep their weights in a separate file; below this size they stay in one file.
_SINGLE_FILE_BYTES = 1_800_000_000
_EXAMPLE_BATCH = 2  # the traced batch; any batch >= 1 runs (the batch dimension is symbolic)


def max_opset() -> int:
    from torch.onnx import _constants

    return _constants.ONNX_MAX_OPSET


def check_request(out: str | Path, format: str, opset: int | None, overwrite: bool) -> Path:
    """``out`` as a Path if it can be written in ``format``; else ValueError in one line (before any work)."""
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    suffix = FORMATS[format]
    if out.suffix != suffix:
        others = [name for name, other in FORMATS.items() if other == out.suffix]
        hint = f" (or give --format {others[0]})" if others else ""
        raise ValueError(f"--out {out}: a {format} export is written to a {suffix} file{hint}")
    if format != "onnx" and opset is not None:
        raise ValueError("--opset is for --format onnx")
    if format == "onnx" and opset is not None:
        if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
            raise ValueError(f"--opset {opset!r}: the ONNX exporter writes opsets {MIN_OPSET} to {max_opset()}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file name ending in {suffix}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists: use --overwrite to replace it, or another --out")
    return out


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(
            f"ONNX export needs the {' and '.join(missing)} package(s): pip install 'l2b_fast[export]'"
        ) from None


def _metadata(trained, dtype: torch.dtype) -> dict:
    return {
        "name": trained.config["name"],
        "tasks": list(trained.net.tasks),
        "input_shape": ["batch", *trained.spec.input_shape],
        "dtype": str(dtype).removeprefix("torch."),
        "tree": trained.tree.to_dict(),
        "torch": torch.__version__,
    }


@contextlib.contextmanager
def _quiet_onnx_registry():
    """The ONNX exporter logs a warning per torchvision operator it cannot register; none is used here."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_program(net: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``net`` (eval mode) traced by ``torch.export`` with a symbolic batch size (the first input dimension)."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(net.eval(), (example,), dynamic_shapes=({0: batch},))


def _write_pt2(program, path: Path, metadata: dict) -> list[Path]:
    torch.export.save(program, path, extra_files={METADATA_NAME: json.dumps(metadata)})
    return [path]


def _write_onnx(program, example: torch.Tensor, path: Path, metadata: dict, opset: int, weight_bytes: int):
    with _quiet_onnx_registry():
        onnx_program = torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=metadata["tasks"],
            opset_version=opset,
            verbose=False,
        )
    onnx_program.model.metadata_props[METADATA_NAME] = json.dumps(metadata)
    external = weight_bytes > _SINGLE_FILE_BYTES
    onnx_program.save(path, external_data=external)
    return [path] + ([path.with_name(path.name + ".data")] if external else [])


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    format: str = "pt2",
    opset: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Exports the retrained tree of ``run`` (a search folder holding ``retrain/``, or a retrain folder) to ``out``.

    ``format="pt2"``: ``torch.export.save`` of the program (load with ``torch.export.load(out).module()``);
    ``"onnx"``: ``torch.onnx.export(..., dynamo=True)`` at ``opset`` (default :data:`DEFAULT_OPSET`), input
    ``images``, one output per task. The batch size is dynamic. Refused with ValueError (one line, nothing
    written): a run without a retrained tree, an existing ``out`` unless ``overwrite``, a suffix that is not the
    format's. Returns what was written: format, files, tasks, input shape, dtype, parameters, opset."""
    from l2b_fast import pipeline
    from l2b_fast.nn import parameter_count

    out = check_request(out, format, opset, overwrite)
    if format == "onnx":
        _require_onnx()
        opset = DEFAULT_OPSET if opset is None else opset
    trained = pipeline.load_trained(run)
    dtype = next(trained.net.parameters()).dtype
    example = trained.spec.example_input(_EXAMPLE_BATCH, generator=torch.Generator().manual_seed(0), dtype=dtype)
    program = export_program(trained.net, example)
    metadata = _metadata(trained, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in trained.net.parameters())
    # written into a fresh folder beside ``out`` and moved into place: a failed export leaves nothing behind
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = staging / out.name
        if format == "pt2":
            files = _write_pt2(program, staged, metadata)
        else:
            files = _write_onnx(program, example, staged, metadata, opset, weight_bytes)
        written = []
        for file in files:
            os.replace(file, out.parent / file.name)
            written.append(out.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "format": format,
        "files": [str(path) for path in written],
        "run": str(trained.folder),
        "name": metadata["name"],
        "tasks": metadata["tasks"],
        "input_shape": metadata["input_shape"],
        "dtype": metadata["dtype"],
        "parameters": parameter_count(trained.net),
        "opset": opset,
        "exporter": "torch.export.export" if format == "pt2" else "torch.onnx.export(dynamo=True)",
    }


def read_metadata(path: str | Path) -> dict:
    """The metadata stored in an exported file (tasks, input shape, dtype, tree); ValueError if it holds none."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {entry.key: entry.value for entry in onnx.load(path, load_external_data=False).metadata_props}
        if METADATA_NAME not in props:
            raise ValueError(f"{path} was not written by l2b export (no {METADATA_NAME} metadata)")
        return json.loads(props[METADATA_NAME])
    extra = {METADATA_NAME: ""}
    torch.export.load(path, extra_files=extra)
    if not extra[METADATA_NAME]:
        raise ValueError(f"{path} was not written by l2b export (no {METADATA_NAME} metadata)")
    return json.loads(extra[METADATA_NAME])
