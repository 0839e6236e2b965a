"""Model outputs and data classes are matched by class id; mismatches are clear errors."""

import json

import numpy as np
import pytest

from eval.classmap import match_classes, read_class_map
from mlc.io import InputFileError

MODEL = ["cat", "dog", "fox", "owl"]
NAMES = {"cat": "Cat", "dog": "Dog", "fox": "Fox", "owl": "Owl", "eel": "Eel"}


def names(ids):
    return [NAMES[i] for i in ids]


def test_same_ids_in_another_order_are_matched_by_id():
    data = ["owl", "cat", "fox", "dog"]
    m = match_classes(MODEL, data, names(data))
    assert m.ids == MODEL and m.names == ["Cat", "Dog", "Fox", "Owl"]
    assert [data[i] for i in m.data_cols] == [MODEL[i] for i in m.model_cols] == MODEL
    assert not m.identity
    assert match_classes(MODEL, MODEL, names(MODEL)).identity


def test_a_mismatch_names_the_differences():
    data = ["cat", "dog", "eel"]
    with pytest.raises(InputFileError) as e:
        match_classes(MODEL, data, names(data), None, "checkpoint ck.pt", "d/classes.json")
    message = str(e.value)
    assert "1 data class(es) that checkpoint ck.pt does not score: 'eel'" in message
    assert "2 class(es) of checkpoint ck.pt with no labels in d/classes.json: 'fox', 'owl'" in (
        message
    )
    assert "--class-map common" in message


def test_common_and_file_maps(tmp_path):
    data = ["eel", "owl", "cat"]
    m = match_classes(MODEL, data, names(data), "common")
    assert m.ids == ["cat", "owl"] and m.model_not_evaluated == 2 and m.data_not_evaluated == 1
    assert list(m.model_cols) == [0, 3] and list(m.data_cols) == [2, 1]

    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(["owl"]))
    m = match_classes(MODEL, data, names(data), read_class_map(str(subset)))
    assert m.ids == ["owl"] and list(m.data_cols) == [1]

    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps({"eel": "fox", "cat": "cat"}))  # data id -> model id
    m = match_classes(MODEL, data, names(data), read_class_map(str(renamed)))
    assert m.ids == ["cat", "fox"] and m.names == ["Cat", "Eel"]
    assert np.array_equal(m.model_cols, [0, 2]) and np.array_equal(m.data_cols, [2, 0])


def test_class_map_errors_name_the_file_and_key(tmp_path):
    data = ["cat", "dog"]
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"cat": "lynx"}))
    with pytest.raises(InputFileError, match=r"map\.json: key 'cat': .* has no class 'lynx'"):
        match_classes(MODEL, data, names(data), read_class_map(str(bad)), map_source=str(bad))
    bad.write_text(json.dumps({"emu": "cat"}))
    with pytest.raises(InputFileError, match=r"key 'emu': no such class in"):
        match_classes(MODEL, data, names(data), read_class_map(str(bad)), map_source=str(bad))
    bad.write_text(json.dumps({"cat": "cat", "dog": "cat"}))
    with pytest.raises(InputFileError, match=r"'cat' and 'dog' both map to model class 'cat'"):
        read_class_map(str(bad))
    bad.write_text("{not json")
    with pytest.raises(InputFileError, match=r"map\.json: invalid JSON"):
        read_class_map(str(bad))
    with pytest.raises(InputFileError, match="no such file"):
        read_class_map(str(tmp_path / "missing.json"))
    with pytest.raises(InputFileError, match="share no class id"):
        match_classes(["a"], ["b"], ["B"], "common")
