"""Generated OpenImages-sized inputs for benchmarks/bench_scale.py (deterministic, seeded,
vectorised, written in chunks): a human image-labels CSV and a predictions Parquet file.

    label_csv(path, rows, images, class_ids, seed)   ImageID,Source,LabelName,Confidence
    predictions(path, keys, class_ids, ...)           key + scores, row groups of 1,000

The label CSV looks like OpenImages' human image-level labels: rows sorted by ImageID (16
lowercase hex digits), 1 to 30 rows per image (``rows`` in all), LabelName drawn from the class
list with a long-tailed (Zipf-like, exponent 1.1) distribution over a seeded permutation of the
classes, Source "verification" or "crowdsource-verification", Confidence 1 (positive, 60%) or 0
(verified negative).
An image may list a class twice, as the real files do now and then.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SOURCES = ["verification", "crowdsource-verification"]
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
IMAGES_PER_CHUNK = 250_000
ZIPF_EXPONENT = 1.1
POSITIVE_FRACTION = 0.6
MAX_LABELS_PER_IMAGE = 30


def hex_ids(values: np.ndarray) -> pa.Array:
    """uint64 values -> 16-character lowercase hex strings (a pyarrow string array)."""
    raw = values.astype(">u8").view(np.uint8).reshape(-1, 8)
    digits = np.empty((len(values), 16), dtype=np.uint8)
    digits[:, 0::2] = HEX[raw >> 4]
    digits[:, 1::2] = HEX[raw & 15]
    offsets = np.arange(0, 16 * len(values) + 1, 16, dtype=np.int32)
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())
    )


def image_keys(images: int, seed: int) -> pa.Array:
    """``images`` distinct sorted 16-hex-digit ImageIDs."""
    rng = np.random.default_rng([seed, 0])
    values = np.unique(rng.integers(0, 2**63, int(images * 1.001) + 16, dtype=np.uint64))
    values = values[np.sort(rng.choice(len(values), images, replace=False))]
    return hex_ids(values)


def class_probabilities(n_classes: int, seed: int) -> np.ndarray:
    """A long tail: the class of rank r (a seeded permutation) has weight 1 / (r + 5)**1.1."""
    rng = np.random.default_rng([seed, 1])
    weights = 1.0 / (np.arange(n_classes) + 5.0) ** ZIPF_EXPONENT
    p = np.empty(n_classes)
    p[rng.permutation(n_classes)] = weights / weights.sum()
    return p


def rows_per_image(rows: int, images: int, seed: int) -> np.ndarray:
    """1..MAX_LABELS_PER_IMAGE label rows per image, ``rows`` in all (needs rows >= images)."""
    if not images <= rows <= images * MAX_LABELS_PER_IMAGE:
        raise ValueError(f"cannot spread {rows} rows over {images} images")
    rng = np.random.default_rng([seed, 2])
    counts = np.minimum(rng.geometric(images / rows, images), MAX_LABELS_PER_IMAGE)
    counts = np.maximum(counts, 1)
    diff = rows - int(counts.sum())  # adjust to the exact total, one row at a time per image
    while diff:
        room = counts < MAX_LABELS_PER_IMAGE if diff > 0 else counts > 1
        where = np.flatnonzero(room)[: abs(diff)]
        counts[where] += 1 if diff > 0 else -1
        diff = rows - int(counts.sum())
    return counts


def label_csv(path: Path, rows: int, images: int, class_ids: list[str], seed: int = 0) -> None:
    """Write the label CSV (see the module docstring) in chunks of IMAGES_PER_CHUNK images."""
    keys = image_keys(images, seed)
    counts = rows_per_image(rows, images, seed)
    cumulative = np.cumsum(class_probabilities(len(class_ids), seed))
    cumulative[-1] = 1.0
    vocab = pa.array(class_ids, pa.string())
    sources = pa.array(SOURCES, pa.string())
    confidence = pa.array(["0\n", "1\n"], pa.string())
    with open(path, "wb") as f:
        f.write(b"ImageID,Source,LabelName,Confidence\n")
        for chunk, i0 in enumerate(range(0, images, IMAGES_PER_CHUNK)):
            i1 = min(i0 + IMAGES_PER_CHUNK, images)
            rng = np.random.default_rng([seed, 3, chunk])
            image = np.repeat(np.arange(i0, i1), counts[i0:i1])
            n = len(image)
            cls = np.searchsorted(cumulative, rng.random(n), side="right")
            line = pc.binary_join_element_wise(
                keys.take(pa.array(image)),
                sources.take(pa.array(rng.integers(0, len(SOURCES), n))),
                vocab.take(pa.array(cls)),
                confidence.take(pa.array((rng.random(n) < POSITIVE_FRACTION).astype(np.int8))),
                ",",
            )
            offsets = np.frombuffer(line.buffers()[1], dtype=np.int32)
            data = line.buffers()[2]
            f.write(memoryview(data)[offsets[line.offset] : offsets[line.offset + n]])


def predictions(
    path: Path,
    keys: pa.Array,
    class_ids: list[str],
    dtype=np.float16,
    positives: dict | None = None,
    seed: int = 0,
    row_group: int = 1000,
) -> None:
    """A predictions file (mlc/predictions.py's format) with ``dtype`` scores: logits drawn
    N(-4, 1.5), plus 3 for each image's positive classes when ``positives`` gives them
    ({"rows": row indices, "cols": class indices}), written one row group at a time."""
    width = len(class_ids)
    value_type = pa.float16() if dtype == np.float16 else pa.float32()
    schema = pa.schema(
        [("key", pa.string()), ("scores", pa.list_(value_type, width))],
        metadata={b"mlc.class_ids": json.dumps(class_ids).encode()},
    )
    rows = cols = None
    if positives is not None:
        order = np.argsort(positives["rows"], kind="stable")
        rows, cols = positives["rows"][order], positives["cols"][order]
    with pq.ParquetWriter(path, schema) as writer:
        for group, r0 in enumerate(range(0, len(keys), row_group)):
            r1 = min(r0 + row_group, len(keys))
            rng = np.random.default_rng([seed, 4, group])
            scores = rng.standard_normal((r1 - r0, width), dtype=np.float32)
            scores *= 1.5
            scores -= 4.0
            if rows is not None:
                a, b = np.searchsorted(rows, [r0, r1])
                scores[rows[a:b] - r0, cols[a:b]] += 3.0
            values = pa.array(scores.astype(dtype).ravel(), value_type)
            batch = pa.record_batch(
                [keys.slice(r0, r1 - r0), pa.FixedSizeListArray.from_arrays(values, width)],
                schema=schema,
            )
            writer.write_batch(batch, row_group_size=row_group)
