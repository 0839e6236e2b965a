"""What every input source hands to the shard writer: a Catalog of images and their labels.

A source (OpenImages CSVs, a table, COCO, Fashion-MNIST mosaics) reads its label files into a
Catalog: the class list, one row per image in a pyarrow table (never millions of Python objects),
a picklable loader that turns a row's locator into image bytes inside a worker process, and a
SkipLog of everything it left out and why.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlc.extras import check_protocol
from mlc.storage import READ_ONLY_PROTOCOLS, Folder, is_local, protocol

# One row per image. ``locator`` is what the loader needs to get the bytes (a path relative to
# the source's root, or a recipe for generated images); ``rotation`` (degrees, counter-clockwise)
# is applied when an image is re-encoded; ``label_rows`` is the number of the source's label rows
# that this image's labels come from (read and not skipped; 0 for generated data), so that the
# report counts as used only the label rows of the images written.
CATALOG_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("locator", pa.string()),
        ("positives", pa.list_(pa.int32())),
        ("negatives", pa.list_(pa.int32())),
        ("rotation", pa.int16()),
        ("label_rows", pa.int32()),
    ]
)

EXAMPLES_PER_REASON = 5

# Skip reasons for what the command was asked to leave out: label rows of classes outside
# --trainable, images with only such labels, candidates below a --select. They are counted and
# reported like every skip, but they are not problems of the input: --strict accepts them.
NOT_TRAINABLE = "not a trainable class"
NO_TRAINABLE_LABELS = "no trainable labels"


def not_selected(select: str) -> str:
    """The skip reason of the candidates ranked below ``--select`` (e.g. "densest:N")."""
    return f"not selected ({select})"


def requested(reason: str) -> bool:
    """Whether a skip reason is one the command asked for (see NOT_TRAINABLE)."""
    return reason in (NOT_TRAINABLE, NO_TRAINABLE_LABELS) or reason.startswith("not selected (")


class Skip(Exception):  # noqa: N818 (a control-flow signal, not an error of the program)
    """Raised by a loader or by image preparation: leave this image out, for ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class SkipLog:
    """Counts of skipped items by reason, with the first few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str, count: int = 1) -> None:
        self.counts[reason] += count
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(example)

    def add_all(self, reason: str, examples: list[str], count: int | None = None) -> None:
        """``count`` items skipped for ``reason``, of which ``examples`` are some."""
        count = len(examples) if count is None else count
        if not count:
            return
        self.counts[reason] += count
        kept = self.examples.setdefault(reason, [])
        kept.extend(examples[: min(EXAMPLES_PER_REASON, self.counts[reason]) - len(kept)])

    def merge(self, other: SkipLog) -> None:
        for reason, count in other.counts.items():
            self.add_all(reason, other.examples.get(reason, []), count)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def problems(self) -> SkipLog:
        """The skips that are problems of the input: all but the requested ones."""
        log = SkipLog()
        for reason, count in self.counts.items():
            if not requested(reason):
                log.add_all(reason, self.examples.get(reason, []), count)
        return log

    def to_dict(self) -> dict:
        return {
            reason: {"count": self.counts[reason], "examples": self.examples.get(reason, [])}
            for reason in sorted(self.counts)
        }

    @classmethod
    def from_dict(cls, data: dict) -> SkipLog:
        log = cls()
        for reason, entry in data.items():
            log.add_all(reason, list(entry["examples"]), int(entry["count"]))
        return log


class Loader(Protocol):
    """Turns a catalog row's locator into the image's encoded bytes; raises Skip when it can't.

    Must be picklable: worker processes receive it. Heavy state (an open dataset) is made lazily
    in the worker, not in __init__.
    """

    def load(self, locator: str) -> bytes: ...


@dataclass
class Catalog:
    class_ids: list[str]
    class_names: list[str]
    table: pa.Table  # CATALOG_SCHEMA
    loader: Loader
    # "partial": pairs not listed are unknown (OpenImages); "full": they are negatives (COCO).
    annotation: str
    # Images and label rows the source read, and those it left out with the reason.
    images_read: int
    image_skips: SkipLog = field(default_factory=SkipLog)
    label_rows_read: int = 0
    label_row_skips: SkipLog = field(default_factory=SkipLog)
    source: str = ""  # what was read, for the report
    # Options that shaped the catalog (a source's --trainable, --select), for the report.
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.annotation not in ("partial", "full"):
            raise ValueError(f"annotation must be 'partial' or 'full', got {self.annotation!r}")
        if self.table.schema.names != CATALOG_SCHEMA.names:
            raise ValueError(
                f"a catalog table needs columns {CATALOG_SCHEMA.names}, "
                f"got {self.table.schema.names}"
            )
        if not self.table.schema.equals(CATALOG_SCHEMA):
            self.table = self.table.cast(CATALOG_SCHEMA)


def catalog_table(ids, locators, positives, negatives, rotation=None, label_rows=None) -> pa.Table:
    """Build a CATALOG_SCHEMA table from columns (lists, numpy or arrow arrays); rotation and
    label_rows default to 0."""
    n = len(ids)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "locator": pa.array(locators, pa.string()),
            "positives": pa.array(positives, pa.list_(pa.int32())),
            "negatives": pa.array(negatives, pa.list_(pa.int32())),
            "rotation": pa.array([0] * n if rotation is None else rotation, pa.int16()),
            "label_rows": pa.array([0] * n if label_rows is None else label_rows, pa.int32()),
        },
        schema=CATALOG_SCHEMA,
    )


@dataclass(frozen=True)
class FileLoader:
    """Reads ``root/locator`` from a local file system; a locator may not leave ``root`` (label
    files are input from elsewhere: "../../home/me/.ssh/id_rsa" must not end up in a shard)."""

    root: str

    def load(self, locator: str) -> bytes:
        root = os.path.realpath(self.root)
        path = os.path.realpath(os.path.join(root, locator))
        if os.path.commonpath([root, path]) != root:
            raise Skip("path outside the image root", locator)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise Skip("missing file", path) from None
        except OSError as e:
            raise Skip("unreadable file", f"{path}: {e.strerror or e}") from None


@dataclass(frozen=True)
class UrlLoader:
    """Reads ``root/locator`` from an object store or a web server (s3://, gs://, http(s)://,
    any fsspec protocol), for images that were not copied to a local disk first.

    Picklable (it holds only the URL): each worker process makes its own client on first use,
    after the fork. A locator may not leave ``root``, as with FileLoader: one with a ``..``
    segment, a leading "/" or a protocol of its own is refused."""

    root: str

    def load(self, locator: str) -> bytes:
        if "://" in locator or locator.startswith("/") or ".." in locator.split("/"):
            raise Skip("path outside the image root", locator)
        url = f"{self.root}/{locator}"
        try:
            return _folder(self.root).read_bytes(locator)
        except FileNotFoundError:
            raise Skip("missing file", url) from None
        except OSError as e:
            raise Skip("unreadable file", f"{url}: {e.strerror or e}") from None


_FOLDERS: dict[tuple[int, str], Folder] = {}


def _folder(root: str) -> Folder:
    """This process's Folder of ``root`` (a client made before a fork is not used after it)."""
    key = (os.getpid(), root)
    if key not in _FOLDERS:
        _FOLDERS[key] = Folder(root)
    return _FOLDERS[key]


def image_loader(root: str | os.PathLike) -> FileLoader | UrlLoader:
    """The loader of images under ``root``, a local folder or a URL. A local root is kept as
    given (its text is part of the shard plan's fingerprint: resuming a folder written before
    URLs were accepted must still recognise its shards)."""
    text = str(root)
    if is_local(text):
        return FileLoader(text.removeprefix("file://"))
    if protocol(text) not in READ_ONLY_PROTOCOLS:
        # an unknown protocol or a missing package: stop now, not once per image in the workers
        check_protocol(text, purpose=f"reading {protocol(text)}:// images ({text})")
    return UrlLoader(text.rstrip("/"))


def densest_order(catalog: Catalog, seed: int = 0) -> np.ndarray:
    """The catalog's rows by decreasing number of known labels (positives + verified
    negatives), ties broken by a seeded hash of the id: the ranking of ``--select densest:N``
    (a FastEval14k-style densely annotated evaluation set)."""
    table = catalog.table
    known = pc.list_value_length(table["positives"]).to_numpy(
        zero_copy_only=False
    ) + pc.list_value_length(table["negatives"]).to_numpy(zero_copy_only=False)
    tie = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())
            for i in table["id"].to_pylist()
        ],
        dtype=np.uint64,
    )
    return np.lexsort((tie, -known))
