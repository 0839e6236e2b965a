"""Readers for what `mlc eval` scores: predictions, labels, weights (classes: mlc.io).

File formats (docs/eval.md has the full description):
- predictions: Parquet, columns ``key`` (string) and ``scores`` (list of floats, one per class,
  logits preferred); the class order is the JSON list in schema metadata ``mlc.class_ids``, or
  else the order of ``--classes``.
- labels: a Parquet/JSONL table with ``key``, ``positives`` (list of class ids) and optionally
  ``negatives`` (verified negatives), or an OpenImages human image-labels CSV
  (``ImageID,Source,LabelName,Confidence``).
- classes: an OpenImages class-descriptions CSV (``LabelName,DisplayName``, no header) or JSON.
- weights: JSON (``{id: count}``, a list, or such a mapping under ``positive_counts``) or Parquet
  (``class_id`` and ``weight`` or ``count``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from mlc.io import Classes, InputFileError, check_unique_ids, existing_file
from mlc.predictions import CLASS_IDS_METADATA

EXAMPLES = 5  # skipped label rows named in the summary
READ_SCORES = 5_000_000  # scores per read of a predictions file (PredictionsFile.batches)
__all__ = ["CLASS_IDS_METADATA", "read_labels", "read_predictions", "read_weights"]
OPENIMAGES_LABEL_COLUMNS = ["ImageID", "Source", "LabelName", "Confidence"]


@dataclass
class Predictions:
    keys: pa.Array  # [n] string
    scores: np.ndarray  # [n, c] float32
    class_ids: list[str] | None  # from the file's metadata


@dataclass
class Labels:
    """Label pairs as (image, class) index arrays; every other pair is ``unlisted``."""

    keys: pa.Array  # [m] unique image keys
    pos_rows: np.ndarray
    pos_cols: np.ndarray
    neg_rows: np.ndarray
    neg_cols: np.ndarray
    unlisted: int  # 0 = negative (fully annotated), -1 = unknown (OpenImages-style)
    skipped_other_classes: int  # label rows for classes the predictions do not score
    # Label rows whose class id neither the predictions nor --classes know: skipped, as
    # `mlc shard` skips them, with the first few named ("<file> line N: class id '...'").
    skipped_unknown_classes: int = 0
    unknown_class_examples: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- helpers


def _first_null(array: pa.Array) -> int:
    return int(array.is_null().to_numpy(zero_copy_only=False).argmax())


def _duplicate_keys(keys: pa.Array, path: Path, row_name) -> None:
    """Raise naming the first duplicated key and the rows it appears on."""
    if pc.count_distinct(keys).as_py() == len(keys):
        return
    codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
    first = np.full(codes.max() + 1, -1, dtype=np.int64)
    for row, code in enumerate(codes):  # only runs when there is a duplicate to report
        if first[code] >= 0:
            n_dup = len(codes) - len(np.unique(codes))
            raise InputFileError(
                f"{path}: key {keys[row].as_py()!r} appears at {row_name(first[code])} and "
                f"{row_name(row)} ({n_dup} duplicate row(s) in all); keys must be unique"
            )
        first[code] = row


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path, columns=columns)
        if suffix in (".jsonl", ".ndjson", ".json"):
            table = pajson.read_json(path)
            return table.select(columns) if columns else table
    except (pa.ArrowInvalid, KeyError) as e:
        raise InputFileError(f"{path}: cannot read: {e}") from e
    raise InputFileError(f"{path}: unknown table format {suffix!r} (use .parquet or .jsonl)")


def _require_columns(table: pa.Table, path: Path, required: list[str]) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise InputFileError(f"{path}: missing column(s) {missing}; found {table.column_names}")


def _line_names(path: Path, header_lines: int, records) -> list[str]:
    """Record indices -> "line N" of the file, in one scan up to the last of them. The CSV and
    JSON readers skip blank lines, so they are counted back in; the scan only runs when rows
    are reported."""
    wanted = {int(r) for r in records}
    found: dict[int, str] = {}
    if wanted:
        last, record = max(wanted), -1
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if number > header_lines and line.strip():
                    record += 1
                    if record in wanted:
                        found[record] = f"line {number}"
                    if record >= last:
                        break
    return [found.get(int(r), f"record {int(r) + 1}") for r in records]


def _line_namer(path: Path, header_lines: int):
    """Record index -> "line N" of the file (see _line_names)."""
    return lambda record: _line_names(path, header_lines, [record])[0]


# ---------------------------------------------------------------- predictions


def _open_parquet(path: Path) -> tuple[pq.ParquetFile, list[str] | None]:
    """A predictions file opened, and the class ids of its metadata (None without them)."""
    try:
        # No pre-buffering: it would read every row group's column chunks into memory at once.
        pf = pq.ParquetFile(path, pre_buffer=False)
    except pa.ArrowInvalid as e:
        raise InputFileError(f"{path}: not a Parquet file: {e}") from e
    metadata = pf.schema_arrow.metadata or {}
    class_ids = None
    if CLASS_IDS_METADATA in metadata:
        class_ids = [str(x) for x in json.loads(metadata[CLASS_IDS_METADATA])]
        check_unique_ids(class_ids, path, "its mlc.class_ids metadata")
    return pf, class_ids


def read_predictions(path: str | Path) -> Predictions:
    path = existing_file(path)
    pf, class_ids = _open_parquet(path)
    table = pf.read()
    _require_columns(table, path, ["key", "scores"])
    keys = table["key"].combine_chunks().cast(pa.string())
    row = lambda i: f"row {i} (key {keys[i].as_py()!r})"  # noqa: E731
    if keys.null_count:
        raise InputFileError(
            f"{path}: {keys.null_count} row(s) without a key, first {row(_first_null(keys))}"
        )
    _duplicate_keys(keys, path, row)
    col = table["scores"].combine_chunks()
    if (
        not pa.types.is_list(col.type)
        and not pa.types.is_large_list(col.type)
        and not pa.types.is_fixed_size_list(col.type)
    ):
        raise InputFileError(
            f"{path}: column 'scores' must hold one list of floats per row, found {col.type}"
        )
    if col.null_count:
        raise InputFileError(f"{path}: {row(_first_null(col))} has no scores")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    width = len(class_ids) if class_ids is not None else int(lengths[0]) if len(lengths) else 0
    wrong = np.flatnonzero(lengths != width)
    if len(wrong):
        expected = "classes in its mlc.class_ids metadata" if class_ids is not None else "in row 0"
        raise InputFileError(
            f"{path}: {row(int(wrong[0]))} has {lengths[wrong[0]]} scores, expected {width} "
            f"({expected}); {len(wrong)} row(s) have the wrong length"
        )
    values = col.flatten()
    if values.null_count:
        first = pc.list_parent_indices(col).to_numpy()[_first_null(values)]
        raise InputFileError(
            f"{path}: {row(int(first))} has a null score ({values.null_count} null value(s))"
        )
    scores = values.cast(pa.float32()).to_numpy(zero_copy_only=False).reshape(len(keys), width)
    if scores.size and not (np.isfinite(scores.min()) and np.isfinite(scores.max())):
        bad = ~np.isfinite(scores)  # NaN, inf, or beyond float32's range
        r, c = np.argwhere(bad)[0]
        cls = repr(class_ids[c]) if class_ids else f"column {c}"
        raise InputFileError(
            f"{path}: {row(int(r))} has score {scores[r, c]} for class {cls}; scores must be "
            f"finite float32 ({int(bad.sum())} such value(s))"
        )
    return Predictions(keys, scores, class_ids)


class PredictionsFile:
    """A predictions file read in batches of rows, so that scoring it holds one batch of scores
    at a time (``open_predictions``): the keys, class ids and score count are checked when it
    is opened, each batch's scores as it is read. A batch with a bad score list (null, wrong
    length, null or non-finite value) makes ``batches`` raise read_predictions' error for the
    whole file (the same message, naming the first bad row and counting all of them), which
    then reads the file at once: only a broken file costs its full size in memory."""

    def __init__(self, path: Path, pf: pq.ParquetFile, keys: pa.Array, class_ids, width: int):
        self.path, self._file, self.keys = path, pf, keys
        self.class_ids = class_ids
        self.width = width

    @property
    def rows(self) -> int:
        return len(self.keys)

    def _fail(self) -> None:
        read_predictions(self.path)  # raises the whole file's error
        raise InputFileError(f"{self.path}: cannot read its scores")  # (not reached)

    def _scores(self, col: pa.Array) -> np.ndarray:
        """One read's score lists -> [rows, width] numpy floats (float16 or float32, maybe
        read-only), checked."""
        if col.null_count:
            self._fail()
        if pa.types.is_fixed_size_list(col.type):
            right_length = col.type.list_size == self.width or not len(col)
        else:
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            right_length = bool((lengths == self.width).all())
        if not right_length:
            self._fail()
        values = col.flatten()
        if values.null_count:
            self._fail()
        if not pa.types.is_float16(values.type):  # float16 is exact in float32: numpy converts
            values = values.cast(pa.float32())
        scores = values.to_numpy(zero_copy_only=False).reshape(len(col), self.width)
        if scores.size and not (np.isfinite(scores.min()) and np.isfinite(scores.max())):
            self._fail()
        return scores

    def batches(self, rows: int, read_ahead: bool = False):
        """(first row, scores float32 [n, width]) for consecutive batches of ``rows`` rows (the
        last one shorter), in file order. The file is read READ_SCORES scores at a time into
        each batch's array: pyarrow's reader needs several times the memory of what it reads.
        ``read_ahead``: the next batch is read by a thread while the caller scores this one
        (one batch more in memory)."""
        return _read_ahead(self._batches(rows)) if read_ahead else self._batches(rows)

    def _batches(self, rows: int):
        step = max(1, min(rows, READ_SCORES // max(1, self.width)))
        first, batch, filled = 0, None, 0
        for part in self._file.iter_batches(batch_size=step, columns=["scores"]):
            scores = self._scores(part.column(0))
            at = 0
            while at < len(scores):
                if batch is None:
                    batch = np.empty((min(rows, self.rows - first), self.width), np.float32)
                n = min(len(scores) - at, len(batch) - filled)
                batch[filled : filled + n] = scores[at : at + n]
                at, filled = at + n, filled + n
                if filled == len(batch):
                    yield first, batch
                    first, batch, filled = first + filled, None, 0


def _read_ahead(items: Iterator) -> Iterator:
    """The items of ``items``, each next one made by a thread while the caller works on the
    current one (pyarrow's reading and numpy's copies release the GIL)."""
    end = object()
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as thread:
        coming = thread.submit(next, items, end)
        while (item := coming.result()) is not end:
            coming = thread.submit(next, items, end)
            yield item


def open_predictions(path: str | Path) -> PredictionsFile:
    """A predictions file for reading in batches (PredictionsFile); the checks that need no
    scores (class ids, columns, keys, the type of ``scores``) are done here, with
    read_predictions' messages."""
    path = existing_file(path)
    pf, class_ids = _open_parquet(path)
    names = pf.schema_arrow.names
    missing = [c for c in ["key", "scores"] if c not in names]
    if missing:
        raise InputFileError(f"{path}: missing column(s) {missing}; found {names}")
    keys = pf.read(columns=["key"])["key"].combine_chunks().cast(pa.string())
    row = lambda i: f"row {i} (key {keys[i].as_py()!r})"  # noqa: E731
    if keys.null_count:
        raise InputFileError(
            f"{path}: {keys.null_count} row(s) without a key, first {row(_first_null(keys))}"
        )
    _duplicate_keys(keys, path, row)
    kind = pf.schema_arrow.field("scores").type
    if (
        not pa.types.is_list(kind)
        and not pa.types.is_large_list(kind)
        and not pa.types.is_fixed_size_list(kind)
    ):
        raise InputFileError(
            f"{path}: column 'scores' must hold one list of floats per row, found {kind}"
        )
    if class_ids is not None:
        width = len(class_ids)
    elif pa.types.is_fixed_size_list(kind):
        width = kind.list_size
    elif len(keys):  # the length of row 0, as read_predictions takes it
        first = next(pf.iter_batches(batch_size=1, columns=["scores"])).column(0)
        if first.null_count:
            read_predictions(path)  # raises: row 0 has no scores
        width = int(pc.list_value_length(first)[0].as_py())
    else:
        width = 0
    return PredictionsFile(path, pf, keys, class_ids, width)


# ---------------------------------------------------------------- labels


@dataclass
class _ClassColumns:
    cols: np.ndarray  # vocabulary column of each id (meaningless where dropped)
    drop: np.ndarray  # ids not used: not scored by the predictions
    unscored: int  # ids --classes knows but the predictions do not score
    unknown: int  # ids found nowhere
    examples: list[str]  # the first unknown ones: "<file> line N: class id '...'"


def _class_columns(
    ids: pa.Array,
    vocabulary: Classes,
    known_ids: set[str],
    path: Path,
    row_names,
    parents,
    strict: bool,
    column: str = "",
) -> _ClassColumns:
    """Map class ids to vocabulary columns. Ids the predictions do not score are dropped:
    counted as unscored when the class list knows them, else as unknown, with examples, or,
    with ``strict``, an error naming the first one's row. ``row_names`` maps row indices to
    their names ("line N", "row N") in one call."""
    cols = pc.index_in(ids, value_set=pa.array(vocabulary.ids, pa.string()))
    missing = cols.is_null().to_numpy(zero_copy_only=False)
    unknown: list[int] = []
    if missing.any():
        missing_ids = ids.filter(pa.array(missing)).to_pylist()
        unknown = [
            int(i)
            for i, cid in zip(np.flatnonzero(missing), missing_ids, strict=True)
            if cid not in known_ids
        ]
    shown = unknown[:1] if strict else unknown[:EXAMPLES]
    names = row_names([parents[i] for i in shown])
    where = f" in {column}" if column else ""
    examples = [
        f"{path} {name}: class id {ids[i].as_py()!r}{where}"
        for i, name in zip(shown, names, strict=True)
    ]
    if strict and unknown:
        first = unknown[0]
        raise InputFileError(
            f"{path}: {names[0]} has unknown class id {ids[first].as_py()!r}{where} "
            f"({len(unknown)} label(s) with ids in neither the predictions' classes nor "
            "--classes; without --strict they are skipped and counted)"
        )
    return _ClassColumns(
        cols.to_numpy(zero_copy_only=False),
        missing,
        int(missing.sum()) - len(unknown),
        len(unknown),
        examples,
    )


def read_labels(
    path: str | Path,
    vocabulary: Classes,
    known_ids: set[str] | None = None,
    unlisted: str = "auto",
    strict: bool = False,
) -> Labels:
    """Labels from an OpenImages human image-labels CSV or a key/positives/negatives table.

    ``vocabulary`` is the predictions' class order. Label rows (list values, in a table) of
    classes in ``known_ids`` (the --classes list) but not in ``vocabulary`` are skipped and
    counted; so are those with an id found nowhere (counted apart, with the first few named),
    as `mlc shard` skips them, unless ``strict``: then they are an error naming the first one.
    ``unlisted``: what a pair with no label row means: "unknown", "negative", or "auto" (unknown
    for OpenImages CSVs and tables with a ``negatives`` column, negative otherwise).
    """
    path = existing_file(path)
    known_ids = set(vocabulary.ids) | (known_ids or set())
    if path.suffix.lower() == ".csv":
        return _read_openimages_labels(path, vocabulary, known_ids, unlisted, strict)
    table = _read_table(path)
    _require_columns(table, path, ["key", "positives"])
    keys = table["key"].combine_chunks().cast(pa.string())
    is_parquet = path.suffix.lower() == ".parquet"
    if is_parquet:
        row_names = lambda rows: [f"row {int(i)}" for i in rows]  # noqa: E731
    else:
        row_names = lambda rows: _line_names(path, 0, rows)  # noqa: E731
    row_name = lambda i: row_names([i])[0]  # noqa: E731
    if keys.null_count:
        raise InputFileError(
            f"{path}: {row_name(_first_null(keys))} has no key ({keys.null_count} such row(s))"
        )
    _duplicate_keys(keys, path, row_name)
    has_negatives = "negatives" in table.column_names
    pairs = []
    unscored, unknown, examples = 0, 0, []
    for column in ["positives", "negatives"] if has_negatives else ["positives"]:
        col = table[column].combine_chunks()
        if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
            raise InputFileError(
                f"{path}: column {column!r} must hold a list of class ids per row, found {col.type}"
            )
        parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
        ids = col.flatten().cast(pa.string())
        found = _class_columns(ids, vocabulary, known_ids, path, row_names, parents, strict, column)
        unscored += found.unscored
        unknown += found.unknown
        examples += found.examples[: EXAMPLES - len(examples)]
        keep = ~found.drop
        pairs.append((parents[keep], found.cols[keep].astype(np.int64)))
    neg_rows, neg_cols = pairs[1] if has_negatives else (np.zeros(0, np.int64),) * 2
    mode = unlisted if unlisted != "auto" else ("unknown" if has_negatives else "negative")
    return Labels(
        keys,
        pairs[0][0],
        pairs[0][1],
        neg_rows,
        neg_cols,
        _unlisted_value(mode),
        unscored,
        unknown,
        examples,
    )


def _unlisted_value(mode: str) -> int:
    if mode not in ("unknown", "negative"):
        raise InputFileError(f"unlisted must be 'unknown', 'negative' or 'auto', got {mode!r}")
    return -1 if mode == "unknown" else 0


def _read_openimages_labels(
    path: Path, vocabulary: Classes, known_ids: set[str], unlisted: str, strict: bool
) -> Labels:
    with path.open(encoding="utf-8", errors="replace") as f:
        header = f.readline().strip().split(",")
    if header[: len(OPENIMAGES_LABEL_COLUMNS)] != OPENIMAGES_LABEL_COLUMNS:
        raise InputFileError(
            f"{path}: line 1 is {header}, expected an OpenImages image-labels header "
            f"{','.join(OPENIMAGES_LABEL_COLUMNS)}"
        )
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                include_columns=["ImageID", "LabelName", "Confidence"],
                # strings, so that a bad value is reported with its line, not by the parser
                column_types={c: pa.string() for c in ("ImageID", "LabelName", "Confidence")},
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as e:
        raise InputFileError(f"{path}: cannot read: {e}") from e
    line = _line_namer(path, 1)
    image_ids = table["ImageID"].combine_chunks()
    text = table["Confidence"].combine_chunks()
    is_positive = pc.match_substring_regex(text, r"^\s*1(\.0*)?\s*$").to_numpy(zero_copy_only=False)
    is_negative = pc.match_substring_regex(text, r"^\s*0(\.0*)?\s*$").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~(is_positive | is_negative))
    if len(bad):
        raise InputFileError(
            f"{path}: {line(int(bad[0]))} has Confidence {text[bad[0]].as_py()!r}, expected 1 "
            f"(positive) or 0 (verified negative); {len(bad)} such row(s)"
        )
    empty = np.flatnonzero(
        pc.equal(pc.utf8_trim_whitespace(image_ids), "").to_numpy(zero_copy_only=False)
    )
    if len(empty):
        raise InputFileError(
            f"{path}: {line(int(empty[0]))} has no ImageID ({len(empty)} such row(s))"
        )
    label_names = table["LabelName"].combine_chunks()
    rows_all = np.arange(len(label_names))
    found = _class_columns(
        label_names,
        vocabulary,
        known_ids,
        path,
        lambda rows: _line_names(path, 1, rows),
        rows_all,
        strict,
    )
    encoded = pc.dictionary_encode(image_ids)
    image_rows = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    keep = ~found.drop
    positive = is_positive & keep
    negative = is_negative & keep
    mode = "unknown" if unlisted == "auto" else unlisted
    return Labels(
        encoded.dictionary,
        image_rows[positive],
        found.cols[positive].astype(np.int64),
        image_rows[negative],
        found.cols[negative].astype(np.int64),
        _unlisted_value(mode),
        found.unscored,
        found.unknown,
        found.examples,
    )


# ---------------------------------------------------------------- weights


@dataclass
class Weights:
    values: np.ndarray | str  # per vocabulary class, or "uniform" / "positives"
    source: str
    unlisted: int = 0  # scored classes the file gives no weight (weight 0)
    extra: int = 0  # classes in the file that the predictions do not score (ignored)


def read_weights(spec: str, vocabulary: Classes) -> Weights:
    """ "uniform", "positives" (the evaluated labels' own counts), or a file of reference counts."""
    if spec == "uniform":
        return Weights(spec, "uniform")
    if spec == "positives":
        return Weights(spec, "positive counts of the evaluated labels")
    path = existing_file(spec)
    if path.suffix.lower() == ".parquet":
        table = pq.read_table(path)
        value_col = next(
            (c for c in ("weight", "count", "positives") if c in table.column_names), None
        )
        if "class_id" not in table.column_names or value_col is None:
            raise InputFileError(
                f"{path}: expected columns class_id and weight (or count); "
                f"found {table.column_names}"
            )
        data = dict(
            zip(
                table["class_id"].cast(pa.string()).to_pylist(),
                table[value_col].to_pylist(),
                strict=True,
            )
        )
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}: invalid JSON: {e}") from e
        if isinstance(data, dict) and "positive_counts" in data:
            data = data["positive_counts"]
    if isinstance(data, list):
        if len(data) != len(vocabulary):
            raise InputFileError(
                f"{path}: a list of weights needs one value per class ({len(vocabulary)}), "
                f"got {len(data)}"
            )
        data = dict(zip(vocabulary.ids, data, strict=True))
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: expected {{class id: count}}, a list, or positive_counts")
    weights = np.zeros(len(vocabulary), dtype=np.float64)
    extra = 0
    for cid, value in data.items():
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not np.isfinite(value)
            or value < 0
        ):
            raise InputFileError(
                f"{path}: class {cid!r} has weight {value!r}; weights must be finite numbers >= 0"
            )
        if cid in vocabulary.index:
            weights[vocabulary.index[cid]] = value
        else:
            extra += 1  # a reference set may count classes that these predictions do not score
    unlisted = sum(1 for cid in vocabulary.ids if cid not in data)
    return Weights(weights, f"reference counts from {path}", unlisted, extra)


# ---------------------------------------------------------------- alignment


@dataclass
class Aligned:
    """Predictions and labels of the same images, row for row."""

    keys: pa.Array
    scores: np.ndarray  # [n, c] float32
    labels: np.ndarray  # [n, c] int8 in {1, 0, -1}
    predictions_without_labels: int
    labels_without_predictions: int
    conflicts: int  # (image, class) pairs listed as positive and negative: positive wins


def _examples(keys: pa.Array, mask: np.ndarray, n: int = 3) -> str:
    return ", ".join(repr(k) for k in keys.filter(pa.array(mask)).slice(0, n).to_pylist())


@dataclass
class LabelRows:
    """The labels of the prediction rows, sparse: which rows have labels (``rows``, ascending;
    the others are left out) and, per such row, its labelled (class, 0 or 1) pairs. ``block``
    makes the dense labels of a batch of rows, so the labels of all images never need a dense
    [images, classes] matrix."""

    rows: np.ndarray  # [m] prediction rows with labels, ascending
    offsets: np.ndarray  # [m + 1]: the pairs of rows[i] are offsets[i] .. offsets[i + 1] - 1
    cols: np.ndarray  # [pairs] class column
    values: np.ndarray  # [pairs] int8: 0 negative, then 1 positive (positive wins)
    classes: int
    unlisted: int  # the label of every other pair: 0 or -1
    predictions_without_labels: int
    labels_without_predictions: int
    conflicts: int  # (image, class) pairs listed as positive and negative: positive wins

    def block(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Prediction rows first .. last - 1: (those with labels, minus ``first``; their dense
        labels int8 [n, classes] in {1, 0, -1})."""
        a, b = np.searchsorted(self.rows, [first, last])
        labels = np.full((b - a, self.classes), self.unlisted, dtype=np.int8)
        lo, hi = self.offsets[a], self.offsets[b]
        row = np.repeat(np.arange(b - a), np.diff(self.offsets[a : b + 1]))
        cols, values = self.cols[lo:hi], self.values[lo:hi]
        negative = values == 0
        labels[row[negative], cols[negative]] = 0
        labels[row[~negative], cols[~negative]] = 1  # after negatives: positive wins
        return self.rows[a:b] - first, labels

    def pairs(self, first: int, last: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Prediction rows first .. last - 1 as ``block`` gives them, with their labels as the
        labelled pairs alone: (index into those rows, class column, label 0 or 1), one per
        pair (positive wins), for labels whose other pairs are unknown."""
        a, b = np.searchsorted(self.rows, [first, last])
        lo, hi = self.offsets[a], self.offsets[b]
        row = np.repeat(np.arange(b - a, dtype=np.int64), np.diff(self.offsets[a : b + 1]))
        pair = row * self.classes + self.cols[lo:hi]
        order = np.lexsort((-self.values[lo:hi], pair))  # per pair: its positive first
        pair, values = pair[order], self.values[lo:hi][order]
        once = np.ones(len(pair), dtype=bool)
        once[1:] = pair[1:] != pair[:-1]
        pair = pair[once]
        return self.rows[a:b] - first, (pair // self.classes, pair % self.classes, values[once])


def label_rows(
    keys: pa.Array,
    labels: Labels,
    classes: int,
    predictions_path: str | Path,
    labels_path: str | Path,
    allow_missing: bool = False,
) -> LabelRows:
    """Match the prediction keys to the labels' keys: an error naming both sides' unmatched
    keys unless ``allow_missing``; then the labels of the matched rows, sparse (LabelRows)."""
    label_row = pc.index_in(keys, value_set=labels.keys)
    has_labels = label_row.is_valid().to_numpy(zero_copy_only=False)
    has_prediction = pc.is_in(labels.keys, value_set=keys).to_numpy(zero_copy_only=False)
    no_labels, no_prediction = int((~has_labels).sum()), int((~has_prediction).sum())
    if (no_labels or no_prediction) and not allow_missing:
        parts = []
        if no_labels:
            parts.append(
                f"{no_labels} of {len(has_labels)} predicted images have no labels in "
                f"{labels_path} (e.g. {_examples(keys, ~has_labels)})"
            )
        if no_prediction:
            parts.append(
                f"{no_prediction} of {len(has_prediction)} labelled images have no prediction in "
                f"{predictions_path} (e.g. {_examples(labels.keys, ~has_prediction)})"
            )
        raise InputFileError(
            "; ".join(parts) + ". Pass --allow-missing to evaluate the images present in both."
        )
    keep = np.flatnonzero(has_labels)
    row_of_label = np.full(len(labels.keys), -1, dtype=np.int64)
    row_of_label[label_row.to_numpy(zero_copy_only=False)[keep].astype(np.int64)] = np.arange(
        len(keep)
    )
    neg_rows, pos_rows = row_of_label[labels.neg_rows], row_of_label[labels.pos_rows]
    neg_ok, pos_ok = neg_rows >= 0, pos_rows >= 0
    conflicts = np.intersect1d(
        neg_rows[neg_ok] * classes + labels.neg_cols[neg_ok],
        pos_rows[pos_ok] * classes + labels.pos_cols[pos_ok],
    ).size
    rows = np.concatenate([neg_rows[neg_ok], pos_rows[pos_ok]])
    order = np.argsort(rows, kind="stable")  # per row: its negatives, then its positives
    cols = np.concatenate([labels.neg_cols[neg_ok], labels.pos_cols[pos_ok]])[order]
    values = np.repeat(np.array([0, 1], dtype=np.int8), [int(neg_ok.sum()), int(pos_ok.sum())])
    offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(keep)), out=offsets[1:])
    return LabelRows(
        keep,
        offsets,
        cols.astype(np.int32),
        values[order],
        classes,
        labels.unlisted,
        no_labels,
        no_prediction,
        int(conflicts),
    )


def align(
    predictions: Predictions,
    labels: Labels,
    predictions_path: str | Path,
    labels_path: str | Path,
    allow_missing: bool = False,
) -> Aligned:
    c = predictions.scores.shape[1]
    found = label_rows(predictions.keys, labels, c, predictions_path, labels_path, allow_missing)
    _, matrix = found.block(0, len(predictions.keys))
    return Aligned(
        predictions.keys.take(pa.array(found.rows)),
        predictions.scores[found.rows],
        matrix,
        found.predictions_without_labels,
        found.labels_without_predictions,
        found.conflicts,
    )
