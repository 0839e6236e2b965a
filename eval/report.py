"""Score prediction files against label files and write the report (summary.json, tables,
report.md and plots). Evaluation from a checkpoint (eval/evaluate.py) writes the same report."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from eval.bootstrap import PoissonBootstrap, pool_size
from eval.io import label_rows, open_predictions, read_labels, read_weights
from eval.metrics import (
    ClassAP,
    ImageAP,
    KnownItems,
    full_ap,
    image_ap_at_k,
    image_ap_of_items,
    weighted_mean,
)
from eval.streaming import MAPAccumulator
from mlc.data import counts
from mlc.io import Classes, InputFileError, atomic_write_csv, atomic_write_text, read_classes

CI_LEVEL = 0.95
DEFAULT_REPLICATES = 200
# Bootstrap replicates are capped so that ranking them at the end expands at most this many
# (replicate, class, pool item) entries, which bounds the time and memory of that final step.
BOOTSTRAP_MAX_ENTRIES = 400_000_000
# `mlc eval --predictions` scores batches of about this many scores (20 MB as float32; the
# bootstrap's update takes about 40 bytes per score of the batch, briefly) and keeps all of
# them, for full AP, only up to FULL_AP_LIMIT (5 bytes each with the label).
STREAM_SCORES = 5_000_000
FULL_AP_LIMIT = 50_000_000
# Every this many batches the heap's free pages go back to the system: the `mlc` command keeps
# freed memory (mlc/runtime.py), and the batches' temporaries of varying sizes then fragment
# the heap, whose size kept growing (41,620 x 19,994 float32: 3.6-4.4 GB peak RSS without this,
# 1.7 GB with it, 1.4 GB with glibc's default malloc; about 10% more time than without).
TRIM_BATCHES = 8
BOOTSTRAP_METHOD = (
    "Poisson bootstrap over images (each image weighted by a Poisson(1) count drawn from a hash "
    "of its key, per replicate), percentile interval; docs/eval.md"
)


@dataclass
class ClassTable:
    """Per-class results of a class-wise evaluation: the table, report.md and the plots."""

    result: ClassAP  # AP@K, P_c, known counts and the weights used
    ids: list[str]
    names: list[str]
    reference: np.ndarray | None = None  # reference (training) positive counts; NaN = unknown
    full: np.ndarray | None = None  # untruncated AP per class; None when not computed

    def header(self) -> list[str]:
        k = self.result.k
        return [
            "class_id",
            "name",
            "reference_count",
            "weight",
            "positives",
            "known",
            f"ap_at_{k}",
            "full_ap",
        ]

    def rows(self) -> list[list]:
        r = self.result
        reference = self.reference if self.reference is not None else np.full(len(r.ap), np.nan)
        full = self.full if self.full is not None else np.full(len(r.ap), np.nan)
        return [
            [cid, name, _count(ref), float(w), int(p), int(n), _number(ap), _number(f)]
            for cid, name, ref, w, p, n, ap, f in zip(
                self.ids,
                self.names,
                reference,
                r.weights,
                r.positives,
                r.known,
                r.ap,
                full,
                strict=True,
            )
        ]


@dataclass
class Report:
    summary: dict
    table_name: str  # per_class.csv or per_image.csv
    header: list[str]
    rows: list[list] = field(repr=False)
    classes: ClassTable | None = field(default=None, repr=False)  # for report.md and plots
    image_rows: list[list] | None = field(default=None, repr=False)  # per_image.csv as well


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _count(x: float):
    return None if math.isnan(x) else (int(x) if float(x).is_integer() else float(x))


def score_batch(
    keys: list[str] | None,
    scores: torch.Tensor,
    labels: torch.Tensor | KnownItems,
    k: int,
    accumulator: MAPAccumulator | None,
    bootstrap: PoissonBootstrap | None,
) -> ImageAP:
    """Add a batch to the class-wise accumulator and the bootstrap (either may be None) and
    return its image-wise AP@K. ``labels``: dense [n, c], or the batch's KnownItems (then
    ``scores`` are not read again)."""
    if isinstance(labels, KnownItems):
        images = image_ap_of_items(labels, k)
        if accumulator is not None:
            accumulator.update_items(labels)
        if bootstrap is not None:
            bootstrap.update_items(keys, labels, images.ap)
        return images
    images = image_ap_at_k(scores, labels, k)
    if accumulator is not None:
        accumulator.update(scores, labels)
    if bootstrap is not None:
        bootstrap.update(keys, scores, labels, images.ap)
    return images


def image_header(k: int) -> list[str]:
    return ["key", "positives", "known", f"ap_at_{k}"]


def bootstrap_replicates(requested: int, classes: int, k: int) -> int:
    """Replicates within BOOTSTRAP_MAX_ENTRIES (at least 20 when any are requested)."""
    if requested <= 0:
        return 0
    return min(requested, max(20, BOOTSTRAP_MAX_ENTRIES // max(1, classes * pool_size(k))))


def class_summary(
    table: ClassTable,
    image_map: float,
    images_evaluated: int,
    images_excluded: int,
    bootstrap: PoissonBootstrap | None,
    weights,
) -> dict:
    """The class-wise part of summary.json (shared by the file and checkpoint paths)."""
    r = table.result
    full_map = None
    if table.full is not None:
        full_map = _number(weighted_mean(table.full, np.ones_like(table.full)))
    summary = {
        "weighted_map_at_k": _number(r.weighted_map),
        "unweighted_map_at_k": _number(r.unweighted_map),
        "full_map": full_map,
        "image_map_at_k": _number(image_map),
        "classes_evaluated": int(np.sum(r.positives > 0)),
        "classes_excluded_no_positives": len(r.excluded_no_positives),
        "classes_zero_weight": len(r.excluded_zero_weight),
        "excluded_class_ids": [table.ids[i] for i in r.excluded_no_positives],
        "images_evaluated": images_evaluated,
        "images_excluded_no_positives": images_excluded,
    }
    if bootstrap is not None:
        intervals = bootstrap.intervals(weights, CI_LEVEL)
        summary["confidence_intervals"] = {
            "level": CI_LEVEL,
            "method": BOOTSTRAP_METHOD,
            "replicates": bootstrap.replicates,
            "seed": bootstrap.seed,
            **intervals,
            # replicate-classes whose top K was not provably in the pool (approximated)
            "inexact_replicate_classes": bootstrap.inexact,
            # figures whose estimate lies outside its own interval (docs/eval.md: bias)
            "estimate_outside_interval": [
                name
                for name, interval in intervals.items()
                if interval is not None
                and summary[name] is not None
                and not interval[0] <= summary[name] <= interval[1]
            ],
        }
    return summary


def _vocabulary(
    prediction_ids: list[str] | None, classes: Classes | None, width: int, path
) -> Classes:
    """The predictions' class order, with display names from --classes where it has them."""
    if prediction_ids is None:
        if classes is None:
            raise InputFileError(
                f"{path}: has no mlc.class_ids metadata, so pass --classes to say which class "
                "each score is"
            )
        if len(classes) != width:
            raise InputFileError(
                f"{path}: rows have {width} scores but --classes lists {len(classes)} classes"
            )
        return classes
    names = {} if classes is None else dict(zip(classes.ids, classes.names, strict=True))
    return Classes(prediction_ids, [names.get(cid, cid) for cid in prediction_ids])


def _release_freed_memory() -> None:
    """glibc's malloc_trim(0); nothing on other C libraries."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def evaluate_files(
    predictions: str | Path,
    labels: str | Path,
    classes: str | Path | None = None,
    weights: str = "positives",
    k: int = 100,
    mode: str = "class",
    allow_missing: bool = False,
    unlisted: str = "auto",
    bootstrap: int = DEFAULT_REPLICATES,
    seed: int = 0,
    strict: bool = False,
) -> Report:
    """Everything `mlc eval` computes, as a Report (nothing is written). Label rows with class
    ids found nowhere are skipped and counted, or with ``strict`` refused (InputFileError).

    The predictions are read in batches of about STREAM_SCORES scores, each scored with the
    labels of its rows and dropped: the streaming class-wise accumulator, image-wise AP@K and
    the bootstrap hold O(classes x K) state, so memory does not grow with the images (full AP,
    which needs every score, only up to FULL_AP_LIMIT scores). The results are those of
    scoring all images at once, exactly: the accumulator, the image-wise sum and the bootstrap
    do not depend on the batching."""
    class_list = read_classes(classes) if classes else None
    preds = open_predictions(predictions)
    vocab = _vocabulary(preds.class_ids, class_list, preds.width, predictions)
    known = set(class_list.ids) if class_list else set()
    label_set = read_labels(labels, vocab, known, unlisted, strict)
    found = label_rows(preds.keys, label_set, len(vocab), predictions, labels, allow_missing)
    weight_spec = read_weights(weights, vocab)
    keys = preds.keys.take(pa.array(found.rows))
    summary = {
        "k": k,
        "mode": mode,
        "predictions": str(predictions),
        "labels": str(labels),
        "images": len(keys),
        "classes": len(vocab),
        "unlisted_pairs": "unknown" if found.unlisted == -1 else "negative",
        "predictions_without_labels": found.predictions_without_labels,
        "labels_without_predictions": found.labels_without_predictions,
        "label_rows_for_unscored_classes": label_set.skipped_other_classes,
        "label_rows_unknown_class": label_set.skipped_unknown_classes,
        "label_rows_unknown_class_examples": label_set.unknown_class_examples,
        "positive_negative_conflicts": found.conflicts,
    }
    if mode not in ("class", "image"):
        raise InputFileError(f"mode must be 'class' or 'image', got {mode!r}")
    del label_set  # the sparse pairs of `found` are what the pass needs
    n, c = len(keys), len(vocab)
    by_class = mode == "class"
    accumulator = MAPAccumulator(c, k) if by_class else None
    replicates = bootstrap_replicates(bootstrap, c, k) if by_class else 0
    boot = PoissonBootstrap(c, k, replicates, seed) if replicates and n else None
    keep_full = by_class and n * c <= FULL_AP_LIMIT
    # Labels whose unlisted pairs are unknown (OpenImages') are scored from their labelled pairs
    # alone: O(labelled pairs) per batch instead of O(images x classes), the same results.
    sparse = found.unlisted == -1
    full_scores, full_labels = [], []
    image_parts = []  # per batch: ImageAP
    done = 0  # images scored so far
    for first, scores in preds.batches(max(1, STREAM_SCORES // max(1, c)), read_ahead=True):
        last = first + len(scores)
        rows, batch_labels = found.pairs(first, last) if sparse else found.block(first, last)
        if not len(rows):
            continue
        if len(rows) < len(scores):
            scores = scores[rows]
        batch_keys = keys.slice(done, len(rows)).to_pylist() if boot is not None else None
        s = torch.from_numpy(scores)  # float32, finite: checked as it was read
        batch = KnownItems.gather(s, *batch_labels) if sparse else torch.from_numpy(batch_labels)
        images = score_batch(batch_keys, s, batch, k, accumulator, boot)
        image_parts.append(images)
        if keep_full:
            full_scores.append(s)
            full_labels.append(batch.dense_labels() if sparse else batch)
        done += len(rows)
        if len(image_parts) % TRIM_BATCHES == 0:
            _release_freed_memory()
    images = ImageAP(
        k,
        *(
            np.concatenate([getattr(p, f) for p in image_parts]) if image_parts else np.zeros(0)
            for f in ("ap", "positives", "known")
        ),
    )
    if not by_class:
        summary.update(
            image_map_at_k=_number(images.mean),
            images_evaluated=int(np.sum(images.positives > 0)),
            images_excluded_no_positives=len(images.excluded_no_positives),
        )
        rows = [
            [key, int(p), int(n), _number(ap)]
            for key, p, n, ap in zip(
                keys.to_pylist(), images.positives, images.known, images.ap, strict=True
            )
        ]
        return Report(summary, "per_image.csv", image_header(k), rows)
    result = accumulator.compute(weight_spec.values)
    reference = weight_spec.values if not isinstance(weight_spec.values, str) else None
    notes = []
    full = None
    if keep_full:
        scores = torch.cat(full_scores) if full_scores else torch.zeros(0, c)
        labels_all = torch.cat(full_labels) if full_labels else torch.zeros(0, c, dtype=torch.int8)
        full = full_ap(scores, labels_all)
    else:
        notes.append(
            f"full mAP not computed: {c} classes x {n} images exceed the limit of "
            f"{FULL_AP_LIMIT} scores held in memory"
        )
    table = ClassTable(result, vocab.ids, vocab.names, reference, full)
    summary.update(
        class_summary(
            table,
            images.mean,
            int(np.sum(images.positives > 0)),
            len(images.excluded_no_positives),
            boot,
            weight_spec.values,
        ),
        weights=weight_spec.source,
        classes_without_reference_weight=weight_spec.unlisted,
        weight_file_classes_not_scored=weight_spec.extra,
    )
    if notes:
        summary["notes"] = notes
    return Report(summary, "per_class.csv", table.header(), table.rows(), table)


def write_report(report: Report, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """summary.json and the table; for a class-wise report also report.md and the PNG plots."""
    from eval.report_md import write_markdown_and_plots

    out = Path(out_dir)
    paths = [out / "summary.json", out / report.table_name]
    atomic_write_text(paths[0], json.dumps(report.summary, indent=2) + "\n")
    atomic_write_csv(paths[1], report.header, report.rows)
    if report.image_rows is not None and report.table_name != "per_image.csv":
        paths.append(out / "per_image.csv")
        atomic_write_csv(paths[-1], image_header(report.summary["k"]), report.image_rows)
    if report.classes is not None:
        paths += write_markdown_and_plots(report, out, plots)
    return paths


def _interval(s: dict, key: str) -> str:
    ci = (s.get("confidence_intervals") or {}).get(key)
    return f"  95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def skip_notes(s: dict, examples: int = 1) -> list[str]:
    """One sentence per kind of input the evaluation left out (counts > 0), with up to
    ``examples`` of the skipped label rows whose class ids are unknown."""
    texts = {
        "predictions_without_labels": "predicted images without labels were skipped",
        "labels_without_predictions": "labelled images without predictions were skipped",
        "label_rows_for_unscored_classes": "label rows for classes the predictions do not score "
        "were skipped",
        "label_rows_unknown_class": "label rows with class ids in neither the predictions' "
        "classes nor --classes were skipped (--strict refuses them)",
        "positive_negative_conflicts": "(image, class) pairs were both positive and negative: "
        "counted as positive",
    }
    notes = []
    for key, text in texts.items():
        if not s.get(key):
            continue
        shown = s.get(f"{key}_examples", [])[:examples]
        notes.append(f"{s[key]} {text}" + (f", e.g. {'; '.join(shown)}" if shown else ""))
    return notes


def data_line(s: dict) -> str | None:
    """What the loader delivered of the split, for a pass over shards (None for files): images
    scored of the split's, and what was lost, by shard."""
    if "split_images" not in s:
        return None
    lost = {
        "expected": s["split_images"],
        "lost": s["lost_samples"],
        "lost_by_shard": s["lost_by_shard"],
        "problems": s["loader_problems"],
    }
    scored = f"{s['images']} of the split's {s['split_images']} images scored"
    return f"{scored}; {counts.describe(lost)}"


def format_summary(report: Report) -> str:
    s, k = report.summary, report.summary["k"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    if s["mode"] == "image" and "weighted_map_at_k" not in s:
        lines = [
            f"image-wise MAP@{k}  {fmt(s['image_map_at_k'])}",
            f"images: {s['images_evaluated']} evaluated, "
            f"{s['images_excluded_no_positives']} excluded without a known positive",
        ]
    else:
        image_line = f"image-wise AP@{k}  {fmt(s['image_map_at_k'])}" + _interval(
            s, "image_map_at_k"
        )
        lines = [
            f"fwMAP@{k}  {fmt(s['weighted_map_at_k'])}"
            + _interval(s, "weighted_map_at_k")
            + f"   (weights: {s['weights']})",
            f"MAP@{k}    {fmt(s['unweighted_map_at_k'])}"
            + _interval(s, "unweighted_map_at_k")
            + "   (unweighted)",
            f"full mAP   {fmt(s['full_map'])}",
            image_line,
            f"classes: {s['classes_evaluated']} evaluated of {s['classes']}, "
            f"{s['classes_excluded_no_positives']} excluded without positives, "
            f"{s['classes_zero_weight']} with zero weight",
            f"images: {s['images']} ({s['images_excluded_no_positives']} without a known "
            "positive, left out of the image-wise mean)",
        ]
        if s["mode"] == "image":
            lines.insert(0, lines.pop(3))
    outside = (s.get("confidence_intervals") or {}).get("estimate_outside_interval")
    if outside:
        lines.append(
            f"note: {', '.join(outside)}: the estimate lies outside its bootstrap interval "
            "(the replicates are biased; see 'Confidence intervals' in docs/eval.md)"
        )
    lines += [f"note: {text}" for text in skip_notes(s, examples=1)]
    lines += [f"note: {text}" for text in s.get("notes", [])]
    if data_line(s):
        lines.append(f"data: {data_line(s)}")
    return "\n".join(lines)
