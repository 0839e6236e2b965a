"""data_tools.sources.openimages: the small OpenImages-style dataset of conftest.py read into a
Catalog and checked against catalogs written out by hand below; every label-row and image skip
reason counted; --trainable and the rotation CSV; and the real 19,994-class list (quoted names
with commas and doubled quotes) carried into classes.json by `mlc shard`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_tools.catalog import CATALOG_SCHEMA, FileLoader
from data_tools.sources.openimages import read_openimages
from mlc.cli import main

from .conftest import (
    CLASS_IDS,
    CLASS_NAMES,
    DUCK,
    FIAT,
    LEMON,
    PERSON,
    TRAINABLE,
    image_id,
)

REAL_CLASSES = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "openimages"
    / "oidv6-class-descriptions.csv"
)

# Image k -> (positives, negatives) as indices into the small class list:
# 0 Duck, 1 Fiat, 2 Lemon, 3 Person, 4 Cat, 5 Dog, 6 Car, 7 Flower. Written from the label rows
# of conftest.py by hand. Image 28 has only labels of a class outside the list: not a row.
EXPECTED = {
    1: ([0], [3]),
    2: ([1, 6], [5]),
    3: ([2], []),
    4: ([3, 4], [5, 6]),
    5: ([5], []),
    6: ([4], [7]),
    7: ([7], [0]),
    8: ([3, 6], [1]),
    9: ([], [0]),
    10: ([3], []),
    11: ([5], []),
    12: ([6], []),
    13: ([2], [0]),
    14: ([7], [4]),
    15: ([3, 4, 5, 6, 7], [0, 1, 2]),
    16: ([3, 5], [0, 4, 6, 7]),
    17: ([4], [1, 3, 5, 6]),
    18: ([6], []),
    19: ([1], [6]),
    20: ([3], [2]),
    21: ([4, 5], []),
    22: ([0, 7], []),
    23: ([3], [6]),
    24: ([0, 1, 2], []),
    25: ([5], [4]),
    26: ([3], []),
    27: ([6], []),
    29: ([5], []),
    30: ([3], []),
    31: ([4], []),
}

# With --trainable: vocabulary Car 0, Duck 1, Fiat 2, Lemon 3, Person 4, Dog 5 (the trainable
# file's order); Cat and Flower rows are "not a trainable class". Images 6, 14 and 31 have only
# Cat/Flower labels: "no trainable labels" (left out as asked); 28 only Tree's: no known labels.
EXPECTED_TRAINABLE = {
    1: ([1], [4]),
    2: ([0, 2], [5]),
    3: ([3], []),
    4: ([4], [0, 5]),
    5: ([5], []),
    7: ([], [1]),
    8: ([0, 4], [2]),
    9: ([], [1]),
    10: ([4], []),
    11: ([5], []),
    12: ([0], []),
    13: ([3], [1]),
    15: ([0, 4, 5], [1, 2, 3]),
    16: ([4, 5], [0, 1]),
    17: ([], [0, 2, 4, 5]),
    18: ([0], []),
    19: ([2], [0]),
    20: ([4], [3]),
    21: ([5], []),
    22: ([1], []),
    23: ([4], [0]),
    24: ([1, 2, 3], []),
    25: ([5], []),
    26: ([4], []),
    27: ([0], []),
    29: ([5], []),
    30: ([4], []),
}

LABEL_ROW_SKIPS = {
    "malformed line": 2,
    "no ImageID": 1,
    "bad Confidence (not 0 or 1)": 1,
    "unknown class id": 2,  # image 10's /m/0notaclass, image 28's Tree
    "positive and negative (kept positive)": 1,
    "duplicate (image, class) row": 2,
}
LABEL_ROWS = 75  # the data lines of the labels CSV (malformed ones included)


def catalog_rows(catalog) -> dict[int, tuple[list[int], list[int]]]:
    table = catalog.table.to_pydict()
    return {
        int(i, 16): (p, n)
        for i, p, n in zip(table["id"], table["positives"], table["negatives"], strict=True)
    }


def test_catalog_matches_hand_written_expectation(oi):
    catalog = read_openimages(oi.classes, [oi.labels], oi.images)
    assert catalog.class_ids == CLASS_IDS
    assert catalog.class_names == CLASS_NAMES
    assert catalog.annotation == "partial"
    assert catalog.table.schema.equals(CATALOG_SCHEMA)
    # Rows in order of the images' first appearance in the labels file.
    assert catalog.table["id"].to_pylist() == [image_id(k) for k in EXPECTED]
    assert catalog_rows(catalog) == EXPECTED
    assert catalog.table["locator"].to_pylist() == [f"{image_id(k)}.jpg" for k in EXPECTED]
    assert catalog.table["rotation"].to_pylist() == [0] * len(EXPECTED)  # no rotation CSV
    assert isinstance(catalog.loader, FileLoader)
    assert catalog.loader.root == str(oi.images)


def test_label_row_and_image_skips_are_counted(oi):
    catalog = read_openimages(oi.classes, [oi.labels], oi.images)
    assert dict(catalog.label_row_skips.counts) == LABEL_ROW_SKIPS
    assert catalog.label_rows_read == LABEL_ROWS
    assert dict(catalog.image_skips.counts) == {"no known labels": 1}
    assert catalog.image_skips.examples["no known labels"] == [image_id(28)]
    assert catalog.images_read == 31
    assert catalog.images_read == catalog.table.num_rows + catalog.image_skips.total
    # Examples name the offending row.
    examples = catalog.label_row_skips.examples
    assert examples["bad Confidence (not 0 or 1)"] == [f"{image_id(11)} /m/01yrx 0.5"]
    assert f"{image_id(10)} /m/0notaclass" in examples["unknown class id"]
    assert len(examples["malformed line"]) == 2
    assert examples["malformed line"][0].startswith("image-labels.csv line 13: ")
    # Every reason has examples, duplicate and conflicting rows too.
    assert set(examples) == set(LABEL_ROW_SKIPS)
    assert examples["positive and negative (kept positive)"] == [f"{image_id(12)} /m/0k4j"]
    assert examples["duplicate (image, class) row"] == [
        f"{image_id(13)} /m/01c_0l",
        f"{image_id(13)} /m/03hgsf0",
    ]
    # The catalog's label_rows: one kept label row per (image, class) pair.
    ids, label_rows = catalog.table["id"].to_pylist(), catalog.table["label_rows"].to_pylist()
    rows = dict(zip(ids, label_rows, strict=True))
    assert rows == {image_id(k): len(p) + len(n) for k, (p, n) in EXPECTED.items()}


def test_trainable_restricts_the_vocabulary(oi):
    catalog = read_openimages(oi.classes, [oi.labels], oi.images, trainable=oi.trainable)
    assert catalog.class_ids == TRAINABLE
    names = dict(zip(CLASS_IDS, CLASS_NAMES, strict=True))
    assert catalog.class_names == [names[c] for c in TRAINABLE]
    assert catalog.table["id"].to_pylist() == [image_id(k) for k in EXPECTED_TRAINABLE]
    assert catalog_rows(catalog) == EXPECTED_TRAINABLE
    # 15 Cat/Flower rows with a valid Confidence (image 11's Cat row has 0.5: bad Confidence).
    assert dict(catalog.label_row_skips.counts) == {**LABEL_ROW_SKIPS, "not a trainable class": 15}
    assert catalog.label_rows_read == LABEL_ROWS
    assert catalog.image_skips.to_dict() == {
        "no known labels": {"count": 1, "examples": [image_id(28)]},
        "no trainable labels": {"count": 3, "examples": [image_id(k) for k in (6, 14, 31)]},
    }
    assert catalog.images_read == 31
    assert catalog.images_read == catalog.table.num_rows + catalog.image_skips.total


def test_trainable_file_errors(oi, tmp_path):
    bad = tmp_path / "trainable.txt"
    bad.write_text(f"{DUCK}\n/m/0notaclass\n")
    with pytest.raises(ValueError, match=r"line 2: '/m/0notaclass' is not in the class desc"):
        read_openimages(oi.classes, [oi.labels], oi.images, trainable=bad)
    bad.write_text(f"{DUCK}\n{FIAT}\n{DUCK}\n")
    with pytest.raises(ValueError, match="line 3: '/m/01c_0l' listed twice"):
        read_openimages(oi.classes, [oi.labels], oi.images, trainable=bad)


def test_rotation_csv_values_reach_the_catalog(oi):
    catalog = read_openimages(oi.classes, [oi.labels], oi.images, rotation_csv=oi.rotation)
    rotation = dict(
        zip(
            [int(i, 16) for i in catalog.table["id"].to_pylist()],
            catalog.table["rotation"].to_pylist(),
            strict=True,
        )
    )
    # 29: 90.0, 30: 180, 31: 270.0; image 1's empty value, image 2's 0.0 and every image not in
    # the rotation CSV: 0. Image 99 (in the CSV, not labelled) does not appear.
    assert rotation == {k: {29: 90, 30: 180, 31: 270}.get(k, 0) for k in EXPECTED}
    assert catalog_rows(catalog) == EXPECTED


def test_labels_split_over_several_files(oi, tmp_path):
    """Two label CSVs read as one: an image's rows in both files are merged, and a pair listed
    positive in one file and negative in the other is a conflict like within one file."""
    lines = oi.labels.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("\n".join([header, *rows[:40]]) + "\n")
    second.write_text("\n".join([header, *rows[40:]]) + "\n")
    catalog = read_openimages(oi.classes, [first, second], oi.images)
    assert catalog_rows(catalog) == EXPECTED
    assert catalog.label_rows_read == LABEL_ROWS
    assert dict(catalog.label_row_skips.counts) == LABEL_ROW_SKIPS

    extra = tmp_path / "c.csv"
    extra.write_text(f"{header}\n{image_id(3)},verification,{LEMON},0\n")  # 3: Lemon positive
    catalog = read_openimages(oi.classes, [oi.labels, extra], oi.images)
    assert catalog_rows(catalog)[3] == ([2], [])
    assert catalog.label_row_skips.counts["positive and negative (kept positive)"] == 2


def test_labels_csv_without_the_openimages_columns(oi, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text(f"ImageID,LabelName,Confidence\n{image_id(1)},{DUCK},1\n")
    with pytest.raises(ValueError, match=r"missing \['Source'\]"):
        read_openimages(oi.classes, [bad], oi.images)
    with pytest.raises(FileNotFoundError, match="no such labels file"):
        read_openimages(oi.classes, [tmp_path / "nope.csv"], oi.images)


# ---------------------------------------------------------------- the real class list


def real_class_list() -> list[tuple[str, str]]:
    """The real class descriptions, parsed with Python's csv module (independently of the
    reader under test)."""
    with REAL_CLASSES.open(newline="", encoding="utf-8") as f:
        return [(row[0], row[1]) for row in csv.reader(f)]


@pytest.mark.skipif(not REAL_CLASSES.is_file(), reason=f"{REAL_CLASSES} not present")
def test_real_class_list_reaches_classes_json(oi, tmp_path):
    real = real_class_list()
    assert len(real) == 19_994
    index = {cid: i for i, (cid, _) in enumerate(real)}
    names = dict(real)
    assert names["/m/02wvth"] == 'Fiat 500 "topolino"'  # the csv module's reading

    labels = tmp_path / "labels.csv"
    rows = [
        (1, DUCK, 1),  # "Ducks, geese and swans": a comma in the name
        (1, FIAT, 0),  # 'Fiat 500 "topolino"': doubled quotes
        (2, FIAT, 1),
        (2, LEMON, 1),  # "Lemon, lime and bitters"
        (3, PERSON, 1),
        (3, "/m/01qtdl", 0),  # "Datsun 1500, 1600, 2000 roadster"
    ]
    labels.write_text(
        "ImageID,Source,LabelName,Confidence\n"
        + "".join(f"{image_id(k)},verification,{c},{v}\n" for k, c, v in rows)
    )
    out = tmp_path / "out"
    args = ["openimages", "--classes", str(REAL_CLASSES), "--labels", str(labels)]
    assert main(["shard", *args, "--images", str(oi.images), "--out", str(out), "--quiet"]) == 0

    classes = json.loads((out / "classes.json").read_text())
    assert classes["annotation"] == "partial"
    assert len(classes["classes"]) == 19_994
    assert classes["classes"] == [
        {"index": i, "id": cid, "name": name} for i, (cid, name) in enumerate(real)
    ]
    by_id = {c["id"]: c for c in classes["classes"]}
    assert by_id["/m/02wvth"]["name"] == 'Fiat 500 "topolino"'
    assert by_id["/m/01c_0l"]["name"] == "Ducks, geese and swans"
    assert by_id["/m/03hgsf0"]["name"] == "Lemon, lime and bitters"
    assert by_id["/m/01qtdl"]["name"] == "Datsun 1500, 1600, 2000 roadster"

    manifest = {r["id"]: r for r in pq.read_table(out / "train.manifest.parquet").to_pylist()}
    assert manifest[image_id(1)]["positives"] == [index[DUCK]]
    assert manifest[image_id(1)]["negatives"] == [index[FIAT]]
    assert manifest[image_id(2)]["positives"] == sorted([index[FIAT], index[LEMON]])
    assert manifest[image_id(3)]["negatives"] == [index["/m/01qtdl"]]
    stats = json.loads((out / "train.stats.json").read_text())
    assert stats["num_classes"] == 19_994
    assert stats["positive_counts"][FIAT] == 1
    assert stats["negative_counts"][FIAT] == 1
    assert sum(stats["positive_counts"].values()) == 4
    assert list(stats["positive_counts"]) == [cid for cid, _ in real]


# ---------------------------------------------------------------- against a brute-force reader


def brute_force(class_ids: list[str], vocab: list[str], paths: list[Path]) -> dict:
    """What read_openimages should make of label CSVs, by a plain Python loop over the rows
    (independently of the reader's batches, dictionaries and sorted keys)."""
    column = {cid: i for i, cid in enumerate(vocab)}
    known = set(class_ids)
    skips: dict[str, int] = {}
    rows_read = 0
    labels: dict[str, dict[int, list[bool]]] = {}  # image -> class -> its rows (positive?)
    not_trainable: set[str] = set()

    def skip(reason: str) -> None:
        skips[reason] = skips.get(reason, 0) + 1

    for path in paths:
        with path.open(newline="") as f:
            lines = list(csv.reader(f))
        header = lines[0]
        for row in lines[1:]:
            rows_read += 1
            if len(row) != len(header):
                skip("malformed line")
                continue
            fields = dict(zip(header, row, strict=True))
            image, label = fields["ImageID"].strip(), fields["LabelName"].strip()
            if not image:
                skip("no ImageID")
                continue
            labels.setdefault(image, {})  # an image, in order of first appearance
            conf = fields["Confidence"].strip()
            positive = conf in ("1", "1.0", "1.00")
            if not positive and conf not in ("0", "0.0", "0.00"):
                skip("bad Confidence (not 0 or 1)")
            elif label in column:
                labels[image].setdefault(column[label], []).append(positive)
            elif label in known:
                skip("not a trainable class")
                not_trainable.add(image)
            else:
                skip("unknown class id")
    expected, image_skips = {}, {}
    for image, pairs in labels.items():
        if not pairs:
            reason = "no trainable labels" if image in not_trainable else "no known labels"
            image_skips[reason] = image_skips.get(reason, 0) + 1
            continue
        pos, neg = [], []
        for cls in sorted(pairs):
            rows = pairs[cls]
            if any(rows):
                pos.append(cls)
                for _ in range(rows.count(False)):
                    skip("positive and negative (kept positive)")
                for _ in range(rows.count(True) - 1):
                    skip("duplicate (image, class) row")
            else:
                neg.append(cls)
                for _ in range(len(rows) - 1):
                    skip("duplicate (image, class) row")
        expected[image] = (pos, neg, len(pairs))
    return {
        "rows": expected,
        "skips": skips,
        "image_skips": image_skips,
        "rows_read": rows_read,
        "images_read": len(labels),
    }


def random_label_csvs(folder: Path, class_ids: list[str], seed: int) -> list[Path]:
    """Two OpenImages-style label CSVs: 60 images in random order, ids recurring across rows
    and files, long-tailed classes (duplicates and conflicts among them), some unknown class
    ids, bad confidences, blank ids, padded fields and malformed lines."""
    rng = np.random.default_rng(seed)
    images = [f"{x:016x}" for x in rng.integers(0, 2**63, 60)]
    weights = 1.0 / np.arange(1, len(class_ids) + 1)
    paths = []
    for part in range(2):
        lines = ["ImageID,Source,LabelName,Confidence"]
        for _ in range(700):
            image = images[int(rng.integers(0, 60 if part else 40))]
            u = rng.random()
            if u < 0.03:
                label = "/m/0notaclass"
            else:
                label = class_ids[rng.choice(len(class_ids), p=weights / weights.sum())]
            conf = str(int(rng.random() < 0.6))
            if u > 0.98:
                conf = rng.choice(["0.5", "yes", "1.0", " 0 "])
            if 0.5 < u < 0.51:
                image = " "
            if 0.3 < u < 0.31:
                image = f" {image} "
            lines.append(f"{image},verification,{label},{conf}")
            if 0.7 < u < 0.705:
                lines.append(f"{image},{label},1")  # a malformed line
        paths.append(folder / f"labels-{part}.csv")
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("trainable", [False, True])
def test_catalog_equals_a_brute_force_reading(oi, tmp_path, monkeypatch, seed, trainable):
    """Random label CSVs read in tiny batches (so images recur across batches and files): the
    catalog, its skip counts and its image order are those of a plain Python loop."""
    import data_tools.sources.openimages as source

    monkeypatch.setattr(source, "BLOCK_BYTES", 2048)
    paths = random_label_csvs(tmp_path, CLASS_IDS, seed)
    vocab = TRAINABLE if trainable else CLASS_IDS
    want = brute_force(CLASS_IDS, vocab, paths)
    catalog = read_openimages(
        oi.classes, paths, oi.images, trainable=oi.trainable if trainable else None
    )
    table = catalog.table.to_pydict()
    got = {
        i: (p, n, r)
        for i, p, n, r in zip(
            table["id"], table["positives"], table["negatives"], table["label_rows"], strict=True
        )
    }
    assert table["id"] == list(want["rows"])  # the order of first appearance
    assert got == want["rows"]
    assert dict(catalog.label_row_skips.counts) == want["skips"]
    assert dict(catalog.image_skips.counts) == want["image_skips"]
    assert catalog.label_rows_read == want["rows_read"]
    assert catalog.images_read == want["images_read"]
    assert want["skips"]["duplicate (image, class) row"] > 0
    assert want["skips"]["positive and negative (kept positive)"] > 0
