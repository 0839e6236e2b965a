"""`mlc predict`: a checkpoint or an `mlc export` folder scores images into a predictions file
that `mlc eval --predictions` reads (argument parsing and printing; the work is mlc.predict)."""

from __future__ import annotations

import argparse
import sys

from mlc.config import UsageError, add_pass_arguments, positive_int, unit_interval

HELP = "score image files or shards with a checkpoint or an exported model (docs/api.md)"
SHOWN_TABLE_ROWS = 40  # the table is printed as well when it is this short


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders of them (walked), file lists (a path per line), an `mlc "
        "shard` folder or its URL (s3://bucket/ds, https://host/ds; with --split), or shard "
        "URLs (.tar, brace patterns, http://, s3://)",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="CK",
        help="an `mlc train` checkpoint (.pt) or an `mlc export` folder",
    )
    p.add_argument(
        "--out",
        default="predictions.parquet",
        metavar="FILE",
        help="the predictions file (Parquet, the format of `mlc eval --predictions`; default "
        "predictions.parquet)",
    )
    p.add_argument("--split", default="test", help="split of an `mlc shard` folder")
    p.add_argument(
        "--classes",
        metavar="FILE",
        help="the dataset's classes.json (path or URL) for shard URLs (default: the one beside "
        "the shards)",
    )
    p.add_argument(
        "--key",
        choices=["path", "name", "stem"],
        default="path",
        help="an image file's key: its path as given (default), its file name, or the name "
        "without suffix (e.g. OpenImages ImageIDs); shard samples keep their keys",
    )
    g = p.add_argument_group("compact table")
    g.add_argument(
        "--top-k",
        type=positive_int,
        metavar="K",
        help="also write a table of each image's K best classes (id, name, probability)",
    )
    g.add_argument(
        "--threshold",
        type=unit_interval,
        metavar="T",
        help="also write a table of the classes with probability >= T (with --top-k: of the "
        "K best)",
    )
    g.add_argument(
        "--table",
        metavar="FILE",
        help="where the table goes (CSV; default: the predictions file's name with .top.csv)",
    )
    g = p.add_argument_group("the pass")
    add_pass_arguments(g, "decoding processes")
    g.add_argument(
        "--strict",
        action="store_true",
        help="an unreadable image (or a corrupt shard sample) is an error; by default it is "
        "skipped, named and counted",
    )
    g.add_argument(
        "--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run commands)"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _predict(args: argparse.Namespace) -> dict | None:
    from mlc.dist import teardown
    from mlc.predict import predict_to_file

    ok = False
    try:
        summary = predict_to_file(
            args.checkpoint,
            args.inputs,
            args.out,
            split=args.split,
            classes=args.classes,
            key=args.key,
            batch_size=args.batch_size,
            workers=args.workers,
            fold=not args.no_fold,
            strict=args.strict,
            allow_pipe=args.allow_pipe,
            top_k=args.top_k,
            threshold=args.threshold,
            table=args.table,
            progress=not args.quiet,
            device=args.device,
            precision=args.precision,
        )
        ok = True
        return summary
    finally:
        teardown(finished=ok)


def _print_summary(s: dict) -> None:
    labels = f", with the labels of {s['labels']}" if "labels" in s else ""
    print(
        f"{s['images']} images x {s['classes']} classes -> {s['predictions']}{labels} "
        f"({s['seconds']:.1f} s, {s['images_per_s']:.0f} images/s, {s['processes']} process(es), "
        f"{s['device']}, {s['precision']})"
    )
    if s["skipped"]:
        examples = ", ".join(s["skipped_examples"])
        print(
            f"skipped {s['skipped']} unreadable image(s)"
            + (f": {examples}" if examples else "")
            + (f"; the list is in {s['skipped_list']}" if "skipped_list" in s else "")
        )
    if s["loader_problems"]:
        problems = ", ".join(f"{n} x {reason}" for reason, n in s["loader_problems"].items())
        print(f"loader problems: {problems}")
    for folder, count in s.get("ignored_files", {}).items():
        print(f"ignored {count} file(s) without an image suffix in {folder}")


def run(args: argparse.Namespace) -> int:
    from mlc.storage import require_local

    if args.table and args.top_k is None and args.threshold is None:
        raise UsageError("--table needs --top-k or --threshold")
    require_local(args.out, "--out")  # before any work: the files are written locally
    if args.table:
        require_local(args.table, "--table")
    if args.processes > 1:
        from mlc.dist import rerun_as_local_group

        return rerun_as_local_group(args.argv, args.processes)
    summary = _predict(args)
    if summary is None:  # not rank 0 of a torchrun job: rank 0 reports
        return 0
    _print_summary(summary)
    if "table" in summary:
        from mlc.predict import format_table

        what = [f"top {args.top_k}"] if args.top_k else []
        what += [f"probability >= {args.threshold:g}"] if args.threshold is not None else []
        print(
            f"classes of each image ({', '.join(what)}): {summary['table_rows']} rows -> "
            f"{summary['table']}"
        )
        text = format_table(summary["table"], SHOWN_TABLE_ROWS)
        if text is not None:
            print(text)
    sys.stdout.flush()
    return 0
