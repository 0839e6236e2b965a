"""data_tools.sources.fashion_mnist: the IDX reader on tiny files written here (gzip and raw, bad
headers), and, with Debian's dataset-fashion-mnist installed, the mosaic catalog and its loader
checked against the real images and labels read independently."""

import gzip
import io
import os
import pickle
import re
import struct

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from data_tools.catalog import CATALOG_SCHEMA, Catalog, Skip
from data_tools.sources.fashion_mnist import (
    CLASS_IDS,
    CLASS_NAMES,
    DEFAULT_ROOT,
    MosaicLoader,
    class_prior,
    class_ranking,
    load_split,
    mosaic_catalog,
    read_idx,
)

HAVE_DATA = os.path.isdir(DEFAULT_ROOT) and all(
    os.path.isfile(os.path.join(DEFAULT_ROOT, f"{prefix}-{kind}-ubyte.gz"))
    for prefix in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
)
needs_data = pytest.mark.skipif(
    not HAVE_DATA,
    reason=f"Fashion-MNIST not in {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of a uint8 array, written independently of the reader."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write(path, data: bytes, gz: bool) -> str:
    path = str(path) + (".gz" if gz else "")
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return path


def real_labels(path: str) -> np.ndarray:
    """The labels of a real label file, read without the module under test."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    assert magic == 0x801
    return np.frombuffer(data[8:], dtype=np.uint8, count=n)


def positives(catalog: Catalog) -> list[list[int]]:
    return catalog.table.column("positives").to_pylist()


def recipes(catalog: Catalog) -> np.ndarray:
    return np.array(
        [[int(i) for i in loc.split(",")] for loc in catalog.table.column("locator").to_pylist()]
    )


# ------------------------------------------------------------------------------- IDX, tiny files


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    got_images = read_idx(write(tmp_path / "images", idx_bytes(images), gz))
    got_labels = read_idx(write(tmp_path / "labels", idx_bytes(labels), gz))
    assert got_images.shape == (5, 28, 28) and got_images.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_other_element_type(tmp_path):
    values = np.array([[1, -2, 3], [70000, 5, -6]], dtype=">i4")
    data = bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + values.tobytes()
    np.testing.assert_array_equal(read_idx(write(tmp_path / "ints", data, False)), values)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00\x08", "not an IDX file"),  # short magic
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x01", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x01", "not an IDX file"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x00\x01", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x01", "longer than its header"),
    ],
)
def test_read_idx_bad_file_names_it(tmp_path, gz, data, message):
    path = write(tmp_path / "bad-ubyte", data, gz)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        read_idx(path)
    assert path in str(info.value)


def test_read_idx_bad_gzip_names_it(tmp_path):
    path = str(tmp_path / "broken.gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:-30])
    with pytest.raises(ValueError, match=re.escape(path)):
        read_idx(path)


def fake_root(tmp_path, gz: bool, n_test: int = 20) -> tuple[str, np.ndarray, np.ndarray]:
    """A root with tiny train and test files; every class is present in each split."""
    rng = np.random.default_rng(2)
    for prefix, n in (("train", 30), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write(tmp_path / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write(tmp_path / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
        if prefix == "t10k":
            return str(tmp_path), images, labels
    raise AssertionError


@pytest.mark.parametrize("gz", [False, True])
def test_catalog_and_loader_on_tiny_files(tmp_path, gz):
    root, images, labels = fake_root(tmp_path, gz)
    catalog = mosaic_catalog(root, "test", count=50, grid=3, min_items=2, max_items=5, seed=4)
    assert catalog.table.num_rows == 50 and catalog.label_rows_read == 0  # generated images
    for recipe, pos, locator in zip(
        recipes(catalog),
        positives(catalog),
        catalog.table.column("locator").to_pylist(),
        strict=True,
    ):
        used = recipe[recipe >= 0]
        assert 2 <= len(used) <= 5 and used.max() < 20
        assert pos == sorted(set(labels[used].tolist()))
        mosaic = np.asarray(Image.open(io.BytesIO(catalog.loader.load(locator))))
        for cell, index in enumerate(recipe):
            r, c = divmod(cell, 3)
            tile = mosaic[28 * r : 28 * r + 28, 28 * c : 28 * c + 28]
            np.testing.assert_array_equal(tile, images[index] if index >= 0 else 0)


def test_shape_and_count_mismatch(tmp_path):
    root, _, _ = fake_root(tmp_path, gz=False)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(7, np.uint8)), gz=False)
    with pytest.raises(ValueError, match="holds 20 images but .* 7 labels"):
        mosaic_catalog(root, "test", count=5)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((7, 28, 27), np.uint8)), False)
    with pytest.raises(ValueError, match=re.escape("t10k-images-idx3-ubyte")):
        mosaic_catalog(root, "test", count=5)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.full(30, 10, np.uint8)), False)
    with pytest.raises(ValueError, match="label 10 out of range"):
        mosaic_catalog(root, "train", count=5)


def test_missing_class_is_an_error(tmp_path):
    root, _, _ = fake_root(tmp_path, gz=False, n_test=8)  # classes 8 and 9 absent from "test"
    with pytest.raises(ValueError, match="bag, ankle_boot"):
        mosaic_catalog(root, "test", count=5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "val"},
        {"grid": 0},
        {"min_items": 3, "max_items": 2},
        {"max_items": 5},
        {"min_items": -1},
        {"count": -1},
        {"count": 2.5},
        {"prior_alpha": -1},
        {"prior_alpha": float("nan")},
        {"seed": -1},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    root, _, _ = fake_root(tmp_path, gz=False)
    with pytest.raises(ValueError):
        mosaic_catalog(root, **{"count": 5, **kwargs})


def test_missing_root_says_how_to_get_the_data(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        mosaic_catalog(missing, count=5)
    message = str(info.value)
    assert missing in message
    assert "apt-get install dataset-fashion-mnist" in message and "--root DIR" in message
    with pytest.raises(FileNotFoundError, match="apt-get"):
        MosaicLoader(missing, "train", 2).load("0,1,2,3")


def test_classes():
    assert CLASS_IDS[0] == "tshirt_top" and CLASS_IDS[-1] == "ankle_boot"
    assert len(set(CLASS_IDS)) == 10
    assert all(re.fullmatch(r"[a-z_]+", c) for c in CLASS_IDS)


def test_prior():
    for seed in (0, 1, 7):
        ranking = class_ranking(seed)
        assert sorted(ranking.tolist()) == list(range(10))
        prior = class_prior(1.0, seed)
        assert prior.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(
            prior[ranking], (1 / np.arange(1, 11)) / (1 / np.arange(1, 11)).sum()
        )
    assert class_ranking(0).tolist() != class_ranking(1).tolist()
    np.testing.assert_allclose(class_prior(0.0, 3), 0.1)


# ------------------------------------------------------------------------------ the real files


@pytest.fixture(scope="module")
def real():
    if not HAVE_DATA:
        pytest.skip(f"Fashion-MNIST not in {DEFAULT_ROOT}")
    return {
        split: (
            load_split(DEFAULT_ROOT, split)[0],
            real_labels(os.path.join(DEFAULT_ROOT, f"{prefix}-labels-idx1-ubyte.gz")),
        )
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }


@needs_data
def test_real_shapes(real):
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = real[split]
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,)
        np.testing.assert_array_equal(load_split(DEFAULT_ROOT, split)[1], labels)
        assert np.bincount(labels).tolist() == [n // 10] * 10


@needs_data
def test_catalog_rows():
    catalog = mosaic_catalog(count=200, seed=3)
    assert isinstance(catalog, Catalog)
    assert catalog.table.schema.equals(CATALOG_SCHEMA)
    assert catalog.class_ids == CLASS_IDS and catalog.class_names == CLASS_NAMES
    assert catalog.annotation == "full"
    assert catalog.images_read == 200 and catalog.image_skips.total == 0
    assert catalog.label_row_skips.total == 0
    table = catalog.table.to_pydict()
    assert table["id"] == [f"fmnist-train-{i:07d}" for i in range(200)]
    assert table["negatives"] == [[]] * 200 and table["rotation"] == [0] * 200
    assert all(re.fullmatch(r"-?\d+(,-?\d+){3}", loc) for loc in table["locator"])
    assert mosaic_catalog(split="test", count=3).table.column("id").to_pylist() == [
        "fmnist-test-0000000",
        "fmnist-test-0000001",
        "fmnist-test-0000002",
    ]
    assert mosaic_catalog(split="test").table.num_rows == 10000  # count defaults to the split's


@needs_data
def test_catalog_is_deterministic():
    args = {"count": 200, "grid": 3, "min_items": 2, "max_items": 6, "prior_alpha": 1.5}
    a = mosaic_catalog(seed=5, **args).table
    assert a.equals(mosaic_catalog(seed=5, **args).table)
    assert not a.column("locator").equals(mosaic_catalog(seed=6, **args).table.column("locator"))
    test = mosaic_catalog(split="test", seed=5, **args).table
    assert test.column("locator").to_pylist() != a.column("locator").to_pylist()


@needs_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_positives_are_the_classes_of_the_sources(real, split):
    _, labels = real[split]
    catalog = mosaic_catalog(split=split, count=200, grid=3, min_items=0, max_items=7, seed=1)
    rows = recipes(catalog)
    assert rows.shape == (200, 9)
    assert rows.min() >= -1 and rows.max() < len(labels)
    if split == "test":
        assert rows.max() < 10000
    for recipe, pos in zip(rows, positives(catalog), strict=True):
        assert pos == sorted(set(labels[recipe[recipe >= 0]].tolist()))


@needs_data
def test_loader_composes_the_sources(real):
    images, _ = real["test"]
    grid = 3
    catalog = mosaic_catalog(split="test", count=30, grid=grid, seed=2)
    loader = catalog.loader
    assert loader._images is None  # not loaded before first use
    for locator, recipe in zip(
        catalog.table.column("locator").to_pylist(), recipes(catalog), strict=True
    ):
        pgm = loader.load(locator)
        assert pgm.startswith(b"P5")  # binary PGM
        image = Image.open(io.BytesIO(pgm))
        assert image.mode == "L" and image.size == (28 * grid, 28 * grid)
        mosaic = np.asarray(image)
        for cell, index in enumerate(recipe):
            r, c = divmod(cell, grid)
            tile = mosaic[28 * r : 28 * (r + 1), 28 * c : 28 * (c + 1)]
            if index >= 0:
                np.testing.assert_array_equal(tile, images[index])
            else:
                assert not tile.any()


@needs_data
def test_loader_pickles(real):
    images, _ = real["train"]
    loader = mosaic_catalog(count=5, seed=0).loader
    locator = "0,-1,59999,7"
    before = loader.load(locator)
    assert loader._images is not None
    copy = pickle.loads(pickle.dumps(loader))
    assert copy._images is None  # the images don't travel with it
    assert len(pickle.dumps(loader)) < 1000
    assert copy == loader and copy.load(locator) == before
    mosaic = np.asarray(Image.open(io.BytesIO(copy.load(locator))))
    np.testing.assert_array_equal(mosaic[28:, 28:], images[7])
    np.testing.assert_array_equal(mosaic[:28, 28:], 0)


@needs_data
@pytest.mark.parametrize(
    "locator",
    [
        "",
        "1,2,3",
        "1,2,3,4,5",
        "1,2,x,4",
        "1,2,3,60000",
        "1,2,3,-2",
        "1,2,3," + "9" * 30,
        "1.5,2,3,4",
        "1,,2,3",
        "1, 2,3,4",
        "1_0,2,3,4",
        "+1,2,3,4",
    ],
)
def test_loader_corrupt_recipe(locator):
    loader = MosaicLoader(DEFAULT_ROOT, "train", 2)
    with pytest.raises(Skip) as info:
        loader.load(locator)
    assert info.value.reason == "corrupt recipe"


@needs_data
def test_test_split_uses_only_t10k():
    rows = recipes(mosaic_catalog(split="test", count=2000, grid=4, seed=9))
    assert rows.max() < 10000 and (rows >= 0).any()
    with pytest.raises(Skip, match="corrupt recipe"):
        MosaicLoader(DEFAULT_ROOT, "test", 1).load("10000")


@needs_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_class_frequency_follows_the_prior(real, split):
    _, labels = real[split]
    seed = 11
    rows = recipes(mosaic_catalog(split=split, count=5000, seed=seed))
    items = labels[rows[rows >= 0]]
    frequency = np.bincount(items, minlength=10)
    ranking = class_ranking(seed)
    assert frequency[ranking[0]] > 5 * frequency[ranking[-1]]
    # The observed order follows the seeded ranking, up to swaps of neighbours of close prior.
    observed_rank = np.argsort(np.argsort(-frequency))[ranking]
    assert np.abs(observed_rank - np.arange(10)).max() <= 1
    assert observed_rank[0] == 0
    expected = class_prior(1.0, seed) * len(items)
    assert np.all(np.abs(frequency - expected) < 5 * np.sqrt(expected) + 1)


@needs_data
def test_item_counts_respect_min_and_max():
    for grid, lo, hi in ((2, 1, 4), (3, 2, 5), (4, 16, 16), (3, 0, 0)):
        rows = recipes(mosaic_catalog(count=500, grid=grid, min_items=lo, max_items=hi, seed=1))
        k = (rows >= 0).sum(axis=1)
        assert k.min() >= lo and k.max() <= hi
        if hi - lo <= 4:
            assert set(k.tolist()) == set(range(lo, hi + 1))
    rows = recipes(mosaic_catalog(count=300, grid=3, seed=1))  # max_items defaults to grid**2
    k = (rows >= 0).sum(axis=1)
    assert k.min() == 1 and k.max() == 9


@needs_data
def test_positives_column_type():
    table = mosaic_catalog(count=10).table
    assert table.schema.field("positives").type == pa.list_(pa.int32())
    assert all(p for p in table.column("positives").to_pylist())  # min_items=1: never empty
