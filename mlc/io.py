"""Files every layer writes and reads: atomic writes, state files, class lists, 8-bit images,

Every file mlc publishes (shards, part files, manifests, reports, checkpoints) is written to a
temporary name in its own folder, fsynced and renamed, so a reader or a crash sees the whole
file or none. The temporary is ``.<name>.tmp-<pid>``: a killed writer's leftovers are
recognisable and removed by the next run that writes the same folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image


class InputFileError(ValueError):
    """A file that cannot be used as given; the message names the file and the row or key."""


# ---------------------------------------------------------------- atomic writes


def temp_name(path: Path) -> Path:
    """The temporary a writer of ``path`` in this process uses before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, durable: bool = True):
    """A binary file object for ``path``: renamed into place when the block ends without an
    error, removed when it raises. ``durable=False`` skips the fsyncs, for callers that flush
    a whole batch of files at once (the shard writer) and can detect a lost one later."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with tmp.open("wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data, indent: int | None = 1, **kwargs) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent, **kwargs) + "\n")


def atomic_write_csv(path: str | Path, header: list[str], rows) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write_parquet(path: str | Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def save_state(state: dict, path: str | Path) -> None:
    """A torch state (checkpoint) written atomically."""
    import torch

    with atomic_writer(path) as f:
        torch.save(state, f)


def load_state(path: str | Path) -> dict:
    """A torch state file, with ``weights_only=True``: loading it cannot run code."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- class lists


@dataclass
class Classes:
    ids: list[str]
    names: list[str]

    def __post_init__(self):
        self.index = {cid: i for i, cid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)


def existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    return path


def check_unique_ids(ids: list[str], path: Path, what: str) -> None:
    seen: dict[str, int] = {}
    for i, cid in enumerate(ids):
        if cid in seen:
            raise InputFileError(
                f"{path}: class id {cid!r} listed twice in {what} (entries {seen[cid] + 1} and "
                f"{i + 1})"
            )
        seen[cid] = i


def read_classes(path: str | Path, data: bytes | None = None) -> Classes:
    """An OpenImages class-descriptions CSV (no header; quoted names with commas) or JSON.
    ``data``: the file's bytes, read elsewhere (mlc.storage.read_input_classes, for a URL);
    ``path`` then only names the file and gives its suffix."""
    path = existing_file(path) if data is None else path
    if Path(path).suffix.lower() == ".json":
        data = json.loads(path.read_text() if data is None else data)
        items = data["classes"] if isinstance(data, dict) and "classes" in data else data
        if not isinstance(items, list):
            raise InputFileError(f"{path}: expected a list of class ids or of {{id, name}}")
        ids = [str(x["id"]) if isinstance(x, dict) else str(x) for x in items]
        names = [str(x.get("name", x["id"])) if isinstance(x, dict) else str(x) for x in items]
    else:
        try:
            table = pacsv.read_csv(
                path if data is None else pa.BufferReader(data),
                read_options=pacsv.ReadOptions(column_names=["id", "name"]),
                convert_options=pacsv.ConvertOptions(
                    column_types={"id": pa.string(), "name": pa.string()}
                ),
            )
        except pa.ArrowInvalid as e:
            raise InputFileError(
                f"{path}: not a class-descriptions CSV (LabelName,DisplayName per line): {e}"
            ) from e
        ids, names = table["id"].to_pylist(), table["name"].to_pylist()
        if ids and ids[0] == "LabelName":  # tolerate a header line
            ids, names = ids[1:], names[1:]
    check_unique_ids(ids, path, "the class list")
    return Classes(ids, names)


# ---------------------------------------------------------------- images


def to_8bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit grayscale -> 8-bit L (PIL's convert would clip them at 255)."""
    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    if im.mode in ("I", "F"):  # stretch the range to 0..255
        pixels = np.asarray(im, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else pixels * 0
        return Image.fromarray(scaled.round().astype(np.uint8))
    return im
