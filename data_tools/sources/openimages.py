"""OpenImages (V4 to V7) human image-level labels -> Catalog, streamed in pyarrow batches.

Inputs: the class-descriptions CSV (``LabelName,DisplayName``, no header, quoted names), one or
more human image-labels CSVs (``ImageID,Source,LabelName,Confidence``: 1 = positive, 0 = verified
negative; any pair not listed is unknown), the image folder (``<ImageID>.jpg``), optionally the
trainable classes (one id per line) and a rotation CSV (``ImageID,...,Rotation``).

Label rows are read in batches into arrow and numpy arrays (60M rows never become Python
objects), then de-duplicated and grouped by image with one sort.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_tools.catalog import (
    EXAMPLES_PER_REASON,
    NO_TRAINABLE_LABELS,
    NOT_TRAINABLE,
    Catalog,
    SkipLog,
    catalog_table,
    image_loader,
)
from mlc.storage import input_is_file, input_source, open_input, read_input_classes

LABEL_COLUMNS = ["ImageID", "Source", "LabelName", "Confidence"]
BLOCK_BYTES = 16 << 20  # CSV bytes per batch


def read_trainable(path: str | Path, known: set[str]) -> list[str]:
    ids, seen = [], set()
    with open_input(path) as f:
        text = f.read().decode("utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        cid = line.strip().split(",")[0]
        if not cid:
            continue
        if cid not in known:
            raise ValueError(f"{path}: line {number}: {cid!r} is not in the class descriptions")
        if cid in seen:
            raise ValueError(f"{path}: line {number}: {cid!r} listed twice")
        seen.add(cid)
        ids.append(cid)
    return ids


def _examples(mask: np.ndarray, *columns: pa.Array, n: int = 5) -> list[str]:
    rows = np.flatnonzero(mask)[:n]
    return [" ".join(str(col[int(r)].as_py()) for col in columns) for r in rows]


class _LabelBatches:
    """Reads label CSVs batch by batch. Per batch it keeps the batch's distinct image ids (in
    order of first appearance) and, per used label row, only small integers: the row's image
    as an index into those ids, its class column and whether it is positive. 60M rows over 9M
    images thus take about 7 bytes a row plus the distinct ids, never a string per row."""

    def __init__(self, vocabulary: list[str], all_ids: set[str]):
        self.vocab = pa.array(vocabulary, pa.string())
        self.all_ids = all_ids
        self.skips = SkipLog()
        self.rows_read = 0
        self.class_type = np.uint16 if len(vocabulary) <= 1 << 16 else np.uint32
        self.image_ids: list[pa.Array] = []  # per batch: its distinct image ids
        self.images: list[np.ndarray] = []  # per batch, per kept row: index into its ids
        self.not_trainable: list[np.ndarray] = []  # per batch: rows left out by --trainable
        self.classes: list[np.ndarray] = []  # per batch, per kept row: class column
        self.positive: list[np.ndarray] = []  # per batch, per kept row

    def read(self, path: str | Path) -> None:
        with open_input(path) as f:
            header = f.readline().decode("utf-8", errors="replace").strip().split(",")
        missing = [c for c in LABEL_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: line 1 has columns {header}; an OpenImages image-labels CSV needs "
                f"{','.join(LABEL_COLUMNS)} (missing {missing})"
            )

        def malformed(row) -> str:
            self.rows_read += 1
            self.skips.add(
                "malformed line", f"{Path(path).name} line {row.number}: {row.text[:80]}"
            )
            return "skip"

        with input_source(path) as source:
            reader = pacsv.open_csv(
                source,
                read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=False),
                parse_options=pacsv.ParseOptions(invalid_row_handler=malformed),
                convert_options=pacsv.ConvertOptions(
                    include_columns=["ImageID", "LabelName", "Confidence"],
                    column_types={c: pa.string() for c in LABEL_COLUMNS},
                    strings_can_be_null=False,
                ),
            )
            for batch in reader:
                self._add(batch)

    def _add(self, batch: pa.RecordBatch) -> None:
        image = pc.utf8_trim_whitespace(batch.column("ImageID"))
        label = pc.utf8_trim_whitespace(batch.column("LabelName"))
        conf = batch.column("Confidence")
        self.rows_read += batch.num_rows
        has_image = pc.not_equal(image, "").to_numpy(zero_copy_only=False)
        self.skips.add_all("no ImageID", _examples(~has_image, label), int((~has_image).sum()))
        is_pos = pc.match_substring_regex(conf, r"^\s*1(\.0*)?\s*$").to_numpy(zero_copy_only=False)
        is_neg = pc.match_substring_regex(conf, r"^\s*0(\.0*)?\s*$").to_numpy(zero_copy_only=False)
        bad_conf = has_image & ~(is_pos | is_neg)
        self.skips.add_all(
            "bad Confidence (not 0 or 1)",
            _examples(bad_conf, image, label, conf),
            int(bad_conf.sum()),
        )
        column = pc.index_in(label, value_set=self.vocab)
        in_vocab = column.is_valid().to_numpy(zero_copy_only=False)
        candidate = has_image & (is_pos | is_neg)
        if not in_vocab[candidate].all():
            out = candidate & ~in_vocab
            known = pc.is_in(label, value_set=pa.array(sorted(self.all_ids), pa.string()))
            known = known.to_numpy(zero_copy_only=False)
            not_trainable = out & known
            for reason, mask in (
                (NOT_TRAINABLE, not_trainable),
                ("unknown class id", out & ~known),
            ):
                self.skips.add_all(reason, _examples(mask, image, label), int(mask.sum()))
        else:
            not_trainable = np.zeros(len(candidate), dtype=bool)
        keep = candidate & in_vocab
        # The batch's rows with an ImageID, as indices into its distinct ids.
        encoded = pc.dictionary_encode(image.filter(pa.array(has_image)))
        rows = encoded.indices.to_numpy(zero_copy_only=False)
        self.image_ids.append(encoded.dictionary)
        self.images.append(rows[keep[has_image]])
        self.not_trainable.append(rows[not_trainable[has_image]])
        self.classes.append(column.to_numpy(zero_copy_only=False)[keep].astype(self.class_type))
        self.positive.append(is_pos[keep])

    def image_codes(self) -> tuple[pa.Array, list[np.ndarray]]:
        """Every image id once, in order of first appearance, and per batch the code (index
        into them) of each of its distinct ids."""
        ids = pa.chunked_array(self.image_ids, pa.string())
        bounds = np.cumsum([0] + [len(x) for x in self.image_ids])
        self.image_ids = []
        unique_ids = pc.unique(ids)
        codes = pc.index_in(ids, value_set=unique_ids).to_numpy().astype(np.int32)
        del ids
        pa.default_memory_pool().release_unused()  # the hash tables' memory, back to the system
        return unique_ids, [codes[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# Label pairs are sorted as one uint64 key each: (image code * classes + class) * 2 + (0 for a
# positive, 1 for a negative), so a pair's positive row comes first; processed in slices.
SLICE = 1 << 22


def _slices(n: int):
    for i in range(0, n, SLICE):
        yield slice(i, min(i + SLICE, n))


def _sorted_keys(batches: _LabelBatches, codes: list[np.ndarray], n_classes: int) -> np.ndarray:
    """The kept label rows as sorted keys (see SLICE), the batches' arrays freed as they go."""
    keys = np.empty(sum(len(x) for x in batches.images), dtype=np.uint64)
    at = 0
    for b in range(len(codes)):
        image = codes[b][batches.images[b]].astype(np.uint64)
        key = image * np.uint64(n_classes) + batches.classes[b]
        key <<= np.uint64(1)
        key |= (~batches.positive[b]).astype(np.uint64)
        keys[at : at + len(key)] = key
        at += len(key)
        batches.images[b] = batches.classes[b] = batches.positive[b] = None
    keys.sort()
    return keys


def _group_by_image(img: np.ndarray, classes: np.ndarray, n_images: int) -> pa.ListArray:
    """classes sorted by (image, class) -> one list per image."""
    offsets = np.zeros(n_images + 1, dtype=np.int32)
    np.cumsum(np.bincount(img, minlength=n_images), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(classes))


def read_openimages(
    class_descriptions: str | Path,
    label_csvs: list[str | Path],
    images: str | Path,
    trainable: str | Path | None = None,
    rotation_csv: str | Path | None = None,
) -> Catalog:
    classes = read_input_classes(class_descriptions)
    names = dict(zip(classes.ids, classes.names, strict=True))
    vocab = read_trainable(trainable, set(classes.ids)) if trainable else classes.ids
    batches = _LabelBatches(vocab, set(classes.ids))
    for path in label_csvs:
        if not input_is_file(path):
            raise FileNotFoundError(f"{path}: no such labels file")
        batches.read(path)

    unique_ids, codes = batches.image_codes()
    n_images = len(unique_ids)
    # Images with a label row left out by --trainable: without labels, they are skipped for that.
    had_not_trainable = np.zeros(n_images, dtype=bool)
    for b, rows in enumerate(batches.not_trainable):
        had_not_trainable[codes[b][rows]] = True
    batches.not_trainable = []
    n_classes = len(vocab)
    keys = _sorted_keys(batches, codes, n_classes)
    del codes

    # One label per (image, class); a pair listed positive and negative is positive: sorted,
    # the first row of a pair is its positive one if it has one.
    n = len(keys)
    first = np.ones(n, dtype=bool)  # the first row of its pair
    positive = np.empty(n, dtype=bool)
    conflict = np.empty(n, dtype=bool)  # a negative row of a pair that has a positive one
    start = 0  # the first row of the pair that the slice's first row belongs to
    for s in _slices(n):
        positive[s] = (keys[s] & np.uint64(1)) == 0
        lo, hi = max(s.start, 1), s.stop
        first[lo:hi] = (keys[lo:hi] >> np.uint64(1)) != (keys[lo - 1 : hi - 1] >> np.uint64(1))
        starts = np.where(first[s], np.arange(s.start, s.stop), start)
        np.maximum.accumulate(starts, out=starts)
        conflict[s] = ~first[s] & ~positive[s] & positive[starts]
        start = int(starts[-1])
    duplicate = ~first & ~conflict

    def pair_examples(mask: np.ndarray, keys: np.ndarray) -> list[str]:
        out = []
        for i in np.flatnonzero(mask)[:EXAMPLES_PER_REASON]:
            pair = int(keys[i]) >> 1
            out.append(f"{unique_ids[pair // n_classes].as_py()} {vocab[pair % n_classes]}")
        return out

    skips = batches.skips
    skips.add_all(
        "positive and negative (kept positive)", pair_examples(conflict, keys), int(conflict.sum())
    )
    skips.add_all(
        "duplicate (image, class) row", pair_examples(duplicate, keys), int(duplicate.sum())
    )
    del conflict, duplicate
    # The first row of each pair, moved to the front in place (no second array of keys), then
    # split into image and class columns.
    pairs = 0
    for s in _slices(n):
        kept = first[s]
        count = int(kept.sum())
        keys[pairs : pairs + count] = keys[s][kept]
        positive[pairs : pairs + count] = positive[s][kept]
        pairs += count
    del first
    positive = positive[:pairs]
    img = np.empty(pairs, dtype=np.int32)
    cls = np.empty(pairs, dtype=np.int32)
    for s in _slices(pairs):
        image, column = np.divmod(keys[s] >> np.uint64(1), np.uint64(n_classes))
        img[s], cls[s] = image, column
    del keys
    pos_lists = _group_by_image(img[positive], cls[positive], n_images)
    negative = ~positive
    neg_lists = _group_by_image(img[negative], cls[negative], n_images)
    del cls, positive, negative

    rows_per_image = np.bincount(img, minlength=n_images)  # one kept label row per pair
    del img
    known = rows_per_image > 0
    image_skips = SkipLog()
    for reason, mask in (
        ("no known labels", ~known & ~had_not_trainable),
        (NO_TRAINABLE_LABELS, ~known & had_not_trainable),
    ):
        skipped = np.flatnonzero(mask)
        image_skips.add_all(reason, [unique_ids[int(i)].as_py() for i in skipped[:5]], len(skipped))
    keep = pa.array(known)
    ids = unique_ids.filter(keep)
    rotation = _rotations(rotation_csv, ids) if rotation_csv else None
    table = catalog_table(
        ids,
        pc.binary_join_element_wise(ids, pa.scalar(".jpg"), ""),
        pos_lists.filter(keep),
        neg_lists.filter(keep),
        rotation,
        rows_per_image[known],
    )
    return Catalog(
        class_ids=list(vocab),
        class_names=[names[c] for c in vocab],
        table=table,
        loader=image_loader(images),
        annotation="partial",
        images_read=n_images,
        image_skips=image_skips,
        label_rows_read=batches.rows_read,
        label_row_skips=skips,
        source=f"OpenImages labels {', '.join(str(p) for p in label_csvs)}",
        options={
            "trainable": str(trainable) if trainable else None,
            "rotation": str(rotation_csv) if rotation_csv else None,
        },
    )


def _rotations(path: str | Path, ids: pa.Array) -> np.ndarray:
    """Rotation per image (degrees counter-clockwise; missing or NaN = 0)."""
    with input_source(path) as source:
        table = pacsv.read_csv(
            source,
            convert_options=pacsv.ConvertOptions(
                include_columns=["ImageID", "Rotation"],
                column_types={"ImageID": pa.string(), "Rotation": pa.float64()},
            ),
        )
    where = pc.index_in(ids, value_set=table["ImageID"].combine_chunks())
    found = where.is_valid().to_numpy(zero_copy_only=False)
    if not found.any():
        return np.zeros(len(ids), dtype=np.int16)
    degrees = np.nan_to_num(table["Rotation"].combine_chunks().to_numpy(zero_copy_only=False))
    rows = pc.fill_null(where, 0).to_numpy()
    return np.where(found, degrees[rows], 0).astype(np.int16)
