"""Small `mlc shard` datasets for the loader tests, written with the real writer
(data_tools.writer.write_split + data_tools.merge.merge_split) over tiny generated images.

Shard sizes are made uneven on purpose: some catalog rows point at image files that do not
exist, so the writer skips them ("missing file") and the shards holding them come out shorter.
Images are JPEG (RGB and grayscale) and PNG, 20..48 pixels a side, so every test decodes real
bytes in well under a millisecond per sample.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_tools.catalog import Catalog, FileLoader, catalog_table
from data_tools.merge import merge_split
from data_tools.writer import ShardOptions, write_split
from mlc.data import LoaderConfig, ShardLoader
from mlc.format import CLASSES_FILE, manifest_name, stats_name


@dataclass
class Dataset:
    """An `mlc shard` folder and what the tests need to know about it."""

    path: Path
    split: str
    num_classes: int
    full: bool
    manifest: dict[str, dict] = field(default_factory=dict)  # key -> manifest row

    @property
    def keys(self) -> set[str]:
        return set(self.manifest)

    def stats(self) -> dict:
        return json.loads((self.path / stats_name(self.split)).read_text())

    def shard_lengths(self) -> dict[str, int]:
        stats = self.stats()
        return dict(zip(stats["shards"], stats["shard_lengths"], strict=True))

    def expected(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(targets, mask) of a key, from the manifest and the annotation kind."""
        row = self.manifest[key]
        targets = np.zeros(self.num_classes, np.uint8)
        targets[row["positives"]] = 1
        if self.full:
            mask = np.ones(self.num_classes, np.uint8)
        else:
            mask = np.zeros(self.num_classes, np.uint8)
            mask[row["positives"]] = 1
            mask[row["negatives"]] = 1
        return targets, mask

    def loader(self, config: LoaderConfig, **kwargs) -> ShardLoader:
        return ShardLoader.from_dataset(self.path, self.split, config, **kwargs)


def read_manifest(path: Path, split: str) -> dict[str, dict]:
    rows = pq.read_table(path / manifest_name(split)).to_pylist()
    return {row["key"]: row for row in rows}


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


def tiny_image(rng: np.random.Generator, index: int) -> tuple[bytes, str]:
    """A small smooth-ish image with random size; every 7th is PNG, every 5th grayscale JPEG."""
    w, h = (int(v) for v in rng.integers(20, 49, 2))
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(base, "RGB").resize((w, h), Image.Resampling.BILINEAR)
    if index % 7 == 0:
        return encode(im, "PNG"), "png"
    if index % 5 == 0:
        return encode(im.convert("L"), "JPEG", quality=90), "jpg"
    return encode(im, "JPEG", quality=90), "jpg"


def make_dataset(
    out: Path,
    candidates: int,
    shard_size: int,
    annotation: str = "partial",
    num_classes: int = 7,
    missing: float = 0.0,
    split: str = "train",
    seed: int = 0,
) -> Dataset:
    """Write a dataset of ``candidates`` rows (a fraction ``missing`` of them without an image
    file, so the writer skips them) into ``out``."""
    rng = np.random.default_rng(seed)
    images = out.parent / f"{out.name}-images"
    images.mkdir(parents=True)
    ids, locators, positives, negatives = [], [], [], []
    for i in range(candidates):
        data, ext = tiny_image(rng, i)
        name = f"img{i:05d}.{ext}"
        if rng.random() >= missing:
            (images / name).write_bytes(data)
        classes = rng.permutation(num_classes)
        n_pos = int(rng.integers(1, 4))
        n_neg = int(rng.integers(0, 3)) if annotation == "partial" else 0
        ids.append(f"id{i:05d}")
        locators.append(name)
        positives.append(sorted(int(c) for c in classes[:n_pos]))
        negatives.append(sorted(int(c) for c in classes[n_pos : n_pos + n_neg]))
    catalog = Catalog(
        class_ids=[f"/m/c{c}" for c in range(num_classes)],
        class_names=[f"class {c}" for c in range(num_classes)],
        table=catalog_table(ids, locators, positives, negatives),
        loader=FileLoader(str(images)),
        annotation=annotation,
        images_read=candidates,
        source="generated for tests/mlc",
    )
    write_split(catalog, out, split, ShardOptions(shard_size=shard_size, seed=seed), progress=False)
    merge_split(out, split)
    full = json.loads((out / CLASSES_FILE).read_text())["annotation"] == "full"
    return Dataset(out, split, num_classes, full, read_manifest(out, split))


# ---------------------------------------------------------------- tar helpers


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))


def sample_images(ds: Dataset) -> dict[str, bytes]:
    """key -> stored image bytes, read from the dataset's shards."""
    out = {}
    for shard in ds.shard_lengths():
        for name, data in tar_members(ds.path / shard):
            key, _, suffix = name.partition(".")
            if suffix != "json":
                out[key] = data
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def partial_ds(tmp_path_factory) -> Dataset:
    """OpenImages-style (annotation "partial": mask = positives + verified negatives), 8 shards
    of uneven sizes (about a quarter of the rows have no image file)."""
    ds = make_dataset(
        tmp_path_factory.mktemp("partial") / "ds", 160, 20, "partial", missing=0.25, seed=1
    )
    lengths = list(ds.shard_lengths().values())
    assert len(lengths) == 8 and len(set(lengths)) >= 3, lengths  # really uneven
    return ds


@pytest.fixture(scope="session")
def full_ds(tmp_path_factory) -> Dataset:
    """Fully annotated (mask all ones): 5 shards of 13, 13, 13, 13 and 8 samples."""
    ds = make_dataset(tmp_path_factory.mktemp("full") / "ds", 60, 13, "full", seed=2)
    assert sorted(ds.shard_lengths().values()) == [8, 13, 13, 13, 13]
    return ds


@pytest.fixture(scope="session")
def two_shard_ds(tmp_path_factory) -> Dataset:
    """Two shards (17 and 13 samples): fewer shards than 2 ranks x 2 workers."""
    ds = make_dataset(tmp_path_factory.mktemp("two") / "ds", 30, 17, "partial", seed=3)
    assert sorted(ds.shard_lengths().values()) == [13, 17]
    return ds


@pytest.fixture(scope="session")
def uneven_ds(tmp_path_factory) -> Dataset:
    """One large shard and three small ones (60, 5, 5, 5 samples), as in issue 19: 15 written
    shards of 5, the first 12 packed into one (stats and manifest rewritten to match)."""
    ds = make_dataset(tmp_path_factory.mktemp("uneven") / "ds", 75, 5, "full", seed=4)
    stats = ds.stats()
    names = stats["shards"]
    big = [member for name in names[:12] for member in tar_members(ds.path / name)]
    write_tar(ds.path / names[0], big)
    for name in names[1:12]:
        (ds.path / name).unlink()
    stats["shards"] = [names[0], *names[12:]]
    stats["shard_lengths"] = [60, 5, 5, 5]
    (ds.path / stats_name(ds.split)).write_text(json.dumps(stats))
    for row in ds.manifest.values():
        if row["shard"] in names[:12]:
            row["shard"] = names[0]
    assert ds.shard_lengths() == dict(zip(stats["shards"], [60, 5, 5, 5], strict=True))
    return ds


@dataclass
class CorruptDataset:
    ds: Dataset
    garbage_key: str  # image bytes replaced by garbage
    no_json_key: str  # json member removed


@pytest.fixture(scope="session")
def corrupt_ds(tmp_path_factory, partial_ds) -> CorruptDataset:
    """partial_ds with its first shard rewritten: one image is garbage, one sample lacks its json
    (stats and manifest still list both: the damage happened after `mlc shard`)."""
    root = tmp_path_factory.mktemp("corrupt") / "ds"
    shutil.copytree(partial_ds.path, root)
    shard = root / next(iter(partial_ds.shard_lengths()))
    members = tar_members(shard)
    keys = sorted({name.partition(".")[0] for name, _ in members})
    garbage_key, no_json_key = keys[1], keys[3]
    rewritten = []
    for name, data in members:
        key, _, suffix = name.partition(".")
        if key == garbage_key and suffix != "json":
            data = b"\x00garbage, not an image" * 10
        if key == no_json_key and suffix == "json":
            continue
        rewritten.append((name, data))
    write_tar(shard, rewritten)
    ds = Dataset(root, partial_ds.split, partial_ds.num_classes, False, dict(partial_ds.manifest))
    return CorruptDataset(ds, garbage_key, no_json_key)
