"""OpenImages at full size on this machine: `mlc shard openimages` planning on 60M label rows and
`mlc eval --predictions` on the V7 validation split's size, peak memory and time, one run.

Shard: a generated human image-labels CSV (benchmarks/scale_data.py: --rows rows over --images
ImageIDs, the real 19,994-class list, long-tailed), the images absent. Measured, each in a fresh
process (peak RSS from the kernel's accounting of that process):
- the baseline: pyarrow's streaming CSV reader over the file with the reader's options, alone;
- labels -> Catalog (read_openimages), then the writer's plan and the first --sample-shards
  shards of 5,000 images (every image skipped as a missing file), timed apart;
- the command itself, `mlc shard openimages ... --workers 2`, the whole run: the labels, the
  shuffle, the split's plan, every shard's bookkeeping (every image skipped as a missing file)
  and the merge.
Target: peak RSS <= 4 GB for the command; the planning time per million rows is stated.

Eval: a predictions file of --eval-images x 19,994 classes (float16 and/or float32 scores,
Parquet row groups of 1,000, mlc/predictions.py's format), OpenImages-style labels for the same
images (--labels-per-image rows each), and `mlc eval --predictions --labels --classes` with its
default 200 bootstrap replicates (capped at 86 for 19,994 classes). The baseline: reading the
same file's row groups with pyarrow and converting the scores to numpy, in its own process,
before and after the command. Targets: peak RSS <= 2 GB; wall time <= 3x the baseline.

    python -m benchmarks.bench_scale [--rows 60000000] [--images 9000000] [--sample-shards 2]
                                     [--workers 2] [--eval-images 41620]
                                     [--dtypes float16,float32] [--bootstrap N]
                                     [--skip-shard] [--skip-eval] [--tmp DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness

NAME = "bench_scale"
SHARD_SIZE = 5000
ROW_GROUP = 1000
TARGET_SHARD_MB = 4096
TARGET_EVAL_MB = 2048
TARGET_EVAL_RATIO = 3.0
CLASSES = harness.OPENIMAGES_CLASSES


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, **kwargs) -> dict:
    """benchmarks.bench_scale's ``kind`` in a fresh process; its result with its peak RSS."""
    cmd = [sys.executable, "-m", f"benchmarks.{NAME}", "--child", kind, json.dumps(kwargs)]
    wall, peak, out = harness.run_with_peak(cmd)
    lines = [x for x in out.splitlines() if x.startswith(harness.RESULT)]
    result = json.loads(lines[-1][len(harness.RESULT) :])
    return {**result, "process_seconds": wall, "peak_mb": peak}


# ---------------------------------------------------------------- children


def csv_read_only(labels: str) -> dict:
    """The baseline: the reader's pyarrow CSV pass over the file, nothing kept."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from data_tools.sources.openimages import BLOCK_BYTES, LABEL_COLUMNS

    t0 = time.perf_counter()
    rows = 0
    reader = pacsv.open_csv(
        labels,
        read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=False),
        convert_options=pacsv.ConvertOptions(
            include_columns=["ImageID", "LabelName", "Confidence"],
            column_types={c: pa.string() for c in LABEL_COLUMNS},
            strings_can_be_null=False,
        ),
    )
    for batch in reader:
        rows += batch.num_rows
    return {"seconds": time.perf_counter() - t0, "rows": rows}


def plan(classes: str, labels: str, out: str, partition: list[int]) -> dict:
    """What `mlc shard openimages --partition i/P` does, timed in parts: labels -> Catalog,
    then write_split (shuffle, plan, this partition's shards)."""
    from data_tools.sources.openimages import read_openimages
    from data_tools.writer import ShardOptions, write_split

    t0 = time.perf_counter()
    catalog = read_openimages(classes, [labels], str(Path(out) / "no-images"))
    t1 = time.perf_counter()
    catalog_peak = peak_mb()
    skips = write_split(
        catalog,
        out,
        "train",
        ShardOptions(shard_size=SHARD_SIZE),
        partition=tuple(partition),
        progress=False,
    )
    t2 = time.perf_counter()
    return {
        "catalog_seconds": t1 - t0,
        "catalog_peak_mb": catalog_peak,
        "write_seconds": t2 - t1,
        "images": catalog.table.num_rows,
        "label_rows": catalog.label_rows_read,
        "label_row_skips": dict(catalog.label_row_skips.counts),
        "shard_skips": dict(skips.counts),
    }


def read_parquet_only(path: str) -> dict:
    """The baseline: every row group's scores read with pyarrow and converted to numpy."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    pf = pq.ParquetFile(path)
    values = 0
    for group in range(pf.num_row_groups):
        col = pf.read_row_group(group, columns=["scores"]).column(0).combine_chunks()
        scores = col.flatten().to_numpy(zero_copy_only=False)
        values += scores.size
    return {"seconds": time.perf_counter() - t0, "values": values}


def make_label_csv(path: str, rows: int, images: int, seed: int) -> dict:
    from benchmarks import scale_data

    t0 = time.perf_counter()
    scale_data.label_csv(Path(path), rows, images, class_ids(), seed=seed)
    return {"seconds": time.perf_counter() - t0}


def make_eval_inputs(folder: str, images: int, per_image: int, dtype: str) -> dict:
    t0 = time.perf_counter()
    predictions, labels = eval_inputs(Path(folder), images, per_image, dtype, class_ids())
    return {"seconds": time.perf_counter() - t0, "predictions": str(predictions)}


CHILDREN = {
    "csv_read_only": csv_read_only,
    "plan": plan,
    "read_parquet_only": read_parquet_only,
    "make_label_csv": make_label_csv,
    "make_eval_inputs": make_eval_inputs,
}


# ---------------------------------------------------------------- data


def class_ids() -> list[str]:
    from mlc.io import read_classes

    return read_classes(CLASSES).ids


def eval_inputs(folder: Path, images: int, per_image: int, dtype: str, ids: list[str]) -> tuple:
    """(predictions, labels) for ``images`` images: OpenImages-style labels, then scores that
    lift each image's positive classes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    from benchmarks import scale_data

    labels = folder / "labels.csv"
    if not labels.is_file():
        scale_data.label_csv(labels, images * per_image, images, ids, seed=1)
    table = pacsv.read_csv(labels)
    keys = scale_data.image_keys(images, seed=1)
    rows = pc.index_in(table["ImageID"], value_set=keys).to_numpy()
    cols = pc.index_in(table["LabelName"], value_set=pa.array(ids)).to_numpy()
    positive = table["Confidence"].to_numpy() == 1
    predictions = folder / f"predictions-{dtype}.parquet"
    scale_data.predictions(
        predictions,
        keys,
        ids,
        np.float16 if dtype == "float16" else np.float32,
        {"rows": rows[positive], "cols": cols[positive]},
        seed=1,
        row_group=ROW_GROUP,
    )
    return predictions, labels


# ---------------------------------------------------------------- main


def shard_command(labels: Path, out: Path, workers: int) -> list[str]:
    """`mlc shard openimages` on ``labels``, images absent: the whole run."""
    return harness.mlc_command(
        "shard", "openimages", "--classes", str(CLASSES), "--labels", str(labels),
        "--images", str(out.parent / "no-images"), "--out", str(out), "--quiet",
        "--shard-size", str(SHARD_SIZE), "--workers", str(workers),
    )  # fmt: skip


def shard_part(result: harness.Result, args, folder: Path, ids: list[str]) -> list[list]:
    rows = []
    labels = folder / "labels.csv"
    generated = child(
        "make_label_csv", path=str(labels), rows=args.rows, images=args.images, seed=0
    )["seconds"]
    size_mb = labels.stat().st_size / 2**20
    result.note(
        f"shard: generated label CSV of {args.rows:,} rows over {args.images:,} ImageIDs, "
        f"{len(ids):,} classes, {size_mb:,.0f} MB, written in {generated:.1f} s"
    )
    csv_only = child("csv_read_only", labels=str(labels))
    n_shards = math.ceil(args.images / SHARD_SIZE)
    parts = max(1, math.ceil(n_shards / args.sample_shards))
    timed = child(
        "plan",
        classes=str(CLASSES),
        labels=str(labels),
        out=str(folder / "plan-out"),
        partition=[0, parts],
    )
    shutil.rmtree(folder / "plan-out")
    cli_wall, cli_peak, _ = harness.run_with_peak(
        shard_command(labels, folder / "cli-out", args.workers)
    )
    report = json.loads((folder / "cli-out" / "train.report.json").read_text())
    shutil.rmtree(folder / "cli-out")
    written = math.ceil(n_shards / parts)  # shards 0, P, 2P, ...
    per_m = 1e6 / args.rows
    csv_s = csv_only["seconds"]
    rows.append(["CSV read alone (pyarrow, baseline)", f"{csv_s:.1f}", f"{csv_s * per_m:.2f}",
                 "1.00", f"{csv_only['peak_mb']:.0f}", ""])  # fmt: skip
    cat_s = timed["catalog_seconds"]
    rows.append(["labels -> Catalog (read_openimages)", f"{cat_s:.1f}", f"{cat_s * per_m:.2f}",
                 f"{cat_s / csv_s:.2f}", f"{timed['catalog_peak_mb']:.0f}",
                 f"{timed['images']:,} images"])  # fmt: skip
    write_s = timed["write_seconds"]
    skipped = sum(timed["shard_skips"].values())
    rows.append([
        f"shuffle + plan + {written} shard(s) of {SHARD_SIZE:,} (write_split, partition 0/{parts})",
        f"{write_s:.1f}", "", "", f"{timed['peak_mb']:.0f}",
        f"{skipped:,} images skipped: {', '.join(timed['shard_skips'])}",
    ])  # fmt: skip
    rows.append([
        f"`mlc shard openimages --workers {args.workers}` (the command, whole run)",
        f"{cli_wall:.1f}", f"{cli_wall * per_m:.2f}", f"{cli_wall / csv_s:.2f}",
        f"{cli_peak:.0f}",
        f"{report['images_read']:,} images read, {report['skipped']:,} skipped "
        f"({', '.join(report['image_skips'])}), in {n_shards:,} shards' bookkeeping",
    ])  # fmt: skip
    result.measure(
        shard={
            "rows": args.rows,
            "images": args.images,
            "csv_mb": size_mb,
            "generate_seconds": generated,
            "csv_read_only": csv_only,
            "plan": timed,
            "cli": {"seconds": cli_wall, "peak_mb": cli_peak, "workers": args.workers},
        }
    )
    result.target(
        cli_peak <= TARGET_SHARD_MB,
        f"mlc shard openimages, {args.rows:,} label rows over {args.images:,} images: peak RSS "
        f"<= {TARGET_SHARD_MB} MB (got {cli_peak:.0f} MB; labels to Catalog "
        f"{cat_s * per_m:.2f} s per million rows, the whole run {cli_wall * per_m:.2f})",
        cli_peak,
        TARGET_SHARD_MB,
    )
    labels.unlink()
    return rows


def eval_part(result: harness.Result, args, folder: Path, ids: list[str]) -> list[list]:
    rows = []
    for dtype in args.dtypes.split(","):
        made = child(
            "make_eval_inputs",
            folder=str(folder),
            images=args.eval_images,
            per_image=args.labels_per_image,
            dtype=dtype,
        )
        predictions, labels = Path(made["predictions"]), folder / "labels.csv"
        made = made["seconds"]
        size_mb = predictions.stat().st_size / 2**20
        result.note(
            f"eval: {args.eval_images:,} images x {len(ids):,} classes, {dtype} scores, row groups "
            f"of {ROW_GROUP:,}, {size_mb:,.0f} MB file (made in {made:.0f} s); labels: "
            f"{args.eval_images * args.labels_per_image:,} OpenImages-style rows"
        )
        cmd = harness.mlc_command(
            "eval", "--predictions", str(predictions), "--labels", str(labels), "--classes",
            str(CLASSES), "--out", str(folder / "eval-out"), "--no-plots", "--quiet",
        )  # fmt: skip
        if args.bootstrap is not None:
            cmd += ["--bootstrap", str(args.bootstrap)]
        before = child("read_parquet_only", path=str(predictions))
        wall, peak, _ = harness.run_with_peak(cmd)
        after = child("read_parquet_only", path=str(predictions))
        summary = json.loads((folder / "eval-out" / "summary.json").read_text())
        shutil.rmtree(folder / "eval-out")
        base = (before["seconds"] + after["seconds"]) / 2
        ratio = wall / base
        rows.append([dtype, "read row groups + scores to numpy (baseline)", f"{base:.1f}",
                     "1.00", f"{max(before['peak_mb'], after['peak_mb']):.0f}",
                     f"runs {before['seconds']:.1f}, {after['seconds']:.1f}"])  # fmt: skip
        replicates = (summary.get("confidence_intervals") or {}).get("replicates", 0)
        note = f"fwMAP@100 {summary['weighted_map_at_k']:.4f}, {replicates} bootstrap replicates"
        if summary["full_map"] is None:
            note += ", full mAP not computed (too many scores to hold)"
        rows.append([dtype, "`mlc eval --predictions --labels --classes` (the command)",
                     f"{wall:.1f}", f"{ratio:.2f}", f"{peak:.0f}", note])  # fmt: skip
        plain = None
        if args.bootstrap is None:  # where the time goes: the same without the intervals
            plain_wall, plain_peak, _ = harness.run_with_peak([*cmd, "--bootstrap", "0"])
            shutil.rmtree(folder / "eval-out")
            plain = {"seconds": plain_wall, "peak_mb": plain_peak, "ratio": plain_wall / base}
            rows.append([dtype, "the same with `--bootstrap 0` (no intervals; for comparison)",
                         f"{plain_wall:.1f}", f"{plain_wall / base:.2f}", f"{plain_peak:.0f}",
                         ""])  # fmt: skip
        result.measure(
            **{
                f"eval_{dtype}": {
                    "file_mb": size_mb,
                    "baseline": [before, after],
                    "seconds": wall,
                    "peak_mb": peak,
                    "ratio": ratio,
                    "without_bootstrap": plain,
                    "summary": {k: summary.get(k) for k in ("weighted_map_at_k", "images")},
                }
            }
        )
        result.target(
            peak <= TARGET_EVAL_MB,
            f"mlc eval --predictions, {args.eval_images:,} x {len(ids):,} {dtype}: peak RSS <= "
            f"{TARGET_EVAL_MB} MB (got {peak:.0f} MB)",
            peak,
            TARGET_EVAL_MB,
        )
        result.target(
            ratio <= TARGET_EVAL_RATIO,
            f"mlc eval --predictions, {dtype}: <= {TARGET_EVAL_RATIO:.0f}x reading the file alone "
            f"(got {ratio:.2f}x: {wall:.1f} s against {base:.1f} s)",
            ratio,
            TARGET_EVAL_RATIO,
        )
        predictions.unlink()
    return rows


def main(argv=None) -> None:
    if harness.child_main(CHILDREN, argv):
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=60_000_000, help="label rows (shard)")
    p.add_argument("--images", type=int, default=9_000_000, help="ImageIDs (shard)")
    p.add_argument("--sample-shards", type=int, default=2, help="shards the sample writes")
    p.add_argument("--workers", type=int, default=2, help="mlc shard --workers")
    p.add_argument("--eval-images", type=int, default=41_620)
    p.add_argument("--labels-per-image", type=int, default=15)
    p.add_argument("--dtypes", default="float16,float32", help="score types of the eval files")
    p.add_argument("--bootstrap", type=int, help="mlc eval --bootstrap (default: its default)")
    p.add_argument("--skip-shard", action="store_true")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--tmp", default=None, help="folder for the generated files (default /tmp)")
    args = harness.parse_args(
        p,
        quick={
            "rows": 300_000,
            "images": 45_000,
            "eval_images": 500,
            "dtypes": "float16",
            "bootstrap": 0,
        },
        argv=argv,
    )
    if not CLASSES.is_file():
        raise SystemExit(f"{CLASSES} not found: the real OpenImages class list is needed")
    result = harness.Result(NAME, args, argv)
    ids = class_ids()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_scale-") as tmp:
        folder = Path(tmp)
        if not args.skip_shard:
            rows = shard_part(result, args, folder, ids)
            result.table(
                ["step", "seconds", "s per million rows", "x CSV read", "peak RSS MB", "note"],
                rows,
                "lrrrrl",
                title=f"mlc shard openimages, {args.rows:,} label rows",
            )
        if not args.skip_eval:
            rows = eval_part(result, args, folder, ids)
            result.table(
                ["scores", "run", "seconds", "x baseline", "peak RSS MB", "note"],
                rows,
                "llrrrl",
                title=f"mlc eval --predictions, {args.eval_images:,} images",
            )
    result.note(
        "peak RSS is each process's own, from wait4 in a small launcher that forks it (harness."
        "run_with_peak: a process's peak starts at its parent's RSS)"
    )
    result.note(
        f"load average at the start {result.data['machine']['load_average'][0]:.1f} (on 2 "
        "cores, above 1 means other work ran beside it: times and ratios are then noisy, peak "
        "memory is not)"
    )
    result.write()


if __name__ == "__main__":
    main()
