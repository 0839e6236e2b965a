"""`mlc shard`: labelled images -> WebDataset shards (argument parsing and the run's outline)."""

from __future__ import annotations

import argparse
import sys

from data_tools.catalog import Catalog, SkipLog
from data_tools.distribute import DISTRIBUTORS, check_distributor, shard_writer
from data_tools.merge import StrictFailure, format_report, merge_split, strict_problems
from data_tools.select import select_densest
from data_tools.writer import PARTS_DIR, ShardError, ShardOptions
from mlc.config import HelpFormatter
from mlc.extras import check_protocol
from mlc.storage import READ_ONLY_PROTOCOLS, Folder, is_local, protocol

HELP = "turn labelled images into WebDataset shards with a manifest and class stats"


def _partition(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/P such as 0/4, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"need 0 <= i < P in i/P, got {text!r}")
    return index, count


def _densest(text: str) -> int:
    kind, _, n = text.partition(":")
    if kind != "densest" or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"expected densest:N (N >= 1), got {text!r}")
    return int(n)


def _common(p: argparse.ArgumentParser, split: bool = True) -> None:
    p.add_argument(
        "--out",
        "--output",
        required=True,
        help="dataset folder (shards, manifest, stats): a path, or a URL such as "
        "s3://bucket/ds or gs://bucket/ds",
    )
    if split:
        p.add_argument("--split", default="train", help="split name (default train)")
    p.add_argument("--workers", type=int, default=1, help="processes (output is the same)")
    p.add_argument(
        "--distributor",
        choices=DISTRIBUTORS,
        default="local",
        help="where the shards are written: local processes (--workers), or Ray tasks "
        "(output is the same; needs mlc[ray])",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --distributor ray: the cluster to join ('auto', host:port, ray://...); "
        "default: start a local Ray with --workers CPUs",
    )
    p.add_argument(
        "--partition",
        type=_partition,
        default=(0, 1),
        metavar="i/P",
        help="write only shards j with j %% P == i; run `mlc shard merge` after all P "
        "(default: 0/1, all shards)",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--max-side", type=int, help="re-encode so the longer side is at most this")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument(
        "--verify",
        choices=["decode", "structure"],
        default="decode",
        help="check every image by decoding it (default), or by headers and end markers only",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.add_argument(
        "--select",
        type=_densest,
        metavar="densest:N",
        help="keep the N images with the most known labels that can be written (a broken one "
        "is replaced by the next densest): a FastEval14k-style evaluation set",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="publish nothing and exit 1 if any image or label row was skipped (other than "
        "those --select or --trainable leave out)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")

    p = sub.add_parser(
        "openimages",
        formatter_class=HelpFormatter,
        help="OpenImages class descriptions + image-labels CSVs",
    )
    p.add_argument("--classes", required=True, help="class-descriptions CSV (no header)")
    p.add_argument("--labels", required=True, nargs="+", help="human image-labels CSV(s)")
    p.add_argument("--images", required=True, help="folder of <ImageID>.jpg")
    p.add_argument("--trainable", help="file of trainable class ids, one per line")
    p.add_argument("--rotation", help="CSV with ImageID and Rotation columns")
    _common(p)

    p = sub.add_parser(
        "table", formatter_class=HelpFormatter, help="CSV/TSV/Parquet/JSONL: image path + labels"
    )
    p.add_argument(
        "--table", required=True, help="the table: CSV, TSV, Parquet or JSONL, one row per image"
    )
    p.add_argument("--root", required=True, help="folder the image paths are relative to")
    p.add_argument("--image-column", default="image", help="column of the image paths")
    p.add_argument(
        "--labels-column",
        default="labels",
        help="column of the positive labels: a list, or text split by --delimiter",
    )
    p.add_argument("--negatives-column", help="verified negatives (makes unlisted pairs unknown)")
    p.add_argument("--id-column", help="image id column (default: the image path)")
    p.add_argument("--delimiter", help="separator of labels in a text column (default |)")
    p.add_argument("--classes", help="class list (ids or names); default: the labels seen")
    _common(p)

    p = sub.add_parser(
        "coco",
        formatter_class=HelpFormatter,
        help="COCO instances JSON: labels = categories present",
    )
    p.add_argument("--instances", required=True, help="instances_*.json")
    p.add_argument("--images", required=True, help="folder of the images' file_name")
    _common(p)

    p = sub.add_parser(
        "fashion-mnist",
        formatter_class=HelpFormatter,
        help="multi-label mosaics of Fashion-MNIST (built in)",
    )
    p.add_argument("--root", help="folder of the IDX files (default: Debian's package)")
    p.add_argument("--train-count", type=int, default=60_000, help="mosaics in split train")
    p.add_argument("--test-count", type=int, default=10_000, help="mosaics in split test")
    p.add_argument("--grid", type=int, default=2, help="grid x grid cells of 28x28")
    p.add_argument("--min-items", type=int, default=1, help="fewest items in a mosaic")
    p.add_argument("--max-items", type=int, help="default grid*grid")
    p.add_argument("--prior-alpha", type=float, default=1.0, help="long-tail exponent")
    _common(p, split=False)

    p = sub.add_parser(
        "merge", formatter_class=HelpFormatter, help="combine the partitions of a split"
    )
    p.add_argument(
        "--out", "--output", required=True, help="the dataset folder the partitions wrote"
    )
    p.add_argument("--split", required=True, help="the split to merge")
    p.add_argument("--strict", action="store_true", help="as for the partitions: see above")


def _catalogs(args: argparse.Namespace) -> list[tuple[str, Catalog]]:
    if args.format == "openimages":
        from data_tools.sources.openimages import read_openimages

        catalog = read_openimages(
            args.classes, args.labels, args.images, args.trainable, args.rotation
        )
        return [(args.split, catalog)]
    if args.format == "table":
        from data_tools.sources.table import read_table_source

        catalog = read_table_source(
            args.table,
            args.root,
            image_column=args.image_column,
            labels_column=args.labels_column,
            negatives_column=args.negatives_column,
            delimiter=args.delimiter,
            classes=args.classes,
            id_column=args.id_column,
        )
        return [(args.split, catalog)]
    if args.format == "coco":
        from data_tools.sources.coco import read_coco

        return [(args.split, read_coco(args.instances, args.images))]
    from data_tools.sources.fashion_mnist import DEFAULT_ROOT, mosaic_catalog

    return [
        (
            split,
            mosaic_catalog(
                root=args.root or DEFAULT_ROOT,
                split=split,
                count=count,
                grid=args.grid,
                min_items=args.min_items,
                max_items=args.max_items,
                prior_alpha=args.prior_alpha,
                seed=args.seed,
            ),
        )
        for split, count in (("train", args.train_count), ("test", args.test_count))
    ]


def _refuse(verdict: str, problems: list[str]) -> int:
    """--strict's verdict, then what was skipped, images apart from label rows; exit code 1."""
    print(f"mlc shard: --strict: {verdict}; skipped:", file=sys.stderr)
    print("\n".join(problems), file=sys.stderr)
    return 1


def output_folder(out: str, workers: int = 1) -> Folder:
    """The dataset folder --out names, checked before any input is read: a URL whose protocol
    is read-only (http, https), unknown, or needs a package that is missing stops the command
    with one line (exit 2) instead of failing after the work, or writing a local folder named
    "s3:"."""
    if not is_local(out):
        kind = protocol(out)
        if kind not in READ_ONLY_PROTOCOLS:
            check_protocol(out, purpose=f"writing {kind}:// datasets ({out})")
    folder = Folder(out)
    folder.require_writable()
    if folder.protocol == "memory" and workers > 1:
        # each worker process would write into its own copy of the in-memory file system
        raise ShardError(f"{out}: memory:// is private to a process; use --workers 1")
    return folder


def run(args: argparse.Namespace) -> int:
    out = output_folder(args.out, getattr(args, "workers", 1))
    if args.format == "merge":
        try:
            report = merge_split(args.out, args.split, strict=args.strict)
        except StrictFailure as e:
            return _refuse(f"nothing published in {args.out}", [str(e)])
        print(format_report(report))
        return 0
    options = ShardOptions(
        shard_size=args.shard_size,
        max_side=args.max_side,
        quality=args.quality,
        verify=args.verify,
        seed=args.seed,
    )
    check_distributor(args.distributor, args.ray_address, args.out)
    index, count = args.partition
    splits = []
    for split, catalog in _catalogs(args):
        if args.select:
            catalog = select_densest(
                catalog,
                args.select,
                options,
                args.out,
                split,
                args.workers,
                not args.quiet,
                recheck=args.strict,
            )
        splits.append((split, catalog))
    if args.strict:  # what reading the labels (and --select) found: refused before any shard
        found = [strict_problems(s, c.image_skips, c.label_row_skips) for s, c in splits]
        if any(found):
            verdict = f"refused before writing any shard to {args.out}"
            return _refuse(verdict, [p for p in found if p])
    skips = {}
    with shard_writer(args.distributor, args.workers, args.ray_address) as write_split:
        for split, catalog in splits:
            skips[split] = write_split(
                catalog,
                args.out,
                split,
                options,
                args.partition,
                progress=not args.quiet,
                retry_skipped=args.strict,
            )
    if args.strict:  # what writing the images found: the shards stay staged, unpublished
        found = [strict_problems(split, log, SkipLog()) for split, log in skips.items()]
        if any(found):
            where = out.join(PARTS_DIR) if out.local else f"{args.out} without stats"
            verdict = (
                f"nothing published in {args.out} (the shards written wait in {where} for a re-run)"
            )
            return _refuse(verdict, [p for p in found if p])
    if count > 1:
        for split, log in skips.items():
            print(
                f"{split}: partition {index}/{count} done ({log.total} images skipped in its "
                f"shards). When all {count} partitions are done: "
                f"mlc shard merge --out {args.out} --split {split}"
                + (" --strict" if args.strict else "")
            )
        return 0
    for split in skips:
        print(format_report(merge_split(args.out, split)))
    print(f"wrote {out}")
    sys.stdout.flush()
    return 0
