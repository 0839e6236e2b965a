"""Publish a split: move its shards into place, and combine their parts into its manifest,
stats and report, and the readers' files.

Runs at the end of an unpartitioned `mlc shard`, or as `mlc shard merge` once every partition
has finished. Everything it writes is derived from the part files, so it can be rerun any time.
With ``strict`` it publishes nothing when anything but what the command asked to leave out was
skipped.

The dataset folder may be a local path or an object-store URL (mlc.storage.Folder): publishing
a shard is a rename locally and a server-side copy and delete on an object store; either way the
shard appears under its final name whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_tools.catalog import SkipLog
from data_tools.writer import ShardError, manifest_table, parts_name, read_parts
from mlc.format import (
    CLASSES_FILE,
    FORMAT_VERSION,
    OPENCLIP_SIZES_FILE,
    TIMM_INFO_FILE,
    manifest_name,
    report_name,
    stats_name,
)
from mlc.io import fsync_dir
from mlc.storage import Folder


class StrictFailure(Exception):  # noqa: N818 (an outcome the command reports, with exit code 1)
    """--strict found problems; nothing was published. The message lists them."""


def _class_counts(lists: pa.ChunkedArray | pa.Array, num_classes: int) -> np.ndarray:
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    return np.bincount(values, minlength=num_classes)[:num_classes]


def _update_json(out: Folder, name: str, update) -> None:
    data = out.read_json(name) if out.is_file(name) else {}
    update(data)
    out.write_text(name, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _write_parquet(out: Folder, name: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    out.write_bytes(name, sink.getvalue().to_pybytes())


def strict_problems(split: str, image_skips: SkipLog, label_row_skips: SkipLog) -> str | None:
    """What --strict refuses in a split, images apart from label rows, with the reasons and an
    example of each; None when only what the command asked for was left out."""
    images, rows = image_skips.problems(), label_row_skips.problems()
    if not images.total and not rows.total:
        return None
    width = max(len(str(images.total)), len(str(rows.total)), 7)
    lines = [f"{split}: {images.total} image(s) and {rows.total} label row(s) skipped"]
    for what, log in (("images", images), ("label rows", rows)):
        if log.total:
            lines.append(f"  {what} skipped: {log.total}")
            lines += _reason_lines(log.to_dict(), width)
    return "\n".join(lines)


def _publish(out: Folder, split: str, shards: list[str]) -> None:
    """Move the split's staged shards into the dataset folder (those of an earlier publication
    that a re-run kept are there already; in an object store the writer puts them there
    directly, see data_tools.writer.shard_location). Staged shards in an object store (written
    by an earlier version) are moved too: a copy on the server, then a delete."""
    staged = out.child(parts_name(split)).sizes()
    published = out.sizes()
    missing = [name for name in shards if name not in staged and name not in published]
    if missing:
        raise ShardError(
            f"{out.join(missing[0])} is missing ({len(missing)} shard(s) in all): run the same "
            "command again to write it"
        )
    for name in shards:
        if name in staged:
            out.move(parts_name(split, name), name)
    if out.local:
        fsync_dir(out.path)


def merge_split(out: str | Path, split: str, strict: bool = False) -> dict:
    """Publish the split's shards; write <split>.manifest.parquet, .stats.json, .report.json;
    update sizes.json and _info.json; return the report. With ``strict``, raise StrictFailure
    before anything is published if any image or label row was skipped as a problem."""
    out = Folder(out)
    out.require_writable()
    plan, parts = read_parts(out, split)
    classes = out.read_json(CLASSES_FILE)
    class_ids = [c["id"] for c in classes["classes"]]
    manifest = manifest_table(parts)

    written = manifest.num_rows
    positives = _class_counts(manifest["positives"], len(class_ids))
    if classes["annotation"] == "full":
        negatives = written - positives  # every unlisted pair is a known negative
    else:
        negatives = _class_counts(manifest["negatives"], len(class_ids))
    shards = [p["shard"] for p in parts]
    lengths = [len(p["manifest"]["key"]) for p in parts]
    stats = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "samples": written,
        "annotation": classes["annotation"],
        "num_classes": len(class_ids),
        "shards": shards,
        "shard_lengths": lengths,
        "positive_counts": dict(zip(class_ids, positives.tolist(), strict=True)),
        "negative_counts": dict(zip(class_ids, negatives.tolist(), strict=True)),
    }

    image_skips = SkipLog.from_dict(plan["image_skips"])
    for part in parts:
        image_skips.merge(SkipLog.from_dict(part["skips"]))
    label_row_skips = SkipLog.from_dict(plan["label_row_skips"])
    label_rows_skipped = label_row_skips.total
    label_rows_used = sum(p["label_rows"] for p in parts)  # by the images written
    # read and not skipped, but of images that were (broken, not selected, ...)
    of_skipped_images = plan["label_rows_read"] - label_rows_skipped - label_rows_used
    report = {
        "split": split,
        "source": plan["source"],
        "images_read": plan["images_read"],
        "written": written,
        "shards": len(shards),
        "skipped": image_skips.total,
        "image_skips": image_skips.to_dict(),
        "label_rows_read": plan["label_rows_read"],
        "label_rows_used": label_rows_used,
        "label_rows_of_skipped_images": of_skipped_images,
        "label_rows_skipped": label_rows_skipped,
        "label_row_skips": plan["label_row_skips"],
        "options": plan["options"],
    }
    select = plan["options"].get("select")
    if select:  # densest:N; fewer are written when fewer candidates can be
        requested = int(select.split(":")[1])
        report["selection"] = {"requested": requested, "short": max(0, requested - written)}
    if plan["images_read"] != written + image_skips.total:
        raise AssertionError(  # a bug in a source or the writer, never the user's input
            f"{split}: {plan['images_read']} images read != {written} written + "
            f"{image_skips.total} skipped"
        )
    if of_skipped_images < 0:
        raise AssertionError(  # the same
            f"{split}: {label_rows_used} label rows used + {label_rows_skipped} skipped > "
            f"{plan['label_rows_read']} read"
        )
    if strict:
        problems = strict_problems(split, image_skips, label_row_skips)
        if problems:
            raise StrictFailure(problems)

    _publish(out, split, shards)
    _write_parquet(out, manifest_name(split), manifest)
    out.write_text(stats_name(split), json.dumps(stats, indent=1) + "\n")
    out.write_text(report_name(split), json.dumps(report, indent=1) + "\n")

    _update_json(out, OPENCLIP_SIZES_FILE, lambda d: d.update(zip(shards, lengths, strict=True)))

    def timm_info(d):
        d.setdefault("name", out.name)
        d.setdefault("splits", {})[split] = {
            "name": split,
            "num_samples": written,
            "filenames": shards,
            "shard_lengths": lengths,
        }

    _update_json(out, TIMM_INFO_FILE, timm_info)
    return report


def format_report(report: dict) -> str:
    """The closing table: images read = written + skipped (by reason), and label rows."""
    width = max(len(str(report["images_read"])), 7)
    lines = [
        f"{report['split']}: {report['images_read']} images read",
        f"  written {report['written']:>{width + 32}} in {report['shards']} shards",
        f"  skipped {report['skipped']:>{width + 32}}",
    ]
    lines += _reason_lines(report["image_skips"], width)
    short = report.get("selection", {}).get("short")
    if short:
        lines.append(
            f"  --select {report['options']['select']}: {short} fewer images than asked "
            "(not enough candidates that can be written)"
        )
    if report["label_rows_read"]:
        lines.append(
            f"  label rows: {report['label_rows_read']} read = {report['label_rows_used']} used "
            f"+ {report['label_rows_of_skipped_images']} of skipped images + "
            f"{report['label_rows_skipped']} skipped"
        )
        lines += _reason_lines(report["label_row_skips"], width)
    return "\n".join(lines)


def _reason_lines(skips: dict, width: int) -> list[str]:
    """One line per reason of a SkipLog.to_dict(): the count and the first example."""
    lines = []
    for reason, entry in skips.items():
        example = f"   e.g. {entry['examples'][0]}" if entry["examples"] else ""
        lines.append(f"    {reason:<38}{entry['count']:>{width}}{example}")
    return lines
