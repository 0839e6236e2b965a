"""Score prediction files against label files and write the report (summary.json, tables)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.io import (
    Classes,
    InputFileError,
    align,
    atomic_write_csv,
    atomic_write_text,
    read_classes,
    read_labels,
    read_predictions,
    read_weights,
)
from eval.metrics import class_ap_at_k, full_ap, image_ap_at_k, weighted_mean


@dataclass
class Report:
    summary: dict
    table_name: str  # per_class.csv or per_image.csv
    header: list[str]
    rows: list[list] = field(repr=False)


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


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def evaluate_files(
    predictions: str | Path,
    labels: str | Path,
    classes: str | Path | None = None,
    weights: str = "positives",
    k: int = 100,
    mode: str = "class",
    allow_missing: bool = False,
    unlisted: str = "auto",
) -> Report:
    """Everything `mlc eval` computes, as a Report (nothing is written)."""
    class_list = read_classes(classes) if classes else None
    preds = read_predictions(predictions)
    vocab = _vocabulary(preds.class_ids, class_list, preds.scores.shape[1], predictions)
    known = set(class_list.ids) if class_list else set()
    label_set = read_labels(labels, vocab, known, unlisted)
    data = align(preds, label_set, predictions, labels, allow_missing)
    weight_spec = read_weights(weights, vocab)
    summary = {
        "k": k,
        "mode": mode,
        "predictions": str(predictions),
        "labels": str(labels),
        "images": len(data.keys),
        "classes": len(vocab),
        "unlisted_pairs": "unknown" if label_set.unlisted == -1 else "negative",
        "predictions_without_labels": data.predictions_without_labels,
        "labels_without_predictions": data.labels_without_predictions,
        "label_rows_for_unscored_classes": label_set.skipped_other_classes,
        "positive_negative_conflicts": data.conflicts,
    }
    if mode == "image":
        result = image_ap_at_k(data.scores, data.labels, k)
        summary.update(
            image_map_at_k=_number(result.mean),
            images_evaluated=int(np.sum(result.positives > 0)),
            images_excluded_no_positives=len(result.excluded_no_positives),
        )
        rows = [
            [key, int(p), int(n), _number(ap)]
            for key, p, n, ap in zip(
                data.keys.to_pylist(), result.positives, result.known, result.ap, strict=True
            )
        ]
        return Report(summary, "per_image.csv", ["key", "positives", "known", f"ap_at_{k}"], rows)
    if mode != "class":
        raise InputFileError(f"mode must be 'class' or 'image', got {mode!r}")
    result = class_ap_at_k(data.scores, data.labels, k, weight_spec.values)
    full = full_ap(data.scores, data.labels)
    no_pos = result.excluded_no_positives
    summary.update(
        weighted_map_at_k=_number(result.weighted_map),
        unweighted_map_at_k=_number(result.unweighted_map),
        full_map=_number(weighted_mean(full, np.ones_like(full))),
        weights=weight_spec.source,
        classes_evaluated=int(np.sum(result.positives > 0)),
        classes_excluded_no_positives=len(no_pos),
        classes_zero_weight=len(result.excluded_zero_weight),
        classes_without_reference_weight=weight_spec.unlisted,
        weight_file_classes_not_scored=weight_spec.extra,
        excluded_class_ids=[vocab.ids[i] for i in no_pos],
    )
    rows = [
        [cid, name, float(w), int(p), int(n), _number(ap), _number(f)]
        for cid, name, w, p, n, ap, f in zip(
            vocab.ids,
            vocab.names,
            result.weights,
            result.positives,
            result.known,
            result.ap,
            full,
            strict=True,
        )
    ]
    header = ["class_id", "name", "weight", "positives", "known", f"ap_at_{k}", "full_ap"]
    return Report(summary, "per_class.csv", header, rows)


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    paths = [out / "summary.json", out / report.table_name]
    atomic_write_text(paths[0], json.dumps(report.summary, indent=2) + "\n")
    atomic_write_csv(paths[1], report.header, report.rows)
    return paths


def format_summary(report: Report) -> str:
    s, k = report.summary, report.summary["k"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    if s["mode"] == "image":
        lines = [
            f"image-wise MAP@{k}  {fmt(s['image_map_at_k'])}",
            f"images: {s['images_evaluated']} evaluated, "
            f"{s['images_excluded_no_positives']} excluded without a known positive",
        ]
    else:
        lines = [
            f"fwMAP@{k}  {fmt(s['weighted_map_at_k'])}   (weights: {s['weights']})",
            f"MAP@{k}    {fmt(s['unweighted_map_at_k'])}   (unweighted)",
            f"full mAP   {fmt(s['full_map'])}",
            f"classes: {s['classes_evaluated']} evaluated of {s['classes']}, "
            f"{s['classes_excluded_no_positives']} excluded without positives, "
            f"{s['classes_zero_weight']} with zero weight",
            f"images: {s['images']}",
        ]
    notes = {
        "predictions_without_labels": "predicted images without labels were skipped",
        "labels_without_predictions": "labelled images without predictions were skipped",
        "label_rows_for_unscored_classes": "label rows for classes the predictions do not score "
        "were skipped",
        "positive_negative_conflicts": "(image, class) pairs were both positive and negative: "
        "counted as positive",
    }
    lines += [f"note: {s[key]} {text}" for key, text in notes.items() if s[key]]
    return "\n".join(lines)
