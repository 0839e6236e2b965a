"""THE predictions file: what `mlc eval --checkpoint --predictions` and `mlc predict` write and
`mlc eval --predictions` reads (docs/eval.md has the full description).

One Parquet row per image: ``key`` (string, unique), ``scores`` (one float32 logit per class,
a fixed-size list) and, when the images come with labels (an `mlc shard` split), ``positives``
and, for partially annotated data, ``negatives`` (lists of class ids): then the same file serves
as both --predictions and --labels. The class of each score position is the JSON list of ids in
the schema metadata ``mlc.class_ids``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlc.io import atomic_writer

CLASS_IDS_METADATA = b"mlc.class_ids"


class PredictionsWriter:
    """Streams key, scores and (optionally) labels to a predictions file.

    Each process writes its own part beside the file (under torchrun the folder must be shared
    across machines); rank 0 joins the parts in rank order and renames the result into place, so
    no reader sees a half-written file. ``label_ids`` are the class ids of the label columns
    (None: no labels); scores are in ``class_ids``' order.
    """

    def __init__(
        self,
        path: str | Path,
        class_ids: list[str],
        label_ids: list[str] | None = None,
        partial: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        self.path, self.rank, self.world = Path(path), rank, world
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.label_ids = None if label_ids is None else pa.array(label_ids, pa.string())
        self.partial = partial and label_ids is not None  # verified negatives are stored too
        fields = [("key", pa.string()), ("scores", pa.list_(pa.float32(), len(class_ids)))]
        if label_ids is not None:
            fields.append(("positives", pa.list_(pa.string())))
        if self.partial:
            fields.append(("negatives", pa.list_(pa.string())))
        metadata = {CLASS_IDS_METADATA: json.dumps(class_ids).encode()}
        self.schema = pa.schema(fields, metadata=metadata)
        self.rows = 0
        self.writer = pq.ParquetWriter(self._part(rank), self.schema)

    def _part(self, rank: int) -> Path:
        return self.path.with_name(f".{self.path.name}.part{rank}-of-{self.world}.tmp")

    def _lists(self, mask: np.ndarray) -> pa.Array:
        rows, cols = np.nonzero(mask)
        offsets = np.zeros(mask.shape[0] + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=mask.shape[0]), out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), self.label_ids.take(pa.array(cols)))

    def write(self, keys: list[str], scores, labels=None) -> None:
        """A batch: ``scores`` float32 [B, classes] and, with label columns, ``labels`` int8
        [B, label classes] in {1 positive, 0 verified negative, -1 unknown} (numpy arrays or CPU
        tensors)."""
        scores = np.asarray(scores, dtype=np.float32)
        columns = [
            pa.array(keys, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel()), scores.shape[1]),
        ]
        if self.label_ids is not None:
            labels = np.asarray(labels)
            columns.append(self._lists(labels == 1))
            if self.partial:
                columns.append(self._lists(labels == 0))
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.rows += len(keys)

    def close(self) -> None:
        self.writer.close()

    def discard(self) -> None:
        """This process's part, after a failed pass."""
        self.writer.close()
        self._part(self.rank).unlink(missing_ok=True)

    def finish(self) -> None:
        """Rank 0, after every part is closed: join the parts, rename into place."""
        with atomic_writer(self.path) as f, pq.ParquetWriter(f, self.schema) as out:
            for rank in range(self.world):
                part = pq.ParquetFile(self._part(rank))
                for group in range(part.num_row_groups):
                    out.write_table(part.read_row_group(group))
                self._part(rank).unlink()
