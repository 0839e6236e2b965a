"""THE shard format: the one place that says what `mlc shard` writes and the loaders read.

A dataset folder holds, per split (docs/format.md has the full description):
- ``<split>-000000.tar`` ...: WebDataset shards. Sample ``<key>`` is two tar members:
  ``<key>.<jpg|png|webp|ppm>`` (the image bytes) and ``<key>.json`` (SAMPLE_FIELDS below).
- ``<split>.manifest.parquet``: one row per sample (MANIFEST_SCHEMA).
- ``<split>.stats.json``: sample counts, per-shard counts, per-class positive/negative counts.
- ``<split>.report.json``: what was read, written and skipped, by reason.
and for the whole dataset ``classes.json`` plus the readers' own size files: ``sizes.json``
(OpenCLIP: shard file name -> samples) and ``_info.json`` (timm: splits -> filenames,
shard_lengths, num_samples).
"""

from __future__ import annotations

import json

import pyarrow as pa

FORMAT_VERSION = 1
CLASSES_FILE = "classes.json"
OPENCLIP_SIZES_FILE = "sizes.json"
TIMM_INFO_FILE = "_info.json"
# PIL format -> member suffix. PPM is binary PGM/PPM (P5/P6): uncompressed, for tiny images
# whose PNG decoding costs more than everything else the loader does with them.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "PPM": "ppm"}

# The sample's <key>.json: original id, class indices of positives and verified negatives, the
# stored image's size, and where the image came from.
SAMPLE_FIELDS = ("id", "positives", "negatives", "width", "height", "source")

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the tar key, unique in the split
        ("id", pa.string()),  # the image's original id
        ("shard", pa.string()),  # shard file name
        ("positives", pa.list_(pa.int32())),
        ("negatives", pa.list_(pa.int32())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),  # stored image bytes
        ("source", pa.string()),  # locator of the input image
    ]
)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(position: int) -> str:
    """Key of the sample at ``position`` in the split's shuffled order. Digits only: WebDataset
    splits member names at the first dot, so original ids (paths, URLs) cannot be keys."""
    return f"{position:09d}"


def manifest_name(split: str) -> str:
    return f"{split}.manifest.parquet"


def stats_name(split: str) -> str:
    return f"{split}.stats.json"


def report_name(split: str) -> str:
    return f"{split}.report.json"


def encode_sample_json(record: dict) -> bytes:
    return json.dumps({f: record[f] for f in SAMPLE_FIELDS}, separators=(",", ":")).encode()


def classes_document(class_ids: list[str], class_names: list[str], annotation: str) -> dict:
    """classes.json: index -> id and display name, and what an unlisted (image, class) pair
    means: "partial" = unknown (OpenImages), "full" = negative (fully annotated data)."""
    return {
        "format_version": FORMAT_VERSION,
        "annotation": annotation,
        "classes": [
            {"index": i, "id": cid, "name": name}
            for i, (cid, name) in enumerate(zip(class_ids, class_names, strict=True))
        ],
    }
