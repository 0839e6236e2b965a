"""A small synthetic evaluation set in the real file formats, for `mlc eval --example`.

It mimics OpenImages: a class-descriptions CSV with a few real ids and quoted names containing
commas, a human image-labels CSV where only some (image, class) pairs are verified (the rest are
unknown), long-tailed class frequencies, scores rounded so that some tie, and reference weights
from a simulated training split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from eval.io import CLASS_IDS_METADATA
from mlc.io import atomic_write_csv, atomic_write_parquet, atomic_write_text

# Real OpenImages V6 classes, chosen for the quoting their names need.
REAL_CLASSES = [
    ("/m/01c_0l", "Ducks, geese and swans"),
    ("/m/02wvth", 'Fiat 500 "topolino"'),
    ("/m/03hgsf0", "Lemon, lime and bitters"),
    ("/m/01crnh", "Meal, ready-to-eat"),
    ("/m/0100nhbf", "Sprenger's tulip"),
    ("/m/0105jzwx", "Dabu-dabu"),
]


def write_example(out_dir: str | Path, images: int = 400, classes: int = 30, seed: int = 0) -> dict:
    """Write classes.csv, labels.csv, predictions.parquet and weights.json; return their paths."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    ids = [cid for cid, _ in REAL_CLASSES][:classes]
    names = [name for _, name in REAL_CLASSES][:classes]
    for i in range(len(ids), classes):
        ids.append(f"/m/0x{i:04x}")
        names.append(f"Synthetic class {i}, long tail")
    prevalence = 0.3 / np.arange(1, classes + 1) ** 0.9  # long-tailed
    truth = rng.random((images, classes)) < prevalence
    # Logits: positives score higher; rounding to 0.1 creates ties, as real models' outputs can.
    logits = np.round(rng.normal(size=(images, classes)) + 2.0 * truth - 1.0, 1)
    keys = [f"{rng.integers(2**63):016x}" for _ in range(images)]
    # Human verification: most positives, some negatives; every other pair stays unknown.
    verified = np.where(truth, rng.random(truth.shape) < 0.9, rng.random(truth.shape) < 0.3)
    rows = [
        [keys[i], "verification", ids[c], int(truth[i, c])]
        for i, c in zip(*np.nonzero(verified), strict=True)
    ]
    paths = {
        "classes": out / "class-descriptions.csv",
        "labels": out / "human-imagelabels.csv",
        "predictions": out / "predictions.parquet",
        "weights": out / "weights.json",
    }
    rows_csv = [[cid, name] for cid, name in zip(ids, names, strict=True)]
    atomic_write_csv(paths["classes"], rows_csv[0], rows_csv[1:])  # no header: first row is data
    atomic_write_csv(paths["labels"], ["ImageID", "Source", "LabelName", "Confidence"], rows)
    table = pa.table(
        {"key": keys, "scores": pa.array(list(logits.astype(np.float32)), pa.list_(pa.float32()))}
    ).replace_schema_metadata({CLASS_IDS_METADATA: json.dumps(ids)})
    atomic_write_parquet(paths["predictions"], table)
    train_counts = rng.poisson(prevalence * 100_000)  # a simulated training split's counts
    atomic_write_text(
        paths["weights"],
        json.dumps(
            {"positive_counts": dict(zip(ids, train_counts.tolist(), strict=True))}, indent=1
        ),
    )
    return paths
