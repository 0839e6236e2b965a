"""Write a Catalog as WebDataset shards: deterministic, resumable, splittable across machines.

The plan is fixed before any image is read: the catalog's rows are shuffled with the seed and
cut into shards of ``shard_size`` rows, so shard j always holds the same candidates whatever the
number of workers or partitions (partition i of P writes the shards j with j % P == i). A shard
is written to a temporary name and renamed, inside the split's bookkeeping folder
``_parts/<split>/``; then its part file (``_parts/<split>/<shard>.json``: its manifest rows,
skips and CRC-32) is written the same way. A shard whose part file is present and whose checksum
matches is complete: a re-run keeps it. ``merge_split`` publishes the split: it moves the shards
into the dataset folder and turns the part files into the split's manifest, stats and report,
so a split whose run failed, or was refused by --strict, leaves nothing under the final names.

The dataset folder is an mlc.storage.Folder: a local path, or a URL of an object store (s3://,
gs://, memory:// for tests, any fsspec protocol that can be written). Locally, a file is written
to a temporary name and renamed; on an object store an upload appears whole when it completes,
so there are no temporaries, and publishing is a server-side copy and delete. A resume checks a
shard by its part file and size everywhere, and by its CRC-32 only on a local file system (see
docs/shard.md, "Object storage").
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_tools.catalog import Catalog, Skip, SkipLog
from data_tools.images import VERIFY_MODES, PreparedImage, prepare_image
from mlc.format import (
    CLASSES_FILE,
    FORMAT_VERSION,
    MANIFEST_SCHEMA,
    classes_document,
    encode_sample_json,
    sample_key,
    shard_name,
)
from mlc.storage import Folder, is_local, join

PARTS_DIR = "_parts"
PLAN_FILE = "plan.json"


class ShardError(RuntimeError):
    """The output folder cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ShardOptions:
    shard_size: int = 1000  # candidate images per shard (a shard holds fewer if some are skipped)
    max_side: int | None = None  # re-encode so the longer side is at most this
    quality: int = 90  # JPEG quality when re-encoding
    verify: str = "decode"  # see data_tools.images.VERIFY_MODES
    seed: int = 0  # shuffles the sample order

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {self.verify!r}")


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its rows are ``count`` rows of the split's rows in plan order from
    ``first_position``. The task names them rather than holding them: a list of every pending
    shard's rows as Python objects would take gigabytes at OpenImages' 9 million images."""

    out: str
    split: str
    index: int  # shard number
    first_position: int  # position of the shard's first row in the split's shuffled order
    count: int
    options: ShardOptions
    loader: object
    fingerprint: str


# The split's rows in plan order, in a pool's worker process: inherited through the fork by
# _pool_worker (as a Pool's initargs are with the fork start method), never pickled.
_pool_rows: pa.Table | None = None


def _pool_worker(rows: pa.Table) -> None:
    global _pool_rows
    _pool_rows = rows


def _write_in_pool(task: ShardTask) -> dict:
    return write_shard(task, _pool_rows)


# ---------------------------------------------------------------- one shard (in a worker)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same samples give a byte-identical tar on any machine, at any time.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _ChecksumFile:
    """A write-only file that checksums what passes through (no second read of the shard).
    CRC-32 and the size catch accidental damage (the threat here), at a fraction of a
    cryptographic hash's cost."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def parts_dir(out: str | Path, split: str) -> Path | str:
    """The split's bookkeeping folder: plan, part files, selection (a Path for a local
    folder, a URL otherwise)."""
    if is_local(out):
        return Path(out) / PARTS_DIR / split
    return join(out, PARTS_DIR, split)


def parts_name(split: str, name: str = "") -> str:
    """A file in the split's bookkeeping folder, by its name inside the dataset folder."""
    return f"{PARTS_DIR}/{split}/{name}" if name else f"{PARTS_DIR}/{split}"


def shard_location(out: Folder, split: str, name: str) -> str:
    """Where a shard is written, inside the dataset folder. In a local folder: staged in the
    split's bookkeeping folder until merge_split renames it into place. In an object store:
    under its final name at once, because there a rename is a copy of every byte on the server
    and a delete, and an object appears only as a whole completed upload anyway; readers find
    shards only through the split's stats and sizes.json, which merge_split writes, so the split
    is still published by the merge."""
    return parts_name(split, name) if out.local else name


def prepare_row(loader, row: dict, options: ShardOptions) -> PreparedImage:
    """The image of a catalog row as its shard stores it; raises Skip when it cannot be."""
    data = loader.load(row["locator"])
    return prepare_image(
        data, options.max_side, options.quality, row["rotation"] or 0, options.verify
    )


def skip_example(row: dict, skip: Skip) -> str:
    """How a skipped image is named in the report: its id and what was wrong."""
    return f"{row['id']}: {skip.detail}" if skip.detail else row["id"]


def write_shard(task: ShardTask, rows: pa.Table) -> dict:
    """Write one shard (where shard_location says) and its part file; return the part
    (manifest columns, skips). ``rows``: the split's rows in plan order.

    Runs in a worker process: the Folder (and so an object store's client) is made here, after
    the fork, not inherited from the parent."""
    out = Folder(task.out)
    name = shard_name(task.split, task.index)
    columns = {field: [] for field in MANIFEST_SCHEMA.names}
    skips = SkipLog()
    label_rows = 0  # of the images written
    # No fsync here: the part file's size and CRC let a resume detect a shard lost in a crash,
    # and write_split flushes all its shards to disk before it returns (see _flush). On an
    # object store the shard object appears when its upload completes, before the part file.
    with out.writer(shard_location(out, task.split, name), durable=False) as f:
        checked = _ChecksumFile(f)
        with tarfile.open(fileobj=checked, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            shard_rows = rows.slice(task.first_position, task.count).to_pylist()
            for offset, row in enumerate(shard_rows):
                try:
                    image = prepare_row(task.loader, row, task.options)
                except Skip as skip:
                    skips.add(skip.reason, skip_example(row, skip))
                    continue
                key = sample_key(task.first_position + offset)
                record = {
                    "key": key,
                    "id": row["id"],
                    "shard": name,
                    "positives": row["positives"],
                    "negatives": row["negatives"],
                    "width": image.width,
                    "height": image.height,
                    "bytes": len(image.data),
                    "source": row["locator"],
                }
                _add_member(tar, f"{key}.{image.ext}", image.data)
                _add_member(tar, f"{key}.json", encode_sample_json(record))
                for field, value in record.items():
                    columns[field].append(value)
                label_rows += row["label_rows"]
    part = {
        "fingerprint": task.fingerprint,
        "shard": name,
        "tar_bytes": checked.size,
        "crc32": checked.crc,
        "manifest": columns,
        "skips": skips.to_dict(),
        "label_rows": label_rows,
    }
    out.write_text(parts_name(task.split, f"{name}.json"), json.dumps(part))
    return part


# ---------------------------------------------------------------- the plan (in the parent)


def _fingerprint(
    split: str, index: int, first: int, rows: list, options: ShardOptions, images_from: str
) -> str:
    content = [FORMAT_VERSION, split, index, first, asdict(options), rows, images_from]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _complete_part(
    out: Folder,
    split: str,
    name: str,
    fingerprint: str,
    retry_skipped: bool,
    part_data: bytes | OSError | None,
    staged: dict[str, int],
    published: dict[str, int],
) -> dict | None:
    """The part of a shard already written with this plan, staged or published, checked; None
    if it must be written (also when ``retry_skipped`` and it skipped an image).

    ``part_data``: the part file's contents (None if there is none); ``staged``, ``published``:
    the sizes of the files in the split's bookkeeping folder and in the dataset folder. The
    shard's size must match its part file's everywhere; its CRC-32 is checked on a local file
    system only, where a crash can lose the data of a shard renamed into place but not yet
    flushed. An object-store object exists only as the completed upload of the whole shard, and
    reading every shard back would download the dataset."""
    part_file = out.join(parts_name(split, f"{name}.json"))
    if part_data is None:
        return None
    try:
        if isinstance(part_data, OSError):
            raise part_data
        part = json.loads(part_data)
    except (OSError, ValueError):
        return None  # a damaged part file: rewrite the shard
    if part.get("fingerprint") != fingerprint:
        raise ShardError(
            f"{out.join(name)} was written from other inputs or options than this run's (its "
            f"part file {part_file} does not match). Use a new output folder, or delete the old "
            "one."
        )
    if name in staged:
        tar, size = parts_name(split, name), staged[name]
    elif name in published:
        tar, size = name, published[name]
    else:
        return None  # missing since: rewrite
    if size != part["tar_bytes"] or (out.local and _crc32(out.path / tar) != part.get("crc32")):
        return None  # damaged since: rewrite
    if retry_skipped and part["skips"]:
        return None  # the images may have been fixed since
    return part


def _check_plan(out: Folder, split: str, plan: dict) -> None:
    """Every run and partition of a split has the same plan; a different one is refused before
    anything in the folder changes."""
    path = parts_name(split, PLAN_FILE)
    if out.is_file(path):
        try:
            existing = json.loads(out.read_bytes(path))
        except (OSError, ValueError):
            existing = None  # damaged: rewrite it
        if existing is not None and existing != plan:
            changed = sorted(k for k in plan if existing.get(k) != plan[k])
            raise ShardError(
                f"{out} already holds split {split!r} written from other inputs or options "
                f"(differs in: {', '.join(changed)}). Use a new output folder, or delete the "
                "old one."
            )
        if existing == plan:
            return
    out.write_text(path, json.dumps(plan, indent=1) + "\n")


def shuffled_rows(catalog: Catalog, seed: int) -> pa.Table:
    order = np.random.default_rng(seed).permutation(catalog.table.num_rows)
    return catalog.table.take(pa.array(order))


def _check_classes(out: Folder, catalog: Catalog) -> None:
    document = classes_document(catalog.class_ids, catalog.class_names, catalog.annotation)
    if out.is_file(CLASSES_FILE):
        existing = out.read_json(CLASSES_FILE)
        if existing != document:
            raise ShardError(
                f"{out.join(CLASSES_FILE)} lists other classes (or another annotation kind) "
                "than this run's; a dataset folder has one class list. Use a new output folder."
            )
        return
    out.write_text(CLASSES_FILE, json.dumps(document, indent=1) + "\n")


def progress_bar(total: int, split: str, partition: tuple[int, int], show: bool) -> tqdm:
    """The one progress bar of a split's (partition's) shards, in images."""
    index, count = partition
    desc = f"{split} {index}/{count}" if count > 1 else split
    return tqdm(total=total, unit="img", desc=desc, disable=not show, smoothing=0.1)


def write_split(
    catalog: Catalog,
    out: str | Path,
    split: str,
    options: ShardOptions = ShardOptions(),
    partition: tuple[int, int] = (0, 1),
    workers: int = 1,
    progress: bool = True,
    retry_skipped: bool = False,
    on_shard: Callable[[str, int, bool], None] | None = None,
    shuffled: pa.Table | None = None,
) -> SkipLog:
    """Write this partition's shards of the split (skipping complete ones); return its skips.

    The shards are staged (see shard_location) until merge_split publishes the split.
    ``retry_skipped`` (--strict) writes again a complete shard that skipped an image. The
    catalog-level skips and counts go to the split's plan file, which every partition writes
    identically; merge_split reads it. ``on_shard(name, images, kept)`` is called in this
    process as each of the partition's shards is done: its file name, its candidate images
    (written + skipped), and whether it was kept from an earlier run; it lets a caller that runs
    partitions elsewhere (data_tools.distribute) show one progress bar for all of them.
    ``shuffled`` is ``shuffled_rows(catalog, options.seed)`` made once by such a caller and
    shared by its partitions (the catalog's own table is then not read): a copy of a large
    table per partition running at once would take a node's memory.
    """
    index, count = partition
    if not 0 <= index < count:
        raise ValueError(f"partition must be i/P with 0 <= i < P, got {index}/{count}")
    out = Folder(out)
    out.require_writable()
    out.makedirs(parts_name(split))
    _check_classes(out, catalog)
    rows = shuffled_rows(catalog, options.seed) if shuffled is None else shuffled
    n_shards = -(-rows.num_rows // options.shard_size)
    plan = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "shards": n_shards,
        # the writer's options, then those that shaped the catalog (--select, --trainable, ...)
        "options": {**asdict(options), "select": None, **catalog.options},
        "source": catalog.source,
        "annotation": catalog.annotation,
        "images_read": catalog.images_read,
        "image_skips": catalog.image_skips.to_dict(),
        "label_rows_read": catalog.label_rows_read,
        "label_row_skips": catalog.label_row_skips.to_dict(),
        "candidates": rows.num_rows,
        "images_from": repr(catalog.loader),
    }
    _check_plan(out, split, plan)
    if out.local:
        # Temporaries of shards and part files, left by a killed run of this partition (an
        # object store has none: an unfinished upload never appears).
        stale_name = re.compile(rf"^\.{re.escape(split)}-(\d+)\.tar(\.json)?\.tmp-\d+$")
        for stale in (out.path / parts_name(split)).glob(f".{split}-*.tar*.tmp-*"):
            match = stale_name.match(stale.name)
            if match and int(match.group(1)) % count == index:
                stale.unlink(missing_ok=True)

    # What earlier runs left, from one listing of each folder (fresh: see Folder.sizes).
    staged = out.child(parts_name(split)).sizes()
    published = out.sizes()
    ours = range(index, n_shards, count)
    part_files = [f"{shard_name(split, j)}.json" for j in ours]
    part_data = out.child(parts_name(split)).read_many([n for n in part_files if n in staged])

    skips = SkipLog()
    todo = []
    done_samples = 0
    for j in ours:
        first = j * options.shard_size
        shard_rows = rows.slice(first, options.shard_size).to_pylist()
        fingerprint = _fingerprint(split, j, first, shard_rows, options, plan["images_from"])
        name = shard_name(split, j)
        part = _complete_part(
            out,
            split,
            name,
            fingerprint,
            retry_skipped,
            part_data.get(f"{name}.json"),
            staged,
            published,
        )
        if part is not None:
            skips.merge(SkipLog.from_dict(part["skips"]))
            done_samples += len(shard_rows)
            if on_shard is not None:
                on_shard(part["shard"], len(shard_rows), True)
            continue
        todo.append(
            ShardTask(
                out.url,
                split,
                j,
                first,
                len(shard_rows),
                options,
                catalog.loader,
                fingerprint,
            )
        )
    total = sum(t.count for t in todo)
    bar = progress_bar(total, split, partition, progress)
    if done_samples and progress:
        print(f"{split}: kept {done_samples} images in shards completed by an earlier run")
    with bar:
        if workers <= 1:
            results = (write_shard(task, rows) for task in todo)
            pool = None
        else:
            context = multiprocessing.get_context("fork")
            pool = context.Pool(workers, initializer=_pool_worker, initargs=(rows,))
            results = pool.imap_unordered(_write_in_pool, todo)
        try:
            for part in results:
                part_skips = SkipLog.from_dict(part["skips"])
                skips.merge(part_skips)
                images = len(part["manifest"]["key"]) + part_skips.total
                bar.update(images)
                if on_shard is not None:
                    on_shard(part["shard"], images, False)
        finally:
            if pool is not None:
                pool.terminate()
    if out.local:
        _flush(out.path / parts_name(split, shard_name(split, t.index)) for t in todo)
    return skips


def _flush(paths) -> None:
    """Make the shards durable before anything (a merge) treats them as final. One pass at the
    end lets the kernel write them back in the background meanwhile, instead of a blocking
    fsync per shard."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- merge


def read_plan(out: str | Path | Folder, split: str) -> dict:
    out = out if isinstance(out, Folder) else Folder(out)
    path = parts_name(split, PLAN_FILE)
    if not out.is_file(path):
        raise ShardError(
            f"{out.join(path)} not found: no shards of split {split!r} were written in {out}"
        )
    return out.read_json(path)


def read_parts(out: str | Path | Folder, split: str) -> tuple[dict, list[dict]]:
    """The split's plan and every shard's part, in shard order; error if any is missing."""
    out = out if isinstance(out, Folder) else Folder(out)
    plan = read_plan(out, split)
    names = [f"{shard_name(split, j)}.json" for j in range(plan["shards"])]
    bookkeeping = out.child(parts_name(split))
    present = set(bookkeeping.sizes())
    data = bookkeeping.read_many([name for name in names if name in present])
    parts, missing = [], []
    for j, name in enumerate(names):
        if name not in data:
            missing.append(j)
        elif isinstance(data[name], OSError):
            raise data[name]
        else:
            parts.append(json.loads(data[name]))
    if missing:
        shown = ", ".join(shard_name(split, j) for j in missing[:5])
        raise ShardError(
            f"{len(missing)} of {plan['shards']} shards of {split!r} are not written yet "
            f"({shown}{', ...' if len(missing) > 5 else ''}): run every partition, then merge"
        )
    return plan, parts


def manifest_table(parts: list[dict]) -> pa.Table:
    columns = {field: [] for field in MANIFEST_SCHEMA.names}
    for part in parts:
        for field in columns:
            columns[field].extend(part["manifest"][field])
    return pa.table(columns, schema=MANIFEST_SCHEMA)
