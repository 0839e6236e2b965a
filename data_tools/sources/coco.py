"""COCO instances JSON -> Catalog of image-level labels (fully annotated)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_tools.catalog import EXAMPLES_PER_REASON, Catalog, SkipLog, catalog_table, image_loader
from data_tools.sources.table import first_occurrences, lists_from_pairs, sorted_unique
from mlc.storage import input_path


def read_coco(instances_json, image_root) -> Catalog:
    """Read a COCO instances file (``images``, ``categories``, ``annotations``) into a Catalog.

    - Classes: the categories in increasing category id order; class id = str(category id),
      name = the category name.
    - Images: one row per entry of ``images``, in file order; id = str(image id), locator =
      ``file_name`` (relative to ``image_root``). Entries without a file name are skipped
      ("no image path"); a repeated image id is skipped ("duplicate id", the first is kept).
    - Labels: an image's positives are the categories with at least one annotation in it, crowd
      annotations included. Annotation is "full": negatives are empty and every unlisted class is
      a negative, so images without annotations are kept as all-negative samples.
    - ``images_read`` = the entries of ``images``; ``label_rows_read`` = the annotations. An
      annotation of an image id not in ``images`` is skipped ("unknown image id", checked first),
      one of a category id not in ``categories`` too ("unknown class id"); annotations of an image
      that was itself skipped are dropped with it and not counted again. An image's
      ``label_rows`` are its annotations that were not skipped.

    Raises ValueError naming the file and the key for a file that is not JSON, a missing
    top-level key, an entry without a required key, or a repeated category id.
    """
    path = input_path(instances_json)  # a local Path, or a RemoteFile
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object with keys 'images', 'categories', 'annotations'"
        )
    for key in ("images", "categories", "annotations"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}; found keys {sorted(data)}")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: {key!r} must be a list, found {type(data[key]).__name__}")
    images, categories, annotations = data["images"], data["categories"], data["annotations"]

    image_ids = _field(images, "id", "images", path)
    file_names = _field(images, "file_name", "images", path)
    category_ids = _field(categories, "id", "categories", path)
    category_names = _field(categories, "name", "categories", path)
    ann_image_ids = _field(annotations, "image_id", "annotations", path)
    ann_category_ids = _field(annotations, "category_id", "annotations", path)
    image_keys, ann_image_keys = _keys(image_ids, ann_image_ids)
    category_keys, ann_category_keys = _keys(category_ids, ann_category_ids)

    # ---- classes, in increasing category id order
    order = np.argsort(category_keys, kind="stable")
    category_keys = category_keys[order]
    repeated = np.flatnonzero(category_keys[1:] == category_keys[:-1])
    if len(repeated):
        raise ValueError(
            f"{path}: category id {category_ids[order[repeated[0]]]!r} appears more than once in "
            "'categories'"
        )
    class_ids = [str(category_ids[i]) for i in order]
    class_names = [str(category_names[i]) for i in order]
    n_classes = max(len(class_ids), 1)

    # ---- images: skip those without a file name, then repeated ids (keep the first)
    image_skips = SkipLog()
    n = len(images)
    has_path = np.fromiter((isinstance(x, str) and x != "" for x in file_names), bool, n)
    missing = np.flatnonzero(~has_path)
    if len(missing):
        image_skips.add_all(
            "no image path",
            [f"image id {image_ids[i]!r}" for i in missing[:EXAMPLES_PER_REASON]],
            len(missing),
        )
    candidates = np.flatnonzero(has_path)
    is_first, _ = first_occurrences(image_keys[candidates])
    rows = candidates[is_first]
    if not is_first.all():
        dup = candidates[~is_first]
        image_skips.add_all(
            "duplicate id",
            [f"image id {image_ids[i]!r} (images[{i}])" for i in dup[:EXAMPLES_PER_REASON]],
            len(dup),
        )

    # ---- annotations -> (row, class) pairs
    label_skips = SkipLog()
    all_image = _lookup(np.sort(image_keys), ann_image_keys)
    by_key = np.argsort(image_keys[rows], kind="stable")  # kept rows (their ids are unique)
    position = _lookup(image_keys[rows][by_key], ann_image_keys)
    row = np.where(position >= 0, by_key[np.maximum(position, 0)], -1)
    cls = _lookup(category_keys, ann_category_keys)
    unknown_image = all_image < 0
    unknown_class = ~unknown_image & (cls < 0)
    for reason, mask, key, values in (
        ("unknown image id", unknown_image, "image_id", ann_image_ids),
        ("unknown class id", unknown_class, "category_id", ann_category_ids),
    ):
        bad = np.flatnonzero(mask)
        if len(bad):
            label_skips.add_all(
                reason,
                [
                    f"{_name(annotations, i)}: {key} {values[i]!r}"
                    for i in bad[:EXAMPLES_PER_REASON]
                ],
                len(bad),
            )
    good = (row >= 0) & (cls >= 0)
    keys = sorted_unique(row[good] * n_classes + cls[good])

    k = len(rows)
    ids = pa.array([str(image_ids[i]) for i in rows], pa.string())
    locators = pa.array([file_names[i] for i in rows], pa.string())
    table = catalog_table(
        ids,
        locators,
        lists_from_pairs(keys, n_classes, k),
        lists_from_pairs(keys[:0], 1, k),
        label_rows=np.bincount(row[good], minlength=k),  # annotations per image
    )
    return Catalog(
        class_ids=class_ids,
        class_names=class_names,
        table=table,
        loader=image_loader(image_root),
        annotation="full",
        images_read=n,
        image_skips=image_skips,
        label_rows_read=len(annotations),
        label_row_skips=label_skips,
        source=str(path),
    )


def _field(items: list, key: str, what: str, path: Path) -> list:
    try:
        return [item[key] for item in items]
    except (KeyError, TypeError, IndexError):
        for i, item in enumerate(items):  # only runs to name the first bad entry
            if not isinstance(item, dict) or key not in item:
                raise ValueError(f"{path}: {what}[{i}] has no key {key!r}") from None
        raise


def _keys(a: list, b: list) -> tuple[np.ndarray, np.ndarray]:
    """Two lists of ids as comparable numpy arrays: int64 when both hold only ints, else str."""
    arrays = []
    for values in (a, b):
        array = np.asarray(values) if values else np.zeros(0, np.int64)
        arrays.append(array)
    if all(x.dtype.kind in "iu" for x in arrays):
        return arrays[0].astype(np.int64), arrays[1].astype(np.int64)
    return tuple(np.array([str(v) for v in values], dtype=str) for values in (a, b))


def _lookup(sorted_keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Position of each query in ``sorted_keys`` (unique), -1 where absent."""
    if len(sorted_keys) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == query, pos, -1).astype(np.int64)


def _name(annotations: list, i: int) -> str:
    ann = annotations[int(i)]
    return f"annotation id {ann['id']!r}" if "id" in ann else f"annotations[{int(i)}]"
