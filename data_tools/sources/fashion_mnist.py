"""The built-in default dataset: multi-label mosaics of real Fashion-MNIST images.

Each mosaic is a ``grid`` x ``grid`` canvas of 28x28 cells (grayscale, black background) holding
``k`` Fashion-MNIST items in ``k`` distinct cells. Item classes follow a long-tailed prior, so the
mosaics exercise what multi-label training at scale has to cope with (rare classes, several labels
per image) while staying small, fast and made of real photographs of clothes.

The IDX files come from Debian's package ``dataset-fashion-mnist`` (``DEFAULT_ROOT``). Split
"train" draws its items only from the train files and "test" only from t10k, so no source image
is in both splits. A catalog row's locator is the mosaic's recipe: the ``grid * grid`` source
indices, row-major, comma-separated, -1 for an empty cell; ``MosaicLoader`` composes it.
"""

from __future__ import annotations

import gzip
import io
import os
import re

import numpy as np
import pyarrow as pa
from PIL import Image

from data_tools.catalog import Catalog, Skip, catalog_table

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CLASS_IDS = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
NUM_CLASSES = len(CLASS_NAMES)
CELL = 28  # side of a Fashion-MNIST image, in pixels

SPLITS = ("train", "test")
_FILE_PREFIX = {"train": "train", "test": "t10k"}

# IDX element types: the third byte of the magic number.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Random streams derived from the seed: the class ranking (shared by both splits) and one stream
# per split, so train and test mosaics are independent draws.
_STREAM_PRIOR = 0
_STREAM_SPLIT = {"train": 1, "test": 2}

_INDEX = re.compile(r"-?[0-9]{1,9}")  # one cell of a recipe


# --------------------------------------------------------------------------------------- IDX files


def _open(path: str):
    """A binary file object for ``path``, decompressing it when it is gzip (by content)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_header(f, path: str) -> tuple[np.dtype, tuple[int, ...]]:
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {magic.hex() or 'missing'})")
    ndim = magic[3]
    if ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic number {magic.hex()}: 0 dimensions)")
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions expected)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4"))
    return _IDX_DTYPES[magic[2]], shape


def read_idx_header(path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...]]:
    """The element type and shape of the IDX file at ``path``, reading only its header."""
    path = os.fspath(path)
    try:
        with _open(path) as f:
            return _read_header(f, path)
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: unreadable IDX file ({e})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in the IDX file at ``path`` (gzip-compressed or not), in native order.

    Raises ValueError naming the file when the magic number, the header or the data size is wrong.
    """
    path = os.fspath(path)
    try:
        with _open(path) as f:
            dtype, shape = _read_header(f, path)
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            data = f.read(expected + 1)
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: unreadable IDX file ({e})") from None
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"{path}: IDX data {what} (header: shape {shape} of {dtype.str}, {expected} bytes)"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


# ------------------------------------------------------------------------------ Fashion-MNIST files


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _find(root: str, split: str, kind: str) -> str:
    """The path of a split's images or labels file, gzip-compressed or not."""
    name = f"{_FILE_PREFIX[split]}-{kind}-ubyte"
    for candidate in (name + ".gz", name):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {root}: install the data with "
        f"`apt-get install dataset-fashion-mnist` (it goes to {DEFAULT_ROOT}), "
        "or pass `--root DIR` with a folder that holds the four IDX files"
    )


def split_files(root: str | os.PathLike, split: str) -> tuple[str, str]:
    """The (images, labels) IDX paths of ``split`` under ``root``; FileNotFoundError if absent."""
    _check_split(split)
    root = os.fspath(root)
    return _find(root, split, "images-idx3"), _find(root, split, "labels-idx1")


def _check_images_shape(path: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 3 or shape[1:] != (CELL, CELL):
        raise ValueError(f"{path}: expected images of shape (N, {CELL}, {CELL}), got {shape}")


def read_labels(root: str | os.PathLike, split: str) -> np.ndarray:
    """The class of every image of ``split`` (uint8, values in 0..9), checked against the images
    file's header (same count, 28x28 images) without reading the images."""
    images_path, labels_path = split_files(root, split)
    labels = read_idx(labels_path)
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{labels_path}: expected a 1-d uint8 label array, got shape {labels.shape} "
            f"of {labels.dtype}"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise ValueError(
            f"{labels_path}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}"
        )
    dtype, shape = read_idx_header(images_path)
    _check_images_shape(images_path, shape)
    if dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 pixels, got {dtype}")
    if shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {shape[0]} images but {labels_path} {labels.shape[0]} labels"
        )
    return labels


def read_images(root: str | os.PathLike, split: str) -> np.ndarray:
    """The (N, 28, 28) uint8 images of ``split``."""
    images_path, _ = split_files(root, split)
    images = read_idx(images_path)
    _check_images_shape(images_path, images.shape)
    if images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 pixels, got {images.dtype}")
    return images


def load_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of ``split``: "train" or "test" (t10k)."""
    labels = read_labels(root, split)
    return read_images(root, split), labels


# ------------------------------------------------------------------------------------------ prior


def class_ranking(seed: int = 0) -> np.ndarray:
    """The classes from most to least frequent: a permutation of 0..9 fixed by ``seed`` alone."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_PRIOR,)))
    return rng.permutation(NUM_CLASSES)


def class_prior(prior_alpha: float = 1.0, seed: int = 0) -> np.ndarray:
    """Each class's probability (indexed by class): the class of rank r in ``class_ranking(seed)``
    has probability proportional to (r + 1) ** -prior_alpha."""
    weights = np.arange(1, NUM_CLASSES + 1, dtype=np.float64) ** -float(prior_alpha)
    prior = np.empty(NUM_CLASSES)
    prior[class_ranking(seed)] = weights / weights.sum()
    return prior


# ---------------------------------------------------------------------------------------- catalog


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def mosaic_recipes(
    labels: np.ndarray,
    count: int,
    grid: int,
    min_items: int,
    max_items: int,
    prior: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """(count, grid * grid) source indices (int64, -1 for an empty cell), drawn with ``rng``.

    Each mosaic gets k ~ uniform[min_items, max_items] items in k distinct cells; each item's
    class is drawn from ``prior`` and its image uniformly among ``labels``' images of that class.
    """
    cells = grid * grid
    per_class = np.bincount(labels, minlength=NUM_CLASSES)
    missing = [CLASS_IDS[c] for c in range(NUM_CLASSES) if per_class[c] == 0 and prior[c] > 0]
    if missing and count and max_items:
        raise ValueError(f"no source image of class(es) {', '.join(missing)} to draw from")
    by_class = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(per_class)[:-1]])

    items = rng.integers(min_items, max_items + 1, size=count)
    # A random order of the cells per mosaic; the first k of it hold the items.
    order = np.argsort(rng.random((count, cells)), axis=1)
    used = np.zeros((count, cells), dtype=bool)
    np.put_along_axis(used, order, np.arange(cells)[None, :] < items[:, None], axis=1)
    rows, cols = np.nonzero(used)
    classes = rng.choice(NUM_CLASSES, size=len(rows), p=prior)
    within = rng.integers(0, per_class[classes]) if len(rows) else np.zeros(0, np.int64)
    recipes = np.full((count, cells), -1, dtype=np.int64)
    recipes[rows, cols] = by_class[starts[classes] + within]
    return recipes


def _positives(labels: np.ndarray, recipes: np.ndarray) -> pa.Array:
    """The sorted distinct classes of each recipe's items, as a list<int32> array."""
    count = recipes.shape[0]
    present = np.zeros((count, NUM_CLASSES), dtype=bool)
    rows, cols = np.nonzero(recipes >= 0)
    present[rows, labels[recipes[rows, cols]]] = True
    offsets = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    values = np.nonzero(present)[1].astype(np.int32)  # row-major: sorted within each row
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def mosaic_catalog(
    root: str | os.PathLike = DEFAULT_ROOT,
    split: str = "train",
    count: int | None = None,
    grid: int = 2,
    min_items: int = 1,
    max_items: int | None = None,
    prior_alpha: float = 1.0,
    seed: int = 0,
) -> Catalog:
    """A Catalog of ``count`` Fashion-MNIST mosaics of ``split`` ("train" or "test").

    ``count`` defaults to the number of source images of the split (60,000 or 10,000).
    ``max_items`` defaults to ``grid * grid``. The class ranking of the long-tailed prior
    depends on ``seed`` only, so both splits share it; the mosaics themselves are drawn from a
    stream of their own per split. The same arguments give the same catalog. Only the label file
    is read here; ``MosaicLoader`` reads the images in the worker.
    """
    _check_split(split)
    grid = _check_int("grid", grid, 1)
    cells = grid * grid
    min_items = _check_int("min_items", min_items, 0)
    max_items = cells if max_items is None else _check_int("max_items", max_items, 0)
    if not min_items <= max_items <= cells:
        raise ValueError(
            f"need 0 <= min_items <= max_items <= grid * grid = {cells}, "
            f"got min_items={min_items}, max_items={max_items}"
        )
    prior_alpha = float(prior_alpha)
    if not np.isfinite(prior_alpha) or prior_alpha < 0:
        raise ValueError(f"prior_alpha must be a finite number >= 0, got {prior_alpha}")
    seed = _check_int("seed", seed, 0)

    root = os.fspath(root)
    labels = read_labels(root, split)
    count = len(labels) if count is None else _check_int("count", count, 0)

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_SPLIT[split],)))
    recipes = mosaic_recipes(
        labels, count, grid, min_items, max_items, class_prior(prior_alpha, seed), rng
    )

    ids = [f"fmnist-{split}-{i:07d}" for i in range(count)]
    locators = [",".join(map(str, row)) for row in recipes.tolist()]
    table = catalog_table(
        ids,
        locators,
        _positives(labels, recipes),
        pa.ListArray.from_arrays(
            pa.array(np.zeros(count + 1, dtype=np.int32)), pa.array([], pa.int32())
        ),
        np.zeros(count, dtype=np.int16),
    )
    return Catalog(
        class_ids=list(CLASS_IDS),
        class_names=list(CLASS_NAMES),
        table=table,
        loader=MosaicLoader(root, split, grid),
        annotation="full",
        images_read=count,
        source=(
            f"Fashion-MNIST {split} mosaics from {root}: {count} of {grid}x{grid} cells, "
            f"{min_items}-{max_items} items, prior alpha {prior_alpha:g}, seed {seed}"
        ),
    )


# ----------------------------------------------------------------------------------------- loader


class MosaicLoader:
    """Composes a mosaic from its recipe and returns it as binary PGM bytes (mode "L").

    PGM, not PNG: uncompressed (3.1 KB against ~2 KB for 56x56), but it costs nothing to
    decode, where PNG's inflate and unfiltering would be a large part of the loader's work on
    an image this small.

    Picklable; the split's images are read on first use in each process and kept on the instance.
    """

    def __init__(self, root: str | os.PathLike, split: str, grid: int):
        _check_split(split)
        self.root = os.fspath(root)
        self.split = split
        self.grid = _check_int("grid", grid, 1)
        self._images: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {"root": self.root, "split": self.split, "grid": self.grid}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._images = None

    def __repr__(self) -> str:
        return f"MosaicLoader(root={self.root!r}, split={self.split!r}, grid={self.grid}, pgm)"

    def __eq__(self, other) -> bool:
        if not isinstance(other, MosaicLoader):
            return NotImplemented
        return (self.root, self.split, self.grid) == (other.root, other.split, other.grid)

    def __hash__(self) -> int:
        return hash((self.root, self.split, self.grid))

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = read_images(self.root, self.split)
        return self._images

    def parse(self, locator: str) -> np.ndarray:
        """The recipe's source indices (int64, -1 for empty); Skip("corrupt recipe") if bad."""
        parts = locator.split(",")
        cells = self.grid * self.grid
        if len(parts) != cells:
            raise Skip("corrupt recipe", f"{locator!r}: {len(parts)} cells, expected {cells}")
        if not all(_INDEX.fullmatch(p) for p in parts):
            raise Skip("corrupt recipe", f"{locator!r}: not a list of integers")
        indices = np.array([int(p) for p in parts], dtype=np.int64)
        n = len(self.images)
        if ((indices < -1) | (indices >= n)).any():
            raise Skip("corrupt recipe", f"{locator!r}: index out of range -1..{n - 1}")
        return indices

    def compose(self, locator: str) -> np.ndarray:
        """The mosaic as a (28 * grid, 28 * grid) uint8 array."""
        indices = self.parse(locator)
        used = indices >= 0
        tiles = np.zeros((len(indices), CELL, CELL), dtype=np.uint8)
        tiles[used] = self.images[indices[used]]
        g = self.grid
        return tiles.reshape(g, g, CELL, CELL).transpose(0, 2, 1, 3).reshape(g * CELL, g * CELL)

    def load(self, locator: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(self.compose(locator)).save(buffer, format="PPM")
        return buffer.getvalue()
