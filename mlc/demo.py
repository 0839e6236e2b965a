"""`mlc demo`: the whole toolkit in one command, sized for a small CPU machine.

shard (Fashion-MNIST 2x2 mosaics, or built-in procedural shapes when the IDX files are missing)
-> train configs/demo.yaml -> evaluate the final checkpoint on the test split -> report.

Everything is done by the library functions the other commands use (data_tools.writer,
mlc.train.loop.train, eval.evaluate); this module only chains them and times each stage.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from mlc.config import UsageError, positive_int

HELP = "shard -> train -> evaluate on built-in data, and print where the report is"
DEMO_CONFIG = "demo"  # a shipped config (configs/demo.yaml)
INSTALL_HINT = (
    "install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make "
    "fashion-mnist` does it), or point --fashion-mnist at a folder holding train-images-idx3-"
    "ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (.gz ok)"
)

# ---------------------------------------------------------------- the stages


def build_dataset(out: Path, source: str, counts: dict, root: str, workers: int, progress: bool):
    """Shard both splits into ``out`` (shards completed by an earlier run are kept)."""
    from data_tools.merge import merge_split
    from data_tools.writer import ShardOptions, write_split

    for split, count in counts.items():
        if source == "fashion-mnist":
            from data_tools.sources.fashion_mnist import mosaic_catalog

            catalog = mosaic_catalog(root=root, split=split, count=count)
        else:
            from data_tools.sources.shapes import shapes_catalog

            catalog = shapes_catalog(split, count)
        write_split(catalog, out, split, ShardOptions(), workers=workers, progress=progress)
        merge_split(out, split)


def _fresh(folder: Path) -> None:
    """Remove an earlier demo's training output (and only that) so runs do not mix."""
    if not folder.exists():
        return
    known = {"checkpoints", "metrics.jsonl", "curves.png", "tensorboard", "config.yaml"}
    if not {p.name for p in folder.iterdir()} <= known:
        raise UsageError(f"{folder} holds files the demo did not write; use --out")
    shutil.rmtree(folder)


def run_demo(
    out: str | Path = "runs/demo",
    source: str = "auto",
    fashion_mnist: str | None = None,
    train_count: int | None = None,
    test_count: int | None = None,
    samples: int | None = None,
    overrides: list[str] = (),
    workers: int = 2,
    progress: bool = True,
    log=print,
) -> dict:
    """Shard, train, evaluate; returns the stage times, the paths and the evaluation summary."""
    from data_tools.sources.fashion_mnist import DEFAULT_ROOT, split_files
    from eval.evaluate import evaluate_checkpoint
    from eval.report import format_summary, write_report
    from mlc.config import load_config
    from mlc.train.loop import train

    out, root = Path(out), fashion_mnist or DEFAULT_ROOT
    if source == "auto":
        try:
            split_files(root, "train"), split_files(root, "test")
            source = "fashion-mnist"
        except (OSError, ValueError):
            log(f"Fashion-MNIST IDX files not found in {root}: {INSTALL_HINT}.")
            log("Using the built-in procedural shapes dataset instead (figures not comparable).")
            source = "shapes"
    default = {"fashion-mnist": (60_000, 10_000), "shapes": (20_000, 2_000)}[source]
    counts = {"train": train_count or default[0], "test": test_count or default[1]}
    name = (
        "data"
        if (source, tuple(counts.values())) == ("fashion-mnist", default)
        else (f"data-{source}-{counts['train']}-{counts['test']}")
    )
    dataset, times = out / name, {}
    # The config first: a bad --set or --samples stops the demo before any sharding.
    sets = [f"data.dataset={dataset}", f"train.out={out / 'train'}"]
    if samples is not None:
        sets += [f"train.samples={samples}", f"train.eval_every={samples}"]
        sets += [f"train.checkpoint_every={samples}", f"train.log_every={max(1, samples // 4)}"]
    config = load_config(DEMO_CONFIG, [*sets, *overrides])
    for what, count in counts.items():
        if count < 1:
            raise UsageError(f"{what} count must be >= 1, got {count}")

    start = time.perf_counter()
    log(f"[1/3] shard: {source}, {counts['train']} train + {counts['test']} test -> {dataset}")
    build_dataset(dataset, source, counts, root, workers, progress)
    times["shard"] = time.perf_counter() - start

    _fresh(Path(config.train.out))
    log(f"[2/3] train: {DEMO_CONFIG}, {config.model.name}, {config.train.samples} samples")
    t0 = time.perf_counter()
    summary = train(config)
    times["train"] = time.perf_counter() - t0
    if summary["stopped_by"]:  # Ctrl-C or SIGTERM: the job saved a checkpoint and returned
        log(
            f"{summary['stopped_by']}: stopped after {summary['samples']} samples; "
            f"{summary['checkpoint']} can be evaluated with `mlc eval --checkpoint "
            f"{summary['checkpoint']} --data {dataset}`"
        )
        return {"source": source, "dataset": str(dataset), "times": times, "train": summary}

    t0 = time.perf_counter()
    log(f"[3/3] evaluate {summary['checkpoint']} on {dataset} (test)")
    # In the training's device and precision: the demo's figure is that of what it trained.
    report = evaluate_checkpoint(
        summary["checkpoint"],
        dataset,
        "test",
        progress=progress,
        workers=0,
        device=config.train.device,
        precision=summary["precision"].split()[0],  # the name the training resolved
    )
    paths = write_report(report, out / "eval")
    times["eval"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - start

    log("")
    log(format_summary(report))
    log("")
    log(f"report:      {out / 'eval' / 'report.md'} (plots and per_class.csv beside it)")
    log(f"training:    {Path(config.train.out) / 'curves.png'}, {summary['checkpoint']}")
    log(
        "time:        "
        + ", ".join(f"{stage} {_duration(seconds)}" for stage, seconds in times.items())
    )
    return {
        "source": source,
        "dataset": str(dataset),
        "times": times,
        "train": summary,
        "summary": report.summary,
        "paths": [str(p) for p in paths],
    }


def _duration(seconds: float) -> str:
    return (
        f"{int(seconds // 60)} min {seconds % 60:04.1f} s" if seconds >= 60 else f"{seconds:.1f} s"
    )


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "--output", default="runs/demo", help="output folder")
    p.add_argument(
        "--source",
        choices=["auto", "fashion-mnist", "shapes"],
        default="auto",
        help="auto: Fashion-MNIST mosaics when the IDX files are there, else procedural shapes",
    )
    p.add_argument("--fashion-mnist", metavar="DIR", help="folder of the Fashion-MNIST IDX files")
    p.add_argument(
        "--train-count", type=positive_int, help="training mosaics (60000; shapes 20000)"
    )
    p.add_argument("--test-count", type=positive_int, help="test mosaics (10000; shapes 2000)")
    p.add_argument("--samples", type=positive_int, help="training samples (default: demo.yaml's)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of configs/demo.yaml (repeatable), as in `mlc train`",
    )
    p.add_argument("--workers", type=positive_int, default=2, help="sharding processes (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    result = run_demo(
        args.out,
        args.source,
        args.fashion_mnist,
        args.train_count,
        args.test_count,
        args.samples,
        args.set,
        args.workers,
        not args.quiet,
    )
    sys.stdout.flush()
    return 130 if result["train"]["stopped_by"] else 0  # 130: stopped by a signal
