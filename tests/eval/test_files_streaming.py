"""`mlc eval --predictions` reads the scores in batches (eval.report.evaluate_files): its report
is the same whatever the batch size, equal to the metrics of all images at once (read_predictions
+ align + eval.metrics), with float16 or float32 scores, OpenImages CSV or table labels, images
missing on either side, and ties; a bad score in a later batch gives the whole file's error."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import eval.report as report
from eval.bootstrap import PoissonBootstrap
from eval.io import CLASS_IDS_METADATA, align, read_labels, read_predictions
from eval.metrics import KnownItems, class_ap_at_k, full_ap, image_ap_at_k
from eval.streaming import MAPAccumulator
from mlc.io import Classes, InputFileError

CLASS_IDS = [f"/m/c{i}" for i in range(23)]


def write_predictions(path, keys, scores, value_type, row_group):
    values = pa.array(scores.astype(value_type.to_pandas_dtype()).ravel(), value_type)
    schema = pa.schema(
        [("key", pa.string()), ("scores", pa.list_(value_type, scores.shape[1]))],
        metadata={CLASS_IDS_METADATA: json.dumps(CLASS_IDS).encode()},
    )
    table = pa.table(
        [pa.array(keys), pa.FixedSizeListArray.from_arrays(values, scores.shape[1])],
        schema=schema,
    )
    pq.write_table(table, path, row_group_size=row_group)
    return path


@pytest.fixture(params=["float16", "float32"])
def inputs(request, tmp_path):
    """90 predicted images (10 of them unlabelled) and labels of 85 (5 without prediction):
    coarse scores (many ties, also at rank K), positives, negatives, conflicts and unknowns."""
    rng = np.random.default_rng(7)
    n, c = 90, len(CLASS_IDS)
    keys = [f"{x:016x}" for x in rng.integers(0, 2**62, n)]
    scores = np.round(rng.normal(0, 1, (n, c)) * 4) / 4
    value_type = pa.float16() if request.param == "float16" else pa.float32()
    preds = write_predictions(tmp_path / "p.parquet", keys, scores, value_type, 13)
    lines = ["ImageID,Source,LabelName,Confidence"]
    labelled = keys[10:] + [f"{x:016x}" for x in rng.integers(2**62, 2**63, 5)]
    for key in labelled:
        for cls in rng.choice(c, int(rng.integers(1, 9)), replace=True):
            lines.append(f"{key},verification,{CLASS_IDS[cls]},{int(rng.random() < 0.5)}")
    lines.append(f"{keys[20]},verification,/m/notaclass,1")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return preds, csv


def dense_reference(preds, labels, k, weights="positives", replicates=50):
    """The metrics of all images at once, from the in-memory readers."""
    p = read_predictions(preds)
    vocab = Classes(p.class_ids, p.class_ids)
    data = align(p, read_labels(labels, vocab), preds, labels, allow_missing=True)
    classes = class_ap_at_k(data.scores, data.labels, k, weights)
    images = image_ap_at_k(data.scores, data.labels, k)
    boot = PoissonBootstrap(len(vocab), k, replicates, 0)
    boot.update(data.keys.to_pylist(), data.scores, data.labels, images.ap)
    full = full_ap(data.scores, data.labels)
    return {
        "weighted_map_at_k": classes.weighted_map,
        "unweighted_map_at_k": classes.unweighted_map,
        "image_map_at_k": images.mean,
        "full_map": float(np.nanmean(full)),
        "images": len(data.keys),
        "positive_negative_conflicts": data.conflicts,
        "intervals": boot.intervals(weights),
    }


@pytest.mark.parametrize("k", [1, 5, 100])
def test_report_does_not_depend_on_the_batch_size(inputs, monkeypatch, k):
    preds, labels = inputs
    want = dense_reference(preds, labels, k)
    runs = {}
    for scores_per_batch in (1, 23 * 4, 10**9):  # one row, 4 rows (within row groups), all
        monkeypatch.setattr(report, "STREAM_SCORES", scores_per_batch)
        got = report.evaluate_files(preds, labels, k=k, allow_missing=True, bootstrap=50)
        runs[scores_per_batch] = (got.summary, got.rows)
    first = runs[1]
    assert all(run == first for run in runs.values())  # every field, every table row
    summary = first[0]
    for key in ("weighted_map_at_k", "unweighted_map_at_k", "image_map_at_k", "images"):
        assert summary[key] == want[key], key
    assert summary["full_map"] == pytest.approx(want["full_map"], abs=1e-15)
    assert summary["positive_negative_conflicts"] == want["positive_negative_conflicts"] > 0
    assert summary["predictions_without_labels"] == 10
    assert summary["labels_without_predictions"] == 5
    assert summary["label_rows_unknown_class"] == 1
    intervals = summary["confidence_intervals"]
    for key, interval in want["intervals"].items():
        assert intervals[key] == interval, key
    assert "notes" not in summary


def test_image_mode_does_not_depend_on_the_batch_size(inputs, monkeypatch):
    preds, labels = inputs
    runs = []
    for scores_per_batch in (1, 10**9):
        monkeypatch.setattr(report, "STREAM_SCORES", scores_per_batch)
        got = report.evaluate_files(preds, labels, k=3, mode="image", allow_missing=True)
        runs.append((got.summary, got.rows))
    assert runs[0] == runs[1]
    assert len(runs[0][1]) == 80


def test_full_ap_beyond_the_limit_is_left_out_with_a_note(inputs, monkeypatch):
    preds, labels = inputs
    monkeypatch.setattr(report, "FULL_AP_LIMIT", 100)
    summary = report.evaluate_files(preds, labels, allow_missing=True, bootstrap=0).summary
    assert summary["full_map"] is None
    assert summary["notes"] == [
        "full mAP not computed: 23 classes x 80 images exceed the limit of 100 scores held "
        "in memory"
    ]
    assert summary["weighted_map_at_k"] is not None
    assert "note: full mAP not computed" in report.format_summary(
        report.Report(summary, "", [], [])
    )


def test_bad_score_in_a_later_batch_is_the_whole_files_error(tmp_path, monkeypatch):
    """The batches are checked as they come; the message is read_predictions' (first bad row,
    all of them counted)."""
    scores = np.zeros((30, len(CLASS_IDS)), dtype=np.float32)
    scores[17, 3] = scores[25, 0] = np.nan
    keys = [f"k{i}" for i in range(30)]
    preds = write_predictions(tmp_path / "p.parquet", keys, scores, pa.float32(), 10)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"key": k, "positives": ["/m/c0"]}) + "\n" for k in keys))
    monkeypatch.setattr(report, "STREAM_SCORES", len(CLASS_IDS) * 5)
    with pytest.raises(InputFileError) as streamed:
        report.evaluate_files(preds, labels)
    with pytest.raises(InputFileError) as whole:
        read_predictions(preds)
    assert str(streamed.value) == str(whole.value)
    assert "row 17 (key 'k17')" in str(streamed.value)
    assert "(2 such value(s))" in str(streamed.value)


def test_score_batch_is_the_same_for_dense_labels_and_known_items():
    """The checkpoint pass scores batches whose labels are mostly unknown as KnownItems: the
    class-wise state, the bootstrap and the image-wise AP are those of the dense labels."""
    rng = np.random.default_rng(3)
    n, c, k = 130, 9, 5
    keys = [f"img{i}" for i in range(n)]
    scores = torch.from_numpy(np.round(rng.normal(size=(n, c)), 1).astype(np.float32))
    labels = torch.from_numpy(rng.choice([-1, 0, 1], p=[0.85, 0.1, 0.05], size=(n, c)))
    labels = labels.to(torch.int8)
    results = {}
    for form in ("dense", "items"):
        acc, boot, image_ap = MAPAccumulator(c, k), PoissonBootstrap(c, k, 20, seed=1), []
        for i in range(0, n, 25):
            s, lab = scores[i : i + 25], labels[i : i + 25]
            batch = KnownItems.of(s, lab) if form == "items" else lab
            image_ap.append(report.score_batch(keys[i : i + 25], s, batch, k, acc, boot).ap)
        results[form] = (acc.state_dict(), boot.replicate_values(), np.concatenate(image_ap))
    (acc_a, boot_a, ap_a), (acc_b, boot_b, ap_b) = results["dense"], results["items"]
    for name in ("values", "tie_count", "tie_positives", "positives", "known"):
        assert torch.equal(acc_a[name], acc_b[name]), name
    for name in boot_a:
        assert np.array_equal(boot_a[name], boot_b[name], equal_nan=True), name
    assert np.array_equal(ap_a, ap_b, equal_nan=True)


def test_an_estimate_outside_its_interval_is_named(tmp_path):
    """Classes of two known images, a negative ranked above the positive (AP 1/2 each): a
    replicate that drops the negative scores 1, one that counts it twice 1/3 (the positive
    once), so the replicates average well above 1/2 and the percentile interval excludes the
    estimate."""
    keys = [f"img{i:03d}" for i in range(2 * len(CLASS_IDS))]
    scores = np.zeros((len(keys), len(CLASS_IDS)))
    lines = ["ImageID,Source,LabelName,Confidence"]
    for c, cls in enumerate(CLASS_IDS):
        negative, positive = keys[2 * c], keys[2 * c + 1]
        scores[2 * c, c], scores[2 * c + 1, c] = 0.9, 0.1
        lines += [f"{negative},verification,{cls},0", f"{positive},verification,{cls},1"]
    preds = write_predictions(tmp_path / "p.parquet", keys, scores, pa.float32(), 10)
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    got = report.evaluate_files(preds, labels, bootstrap=200)
    summary = got.summary
    assert summary["unweighted_map_at_k"] == 0.5
    low, high = summary["confidence_intervals"]["unweighted_map_at_k"]
    assert 0.5 < low < high
    assert "unweighted_map_at_k" in summary["confidence_intervals"]["estimate_outside_interval"]
    assert "unweighted_map_at_k: the estimate lies outside its bootstrap interval" in (
        report.format_summary(got)
    )
