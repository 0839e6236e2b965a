"""eval.io: every bad input that docs/eval.md lists under "Errors" stops with InputFileError and a
message naming the file, the row (or line) and the offending value; skipped and conflicting
labels are counted, not lost; the real OpenImages class list reads right."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.io import (
    CLASS_IDS_METADATA,
    align,
    read_labels,
    read_predictions,
    read_weights,
)
from eval.report import evaluate_files
from mlc.io import Classes, InputFileError, read_classes

# CI checks the shared data out next to the repository: <root>/../shared.
SHARED = Path(__file__).resolve().parents[3] / "shared"  # tests/eval/test_io.py -> <root>/..
OPENIMAGES_CLASSES = SHARED / "data" / "openimages" / "oidv6-class-descriptions.csv"

OI_HEADER = "ImageID,Source,LabelName,Confidence\n"
XYZ = Classes(["x", "y", "z"], ["x", "y", "z"])


def parts(*pieces: str) -> str:
    """A regex matching the pieces, literally and in this order, anywhere in the message."""
    return ".*".join(re.escape(p) for p in pieces)


def write_predictions(path, keys, rows, class_ids=None):
    table = pa.table({"key": keys, "scores": pa.array(rows, pa.list_(pa.float32()))})
    if class_ids is not None:
        table = table.replace_schema_metadata({CLASS_IDS_METADATA: json.dumps(class_ids)})
    pq.write_table(table, path)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_text(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------- duplicate keys


def test_duplicate_prediction_keys_name_both_rows(tmp_path):
    path = write_predictions(
        tmp_path / "preds.parquet",
        ["a", "b", "a", "c"],
        [[0.1, 0.2, 0.3]] * 4,
        ["x", "y", "z"],
    )
    with pytest.raises(
        InputFileError, match=parts("preds.parquet", "'a'", "row 0", "row 2", "unique")
    ):
        read_predictions(path)


def test_duplicate_jsonl_label_keys_name_both_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "labels.jsonl",
        [
            {"key": "a", "positives": ["x"]},
            {"key": "b", "positives": ["y"]},
            {"key": "c", "positives": []},
            {"key": "b", "positives": ["z"]},
        ],
    )
    with pytest.raises(InputFileError, match=parts("labels.jsonl", "'b'", "line 2", "line 4")):
        read_labels(path, XYZ)


# ---------------------------------------------------------------- keys on one side only


@pytest.fixture
def one_sided(tmp_path):
    """Predictions for a, b, c; labels for b, c, d, e: a has no labels, d and e no predictions."""
    preds = write_predictions(
        tmp_path / "preds.parquet",
        ["a", "b", "c"],
        [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]],
        ["x", "y"],
    )
    labels = write_jsonl(
        tmp_path / "labels.jsonl",
        [
            {"key": "b", "positives": ["x"]},
            {"key": "c", "positives": ["y"]},
            {"key": "d", "positives": ["x"]},
            {"key": "e", "positives": ["y"]},
        ],
    )
    return preds, labels


def test_keys_on_one_side_only_are_an_error(one_sided):
    preds, labels = one_sided
    vocab = Classes(["x", "y"], ["x", "y"])
    with pytest.raises(InputFileError) as info:
        align(read_predictions(preds), read_labels(labels, vocab), preds, labels)
    message = str(info.value)
    assert re.search(
        parts("1 of 3 predicted images have no labels", "labels.jsonl", "'a'"), message
    )
    assert re.search(
        parts("2 of 4 labelled images have no prediction", "preds.parquet", "'d'", "'e'"), message
    )
    assert "--allow-missing" in message


def test_allow_missing_evaluates_the_intersection_and_reports_counts(one_sided):
    preds, labels = one_sided
    with pytest.raises(InputFileError, match="allow-missing"):
        evaluate_files(preds, labels)
    summary = evaluate_files(preds, labels, k=2, allow_missing=True).summary
    assert summary["images"] == 2  # b and c
    assert summary["predictions_without_labels"] == 1
    assert summary["labels_without_predictions"] == 2
    # Fully annotated (no negatives column): b = {x}, c = {y}; each class ranks its positive first.
    assert summary["weighted_map_at_k"] == 1.0


# ---------------------------------------------------------------- unknown class ids
#
# Label rows whose class id neither the predictions nor --classes know are skipped and counted,
# with the first few named (file, line, id), as `mlc shard` skips them; strict=True refuses
# them with an error naming the first one's line.


def test_unknown_class_in_openimages_csv_is_skipped_and_named(tmp_path):
    path = write_text(
        tmp_path / "human-imagelabels.csv",
        OI_HEADER
        + "a,verification,x,1\nb,verification,y,0\nb,verification,/m/nope,1\n\n"
        + "a,verification,/m/gone,0\nb,verification,z,1\n",
    )
    labels = read_labels(path, XYZ)
    assert labels.skipped_unknown_classes == 2
    assert labels.unknown_class_examples == [
        f"{path} line 4: class id '/m/nope'",
        f"{path} line 6: class id '/m/gone'",  # line 5 is blank
    ]
    assert labels.skipped_other_classes == 0
    # The other rows are read as without the unknown ones.
    assert (labels.pos_rows.tolist(), labels.pos_cols.tolist()) == ([0, 1], [0, 2])
    assert (labels.neg_rows.tolist(), labels.neg_cols.tolist()) == ([1], [1])
    with pytest.raises(
        InputFileError,
        match=parts("human-imagelabels.csv", "line 4", "unknown class id '/m/nope'", "2 label"),
    ):
        read_labels(path, XYZ, strict=True)


def test_unknown_class_in_jsonl_table_is_skipped_and_named(tmp_path):
    path = write_jsonl(
        tmp_path / "labels.jsonl",
        [
            {"key": "a", "positives": ["x"], "negatives": []},
            {"key": "b", "positives": ["y"], "negatives": ["x"]},
            {"key": "c", "positives": [], "negatives": ["z", "w"]},
        ],
    )
    labels = read_labels(path, XYZ)
    assert labels.skipped_unknown_classes == 1
    assert labels.unknown_class_examples == [f"{path} line 3: class id 'w' in negatives"]
    assert (labels.neg_rows.tolist(), labels.neg_cols.tolist()) == ([1, 2], [0, 2])
    with pytest.raises(
        InputFileError, match=parts("labels.jsonl", "line 3", "unknown class id 'w'")
    ):
        read_labels(path, XYZ, strict=True)


def test_unknown_class_in_parquet_table_is_skipped_and_named(tmp_path):
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "positives": [["x"], ["y", "q"]]}), path)
    labels = read_labels(path, XYZ)
    assert labels.skipped_unknown_classes == 1
    assert labels.unknown_class_examples == [f"{path} row 1: class id 'q' in positives"]
    assert (labels.pos_rows.tolist(), labels.pos_cols.tolist()) == ([0, 1], [0, 1])
    with pytest.raises(InputFileError, match=parts("labels.parquet", "row 1", "'q'")):
        read_labels(path, XYZ, strict=True)


def test_unknown_class_examples_are_capped_and_counted(tmp_path):
    rows = "".join(f"a,verification,/m/u{i},1\n" for i in range(8))
    path = write_text(tmp_path / "labels.csv", OI_HEADER + "a,verification,x,1\n" + rows)
    labels = read_labels(path, XYZ)
    assert labels.skipped_unknown_classes == 8
    assert labels.unknown_class_examples == [
        f"{path} line {i + 3}: class id '/m/u{i}'" for i in range(5)
    ]


# ---------------------------------------------------------------- scores


def test_score_list_of_wrong_length_names_row_and_key(tmp_path):
    path = write_predictions(
        tmp_path / "preds.parquet",
        ["a", "b", "c"],
        [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, 0.2]],
        ["x", "y", "z"],
    )
    with pytest.raises(
        InputFileError, match=parts("preds.parquet", "row 2 (key 'c')", "2 scores", "expected 3")
    ):
        read_predictions(path)


def test_score_list_of_wrong_length_without_metadata(tmp_path):
    path = write_predictions(tmp_path / "preds.parquet", ["a", "b"], [[0.1, 0.2], [0.1, 0.2, 0.3]])
    with pytest.raises(
        InputFileError, match=parts("preds.parquet", "row 1 (key 'b')", "3 scores", "expected 2")
    ):
        read_predictions(path)


def test_null_score_list_names_row_and_key(tmp_path):
    path = write_predictions(tmp_path / "preds.parquet", ["a", "b"], [[0.1, 0.2], None], ["x", "y"])
    with pytest.raises(
        InputFileError, match=parts("preds.parquet", "row 1 (key 'b')", "no scores")
    ):
        read_predictions(path)


def test_null_key_names_the_row(tmp_path):
    path = write_predictions(
        tmp_path / "preds.parquet", ["a", None], [[0.1, 0.2], [0.3, 0.4]], ["x", "y"]
    )
    with pytest.raises(InputFileError, match=parts("preds.parquet", "without a key", "row 1")):
        read_predictions(path)


def test_null_score_value_names_row_and_key(tmp_path):
    path = write_predictions(
        tmp_path / "preds.parquet", ["a", "b"], [[0.1, 0.2], [0.3, None]], ["x", "y"]
    )
    with pytest.raises(InputFileError, match=parts("preds.parquet", "row 1", "'b'")):
        read_predictions(path)


def test_nan_score_names_file_and_key(tmp_path):
    preds = write_predictions(
        tmp_path / "preds.parquet", ["a", "b"], [[0.1, 0.2], [0.3, float("nan")]], ["x", "y"]
    )
    labels = write_jsonl(
        tmp_path / "labels.jsonl", [{"key": "a", "positives": ["x"]}, {"key": "b", "positives": []}]
    )
    with pytest.raises(InputFileError, match=parts("preds.parquet", "'b'")):
        evaluate_files(preds, labels)


# ---------------------------------------------------------------- Confidence


@pytest.mark.parametrize("value", ["0.5", "2", "-1", ""])
def test_confidence_other_than_0_or_1_names_line_and_value(tmp_path, value):
    path = write_text(
        tmp_path / "human-imagelabels.csv",
        OI_HEADER + f"a,verification,x,1\na,verification,y,0\nb,verification,z,{value}\n",
    )
    with pytest.raises(
        InputFileError,
        match=parts("human-imagelabels.csv", "line 4", f"Confidence {value!r}", "expected 1"),
    ):
        read_labels(path, XYZ)


def test_non_numeric_confidence_names_the_line(tmp_path):
    path = write_text(
        tmp_path / "human-imagelabels.csv",
        OI_HEADER + "a,verification,x,1\nb,verification,y,yes\n",
    )
    with pytest.raises(InputFileError, match=parts("human-imagelabels.csv", "line 3", "yes")):
        read_labels(path, XYZ)


# ---------------------------------------------------------------- classes and vocabulary


def test_predictions_without_class_ids_need_classes(tmp_path):
    preds = write_predictions(tmp_path / "preds.parquet", ["a", "b"], [[0.9, 0.1], [0.2, 0.8]])
    labels = write_jsonl(
        tmp_path / "labels.jsonl",
        [{"key": "a", "positives": ["x"]}, {"key": "b", "positives": ["y"]}],
    )
    with pytest.raises(
        InputFileError, match=parts("preds.parquet", "no mlc.class_ids metadata", "--classes")
    ):
        evaluate_files(preds, labels)
    # --classes gives the score order; a list of the wrong size is named.
    classes = write_text(tmp_path / "classes.json", json.dumps(["x", "y"]))
    summary = evaluate_files(preds, labels, classes=classes, k=1).summary
    assert summary["weighted_map_at_k"] == 1.0
    three = write_text(tmp_path / "three.json", json.dumps(["x", "y", "z"]))
    with pytest.raises(InputFileError, match=parts("preds.parquet", "2 scores", "lists 3 classes")):
        evaluate_files(preds, labels, classes=three)


def test_label_rows_for_unscored_classes_are_skipped_and_counted(tmp_path):
    # The class list knows x, y, z and t; the predictions score only x and y.
    classes = write_text(tmp_path / "classes.csv", "x,Ex\ny,Why\nz,Zed\nt,Tee\n")
    preds = write_predictions(
        tmp_path / "preds.parquet", ["a", "b"], [[0.9, 0.1], [0.2, 0.8]], ["x", "y"]
    )
    csv_labels = write_text(
        tmp_path / "labels.csv",
        OI_HEADER + "a,v,x,1\na,v,z,1\na,v,y,0\nb,v,y,1\nb,v,t,0\nb,v,x,0\nb,v,z,1\n",
    )
    summary = evaluate_files(preds, csv_labels, classes=classes, k=2).summary
    assert summary["label_rows_for_unscored_classes"] == 3
    assert summary["classes"] == 2
    assert summary["weighted_map_at_k"] == 1.0
    table_labels = write_jsonl(
        tmp_path / "labels.jsonl",
        [
            {"key": "a", "positives": ["x", "z"], "negatives": ["y"]},
            {"key": "b", "positives": ["y", "z"], "negatives": ["t", "x"]},
        ],
    )
    table_summary = evaluate_files(preds, table_labels, classes=classes, k=2).summary
    assert table_summary["label_rows_for_unscored_classes"] == 3
    # Without --classes, the same rows name classes found nowhere: skipped and counted apart,
    # or with strict an error, with the line.
    unknown = evaluate_files(preds, csv_labels, k=2).summary
    assert unknown["label_rows_for_unscored_classes"] == 0
    assert unknown["label_rows_unknown_class"] == 3
    assert unknown["label_rows_unknown_class_examples"] == [
        f"{csv_labels} line {n}: class id {c!r}" for n, c in ((3, "z"), (6, "t"), (8, "z"))
    ]
    assert unknown["weighted_map_at_k"] == 1.0
    with pytest.raises(InputFileError, match=parts("labels.csv", "line 3", "unknown class id 'z'")):
        evaluate_files(preds, csv_labels, strict=True)


def test_positive_negative_conflict_counts_as_positive(tmp_path):
    preds = write_predictions(
        tmp_path / "preds.parquet", ["a", "b"], [[0.9, 0.1], [0.2, 0.8]], ["x", "y"]
    )
    labels = write_text(
        tmp_path / "labels.csv",
        OI_HEADER
        + "a,verification,x,0\na,crowdsource-verification,x,1\nb,verification,x,1\n"
        + "b,verification,y,1\n",
    )
    vocab = Classes(["x", "y"], ["x", "y"])
    data = align(read_predictions(preds), read_labels(labels, vocab), preds, labels)
    assert data.conflicts == 1
    # a: x positive (the conflict), y unknown; b: x and y positive.
    np.testing.assert_array_equal(data.labels, [[1, -1], [1, 1]])
    summary = evaluate_files(preds, labels, k=2).summary
    assert summary["positive_negative_conflicts"] == 1
    # x ranks a (.9) then b (.2), both positive: AP 1; y: only b known, positive: AP 1. Had the
    # negative won, x would be (0 + 1/2)/1 = 1/2 and the mean (1/2 + 1)/2 = 3/4.
    assert summary["weighted_map_at_k"] == 1.0


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        ({"x": 3, "y": -2}, "-2"),
        ({"positive_counts": {"x": 3, "y": -0.5}}, "-0.5"),
        ([3, -1], "-1"),
    ],
)
def test_negative_weight_names_class_and_value(tmp_path, content, shown):
    path = write_text(tmp_path / "weights.json", json.dumps(content))
    with pytest.raises(
        InputFileError, match=parts("weights.json", "class 'y'", f"weight {shown}", ">= 0")
    ):
        read_weights(str(path), Classes(["x", "y"], ["x", "y"]))


def test_non_finite_weight_is_an_error(tmp_path):
    path = write_text(tmp_path / "weights.json", '{"x": 1, "y": Infinity}')
    with pytest.raises(InputFileError, match=parts("weights.json", "class 'y'", "inf")):
        read_weights(str(path), Classes(["x", "y"], ["x", "y"]))


def test_negative_weight_in_parquet_weights(tmp_path):
    path = tmp_path / "weights.parquet"
    pq.write_table(pa.table({"class_id": ["x", "y"], "count": [4, -3]}), path)
    with pytest.raises(InputFileError, match=parts("weights.parquet", "class 'y'", "-3")):
        read_weights(str(path), Classes(["x", "y"], ["x", "y"]))


def test_weights_for_unscored_and_missing_classes(tmp_path):
    # Scored: x, y, z. The file lists x, y and two classes not scored; z gets weight 0.
    path = write_text(
        tmp_path / "weights.json", json.dumps({"x": 3, "y": 1, "other": 50, "another": 7})
    )
    weights = read_weights(str(path), XYZ)
    np.testing.assert_array_equal(weights.values, [3, 1, 0])
    assert (weights.unlisted, weights.extra) == (1, 2)

    preds = write_predictions(
        tmp_path / "preds.parquet",
        ["a", "b", "c"],
        [[0.9, 0.1, 0.8], [0.8, 0.9, 0.1], [0.1, 0.7, 0.9]],
        ["x", "y", "z"],
    )
    # Fully annotated, K=1. x: top a (pos) -> 1. y: top b (neg), P=1 -> 0. z: top c (pos) -> 1.
    labels = write_jsonl(
        tmp_path / "labels.jsonl",
        [
            {"key": "a", "positives": ["x"]},
            {"key": "b", "positives": []},
            {"key": "c", "positives": ["y", "z"]},
        ],
    )
    summary = evaluate_files(preds, labels, weights=str(path), k=1).summary
    assert summary["weight_file_classes_not_scored"] == 2
    assert summary["classes_without_reference_weight"] == 1
    assert summary["classes_zero_weight"] == 1  # z has a positive but weight 0
    assert summary["weighted_map_at_k"] == pytest.approx((3 * 1 + 1 * 0) / 4)
    assert summary["unweighted_map_at_k"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- class lists


def test_read_classes_small_csv_with_quotes_and_json(tmp_path):
    path = write_text(
        tmp_path / "classes.csv",
        '/m/01c_0l,"Ducks, geese and swans"\n/m/02wvth,"Fiat 500 ""topolino"""\n'
        "/m/0100nhbf,Sprenger's tulip\n",
    )
    classes = read_classes(path)
    assert classes.ids == ["/m/01c_0l", "/m/02wvth", "/m/0100nhbf"]
    assert classes.names == ["Ducks, geese and swans", 'Fiat 500 "topolino"', "Sprenger's tulip"]
    as_json = write_text(
        tmp_path / "classes.json",
        json.dumps({"classes": [{"id": "a", "name": "A, a"}, {"id": "b"}]}),
    )
    assert (read_classes(as_json).ids, read_classes(as_json).names) == (["a", "b"], ["A, a", "b"])


def test_read_classes_duplicate_id_is_an_error(tmp_path):
    path = write_text(tmp_path / "classes.csv", "x,Ex\ny,Why\nx,Ex again\n")
    with pytest.raises(InputFileError, match=parts("classes.csv", "'x'", "entries 1 and 3")):
        read_classes(path)


@pytest.mark.skipif(not OPENIMAGES_CLASSES.is_file(), reason=f"{OPENIMAGES_CLASSES} not present")
def test_read_classes_real_openimages_list():
    classes = read_classes(OPENIMAGES_CLASSES)
    assert len(classes) == 19_994
    assert len(set(classes.ids)) == 19_994
    name = dict(zip(classes.ids, classes.names, strict=True))
    assert name["/m/02wvth"] == 'Fiat 500 "topolino"'
    assert name["/m/01c_0l"] == "Ducks, geese and swans"
    assert name["/m/03hgsf0"] == "Lemon, lime and bitters"
    assert name["/m/01crnh"] == "Meal, ready-to-eat"
    assert name["/m/0100nhbf"] == "Sprenger's tulip"
    assert classes.ids[0] == "/m/0100nhbf"  # the first line is data, not a header
    assert all(cid.startswith("/") for cid in classes.ids)


# ---------------------------------------------------------------- bugs found while testing


def test_null_label_key_names_the_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"key": "a", "positives": ["x"]}\n{"key": null, "positives": ["y"]}\n')
    with pytest.raises(InputFileError, match=parts("labels.jsonl", "line 2")):
        read_labels(path, XYZ)


def test_empty_image_id_is_an_error(tmp_path):
    path = write_text(tmp_path / "labels.csv", OI_HEADER + "a,v,x,1\n,v,y,1\n")
    with pytest.raises(InputFileError, match=parts("labels.csv", "line 3", "ImageID")):
        read_labels(path, XYZ)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_line_numbers_after_a_blank_line(tmp_path, fmt):
    # The bad id 'q' sits on line 4 of the CSV (after the header) and line 3 of the JSONL.
    if fmt == "csv":
        path = write_text(tmp_path / "labels.csv", OI_HEADER + "a,v,x,1\n\nb,v,q,1\n")
        expected = "line 4"
    else:
        path = write_text(
            tmp_path / "labels.jsonl",
            '{"key": "a", "positives": ["x"]}\n\n{"key": "b", "positives": ["q"]}\n',
        )
        expected = "line 3"
    assert read_labels(path, XYZ).unknown_class_examples[0].startswith(f"{path} {expected}: ")
    with pytest.raises(InputFileError, match=parts(f"labels.{fmt}", expected, "'q'")):
        read_labels(path, XYZ, strict=True)


def test_duplicate_class_ids_in_metadata_are_an_error(tmp_path):
    preds = write_predictions(
        tmp_path / "preds.parquet", ["a", "b"], [[0.1, 0.2], [0.3, 0.4]], ["x", "x"]
    )
    labels = write_jsonl(
        tmp_path / "labels.jsonl", [{"key": "a", "positives": ["x"]}, {"key": "b", "positives": []}]
    )
    with pytest.raises(InputFileError, match=parts("preds.parquet", "'x'")):
        evaluate_files(preds, labels)


def test_negative_weight_is_an_error_even_for_an_unscored_class(tmp_path):
    path = write_text(tmp_path / "w.json", json.dumps({"x": 1, "y": 2, "z": 3, "unscored": -4}))
    with pytest.raises(InputFileError, match=parts("w.json", "'unscored'", "-4")):
        read_weights(str(path), XYZ)
