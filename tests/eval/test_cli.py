"""`mlc eval` end to end through mlc.cli.main on small OpenImages-format files whose AP@K values are
derived by hand below (definition: docs/metric.md), and on the built-in example."""

import csv
import json
import shlex
import subprocess
import sys
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.metrics import class_ap_at_k
from mlc.cli import main

ROOT = Path(__file__).resolve().parents[2]

# Real OpenImages V6 ids and names (oidv6-class-descriptions.csv), with the quoting they need.
CLASS_DESCRIPTIONS = (
    '/m/01c_0l,"Ducks, geese and swans"\n'
    '/m/02wvth,"Fiat 500 ""topolino"""\n'
    '/m/03hgsf0,"Lemon, lime and bitters"\n'
    '/m/01crnh,"Meal, ready-to-eat"\n'
    "/m/0100nhbf,Sprenger's tulip\n"
)
A, B, C, D, T = "/m/01c_0l", "/m/02wvth", "/m/03hgsf0", "/m/01crnh", "/m/0100nhbf"
NAMES = {
    A: "Ducks, geese and swans",
    B: 'Fiat 500 "topolino"',
    C: "Lemon, lime and bitters",
    D: "Meal, ready-to-eat",
}
SCORED = [A, B, C, D]  # the predictions score A..D; T (the tulip) is listed but not scored
KEYS = ["i1", "i2", "i3", "i4", "i5"]
# Rows i1..i5, columns A B C D. 0.7 and 0.5 are the same float32 wherever they occur: ties.
SCORES = [
    [0.9, 0.7, 0.1, 0.5],
    [0.8, 0.7, 0.2, 0.4],
    [0.7, 0.7, 0.3, 0.3],
    [0.6, 0.2, 0.4, 0.2],
    [0.5, 0.1, 0.5, 0.1],
]
# Human-verified labels (1 positive, 0 verified negative); every pair not listed is unknown.
# i1/T is for a class the predictions do not score (skipped, counted); i5/C is listed as positive
# by one source and negative by another (a conflict: counts as positive).
LABEL_ROWS = [
    ("i1", "verification", B, 1),
    ("i1", "verification", C, 1),
    ("i1", "verification", D, 0),
    ("i1", "verification", T, 1),
    ("i2", "verification", A, 0),
    ("i2", "verification", B, 0),
    ("i2", "verification", D, 0),
    ("i3", "verification", A, 1),
    ("i3", "verification", B, 1),
    ("i3", "verification", D, 0),
    ("i4", "verification", A, 1),
    ("i4", "verification", B, 0),
    ("i4", "verification", C, 0),
    ("i5", "verification", A, 0),
    ("i5", "verification", C, 1),
    ("i5", "crowdsource-verification", C, 0),
]
# Reference counts: T is not scored (ignored, counted); D has no positives, so its weight is moot.
WEIGHTS = {A: 3, B: 1, C: 2, D: 5, T: 100}

# Class-wise AP@2 by hand. AP@K_c = (1/min(P_c, K)) * sum_{r<=K} rel_r * precision@r over the
# images whose label for c is known; tied scores averaged over their orderings.
#
# A (Ducks): scores .9 .8 .7 .6 .5, labels ? 0 1 1 0. Known ranking: i2(0) i3(1) i4(1) i5(0);
#   P=2. Rank 1 misses, rank 2 hits with precision 1/2: AP = (1/2) / min(2, 2) = 1/4.
#   (Were the unknown i1 a negative, ranks 1-2 would both miss: AP 0.)
# B (Fiat): scores .7 .7 .7 .2 .1, labels 1 0 1 0 ?. i1 i2 i3 tie at .7 (2 positives, 1
#   negative) across rank K=2; P=2. The negative is first, second or third with chance 1/3 each:
#   0 1 1 -> (1/2)/2 = 1/4;  1 0 1 -> (1/1)/2 = 1/2;  1 1 0 -> (1 + 1)/2 = 1.
#   AP = (1/4 + 1/2 + 1)/3 = 7/12 (metric.md's closed form: (2/3 + 1/2)/2, the same).
# C (Lemon): scores .1 .2 .3 .4 .5, labels 1 ? ? 0 1 (i5: conflict -> positive). Ranking:
#   i5(1) i4(0) i1(1); P=2: AP = (1/1)/2 = 1/2. (Had the negative won: P=1, top 2 miss, AP 0.)
# D (Meal): labels 0 0 0 ? ?: no positive, excluded (not counted as 0).
AP_AT_2 = {A: F(1, 4), B: F(7, 12), C: F(1, 2)}
# fwMAP@2 with the reference weights = (3*1/4 + 1*7/12 + 2*1/2)/(3 + 1 + 2) = (28/12)/6 = 7/18.
WEIGHTED = F(7, 18)
# Plain mean = (1/4 + 7/12 + 1/2)/3 = (16/12)/3 = 4/9.
UNWEIGHTED = F(4, 9)
# Full (untruncated) AP: A: hits at ranks 2, 3 -> (1/2 + 2/3)/2 = 7/12.
#   B: tie block of 3 holding 2 positives, then i4(0). Expected rel*hits/rank at ranks 1..3 is
#   (2/3)/1, (2/3 + 1/3)/2, (2/3 + 2/3)/3 -> (2/3 + 1/2 + 4/9)/2 = 29/36.
#   C: hits at ranks 1, 3 -> (1 + 2/3)/2 = 5/6.   full mAP = (7/12 + 29/36 + 5/6)/3 = 20/27.
FULL_AP = {A: F(7, 12), B: F(29, 36), C: F(5, 6)}
FULL_MAP = F(20, 27)

# Image-wise AP@2 by hand (each image's known classes ranked by score):
# i1: B .7(1), D .5(0), C .1(1); P=2: (1/1 + 0)/2 = 1/2.
# i2: A, B, D known, all negative: no positive, excluded.
# i3: A .7(1), B .7(1), D .3(0); P=2: ranks 1 and 2 hit whatever the tie order: (1 + 1)/2 = 1.
# i4: A .6(1), C .4(0), B .2(0); P=1: 1.
# i5: A .5(0) and C .5(1) tie; P=1. C first or second with chance 1/2: (1/2)(1) + (1/2)(1/2)
#   = 3/4.   Image MAP@2 = (1/2 + 1 + 1 + 3/4)/4 = 13/16.
IMAGE_AP_AT_2 = {"i1": F(1, 2), "i3": F(1), "i4": F(1), "i5": F(3, 4)}
IMAGE_MAP = F(13, 16)


def write_predictions(path, keys=KEYS, scores=SCORES, class_ids=SCORED):
    table = pa.table({"key": keys, "scores": pa.array(scores, pa.list_(pa.float32()))})
    table = table.replace_schema_metadata({b"mlc.class_ids": json.dumps(class_ids)})
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    classes = tmp_path / "class-descriptions.csv"
    classes.write_text(CLASS_DESCRIPTIONS)
    labels = tmp_path / "human-imagelabels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["ImageID", "Source", "LabelName", "Confidence"])
        writer.writerows(LABEL_ROWS)
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"positive_counts": WEIGHTS}))
    return {
        "predictions": write_predictions(tmp_path / "predictions.parquet"),
        "labels": str(labels),
        "classes": str(classes),
        "weights": str(weights),
        "dir": tmp_path,
    }


def run_eval(files, out, *extra, labels=None):
    argv = [
        "eval",
        "--predictions",
        files["predictions"],
        "--labels",
        str(labels or files["labels"]),
        "--classes",
        files["classes"],
        "--output",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def read_table(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_class_mode_matches_hand_derivation(files, tmp_path, capsys):
    out = tmp_path / "out"
    summary = run_eval(files, out, "--k", "2", "--weights", files["weights"])
    assert summary["weighted_map_at_k"] == pytest.approx(float(WEIGHTED), abs=1e-12)
    assert summary["unweighted_map_at_k"] == pytest.approx(float(UNWEIGHTED), abs=1e-12)
    assert summary["full_map"] == pytest.approx(float(FULL_MAP), abs=1e-12)
    assert summary["k"] == 2
    assert summary["images"] == 5
    assert summary["classes"] == 4
    assert summary["unlisted_pairs"] == "unknown"
    assert summary["classes_evaluated"] == 3
    assert summary["classes_excluded_no_positives"] == 1
    assert summary["excluded_class_ids"] == [D]
    assert summary["classes_zero_weight"] == 0
    assert summary["label_rows_for_unscored_classes"] == 1  # i1/T
    assert summary["positive_negative_conflicts"] == 1  # i5/C
    assert summary["weight_file_classes_not_scored"] == 1  # T
    assert summary["classes_without_reference_weight"] == 0
    assert summary["predictions_without_labels"] == summary["labels_without_predictions"] == 0

    rows = read_table(out / "per_class.csv")
    assert list(rows[0]) == [
        "class_id",
        "name",
        "reference_count",
        "weight",
        "positives",
        "known",
        "ap_at_2",
        "full_ap",
    ]
    assert [r["class_id"] for r in rows] == SCORED
    assert {r["class_id"]: r["name"] for r in rows} == NAMES  # quotes and commas round-trip
    by_id = {r["class_id"]: r for r in rows}
    for cid in (A, B, C):
        assert float(by_id[cid]["ap_at_2"]) == pytest.approx(float(AP_AT_2[cid]), abs=1e-12)
        assert float(by_id[cid]["full_ap"]) == pytest.approx(float(FULL_AP[cid]), abs=1e-12)
    assert by_id[D]["ap_at_2"] == by_id[D]["full_ap"] == ""  # excluded: empty, not 0
    assert {cid: float(r["weight"]) for cid, r in by_id.items()} == {A: 3, B: 1, C: 2, D: 5}
    assert {cid: int(r["reference_count"]) for cid, r in by_id.items()} == {A: 3, B: 1, C: 2, D: 5}
    assert {cid: int(r["positives"]) for cid, r in by_id.items()} == {A: 2, B: 2, C: 2, D: 0}
    assert {cid: int(r["known"]) for cid, r in by_id.items()} == {A: 4, B: 4, C: 3, D: 3}

    printed = capsys.readouterr().out
    assert "fwMAP@2  0.3889" in printed
    assert "note: 1 (image, class) pairs were both positive and negative" in printed
    assert f"wrote {out / 'per_class.csv'}" in printed


def test_default_and_uniform_weights(files, tmp_path):
    # positives (default): A, B, C have 2 positives each, so it equals the plain mean.
    summary = run_eval(files, tmp_path / "pos", "--k", "2")
    assert summary["weighted_map_at_k"] == pytest.approx(float(UNWEIGHTED), abs=1e-12)
    uniform = run_eval(files, tmp_path / "uni", "--k", "2", "--weights", "uniform")
    assert uniform["weighted_map_at_k"] == pytest.approx(float(UNWEIGHTED), abs=1e-12)


def test_image_mode_matches_hand_derivation(files, tmp_path):
    out = tmp_path / "out"
    summary = run_eval(files, out, "--k", "2", "--mode", "image")
    assert summary["image_map_at_k"] == pytest.approx(float(IMAGE_MAP), abs=1e-12)
    assert summary["images_evaluated"] == 4
    assert summary["images_excluded_no_positives"] == 1
    rows = read_table(out / "per_image.csv")
    assert list(rows[0]) == ["key", "positives", "known", "ap_at_2"]
    assert [r["key"] for r in rows] == KEYS
    for r in rows:
        expected = IMAGE_AP_AT_2.get(r["key"])
        if expected is None:
            assert r["ap_at_2"] == ""
        else:
            assert float(r["ap_at_2"]) == pytest.approx(float(expected), abs=1e-12)
    assert [int(r["positives"]) for r in rows] == [2, 0, 2, 1, 1]
    assert [int(r["known"]) for r in rows] == [3, 3, 3, 3, 2]
    assert not (out / "per_class.csv").exists()


def test_jsonl_table_gives_the_same_result_as_the_csv(files, tmp_path):
    table = {key: {"key": key, "positives": [], "negatives": []} for key in KEYS}
    for key, _, cid, confidence in LABEL_ROWS:
        table[key]["positives" if confidence else "negatives"].append(cid)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in table.values()))
    args = ["--k", "2", "--weights", files["weights"]]
    from_csv = run_eval(files, tmp_path / "csv", *args)
    from_jsonl = run_eval(files, tmp_path / "jsonl", *args, labels=labels)
    assert from_jsonl.pop("labels") == str(labels)
    from_csv.pop("labels")
    assert from_jsonl == from_csv
    assert from_jsonl["positive_negative_conflicts"] == 1
    assert from_jsonl["label_rows_for_unscored_classes"] == 1
    csv_table = (tmp_path / "csv" / "per_class.csv").read_text()
    assert (tmp_path / "jsonl" / "per_class.csv").read_text() == csv_table


def test_parquet_table_without_negatives_is_fully_annotated(files, tmp_path):
    positives = {"i1": [B, C, T], "i2": [], "i3": [A, B], "i4": [A], "i5": [C]}
    labels = tmp_path / "labels.parquet"
    pq.write_table(
        pa.table({"key": list(positives), "positives": list(positives.values())}), labels
    )
    # Unlisted = negative. K=2, uniform weights:
    # A: scores .9 .8 .7 .6 .5, labels 0 0 1 1 0: ranks 1-2 miss, AP 0.
    # B: .7 .7 .7 .2 .1, labels 1 0 1 0 0: the same tie as before, AP 7/12.
    # C: .1 .2 .3 .4 .5, labels 1 0 0 0 1: i5(1) i4(0) ...: AP (1/1)/2 = 1/2.
    # D: no positive, excluded. MAP@2 = (0 + 7/12 + 1/2)/3 = 13/36.
    summary = run_eval(files, tmp_path / "neg", "--k", "2", "--weights", "uniform", labels=labels)
    assert summary["unlisted_pairs"] == "negative"
    assert summary["weighted_map_at_k"] == pytest.approx(13 / 36, abs=1e-12)
    assert summary["label_rows_for_unscored_classes"] == 1
    assert summary["positive_negative_conflicts"] == 0
    known = {r["class_id"]: int(r["known"]) for r in read_table(tmp_path / "neg" / "per_class.csv")}
    assert known == dict.fromkeys(SCORED, 5)
    # --unlisted unknown: only the positives are known, so every class ranks positives only
    # (A: i3 i4, B: i1 i3, C: i1 i5): AP 1 each; D has nothing known and is excluded.
    unknown = run_eval(
        files,
        tmp_path / "unk",
        "--k",
        "2",
        "--weights",
        "uniform",
        "--unlisted",
        "unknown",
        labels=labels,
    )
    assert unknown["unlisted_pairs"] == "unknown"
    assert unknown["weighted_map_at_k"] == 1.0
    assert unknown["excluded_class_ids"] == [D]


def test_unlisted_negative_overrides_openimages_unknowns(files, tmp_path):
    # In the CSV, i1/A is unknown; as a negative it takes rank 1 of A (score .9), and A's top 2
    # (i1, i2) both miss: AP 0. B and C: their unknowns (i5/B, i2/C, i3/C) rank below rank 2 or
    # are negatives below it, so 7/12 and 1/2 stay. fwMAP@2 = (3*0 + 1*7/12 + 2*1/2)/6 = 19/72.
    summary = run_eval(
        files, tmp_path / "out", "--k", "2", "--weights", files["weights"], "--unlisted", "negative"
    )
    assert summary["unlisted_pairs"] == "negative"
    assert summary["weighted_map_at_k"] == pytest.approx(19 / 72, abs=1e-12)


def test_example_matches_the_metric_on_its_own_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "--example", "--output", str(out)]) == 0
    assert "fwMAP@100" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    example = out / "example"

    # Rebuild the dense label matrix without eval.io.
    preds = pq.read_table(example / "predictions.parquet")
    class_ids = json.loads(preds.schema.metadata[b"mlc.class_ids"])
    keys = preds["key"].to_pylist()
    scores = np.array(preds["scores"].to_pylist(), dtype=np.float32)
    row = {key: i for i, key in enumerate(keys)}
    col = {cid: j for j, cid in enumerate(class_ids)}
    labels = np.full(scores.shape, -1, dtype=np.int8)
    with (example / "human-imagelabels.csv").open(newline="") as f:
        records = list(csv.DictReader(f))
    for wanted in ("0", "1"):  # negatives first: a positive wins a conflict
        for r in records:
            if r["Confidence"] == wanted:
                labels[row[r["ImageID"]], col[r["LabelName"]]] = int(wanted)
    counts = json.loads((example / "weights.json").read_text())["positive_counts"]
    weights = np.array([counts[cid] for cid in class_ids], dtype=np.float64)

    expected = class_ap_at_k(scores, labels, k=100, weights=weights)
    assert summary["weighted_map_at_k"] == pytest.approx(expected.weighted_map, abs=1e-12)
    assert summary["unweighted_map_at_k"] == pytest.approx(expected.unweighted_map, abs=1e-12)
    assert summary["images"] == len(keys)
    assert summary["classes"] == len(class_ids)

    # The example's class list carries real OpenImages names with commas and quotes.
    names = {r["class_id"]: r["name"] for r in read_table(out / "per_class.csv")}
    assert names[A] == NAMES[A]
    assert names[B] == NAMES[B]


def test_bad_input_exits_2_with_message_on_stderr(files, tmp_path, capsys):
    labels = tmp_path / "bad.csv"
    labels.write_text("ImageID,Source,LabelName,Confidence\ni1,verification,/m/0zzzz,2\n")
    out = tmp_path / "out"
    argv = ["eval", "--predictions", files["predictions"], "--labels", str(labels)]
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlc eval: error: ")
    assert "bad.csv: line 2 has Confidence '2'" in err
    assert not out.exists()  # nothing written


def test_unknown_class_rows_are_skipped_counted_and_reported(files, tmp_path, capsys):
    """Label rows with a class id found nowhere: skipped and counted as `mlc shard` does, named
    in summary.json, the printed summary and report.md; --strict refuses them (exit 2)."""
    labels = tmp_path / "unknown.csv"
    rows = Path(files["labels"]).read_text().splitlines()
    rows.insert(3, "i1,verification,/m/0zzzz,1")  # line 4
    rows.append("i4,verification,/m/0yyyy,0")  # line 19
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    summary = run_eval(files, out, "--k", "2", "--weights", files["weights"], labels=labels)
    assert summary["label_rows_unknown_class"] == 2
    examples = [
        f"{labels} line 4: class id '/m/0zzzz'",
        f"{labels} line 19: class id '/m/0yyyy'",
    ]
    assert summary["label_rows_unknown_class_examples"] == examples
    assert summary["label_rows_for_unscored_classes"] == 1  # T, as before
    assert F(summary["weighted_map_at_k"]).limit_denominator(1000) == WEIGHTED  # unchanged
    printed = capsys.readouterr().out
    assert (
        "note: 2 label rows with class ids in neither the predictions' classes nor --classes "
        f"were skipped (--strict refuses them), e.g. {examples[0]}\n"
    ) in printed
    report = (out / "report.md").read_text()
    assert "## Skipped inputs" in report
    assert f"e.g. {examples[0]}; {examples[1]}" in report

    strict = tmp_path / "strict"
    argv = ["eval", "--predictions", files["predictions"], "--labels", str(labels)]
    argv += ["--classes", files["classes"], "--output", str(strict), "--strict"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"mlc eval: error: {labels}: line 4 has unknown class id '/m/0zzzz' (2 label(s)"
    )
    assert err.count("\n") == 1  # one line
    assert not strict.exists()


def test_missing_keys_exit_2_and_allow_missing_evaluates(files, tmp_path, capsys):
    preds = write_predictions(tmp_path / "more.parquet", KEYS + ["i6"], SCORES + [[0.0] * 4])
    base = ["eval", "--predictions", preds, "--labels", files["labels"], "--k", "2"]
    base += ["--classes", files["classes"]]
    assert main([*base, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "mlc eval: error: 1 of 6 predicted images have no labels" in err
    assert "'i6'" in err and "--allow-missing" in err
    assert main([*base, "--output", str(tmp_path / "b"), "--allow-missing"]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["predictions_without_labels"] == 1
    assert summary["images"] == 5
    assert summary["unweighted_map_at_k"] == pytest.approx(float(UNWEIGHTED), abs=1e-12)


def test_usage_errors_exit_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "--output", str(out)]) == 2  # no inputs at all
    assert "give --checkpoint and --data, or --predictions and --labels" in capsys.readouterr().err
    for option in (["--bootstrap", "-1"], ["--k", "0"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as stop:
            main(["eval", "--example", "--output", str(out), *option])
        assert stop.value.code == 2
        assert f"argument {option[0]}: must be >=" in capsys.readouterr().err
    assert not out.exists()


def test_a_closed_output_pipe_is_a_normal_end(tmp_path):
    """`mlc eval ... | head -1`: the reader is gone (here before the first line) when mlc writes."""
    command = (
        f"set -o pipefail; {shlex.quote(sys.executable)} -m mlc.cli eval --example --output "
        f"{shlex.quote(str(tmp_path / 'r'))} | true"
    )
    result = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Broken pipe" not in result.stderr and "Error" not in result.stderr
