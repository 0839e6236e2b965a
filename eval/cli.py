"""`mlc eval`: score a checkpoint on shards, or a predictions file against labels, with MAP@K
(argument parsing only; the work is eval.evaluate and eval.report)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from eval.example import write_example
from eval.report import DEFAULT_REPLICATES, evaluate_files, format_summary, write_report
from mlc.config import UsageError, add_pass_arguments, nonnegative_int, positive_int, unit_interval
from mlc.dist import rerun_as_local_group, teardown

HELP = "score a checkpoint on shards, or predictions against labels, with MAP@K (docs/eval.md)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("from a checkpoint")
    g.add_argument("--checkpoint", help="an `mlc train` checkpoint (.pt) or an `mlc export` folder")
    g.add_argument(
        "--data",
        help="an `mlc shard` dataset to score: a folder, or a URL (s3://, gs://, http(s)://)",
    )
    g.add_argument("--split", default="test", help="split of --data (default test)")
    g.add_argument(
        "--class-map",
        help='"common" (the class ids both share) or a JSON list of class ids / object '
        '{"data id": "model id"}: evaluate a subset, or data whose ids differ',
    )
    add_pass_arguments(g, "loader processes")
    g.add_argument(
        "--allow-lost",
        type=unit_interval,
        default=0.0,
        metavar="FRACTION",
        help="the fraction of the split's samples that may be lost (missing or damaged shards, "
        "corrupt samples) and the rest scored; default 0: any loss is an error",
    )

    g = p.add_argument_group("from files")
    g.add_argument(
        "--predictions",
        help="Parquet: key + scores (list of floats per row). With --checkpoint: where to WRITE "
        "the scores (and labels), to rerun the metrics later from files",
    )
    g.add_argument(
        "--labels",
        help="OpenImages human image-labels CSV, or a Parquet/JSONL table "
        "(key, positives[, negatives])",
    )
    g.add_argument(
        "--classes",
        help="class-descriptions CSV (OpenImages, no header) or JSON: names, and the score order "
        "when the predictions carry no mlc.class_ids metadata",
    )
    g.add_argument(
        "--allow-missing",
        action="store_true",
        help="evaluate the images present in both files instead of failing when keys differ",
    )
    g.add_argument(
        "--unlisted",
        choices=["auto", "unknown", "negative"],
        default="auto",
        help="what an (image, class) pair without a label row is; auto: unknown for OpenImages "
        "CSVs and tables with a negatives column, negative otherwise",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="refuse label rows whose class id neither the predictions nor --classes know "
        "(exit 2, naming the file and line) instead of skipping and counting them",
    )
    g.add_argument(
        "--example",
        action="store_true",
        help="write a small OpenImages-format example into OUTPUT/example and evaluate it",
    )

    g = p.add_argument_group("both")
    g.add_argument(
        "--weights",
        help="per-class weights: a JSON/Parquet of reference counts (a training split's "
        '<split>.stats.json), "uniform", or "positives" (the evaluated labels\' own counts). '
        "Default: the training split's counts with --checkpoint, positives with files",
    )
    g.add_argument("--k", type=positive_int, default=100, help="rank cut-off K (default 100)")
    g.add_argument(
        "--mode",
        choices=["class", "image"],
        default="class",
        help="class: class-wise AP@K, the paper's MAP@100; image: also per-image AP@K",
    )
    g.add_argument("--out", "--output", dest="output", default="runs/eval", help="report folder")
    g.add_argument(
        "--bootstrap",
        type=nonnegative_int,
        default=DEFAULT_REPLICATES,
        help=f"bootstrap replicates for the 95%% intervals (default {DEFAULT_REPLICATES}; 0: none)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _example(args: argparse.Namespace) -> None:
    if args.predictions or args.labels:
        raise UsageError("--example makes its own inputs; drop --predictions/--labels")
    paths = write_example(Path(args.output) / "example")
    args.predictions, args.labels = paths["predictions"], paths["labels"]
    args.classes, args.weights = paths["classes"], str(paths["weights"])
    command = ["mlc", "eval"] + [
        f"--{name}={value}"
        for name, value in [
            ("predictions", args.predictions),
            ("labels", args.labels),
            ("classes", args.classes),
            ("weights", args.weights),
            ("output", args.output),
        ]
    ]
    print("example written; the same evaluation by hand:\n  " + shlex.join(map(str, command)))


def _from_checkpoint(args: argparse.Namespace):
    from eval.evaluate import evaluate_checkpoint

    if not args.data:
        raise UsageError("--checkpoint needs --data (an `mlc shard` folder or URL)")
    if args.labels or args.example:
        raise UsageError("--checkpoint takes its labels from --data; drop --labels")
    if args.strict:
        raise UsageError("--strict is about --labels files; drop it with --checkpoint")
    ok = False
    try:
        report = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            split=args.split,
            weights=args.weights or "auto",
            k=args.k,
            mode=args.mode,
            class_map=args.class_map,
            predictions=args.predictions,
            batch_size=args.batch_size,
            workers=args.workers,
            bootstrap=args.bootstrap,
            seed=args.seed,
            fold=not args.no_fold,
            progress=not args.quiet,
            max_lost_fraction=args.allow_lost,
            device=args.device,
            precision=args.precision,
        )
        ok = True
        return report
    finally:
        teardown(finished=ok)


def run(args: argparse.Namespace) -> int:
    from mlc.storage import require_local

    require_local(args.output, "--out")  # before any work: the report is written locally
    if args.checkpoint and args.predictions:
        require_local(args.predictions, "--predictions")
    if args.checkpoint:
        if args.processes > 1:
            return rerun_as_local_group(args.argv, args.processes)
        report = _from_checkpoint(args)
        if report is None:  # not rank 0 of a torchrun job: rank 0 reports
            return 0
    else:
        if args.example:
            _example(args)
        elif not (args.predictions and args.labels):
            raise UsageError(
                "give --checkpoint and --data, or --predictions and --labels (or use --example)"
            )
        report = evaluate_files(
            args.predictions,
            args.labels,
            classes=args.classes,
            weights=args.weights or "positives",
            k=args.k,
            mode=args.mode,
            allow_missing=args.allow_missing,
            unlisted=args.unlisted,
            bootstrap=args.bootstrap,
            seed=args.seed,
            strict=args.strict,
        )
    print(format_summary(report))
    for path in write_report(report, args.output, plots=not args.no_plots):
        print(f"wrote {path}")
    sys.stdout.flush()
    return 0
