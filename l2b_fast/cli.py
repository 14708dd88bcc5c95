"""``l2b``: search a tree, retrain it, show it.

l2b search --preset synthetic-a --seed 0 --out runs/a      # writes runs/a/tree.json, tree.png, logs, checkpoints
l2b search --preset synthetic-a --seed 0 --out runs/a --resume   # continue a killed run
l2b retrain --tree runs/a/tree.json                         # from scratch, into runs/a/retrain
l2b show runs/a/tree.json                                   # text + picture
l2b search --preset taskonomy-resnet34 --data shards/ --out runs/t [--set search.epochs=5 ...]   # shard data
l2b retrain --tree runs/t/tree.json                         # at the preset's retrain size, into runs/t/retrain
l2b eval runs/t --split test                                # the paper's table; writes runs/t/eval.json
l2b export runs/t --out tree.pt2                            # the retrained tree for deployment (or .onnx)
l2b presets [--print NAME]                                  # list presets (what each is) / print one to edit
l2b --version
l2b data taskonomy --root RAW --split tiny --out shards/    # raw Taskonomy -> webdataset shards
l2b data celeba --root RAW --out shards/                    # raw CelebA (any usual layout) -> shards
l2b data synthetic-taskonomy --out shards/ --n 2000         # the embedded default data
l2b data synthetic-celeba --out shards/ --n 2000            # synthetic faces with the 40 CelebA attributes
l2b bench search --preset cpu --out benchmarks/results      # search-step images/s and memory of the paper's models
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch


def check_device(name: str) -> torch.device:
    """The torch device ``name`` if this torch can use it; else ``ValueError`` in one line."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device {name!r} is not available: {why} (torch {torch.__version__}); use --device cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:  # e.g. a missing device index or backend
        first_sentence = str(error).splitlines()[0].split(". ")[0]
        raise ValueError(
            f"--device {name!r} is not available in this torch {torch.__version__} ({first_sentence})"
        ) from None
    return device


EXIT_CODES = """exit codes:
  0    done
  1    the run failed (a loss that became NaN or infinite, unreadable data, another l2b process in the same OUT)
  2    usage or configuration error: nothing was written
  130  interrupted (Ctrl-C): the last checkpoint is kept; the line printed names the command that resumes the run"""

SAFE_RESUME_KEYS = ("search.epochs", "retrain.epochs")  # settings a resumed run may change


class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph texts as argparse does; keeps texts of several lines (the exit codes) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class RunFailed(RuntimeError):
    """A run that could not go on (exit code 1)."""


_locks: list = []  # open lock files: held until the process ends (the kernel releases them if it is killed)


def _lock_run(out: Path) -> None:
    """One l2b process per run folder: an exclusive lock on ``OUT/.lock`` (rank 0), refused in one line."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    handle = open(out / ".lock", "a+")  # noqa: SIM115  held open for the process's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunFailed(
            f"{out} is in use by another l2b process ({owner}): wait for it, or use another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    _locks.append(handle)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the data, initialisation and sampling (default 0; on --resume: the run's)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help=(
            "continue the run in OUT from its last checkpoint (after a kill or Ctrl-C) with the settings it was "
            "started with; the only change allowed is more epochs (--set search.epochs=N or retrain.epochs=N)"
        ),
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is fastest for the small synthetic nets)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even if OUT holds a run (its checkpoint and logs are replaced)",
    )


def _add_stream_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=(
            "presets of shard data: shard directory of `l2b data ...` (default for search: small synthetic shards "
            "made in OUT/synthetic-data; for retrain and eval: the search's)"
        ),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "override a config setting by its dotted key, value as TOML (repeatable), e.g. --set search.epochs=3 "
            "--set model.width=0.5"
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    from l2b_fast import __version__, datasets

    parser = argparse.ArgumentParser(
        prog="l2b",
        description="Learning to Branch: search a multi-task tree, retrain it, show it.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"l2b_fast {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser(
        "search",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
        help="train the supernet, derive and prune the tree",
        description=(
            "Train the tree supernet with gumbel-softmax branching, derive the tree (argmax, paper Eq. 7), prune it "
            "and write OUT/tree.json, OUT/tree.png/.svg, OUT/probabilities.png/.svg, logs, checkpoints and "
            "OUT/summary.json."
        ),
    )
    source = search.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a built-in preset (see `l2b presets`); not needed with --resume")
    source.add_argument("--config", type=Path, help="a TOML config file (e.g. an edited copy of a preset)")
    search.add_argument("--out", type=Path, required=True, help="output directory")
    search.add_argument(
        "--dry-run",
        action="store_true",
        help="write nothing, train nothing: print the supernet's parameters, FLOPs per step and estimated peak memory "
        "per GPU at the configured batch and precision, and whether it fits the device (a CUDA --device: its memory; "
        "otherwise an 80 GB GPU)",
    )
    _add_stream_options(search)
    _add_common(search)

    retrain = commands.add_parser(
        "retrain",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
        help="train the derived tree from scratch",
        description=(
            "Build the derived tree's network with fresh weights and train it (config from the search directory "
            "unless given)."
        ),
    )
    retrain.add_argument("--tree", type=Path, required=True, help="tree.json written by `l2b search`")
    retrain_source = retrain.add_mutually_exclusive_group()
    retrain_source.add_argument("--preset", help="config preset (default: the config saved next to the tree)")
    retrain_source.add_argument("--config", type=Path, help="config TOML file")
    retrain.add_argument("--out", type=Path, default=None, help="output directory (default: <tree dir>/retrain)")
    retrain.add_argument(
        "--no-baselines",
        action="store_true",
        help=(
            "train only the tree, not the two baselines (all tasks sharing every layer; every task alone); default: "
            "the config's [retrain] baselines (true if unset)"
        ),
    )
    _add_stream_options(retrain)
    _add_common(retrain)

    evaluate = commands.add_parser(
        "eval",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
        help="test a retrained tree: the paper's table",
        description=(
            "Evaluate the retrained tree of RUN (a search folder holding retrain/, or a retrain folder) on a split "
            "of the shards; print the data set's table (the paper's rows where it has them) with our row and write "
            "RUN/eval.json."
        ),
    )
    evaluate.add_argument("run", type=Path, help="the search (or retrain) output directory")
    evaluate.add_argument("--data", type=Path, default=None, help="shard directory (default: the data the run used)")
    evaluate.add_argument("--split", default="test", help="split of the shards (default test)")
    evaluate.add_argument("--device", default="cpu", help="torch device (default cpu)")
    evaluate.add_argument("--threads", type=int, default=None, help="CPU threads for torch")

    export = commands.add_parser(
        "export",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
        help="export a retrained tree for deployment (torch.export .pt2 or ONNX)",
        description=(
            "Export the retrained tree of RUN (a search folder holding retrain/, or a retrain folder) in eval mode "
            "with a dynamic batch size: a torch.export program (load it with torch.export.load(FILE).module(), which "
            "returns {task: tensor}) or an ONNX model (input 'images', one output per task)."
        ),
    )
    export.add_argument("run", type=Path, help="the search (or retrain) output directory")
    export.add_argument(
        "--out", type=Path, required=True, help="the file to write: FILE.pt2, or FILE.onnx with --format onnx"
    )
    export.add_argument("--format", choices=("pt2", "onnx"), default="pt2", help="pt2 (default) or onnx")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18); only with --format onnx")
    export.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    export.add_argument("--threads", type=int, default=None, help="CPU threads for torch")

    show = commands.add_parser(
        "show",
        help="print a tree and draw it",
        description="Print a tree.json as text and write its picture (PNG and SVG).",
    )
    show.add_argument("tree", type=Path, help="tree.json")
    show.add_argument("--out", type=Path, default=None, help="picture path without suffix (default: next to the tree)")

    data = commands.add_parser(
        "data",
        help="make or convert webdataset shards",
        description="Shards for streaming training (schema: docs/data-schema.md).",
    )
    data_commands = data.add_subparsers(dest="data_command", required=True)
    for recipe in datasets.recipes():
        for command in recipe.data_commands:
            command.add_arguments(
                data_commands.add_parser(command.name, help=command.help, description=command.description)
            )

    presets = commands.add_parser(
        "presets",
        help="list presets (with what each is) or print one",
        description="List the built-in presets with a line on what each one is, or print one to copy and edit.",
    )
    presets.add_argument("--print", dest="print_name", metavar="NAME", help="print this preset's TOML")

    from l2b_fast.bench import search_step

    bench = commands.add_parser(
        "bench",
        help="benchmarks (CSV/JSON/PNG tagged with device and versions)",
        description="Benchmarks of whole training steps.",
    )
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    search_step.add_arguments(
        bench_commands.add_parser(
            "search",
            help="images/s and peak memory of a search step: naive, per_child, grouped, static floor",
            description=search_step.__doc__.splitlines()[0],
        )
    )
    return parser


def _config_for(args) -> dict:
    from l2b_fast import config as configs

    if getattr(args, "preset", None) or getattr(args, "config", None):
        return configs.load_config(preset=args.preset, path=args.config, overrides=args.overrides)
    saved = args.tree.parent / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"no config.json next to {args.tree}: give --preset or --config")
    config = configs.apply_overrides(json.loads(saved.read_text()), args.overrides)
    configs.check_config(config, str(saved))
    return config


def _is_main_rank() -> bool:
    from l2b_fast.train import distributed

    return distributed.is_main_process()


def _check_data_option(recipe, config: dict, data: Path | None, splits: tuple[str, ...]) -> None:
    if data is not None and not recipe.reads_shards:
        raise ValueError(f"--data is for shard data; {config['name']} makes its own data")
    recipe.check_data(config, data, splits)  # before anything is written


def _search(args) -> int:
    from l2b_fast import config as configs
    from l2b_fast import pipeline, viz

    _refuse_to_clobber(args.out, args)
    if args.resume:
        config, run = _resumed_config(args)
    else:
        if args.preset is None and args.config is None:
            raise ValueError("give --preset or --config (or --resume to continue the run in --out)")
        config, run = configs.load_config(preset=args.preset, path=args.config, overrides=args.overrides), {}
    seed = _resumed_value("--seed", args.seed, run.get("seed"), 0)
    data = _resumed_value("--data", args.data, None if run.get("data") is None else Path(run["data"]), None)
    recipe = pipeline.recipe_of(config)
    _check_data_option(recipe, config, data, ("train",))
    if args.device != "auto":
        check_device(args.device)
    _check_device_settings(config, ("search",), args.device)
    if args.dry_run:
        return _dry_run(config, recipe, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if _is_main_rank():
        _lock_run(args.out)
        (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (args.out / "run.json").write_text(
            json.dumps({"seed": seed, "data": None if data is None else str(data)}) + "\n"
        )
    summary = pipeline.search(
        config, args.out, data, seed=seed, resume=args.resume, progress=not args.quiet, device=args.device
    )
    if _is_main_rank():
        timing = summary["timing"]
        print(viz.tree_text(json.loads((args.out / "tree.json").read_text())))
        print(
            f"supernet parameters {summary['supernet_parameters']:,}, derived tree "
            f"{summary['tree_parameters']:,} ({summary['tree_flops']:,} FLOPs per sample); {timing['seconds']} s, "
            f"{timing['images_per_second']} images/s"
        )
        for line in pipeline.budget_lines(summary):
            print(line)
        for line in recipe.report_lines(summary):
            print(line)
        print(f"wrote {args.out}/tree.json, tree.png, tree.svg, probabilities.png, log.csv, epochs.csv, summary.json")
    return 0


def _check_device_settings(config: dict, stages: tuple[str, ...], device: str) -> None:
    """Settings the device cannot honour, refused before anything is written (the trainer refuses them too)."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    for stage in stages:
        if (config.get(stage) or {}).get("cuda_graph") and kind != "cuda":
            raise ValueError(f"{stage}.cuda_graph needs a CUDA device, not {kind} (--device cuda, or leave it out)")


def _dry_run(config: dict, recipe, device: str) -> int:
    """``l2b search --dry-run``: the size of one search step of the config's supernet, nothing trained or written."""
    from l2b_fast.bench.estimate import estimate, format_estimate

    section = config["search"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    batch = max(1, section["batch_size"] // world_size)
    precision = "fp32" if section.get("precision", "fp32") == "fp32" else "bf16"  # fp16 holds as many bytes as bf16
    execution = "per_child" if config["model"].get("execution", "auto") == "per_child" else "grouped"
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else device)
    if target.type == "cuda":
        memory, where = (
            torch.cuda.get_device_properties(target).total_memory / 2**30,
            torch.cuda.get_device_name(target),
        )
    else:
        memory, where = 80.0, "an 80 GB GPU (no CUDA --device given)"
    result = estimate(
        recipe.model_spec(config, section), batch, precision, execution=execution, device_memory_gib=memory
    )
    print(f"{config['name']}: search step per GPU ({world_size} rank(s)), checked against {where}")
    print(format_estimate(result))
    return 0


def _resumed_config(args) -> tuple[dict, dict]:
    """The config and ``run.json`` a run in ``--out`` was started with; ``--set`` may only lengthen it."""
    from l2b_fast import config as configs

    saved_path = args.out / "config.json"
    if not saved_path.is_file():
        raise ValueError(f"{args.out} holds no config.json of a run to resume")
    saved = json.loads(saved_path.read_text())
    unsafe = [item for item in args.overrides if item.partition("=")[0].strip() not in SAFE_RESUME_KEYS]
    if unsafe:
        raise ValueError(
            f"--resume continues the run as it was started; of --set it takes only {', '.join(SAFE_RESUME_KEYS)} "
            f"(got {', '.join(unsafe)})"
        )
    if args.preset is not None or args.config is not None:
        given = configs.load_config(preset=args.preset, path=args.config, overrides=args.overrides)
        differs = sorted(
            section
            for section in set(given) | set(saved)
            if given.get(section) != saved.get(section) and section not in ("search", "retrain")
        )
        for section in ("search", "retrain"):
            keys = set(given.get(section) or {}) | set(saved.get(section) or {})
            differs += [
                f"{section}.{key}"
                for key in sorted(keys)
                if f"{section}.{key}" not in SAFE_RESUME_KEYS
                and (given.get(section) or {}).get(key) != (saved.get(section) or {}).get(key)
            ]
        if differs:
            raise ValueError(
                f"{args.out} was started with another configuration (differs in {', '.join(differs)}): resume it "
                "with only --out and --resume"
            )
    config = configs.apply_overrides(saved, args.overrides)
    configs.check_config(config, str(saved_path))
    run_path = args.out / "run.json"
    return config, (json.loads(run_path.read_text()) if run_path.is_file() else {})


def _resumed_value(option: str, given, saved, default):
    """``given`` (a command-line value, None if absent), else the run's ``saved`` value, else ``default``; a given
    value that contradicts the run's is refused."""
    if given is not None and saved is not None and given != saved:
        raise ValueError(f"the run was started with {option} {saved}, not {given}: leave {option} out to resume it")
    return given if given is not None else saved if saved is not None else default


def _retrain(args) -> int:
    from l2b_fast import pipeline
    from l2b_fast.tree import Tree

    tree = Tree.load(args.tree)
    config = _config_for(args)
    recipe = pipeline.recipe_of(config)
    data = args.data
    if data is None and recipe.reads_shards:
        data = pipeline.recorded_data(args.tree.parent)
    _check_data_option(recipe, config, data, ("train",))
    out = args.out or args.tree.parent / "retrain"
    if args.device != "auto":
        check_device(args.device)
    _check_device_settings(config, ("retrain",) if config.get("retrain") else ("search",), args.device)
    _refuse_to_clobber(out, args)
    if _is_main_rank():
        out.mkdir(parents=True, exist_ok=True)
        _lock_run(out)
    baselines = False if args.no_baselines else None
    summary = pipeline.retrain(
        config,
        tree,
        out,
        data,
        seed=0 if args.seed is None else args.seed,
        resume=args.resume,
        progress=not args.quiet,
        device=args.device,
        baselines=baselines,
    )
    if _is_main_rank():
        final, timing = summary["final"], summary["timing"]
        print(
            f"retrained tree: {summary['parameters']:,} parameters, train loss {final['loss']:.4f}"
            + (f", validation loss {final['val_loss']:.4f}" if "val_loss" in final else "")
            + f"; {timing['seconds']} s, {timing['images_per_second']} images/s"
        )
        for line in recipe.retrain_lines(summary):
            print(line)
        print(
            f"wrote {out}/retrain_summary.json, log.csv, epochs.csv, checkpoints/last.pt"
            + (", baselines/" if len(summary["models"]) > 1 else "")
        )
    return 0


def _evaluate(args) -> int:
    from l2b_fast import pipeline

    if args.device != "auto":
        check_device(args.device)
    result = pipeline.evaluate(args.run, args.data, split=args.split, device=args.device)
    if _is_main_rank():
        print(result["table"])
        from l2b_fast.data.loader import sample_count_message

        if (incomplete := sample_count_message(result)) is not None:  # missing = skipped + never read
            print(f"warning: {incomplete}")
        print(f"wrote {args.run}/eval.json")
    return 0


def _export(args) -> int:
    from l2b_fast.export import export_run

    result = export_run(args.run, args.out, format=args.format, opset=args.opset, overwrite=args.overwrite)
    shape = " x ".join(str(side) for side in result["input_shape"])
    opset = f", opset {result['opset']}" if result["opset"] is not None else ""
    print(
        f"{result['name']}: {len(result['tasks'])} tasks, input {shape} ({result['dtype']}), "
        f"{result['parameters']:,} parameters; {result['exporter']}{opset}"
    )
    print(f"wrote {', '.join(result['files'])}")
    return 0


def _data(args) -> int:
    from l2b_fast import datasets
    from l2b_fast.data.dependencies import require_data_packages

    require_data_packages()  # a missing package fails here, naming the install command, before anything is written
    command = next(c for recipe in datasets.recipes() for c in recipe.data_commands if c.name == args.data_command)
    manifest = command.run(args)
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['total']} samples in {len(entry['shards'])} shard(s)")
    print(f"wrote {args.out}/manifest.json")
    return 0


def _refuse_to_clobber(out: Path, args) -> None:
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.resume and not (out / "checkpoints" / "last.pt").is_file():
        raise ValueError(f"{out} holds no checkpoint to resume (checkpoints/last.pt): start the run without --resume")
    if not args.resume and not args.overwrite and (out / "checkpoints" / "last.pt").exists():
        raise ValueError(
            f"{out} already holds a run: use --resume to continue it, --overwrite to replace it, or another --out"
        )


def run(args) -> int:
    from l2b_fast import config as configs
    from l2b_fast.tree import Tree

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "presets":
        if args.print_name:
            print(configs.preset_text(args.print_name), end="")
        else:
            descriptions = configs.preset_descriptions()
            width = max(map(len, descriptions))
            for name, description in descriptions.items():
                print(f"{name.ljust(width)}  {description}".rstrip())
        return 0
    if args.command == "data":
        return _data(args)
    if args.command == "bench":
        from l2b_fast.bench import search_step

        return search_step.main_from_args(args)
    if args.command == "show":
        from l2b_fast import viz

        tree = Tree.load(args.tree)
        print(viz.tree_text(tree.to_dict()))
        stem = args.out or args.tree.with_suffix("")
        for path in viz.draw_tree(tree.to_dict(), stem, title=args.tree.parent.name):
            print(f"wrote {path}")
        return 0
    if args.command == "eval":
        return _evaluate(args)
    if args.command == "export":
        return _export(args)
    if args.command == "search":
        return _search(args)
    if args.command == "retrain":
        return _retrain(args)
    raise AssertionError(args.command)


def _resume_hint(argv, args) -> str:
    """The command that continues an interrupted run (the last checkpoint is kept), or why there is none."""
    if args.command not in ("search", "retrain"):
        return "nothing to resume"
    if args.command == "search":
        command = ["l2b", "search", "--out", str(args.out), "--resume"]
    else:
        command = ["l2b", "retrain", "--tree", str(args.tree), "--resume"] + (
            ["--out", str(args.out)] if args.out else []
        )
    return "continue with: " + shlex.join(command)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    failed = True
    try:
        status, failed = run(args), False
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"l2b {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (RunFailed, FloatingPointError) as error:
        print(f"l2b {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"l2b {args.command}: interrupted; {_resume_hint(argv, args)}", file=sys.stderr)
        return 130
    finally:  # under torchrun, also after an error: the trainers are gone, close the group (no barrier if failed)
        if "l2b_fast.train.distributed" in sys.modules:
            sys.modules["l2b_fast.train.distributed"].cleanup(failed=failed)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
