"""data_tools.sources.table and .coco: tables and COCO instances files into Catalogs."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.catalog import CATALOG_SCHEMA, FileLoader, Skip
from data_tools.sources.coco import read_coco
from data_tools.sources.table import read_table_source

# OpenImages-style class descriptions: no header, a quoted name with a comma; "Cat" is both the
# name of /m/01 and the id of another class (ids win); "Tank" is the name of two classes.
CLASSES_CSV = '/m/01,Cat\n/m/02,"Dog, domestic"\n/m/03,Bird\nCat,Feline\n/m/05,Tank\n/m/06,Tank\n'


def rows(catalog):
    """{id: (locator, positives, negatives)} from the catalog table."""
    t = catalog.table
    return {
        i: (loc, pos, neg)
        for i, loc, pos, neg in zip(
            t["id"].to_pylist(),
            t["locator"].to_pylist(),
            t["positives"].to_pylist(),
            t["negatives"].to_pylist(),
            strict=True,
        )
    }


def check_invariants(catalog):
    assert catalog.table.schema.equals(CATALOG_SCHEMA)
    assert catalog.images_read == catalog.table.num_rows + catalog.image_skips.total
    for column in ("positives", "negatives"):
        for labels in catalog.table[column].to_pylist():
            assert labels == sorted(set(labels))
            assert all(0 <= c < len(catalog.class_ids) for c in labels)
    assert catalog.table["rotation"].to_pylist() == [0] * catalog.table.num_rows
    pickle.loads(pickle.dumps(catalog.loader))


def write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------- formats


def test_csv_delimited_labels_full_annotation(tmp_path):
    src = write(
        tmp_path / "labels.csv",
        "image,labels,other\na.jpg,cat|dog,1\nb.jpg,dog,2\nc.jpg,,3\nd.jpg, bird | cat |,4\n",
    )
    catalog = read_table_source(src, tmp_path / "images")
    check_invariants(catalog)
    assert catalog.class_ids == catalog.class_names == ["bird", "cat", "dog"]
    assert catalog.annotation == "full"
    assert rows(catalog) == {
        "a.jpg": ("a.jpg", [1, 2], []),
        "b.jpg": ("b.jpg", [2], []),
        "c.jpg": ("c.jpg", [], []),  # fully annotated: a valid all-negative image
        "d.jpg": ("d.jpg", [0, 1], []),
    }
    assert catalog.table["id"].to_pylist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert catalog.images_read == 4
    assert catalog.label_rows_read == 5
    assert catalog.image_skips.total == 0 and catalog.label_row_skips.total == 0
    assert catalog.source == str(src)


def test_tsv_with_id_and_negatives_is_partial(tmp_path):
    src = write(
        tmp_path / "labels.tsv",
        "key\tpath\tpos\tneg\n"
        "k1\timg/1.jpg\tcat\tdog\n"
        "k2\timg/2.jpg\t\tcat;dog\n"
        "k3\timg/3.jpg\t\t\n"
        "\timg/4.jpg\tcat\t\n"
        "k5\timg/5.jpg\tdog;cat;dog\tbird, with comma\n",
    )
    catalog = read_table_source(
        src,
        tmp_path,
        image_column="path",
        labels_column="pos",
        negatives_column="neg",
        id_column="key",
        delimiter=";",
    )
    check_invariants(catalog)
    assert catalog.annotation == "partial"
    assert catalog.class_ids == ["bird, with comma", "cat", "dog"]
    assert rows(catalog) == {
        "k1": ("img/1.jpg", [1], [2]),
        "k2": ("img/2.jpg", [], [1, 2]),
        "k5": ("img/5.jpg", [1, 2], [0]),
    }
    assert catalog.image_skips.counts == {"no known labels": 1, "no image id": 1}
    assert catalog.image_skips.examples["no known labels"] == ["'k3'"]
    assert catalog.image_skips.examples["no image id"] == ["data row 4"]
    assert catalog.images_read == 5
    assert catalog.label_rows_read == 2 + 2 + 0 + 1 + 4


def test_parquet_list_columns(tmp_path):
    src = tmp_path / "labels.parquet"
    pq.write_table(
        pa.table(
            {
                "file": ["x/1.png", "x/2.png", "x/3.png", "x/4.png"],
                "labels": pa.array([[10, 2], [5], [], None], pa.list_(pa.int64())),
                "negatives": pa.array([[5], None, [2, 2], []], pa.list_(pa.int64())),
            }
        ),
        src,
    )
    catalog = read_table_source(
        src, tmp_path, image_column="file", negatives_column="negatives", annotation="full"
    )
    check_invariants(catalog)
    assert catalog.annotation == "full"  # explicit, despite the negatives column
    # int labels sort numerically
    assert catalog.class_ids == ["2", "5", "10"]
    assert rows(catalog) == {
        "x/1.png": ("x/1.png", [0, 2], [1]),
        "x/2.png": ("x/2.png", [1], []),
        "x/3.png": ("x/3.png", [], [0]),
        "x/4.png": ("x/4.png", [], []),
    }
    assert catalog.label_rows_read == 2 + 1 + 1 + 2
    assert catalog.image_skips.total == 0


def test_parquet_string_lists_with_class_names(tmp_path):
    classes = write(tmp_path / "classes.csv", CLASSES_CSV)
    src = tmp_path / "labels.parquet"
    pq.write_table(
        pa.table(
            {
                "image": pa.array(["1.jpg", "2.jpg"], pa.large_string()),
                "labels": pa.array([["Dog, domestic", "/m/03"], ["Bird"]]),
            }
        ),
        src,
    )
    catalog = read_table_source(src, tmp_path, classes=classes)
    check_invariants(catalog)
    assert catalog.class_ids == ["/m/01", "/m/02", "/m/03", "Cat", "/m/05", "/m/06"]
    assert catalog.class_names[1] == "Dog, domestic"
    assert rows(catalog) == {"1.jpg": ("1.jpg", [1, 2], []), "2.jpg": ("2.jpg", [2], [])}


def test_jsonl(tmp_path):
    src = tmp_path / "labels.jsonl"
    lines = [
        {"id": 7, "image": "a.jpg", "labels": ["cat", "dog"], "negatives": "bird|fish"},
        {"id": 8, "image": "b.jpg", "labels": [], "negatives": None},
        {"id": 9, "image": "c.jpg", "labels": None, "negatives": "cat"},
    ]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    catalog = read_table_source(src, tmp_path, negatives_column="negatives", id_column="id")
    check_invariants(catalog)
    assert catalog.annotation == "partial"
    assert catalog.class_ids == ["bird", "cat", "dog", "fish"]
    assert rows(catalog) == {"7": ("a.jpg", [1, 2], [0, 3]), "9": ("c.jpg", [], [1])}
    assert catalog.image_skips.counts == {"no known labels": 1}
    assert catalog.image_skips.examples["no known labels"] == ["'8'"]
    ndjson = tmp_path / "labels.ndjson"
    ndjson.write_text(src.read_text())
    assert rows(read_table_source(ndjson, tmp_path, negatives_column="negatives", id_column="id"))


# ---------------------------------------------------------------- classes


def test_class_list_by_id_and_name(tmp_path):
    classes = write(tmp_path / "classes.csv", CLASSES_CSV)
    src = write(
        tmp_path / "labels.csv",
        "image,labels\n"
        'a.jpg,"/m/01|Dog, domestic"\n'  # by id and by a name with a comma
        "b.jpg,Bird|/m/99\n"  # /m/99 unknown: dropped, image kept
        "c.jpg,Cat\n"  # "Cat" is a class id: it wins over the name of /m/01
        "d.jpg,Tank|Feline\n"  # Tank is ambiguous
        "e.jpg,zebra\n"  # only unknown labels: no known labels, even fully annotated
        "f.jpg,\n",  # no labels at all: all-negative
    )
    catalog = read_table_source(src, tmp_path, classes=classes)
    check_invariants(catalog)
    assert catalog.annotation == "full"
    assert catalog.class_names == ["Cat", "Dog, domestic", "Bird", "Feline", "Tank", "Tank"]
    assert rows(catalog) == {
        "a.jpg": ("a.jpg", [0, 1], []),
        "b.jpg": ("b.jpg", [2], []),
        "c.jpg": ("c.jpg", [3], []),
        "d.jpg": ("d.jpg", [3], []),
        "f.jpg": ("f.jpg", [], []),
    }
    assert catalog.label_row_skips.counts == {"unknown class id": 2, "ambiguous class name": 1}
    assert catalog.label_row_skips.examples["unknown class id"] == [
        "'/m/99' (image 'b.jpg')",
        "'zebra' (image 'e.jpg')",
    ]
    assert catalog.label_row_skips.examples["ambiguous class name"] == ["'Tank' (image 'd.jpg')"]
    assert catalog.image_skips.counts == {"no known labels": 1}
    assert catalog.label_rows_read == 2 + 2 + 1 + 2 + 1


def test_class_list_json(tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"id": "n1", "name": "one"}, {"id": "n2", "name": "two"}]))
    src = write(tmp_path / "labels.csv", "image,labels\na.jpg,two|n1\n")
    catalog = read_table_source(src, tmp_path, classes=classes)
    assert catalog.class_ids == ["n1", "n2"]
    assert rows(catalog) == {"a.jpg": ("a.jpg", [0, 1], [])}


# ---------------------------------------------------------------- skips and counts


def test_every_skip_reason_is_counted_with_an_example(tmp_path):
    classes = write(tmp_path / "classes.csv", "cat,Cat\ndog,Dog\n")
    src = write(
        tmp_path / "labels.csv",
        "image,labels,negatives\n"  # line 1
        "a.jpg,cat,dog\n"  # 2: kept
        ",cat,\n"  # 3: no image path
        "a.jpg,dog,\n"  # 4: duplicate id
        "b.jpg,cat|zebra,cat\n"  # 5: zebra unknown; cat positive and negative
        "c.jpg,zebra,\n"  # 6: nothing known left
        "\n"  # 7: blank, ignored
        "d.jpg,x,y,z\n"  # 8: malformed
        "e.jpg,,dog\n"  # 9: kept (a verified negative only)
        "f.jpg,,\n",  # 10: no known labels
    )
    catalog = read_table_source(src, tmp_path, negatives_column="negatives", classes=classes)
    check_invariants(catalog)
    assert catalog.annotation == "partial"
    assert rows(catalog) == {
        "a.jpg": ("a.jpg", [0], [1]),
        "b.jpg": ("b.jpg", [0], []),
        "e.jpg": ("e.jpg", [], [1]),
    }
    assert catalog.images_read == 7  # the malformed line is not an image read
    assert catalog.images_read == catalog.table.num_rows + catalog.image_skips.total
    assert catalog.image_skips.to_dict() == {
        "duplicate id": {
            "count": 1,
            "examples": ["'a.jpg' at data row 3 (first at data row 1)"],
        },
        "no image path": {"count": 1, "examples": ["data row 2"]},
        "no known labels": {"count": 2, "examples": ["'c.jpg'", "'f.jpg'"]},
    }
    skips = catalog.label_row_skips
    assert skips.counts == {
        "malformed line": 1,
        "unknown class id": 2,
        "positive and negative (kept positive)": 1,
    }
    assert skips.examples["malformed line"] == ["line 8: d.jpg,x,y,z"]
    assert skips.examples["unknown class id"] == [
        "'zebra' (image 'b.jpg')",
        "'zebra' (image 'c.jpg')",
    ]
    assert skips.examples["positive and negative (kept positive)"] == ["'cat' (image 'b.jpg')"]
    # label values of well-formed rows (2+1+1+3+1+1+0) plus one per malformed line
    assert catalog.label_rows_read == 9 + 1
    # Per image, its values not skipped: b.jpg's zebra and its negative cat are skipped. The
    # values of the rows skipped as images (2, with c.jpg's skipped zebra) are in none.
    label_rows = catalog.table["label_rows"].to_pylist()
    assert dict(zip(catalog.table["id"].to_pylist(), label_rows, strict=True)) == {
        "a.jpg": 2,
        "b.jpg": 1,
        "e.jpg": 1,
    }
    assert catalog.label_rows_read == sum(label_rows) + skips.total + 2


def test_malformed_lines_with_an_id_column(tmp_path):
    src = write(
        tmp_path / "labels.tsv",
        "id\timage\tlabels\n1\ta.jpg\tcat\n2\tb.jpg\n3\tc.jpg\tdog\textra\n4\td.jpg\tdog\n",
    )
    catalog = read_table_source(src, tmp_path, id_column="id")
    check_invariants(catalog)
    assert rows(catalog) == {"1": ("a.jpg", [0], []), "4": ("d.jpg", [1], [])}
    assert catalog.images_read == 2
    assert catalog.label_row_skips.counts == {"malformed line": 2}
    assert catalog.label_row_skips.examples["malformed line"] == [
        "line 3: 2\tb.jpg",
        "line 4: 3\tc.jpg\tdog\textra",
    ]


def test_duplicates_keep_the_first_by_id_column(tmp_path):
    src = write(
        tmp_path / "labels.csv",
        "id,image,labels\nx,1.jpg,a\ny,2.jpg,b\nx,3.jpg,b\nx,4.jpg,a\ny,5.jpg,a\n",
    )
    catalog = read_table_source(src, tmp_path, id_column="id")
    check_invariants(catalog)
    assert rows(catalog) == {"x": ("1.jpg", [0], []), "y": ("2.jpg", [1], [])}
    assert catalog.image_skips.counts == {"duplicate id": 3}
    assert catalog.image_skips.examples["duplicate id"][-1] == (
        "'y' at data row 5 (first at data row 2)"
    )


def test_empty_table(tmp_path):
    src = write(tmp_path / "labels.csv", "image,labels\n")
    catalog = read_table_source(src, tmp_path)
    check_invariants(catalog)
    assert catalog.table.num_rows == 0 and catalog.class_ids == [] and catalog.images_read == 0


# ---------------------------------------------------------------- errors


def test_missing_column_names_file_column_and_columns_found(tmp_path):
    for name, text in (
        ("labels.csv", "image,tags\na.jpg,x\n"),
        ("labels.tsv", "image\ttags\na.jpg\tx\n"),
        ("labels.jsonl", '{"image": "a.jpg", "tags": "x"}\n'),
    ):
        src = write(tmp_path / name, text)
        with pytest.raises(ValueError, match=r"labels\.\w+: missing column\(s\) \['labels'\]") as e:
            read_table_source(src, tmp_path)
        assert "'image', 'tags'" in str(e.value)
    src = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"image": ["a.jpg"], "labels": ["x"]}), src)
    with pytest.raises(ValueError, match=r"labels\.parquet: missing column\(s\) \['neg'\]"):
        read_table_source(src, tmp_path, negatives_column="neg")


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="nope.csv: no such file"):
        read_table_source(tmp_path / "nope.csv", tmp_path)
    bad = write(tmp_path / "bad.jsonl", '{"image": "a.jpg", "labels": "x"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl: cannot read"):
        read_table_source(bad, tmp_path)
    bad = write(tmp_path / "bad.parquet", "not parquet")
    with pytest.raises(ValueError, match="bad.parquet: cannot read"):
        read_table_source(bad, tmp_path)
    other = write(tmp_path / "labels.xlsx", "")
    with pytest.raises(ValueError, match=r"labels.xlsx: unknown table format '.xlsx'"):
        read_table_source(other, tmp_path)
    floats = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"image": ["a.jpg"], "labels": [[1.5]]}), floats)
    with pytest.raises(ValueError, match="floats.parquet: column 'labels'"):
        read_table_source(floats, tmp_path)
    with pytest.raises(ValueError, match="annotation"):
        read_table_source(tmp_path / "nope.csv", tmp_path, annotation="some")


# ---------------------------------------------------------------- COCO


def coco_file(tmp_path, data, name="instances.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


COCO = {
    "info": {"description": "hand made"},
    "images": [
        {"id": 11, "file_name": "000011.jpg", "width": 640, "height": 480},
        {"id": 3, "file_name": "000003.jpg", "width": 320, "height": 200},
        {"id": 7, "file_name": "000007.jpg", "width": 100, "height": 100},  # no annotations
    ],
    "categories": [
        {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 5, "name": "airplane", "supercategory": "vehicle"},
    ],
    "annotations": [
        {"id": 100, "image_id": 11, "category_id": 1, "iscrowd": 0},
        {"id": 101, "image_id": 11, "category_id": 1, "iscrowd": 0},
        {"id": 102, "image_id": 11, "category_id": 90, "iscrowd": 1},  # crowd counts
        {"id": 103, "image_id": 3, "category_id": 5, "iscrowd": 0},
        {"id": 104, "image_id": 3, "category_id": 2, "iscrowd": 0},  # unknown category
        {"id": 105, "image_id": 99, "category_id": 1, "iscrowd": 0},  # unknown image
    ],
}


def test_coco(tmp_path):
    catalog = read_coco(coco_file(tmp_path, COCO), tmp_path / "train2017")
    check_invariants(catalog)
    assert catalog.class_ids == ["1", "5", "90"]
    assert catalog.class_names == ["person", "airplane", "toothbrush"]
    assert catalog.annotation == "full"
    assert catalog.table["id"].to_pylist() == ["11", "3", "7"]  # file order
    assert rows(catalog) == {
        "11": ("000011.jpg", [0, 2], []),
        "3": ("000003.jpg", [1], []),
        "7": ("000007.jpg", [], []),
    }
    assert catalog.images_read == 3 and catalog.image_skips.total == 0
    assert catalog.label_rows_read == 6
    assert catalog.table["label_rows"].to_pylist() == [3, 1, 0]  # annotations used per image
    assert catalog.label_row_skips.to_dict() == {
        "unknown class id": {"count": 1, "examples": ["annotation id 104: category_id 2"]},
        "unknown image id": {"count": 1, "examples": ["annotation id 105: image_id 99"]},
    }
    assert catalog.loader == FileLoader(str(tmp_path / "train2017"))


def test_coco_image_skips(tmp_path):
    data = json.loads(json.dumps(COCO))
    data["images"] += [
        {"id": 3, "file_name": "again.jpg", "width": 1, "height": 1},
        {"id": 12, "file_name": "", "width": 1, "height": 1},
    ]
    data["annotations"].append({"image_id": 12, "category_id": 5})  # dropped with its image
    catalog = read_coco(coco_file(tmp_path, data), tmp_path)
    check_invariants(catalog)
    assert rows(catalog)["3"] == ("000003.jpg", [1], [])
    assert catalog.images_read == 5
    assert catalog.image_skips.to_dict() == {
        "duplicate id": {"count": 1, "examples": ["image id 3 (images[3])"]},
        "no image path": {"count": 1, "examples": ["image id 12"]},
    }
    assert catalog.label_rows_read == 7
    assert catalog.label_row_skips.counts == {"unknown class id": 1, "unknown image id": 1}


def test_coco_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_coco(bad, tmp_path)
    data = {k: v for k, v in COCO.items() if k != "categories"}
    with pytest.raises(ValueError, match="no_cats.json: missing key 'categories'"):
        read_coco(coco_file(tmp_path, data, "no_cats.json"), tmp_path)
    data = json.loads(json.dumps(COCO))
    del data["annotations"][2]["category_id"]
    with pytest.raises(ValueError, match=r"ann.json: annotations\[2\] has no key 'category_id'"):
        read_coco(coco_file(tmp_path, data, "ann.json"), tmp_path)
    data = json.loads(json.dumps(COCO))
    data["categories"].append({"id": 5, "name": "again"})
    with pytest.raises(ValueError, match="cats.json: category id 5 appears more than once"):
        read_coco(coco_file(tmp_path, data, "cats.json"), tmp_path)
    with pytest.raises(ValueError, match="missing.json: cannot read"):
        read_coco(tmp_path / "missing.json", tmp_path)


# ---------------------------------------------------------------- loader


def test_file_loader(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"\xff\xd8bytes")
    loader = pickle.loads(pickle.dumps(FileLoader(str(tmp_path))))
    assert loader.load("sub/a.jpg") == b"\xff\xd8bytes"
    with pytest.raises(Skip) as e:
        loader.load("sub/missing.jpg")
    assert e.value.reason == "missing file"
    assert e.value.detail.endswith("missing.jpg")
