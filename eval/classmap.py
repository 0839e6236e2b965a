"""Which model output scores which data class: matched by class id, never by position.

A checkpoint's class list and a dataset's classes.json must hold the same ids (in any order);
otherwise the mismatch is an error that lists the differences, unless a class map says what to
evaluate:

- ``common``: the classes whose id is in both lists;
- a JSON file: a list of class ids (the same id on both sides), or an object
  ``{data class id: model class id}`` (to evaluate a subset, or data whose ids differ).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlc.io import InputFileError


@dataclass
class ClassMatch:
    """The evaluated classes, in model order: scores[:, model_cols] against labels[:, data_cols]."""

    model_cols: np.ndarray
    data_cols: np.ndarray
    ids: list[str]  # model class ids
    names: list[str]  # the data's display names
    model_not_evaluated: int  # model classes without data labels (or left out by the map)
    data_not_evaluated: int  # data classes the model does not score (or left out by the map)

    @property
    def identity(self) -> bool:
        """Scores and labels already line up column for column (no indexing needed)."""
        n = len(self.model_cols)
        return (
            self.model_not_evaluated == 0
            and self.data_not_evaluated == 0
            and np.array_equal(self.model_cols, np.arange(n))
            and np.array_equal(self.data_cols, np.arange(n))
        )


def _examples(ids: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def read_class_map(spec: str) -> dict[str, str] | str:
    """``common`` or a JSON file -> {data id: model id}."""
    if spec == "common":
        return spec
    path = Path(spec)
    if not path.is_file():
        raise InputFileError(f"--class-map {spec}: no such file (or use --class-map common)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}: invalid JSON: {e}") from e
    if isinstance(data, list):
        data = {str(x): str(x) for x in data}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InputFileError(
            f"{path}: a class map is a list of class ids or an object "
            '{"data class id": "model class id"}'
        )
    seen: dict[str, str] = {}
    for data_id, model_id in data.items():
        if model_id in seen:
            raise InputFileError(
                f"{path}: data classes {seen[model_id]!r} and {data_id!r} both map to model class "
                f"{model_id!r}"
            )
        seen[model_id] = data_id
    return data


def match_classes(
    model_ids: list[str],
    data_ids: list[str],
    data_names: list[str],
    class_map: dict[str, str] | str | None = None,
    model_source: str = "the checkpoint",
    data_source: str = "the data",
    map_source: str = "--class-map",
) -> ClassMatch:
    model_index = {cid: i for i, cid in enumerate(model_ids)}
    data_index = {cid: i for i, cid in enumerate(data_ids)}
    if class_map is None:
        only_data = [c for c in data_ids if c not in model_index]
        only_model = [c for c in model_ids if c not in data_index]
        if only_data or only_model:
            parts = []
            if only_data:
                parts.append(
                    f"{len(only_data)} data class(es) that {model_source} does not score: "
                    f"{_examples(only_data)}"
                )
            if only_model:
                parts.append(
                    f"{len(only_model)} class(es) of {model_source} with no labels in "
                    f"{data_source}: {_examples(only_model)}"
                )
            raise InputFileError(
                f"class vocabularies differ (matched by class id): {'; '.join(parts)}. To "
                "evaluate the classes they share use --class-map common; to evaluate a subset "
                "or map ids use --class-map FILE (docs/eval.md)"
            )
        pairs = [(data_id, data_id) for data_id in data_ids]
    elif class_map == "common":
        pairs = [(data_id, data_id) for data_id in data_ids if data_id in model_index]
        if not pairs:
            raise InputFileError(f"{model_source} and {data_source} share no class id")
    else:
        pairs = list(class_map.items())
        for data_id, model_id in pairs:
            if data_id not in data_index:
                raise InputFileError(
                    f"{map_source}: key {data_id!r}: no such class in {data_source}"
                )
            if model_id not in model_index:
                raise InputFileError(
                    f"{map_source}: key {data_id!r}: {model_source} has no class {model_id!r}"
                )
        if not pairs:
            raise InputFileError(f"{map_source}: maps no class")
    # Model order: the report and the predictions file list classes as the model does.
    pairs.sort(key=lambda p: model_index[p[1]])
    data_cols = np.array([data_index[d] for d, _ in pairs], dtype=np.int64)
    return ClassMatch(
        model_cols=np.array([model_index[m] for _, m in pairs], dtype=np.int64),
        data_cols=data_cols,
        ids=[m for _, m in pairs],
        names=[data_names[i] for i in data_cols],
        model_not_evaluated=len(model_ids) - len(pairs),
        data_not_evaluated=len(data_ids) - len(pairs),
    )
