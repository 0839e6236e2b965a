"""`mlc eval`: score a predictions file against labels with MAP@K (argument parsing only)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from eval.example import write_example
from eval.report import evaluate_files, format_summary, write_report

HELP = "score predictions against labels with MAP@K (docs/eval.md)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", help="Parquet: key + scores (list of floats per row)")
    p.add_argument(
        "--labels",
        help="OpenImages human image-labels CSV, or a Parquet/JSONL table "
        "(key, positives[, negatives])",
    )
    p.add_argument(
        "--classes",
        help="class-descriptions CSV (OpenImages, no header) or JSON: names, and the score order "
        "when the predictions carry no mlc.class_ids metadata",
    )
    p.add_argument(
        "--weights",
        default="positives",
        help='per-class weights: a JSON/Parquet of reference counts, "uniform", or "positives" '
        "(the evaluated labels' own counts; default)",
    )
    p.add_argument("--k", type=int, default=100, help="rank cut-off K (default 100)")
    p.add_argument("--mode", choices=["class", "image"], default="class")
    p.add_argument("--output", default="runs/eval", help="report folder (default runs/eval)")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="evaluate the images present in both files instead of failing when keys differ",
    )
    p.add_argument(
        "--unlisted",
        choices=["auto", "unknown", "negative"],
        default="auto",
        help="what an (image, class) pair without a label row is; auto: unknown for OpenImages "
        "CSVs and tables with a negatives column, negative otherwise",
    )
    p.add_argument(
        "--example",
        action="store_true",
        help="write a small OpenImages-format example into OUTPUT/example and evaluate it",
    )


def run(args: argparse.Namespace) -> int:
    if args.example:
        if args.predictions or args.labels:
            raise SystemExit(
                "mlc eval: --example makes its own inputs; drop --predictions/--labels"
            )
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
    elif not (args.predictions and args.labels):
        raise SystemExit("mlc eval: --predictions and --labels are required (or use --example)")
    report = evaluate_files(
        args.predictions,
        args.labels,
        classes=args.classes,
        weights=args.weights,
        k=args.k,
        mode=args.mode,
        allow_missing=args.allow_missing,
        unlisted=args.unlisted,
    )
    print(format_summary(report))
    for path in write_report(report, args.output):
        print(f"wrote {path}")
    sys.stdout.flush()
    return 0
