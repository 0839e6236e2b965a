"""A table of images and their labels (CSV, TSV, Parquet or JSONL) as a Catalog.

One row per image: a column with the image's path relative to ``root``, a column with its labels
(a list column, or a string of labels separated by ``delimiter``), optionally a column of verified
negatives and a column with the image's id. Everything is done with pyarrow/numpy operations on
whole columns; Python loops only run over the few examples kept for the skip report.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from data_tools.catalog import EXAMPLES_PER_REASON, Catalog, SkipLog, catalog_table, image_loader
from mlc.io import InputFileError
from mlc.storage import RemoteFile, input_path, read_input_classes

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
DEFAULT_LABEL_DELIMITER = "|"
MAX_EXAMPLE_CHARS = 200  # of a malformed line, in the skip report


def read_table_source(
    path,
    root,
    image_column: str = "image",
    labels_column: str = "labels",
    negatives_column: str | None = None,
    delimiter: str | None = None,
    classes=None,
    id_column: str | None = None,
    annotation: str | None = None,
) -> Catalog:
    """Read a table of images and labels into a Catalog whose loader reads ``root/<image>``.

    Format by suffix: ``.csv`` (comma separated), ``.tsv`` (tab separated), both with a header
    line; ``.parquet``; ``.jsonl``/``.ndjson`` (one JSON object per line).

    Columns:
    - ``image_column``: the image's path relative to ``root`` (the catalog's locator).
    - ``id_column``: the image's id; without it, the id is the image path.
    - ``labels_column`` (positives) and ``negatives_column`` (verified negatives, optional): a
      list column (of strings or ints), or a string column of labels separated by ``delimiter``
      (default ``"|"``; an empty or null cell means no labels). Label values are stripped of
      surrounding whitespace; empty values are ignored. CSV/TSV label columns are always read as
      strings.

    Classes: with ``classes`` (an OpenImages class-descriptions CSV or JSON, read with
    ``mlc.io.read_classes``) a label may be a class id or a display name; ids take precedence,
    and a name that several classes share matches none of them (label_row_skips "ambiguous class
    name"). Without ``classes`` the vocabulary is the sorted set of the label values of the
    images kept (positives and negatives), id = name = the value as a string; values from integer
    list columns sort numerically, others as strings (code point order).

    ``annotation``: "partial" (unlisted pairs are unknown) when a negatives column is given, else
    "full" (unlisted pairs are negatives), unless given explicitly.

    Counting (the writer reconciles ``images_read == catalog rows + image_skips.total``):
    - ``images_read`` = the well-formed data rows. A malformed CSV/TSV line (wrong number of
      fields, unterminated quote) cannot be tied to an image: it is not an image read but a label
      row skipped, label_row_skips "malformed line" (example: "line N: <text>", N the physical
      line number, 1 = the header: pyarrow numbers records without counting blank lines, so the
      examples' numbers are mapped back by a rescan of the file up to the last example; "record
      N" where the rescan does not find the text, e.g. after a quoted value spanning lines).
      Blank lines are ignored. Parquet and JSONL files that cannot be parsed raise ValueError.
    - Every well-formed row ends up in the table or in ``image_skips``, checked in this order:
      "no image path" (null or empty image cell), "no image id" (null or empty id cell, only with
      ``id_column``), "duplicate id" (the first row with an id is kept), "no known labels" (no
      known positive and no known negative left, when the annotation is "partial", or when the
      row listed labels of which none is known; with "full" annotation a row that lists no labels
      at all is a valid all-negative image and is kept).
    - ``label_rows_read`` = the label values (positives + negatives) in the well-formed rows,
      plus one per malformed line. Label values of rows skipped as images are read but not
      counted again in label_row_skips. label_row_skips: "malformed line", "unknown class id"
      (the value is dropped), "ambiguous class name", "positive and negative (kept positive)"
      (one per (image, class) pair listed on both sides; the negative is dropped). Repeats of a
      label within a row are merged silently (counted as used). The catalog's ``label_rows`` are
      each row's values that were not skipped.
    Examples name the image id, or "data row N" (N-th well-formed data row, from 1) for rows
    without one.

    Catalog positives/negatives are sorted, de-duplicated int32 class indices.

    Raises ValueError (``mlc.io.InputFileError``) naming the file for an unreadable file, an
    unknown suffix, a missing column (with the columns found) or a column of the wrong type.
    """
    path = input_path(path)  # a local Path, or a RemoteFile read into memory once
    if annotation is None:
        annotation = "partial" if negatives_column else "full"
    if annotation not in ("partial", "full"):
        raise ValueError(f"annotation must be 'partial' or 'full', got {annotation!r}")
    columns = [image_column, labels_column]
    for extra in (negatives_column, id_column):
        if extra and extra not in columns:
            columns.append(extra)

    label_skips = SkipLog()
    image_skips = SkipLog()
    table, malformed = _read(path, columns)
    if malformed.count:
        label_skips.add_all("malformed line", malformed.examples(path), malformed.count)
    n = table.num_rows

    locators = _string_column(table, image_column, path)
    ids = _string_column(table, id_column, path) if id_column else locators

    # ---- image-level skips: no path, no id, duplicate id (keep the first)
    keep = _non_empty(locators)
    _skip_rows(image_skips, "no image path", ~keep, ids if id_column else None)
    if id_column:
        has_id = _non_empty(ids)
        _skip_rows(image_skips, "no image id", keep & ~has_id, None)
        keep &= has_id
    rows = np.flatnonzero(keep)
    codes = pc.dictionary_encode(ids.take(pa.array(rows))).indices.to_numpy(zero_copy_only=False)
    is_first, first_of = first_occurrences(codes)
    if not is_first.all():
        dup = np.flatnonzero(~is_first)[:EXAMPLES_PER_REASON]
        image_skips.add_all(
            "duplicate id",
            [
                f"{ids[int(rows[i])].as_py()!r} at data row {int(rows[i]) + 1} "
                f"(first at data row {int(rows[first_of[i]]) + 1})"
                for i in dup
            ],
            int((~is_first).sum()),
        )
    rows = rows[is_first]
    k = len(rows)
    row_of = np.full(n, -1, dtype=np.int64)
    row_of[rows] = np.arange(k)
    kept_ids = ids.take(pa.array(rows))
    kept_locators = locators.take(pa.array(rows))

    # ---- label values: (kept row, value) pairs
    pos_parent, pos_values, pos_numeric = _label_values(table, labels_column, delimiter, path)
    if negatives_column:
        neg_parent, neg_values, neg_numeric = _label_values(
            table, negatives_column, delimiter, path
        )
    else:
        neg_parent, neg_values, neg_numeric = np.zeros(0, np.int64), pa.array([], pa.string()), True
    label_rows_read = len(pos_values) + len(neg_values) + malformed.count
    pos_parent, pos_values = _kept(pos_parent, pos_values, row_of)
    neg_parent, neg_values = _kept(neg_parent, neg_values, row_of)
    had_labels = np.zeros(k, dtype=bool)
    had_labels[pos_parent] = True
    had_labels[neg_parent] = True

    # ---- vocabulary and class indices
    if classes is not None:
        vocabulary = read_input_classes(classes)
        class_ids, class_names = list(vocabulary.ids), list(vocabulary.names)
        to_index = _class_matcher(class_ids, class_names)
    else:
        class_ids = _sorted_vocabulary(
            pa.concat_arrays([pos_values, neg_values]), pos_numeric and neg_numeric
        )
        class_names = list(class_ids)
        ids_array = pa.array(class_ids, pa.string())

        def to_index(values):
            return _index_in(values, ids_array), np.zeros(len(values), dtype=bool)

    n_classes = max(len(class_ids), 1)
    pos_keys, pos_known = _pair_keys(
        pos_parent, pos_values, to_index, n_classes, label_skips, kept_ids, ""
    )
    neg_keys, neg_known = _pair_keys(
        neg_parent, neg_values, to_index, n_classes, label_skips, kept_ids, ", negative"
    )
    # Per kept row, its label values that are not skipped (repeats within a row included).
    label_rows = np.bincount(pos_parent[pos_known], minlength=k) + np.bincount(
        neg_parent[neg_known], minlength=k
    )
    both = np.isin(neg_keys, pos_keys, assume_unique=True)
    if both.any():
        label_skips.add_all(
            "positive and negative (kept positive)",
            [
                f"{class_ids[int(key % n_classes)]!r} "
                f"(image {kept_ids[int(key // n_classes)].as_py()!r})"
                for key in neg_keys[both][:EXAMPLES_PER_REASON]
            ],
            int(both.sum()),
        )
        label_rows -= np.bincount(neg_keys[both] // n_classes, minlength=k)
        neg_keys = neg_keys[~both]

    positives = lists_from_pairs(pos_keys, n_classes, k)
    negatives = lists_from_pairs(neg_keys, n_classes, k)

    # ---- images left without a known label
    known = np.zeros(k, dtype=bool)
    known[pos_keys // n_classes] = True
    known[neg_keys // n_classes] = True
    unknown = ~known & (had_labels if annotation == "full" else True)
    if unknown.any():
        bad = np.flatnonzero(unknown)
        image_skips.add_all(
            "no known labels",
            [repr(kept_ids[int(i)].as_py()) for i in bad[:EXAMPLES_PER_REASON]],
            len(bad),
        )
    out = catalog_table(
        kept_ids, kept_locators, positives, negatives, label_rows=label_rows
    ).filter(pa.array(~unknown))
    return Catalog(
        class_ids=class_ids,
        class_names=class_names,
        table=out,
        loader=image_loader(root),
        annotation=annotation,
        images_read=n,
        image_skips=image_skips,
        label_rows_read=label_rows_read,
        label_row_skips=label_skips,
        source=str(path),
    )


# ---------------------------------------------------------------- shared with other sources


def lists_from_pairs(keys: np.ndarray, n_classes: int, n_rows: int) -> pa.ListArray:
    """Sorted unique pair keys ``row * n_classes + class`` -> one list<int32> of classes per row
    (rows without a pair get an empty list)."""
    keys = np.asarray(keys, dtype=np.int64)
    counts = np.bincount(keys // n_classes, minlength=n_rows)
    offsets = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array((keys % n_classes).astype(np.int32), pa.int32())
    )


def sorted_unique(keys: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2.x's hash-based np.unique is much slower on millions of
    distinct int64 keys)."""
    keys = np.sort(np.asarray(keys))
    if len(keys) < 2:
        return keys
    return keys[np.concatenate([[True], keys[1:] != keys[:-1]])]


def first_occurrences(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whether each element is the first with its key, index of that first element)."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group_first = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    first_of = np.empty(len(keys), dtype=np.int64)
    first_of[order] = group_first
    is_first = np.zeros(len(keys), dtype=bool)
    is_first[order[starts]] = True
    return is_first, first_of


# ---------------------------------------------------------------- reading


class _Malformed:
    """Collects pyarrow's invalid CSV rows: the count and the first few (number, text)."""

    def __init__(self):
        self.count = 0
        self.rows: list[tuple[int | None, str]] = []

    def __call__(self, row) -> str:
        self.count += 1
        if len(self.rows) < EXAMPLES_PER_REASON:
            self.rows.append((row.number, row.text))
        return "skip"

    def examples(self, path: Path) -> list[str]:
        lines = _physical_lines(path, [number for number, _ in self.rows])
        out = []
        for (number, full), line in zip(self.rows, lines, strict=True):
            first = full.splitlines()[0] if full else ""
            text = full if len(full) <= MAX_EXAMPLE_CHARS else full[:MAX_EXAMPLE_CHARS] + "..."
            if line is not None and line[1].rstrip("\r\n") == first:
                out.append(f"line {line[0]}: {text}")
            elif number is not None:
                out.append(f"record {number}: {text}")
            else:
                out.append(text)
        return out


def _physical_lines(path: Path, numbers: list[int | None]) -> list[tuple[int, str] | None]:
    """pyarrow's row numbers (non-empty lines, header included, from 1) -> (line number, text).

    Only runs to report malformed lines, and only up to the last example's line."""
    wanted = {n for n in numbers if n is not None}
    found: dict[int, tuple[int, str]] = {}
    if wanted:
        last = max(wanted)
        records = 0
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.rstrip(b"\r\n"):
                    records += 1
                    if records in wanted:
                        found[records] = (number, raw.decode("utf-8", "replace"))
                    if records >= last:
                        break
    return [found.get(n) if n is not None else None for n in numbers]


def _read(path: Path, columns: list[str]) -> tuple[pa.Table, _Malformed]:
    malformed = _Malformed()
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        if suffix in CSV_SUFFIXES:
            table = _read_csv(path, columns, CSV_SUFFIXES[suffix], malformed)
        elif suffix in PARQUET_SUFFIXES:
            found = pq.read_schema(_arrow(path)).names
            _require(path, columns, found)
            table = pq.read_table(_arrow(path), columns=columns)
        elif suffix in JSONL_SUFFIXES:
            table = pajson.read_json(_arrow(path))
            _require(path, columns, table.column_names)
            table = table.select(columns)
        else:
            raise InputFileError(
                f"{path}: unknown table format {suffix!r} "
                "(use .csv, .tsv, .parquet, .jsonl or .ndjson)"
            )
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(f"{path}: cannot read: {e}") from e
    return table, malformed


def _read_csv(path: Path, columns: list[str], field_delimiter: str, malformed) -> pa.Table:
    parse = pacsv.ParseOptions(delimiter=field_delimiter, invalid_row_handler=malformed)
    # Single-threaded: malformed lines arrive in file order with pyarrow's row numbers (and the
    # parse is dominated by conversion anyway).
    read = pacsv.ReadOptions(use_threads=False)
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns}, include_columns=columns
    )
    try:
        return pacsv.read_csv(
            _arrow(path), read_options=read, parse_options=parse, convert_options=convert
        )
    except KeyError:  # a column in include_columns is not in the header
        header = pacsv.open_csv(
            _arrow(path), parse_options=pacsv.ParseOptions(delimiter=field_delimiter)
        ).schema.names
        _require(path, columns, header)
        raise


def _arrow(path: Path | RemoteFile):
    """What pyarrow's readers take: a local path, or a URL's bytes (read once)."""
    return pa.BufferReader(path.read_bytes()) if isinstance(path, RemoteFile) else path


def _require(path: Path, required: list[str], found: list[str]) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise InputFileError(f"{path}: missing column(s) {missing}; found {found}")


def _plain(col: pa.ChunkedArray) -> pa.Array:
    array = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(array.type):
        array = array.cast(array.type.value_type)
    return array


def _string_column(table: pa.Table, name: str, path: Path) -> pa.Array:
    array = _plain(table[name])
    t = array.type
    if pa.types.is_null(t):
        return pa.nulls(len(array), pa.string())
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise InputFileError(f"{path}: column {name!r} must hold strings, found {t}")
    return array.cast(pa.string())


def _non_empty(strings: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.greater(pc.utf8_length(strings), 0), False).to_numpy(
        zero_copy_only=False
    )


def _skip_rows(log: SkipLog, reason: str, mask: np.ndarray, ids: pa.Array | None) -> None:
    bad = np.flatnonzero(mask)
    if len(bad):
        examples = []
        for i in bad[:EXAMPLES_PER_REASON]:
            name = ids[int(i)].as_py() if ids is not None else None
            examples.append(f"data row {int(i) + 1}" + (f" (id {name!r})" if name else ""))
        log.add_all(reason, examples, len(bad))


def _label_values(
    table: pa.Table, name: str, delimiter: str | None, path: Path
) -> tuple[np.ndarray, pa.Array, bool]:
    """A label column -> (row of each value, the values as strings, whether they were ints).

    Nulls and empty values (after stripping whitespace) are dropped."""
    col = _plain(table[name])
    t = col.type
    if pa.types.is_null(t):
        return np.zeros(0, np.int64), pa.array([], pa.string()), True
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        lists = pc.split_pattern(col, delimiter or DEFAULT_LABEL_DELIMITER)
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lists = col
    else:
        raise InputFileError(
            f"{path}: column {name!r} must hold a list of labels or a delimited string, found {t}"
        )
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    values = _plain(pc.list_flatten(lists))
    vt = values.type
    numeric = pa.types.is_integer(vt) or pa.types.is_null(vt)
    if not (numeric or pa.types.is_string(vt) or pa.types.is_large_string(vt)):
        raise InputFileError(
            f"{path}: column {name!r} must hold lists of strings or ints, found {t}"
        )
    values = pc.utf8_trim_whitespace(values.cast(pa.string()))
    present = _non_empty(values)
    if not present.all():
        parents, values = parents[present], values.filter(pa.array(present))
    return parents, values, numeric


def _kept(parents: np.ndarray, values: pa.Array, row_of: np.ndarray):
    """Keep the values of kept rows, with their rows renumbered among the kept rows."""
    rows = row_of[parents]
    keep = rows >= 0
    if keep.all():
        return rows, values
    return rows[keep], values.filter(pa.array(keep))


# ---------------------------------------------------------------- classes


def _index_in(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Index of each value in ``value_set``, -1 where absent."""
    index = pc.index_in(values, value_set=value_set)
    return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _sorted_vocabulary(values: pa.Array, numeric: bool) -> list[str]:
    unique = pc.unique(values)
    if numeric and len(unique):
        order = np.argsort(unique.cast(pa.int64()).to_numpy(zero_copy_only=False), kind="stable")
    else:
        order = pc.sort_indices(unique).to_numpy(zero_copy_only=False)
    return unique.take(pa.array(order)).to_pylist()


def _class_matcher(class_ids: list[str], class_names: list[str]):
    """values -> (class index or -1, whether the value is a name several classes share)."""
    ids_array = pa.array(class_ids, pa.string())
    name_counts = Counter(class_names)  # the class list: thousands, not millions
    unique_names = [name for name in class_names if name_counts[name] == 1]
    name_index = np.array(
        [i for i, name in enumerate(class_names) if name_counts[name] == 1], dtype=np.int64
    )
    names_array = pa.array(unique_names, pa.string())
    shared = pa.array([name for name, count in name_counts.items() if count > 1], pa.string())

    def to_index(values: pa.Array):
        index = _index_in(values, ids_array)
        by_name = _index_in(values, names_array)
        use_name = (index < 0) & (by_name >= 0)
        index[use_name] = name_index[by_name[use_name]]
        ambiguous = (index < 0) & pc.is_in(values, value_set=shared).to_numpy(zero_copy_only=False)
        return index, ambiguous

    return to_index


def _pair_keys(parents, values, to_index, n_classes, skips: SkipLog, ids: pa.Array, side: str):
    """(row, value) pairs -> sorted unique keys row * n_classes + class, and the mask of the
    values used; unknown values skipped."""
    index, ambiguous = to_index(values)
    for reason, mask in (
        ("ambiguous class name", ambiguous),
        ("unknown class id", (index < 0) & ~ambiguous),
    ):
        bad = np.flatnonzero(mask)
        if len(bad):
            skips.add_all(
                reason,
                [
                    f"{values[int(i)].as_py()!r} (image {ids[int(parents[i])].as_py()!r}{side})"
                    for i in bad[:EXAMPLES_PER_REASON]
                ],
                len(bad),
            )
    known = index >= 0
    return sorted_unique(parents[known] * n_classes + index[known]), known
