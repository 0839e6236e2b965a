"""Shared fixtures for the `mlc shard` tests: a small OpenImages-style dataset written in a
temporary folder, with real class ids and names (quoting included), positives, verified negatives,
unknown pairs, JPEG/PNG/WebP images and deliberately broken items.

The dataset (``IMAGES`` and ``ROWS`` below) is the single description of the inputs; what a reader
should make of it is written out by hand in the tests (test_openimages.py), not derived from it.

Images are numbered k = 1..31; image k has ImageID ``f"{k:016x}"`` (16 hex digits, like
OpenImages' ids). Classes of the small class list (index: id, name):

    0 /m/01c_0l   Ducks, geese and swans     4 /m/01yrx    Cat
    1 /m/02wvth   Fiat 500 "topolino"        5 /m/0bt9lr   Dog
    2 /m/03hgsf0  Lemon, lime and bitters    6 /m/0k4j     Car
    3 /m/01g317   Person                     7 /m/0c9ph5   Flower

Broken on purpose (each marked ``bad`` so that the clean variant leaves it out):
- image 25: labelled, but its file is missing                     -> "missing file"
- image 26: the first half of a JPEG                              -> "corrupt image"
- image 27: text in a file named .jpg                             -> "corrupt image"
- image 28: only labels of /m/07j7r (Tree: a real id, not in this class list)
                                                                  -> "no known labels"
- a row of image 10 with an unknown class id (/m/0notaclass)      -> "unknown class id"
- a row of image 11 with Confidence 0.5                           -> "bad Confidence (not 0 or 1)"
- image 12: Car listed positive and negative                      -> "positive and negative (kept
                                                                     positive)"
- image 13: two rows repeated                                     -> "duplicate (image, class) row"
- two malformed lines (3 and 5 fields)                            -> "malformed line"
- a row without an ImageID                                        -> "no ImageID"
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The real OpenImages V6 ids and names (oidv6-class-descriptions.csv lines, quoting as there).
CLASS_LINES = [
    '/m/01c_0l,"Ducks, geese and swans"',
    '/m/02wvth,"Fiat 500 ""topolino"""',
    '/m/03hgsf0,"Lemon, lime and bitters"',
    "/m/01g317,Person",
    "/m/01yrx,Cat",
    "/m/0bt9lr,Dog",
    "/m/0k4j,Car",
    "/m/0c9ph5,Flower",
]
DUCK, FIAT, LEMON, PERSON, CAT, DOG, CAR, FLOWER = (
    "/m/01c_0l",
    "/m/02wvth",
    "/m/03hgsf0",
    "/m/01g317",
    "/m/01yrx",
    "/m/0bt9lr",
    "/m/0k4j",
    "/m/0c9ph5",
)
CLASS_IDS = [DUCK, FIAT, LEMON, PERSON, CAT, DOG, CAR, FLOWER]
CLASS_NAMES = [
    "Ducks, geese and swans",
    'Fiat 500 "topolino"',
    "Lemon, lime and bitters",
    "Person",
    "Cat",
    "Dog",
    "Car",
    "Flower",
]
TREE = "/m/07j7r"  # a real OpenImages class, not in the small class list
NOT_A_CLASS = "/m/0notaclass"

# The trainable classes, in an order other than the class list's: the vocabulary follows it.
# Cat and Flower are left out.
TRAINABLE = [CAR, DUCK, FIAT, LEMON, PERSON, DOG]


def image_id(k: int) -> str:
    return f"{k:016x}"


# Image k -> (format, width, height); "missing", "truncated", "text" are the broken files.
IMAGES: dict[int, tuple[str, int, int]] = {k: ("JPEG", 40, 30) for k in range(1, 32)}
IMAGES[5] = ("JPEG", 30, 40)
IMAGES[6] = ("PNG", 40, 30)
IMAGES[7] = ("WEBP", 40, 30)
IMAGES[8] = ("JPEG-L", 40, 30)  # a grayscale JPEG
IMAGES[25] = ("missing", 40, 30)
IMAGES[26] = ("truncated", 40, 30)
IMAGES[27] = ("text", 40, 30)
BAD_IMAGES = {25, 26, 27, 28}

# Label rows in file order: (image k, class id, Confidence, bad). Strings are raw CSV lines.
P, N = "1", "0"
ROWS: list[tuple[int, str, str, bool] | tuple[str, bool]] = [
    (1, DUCK, P, False),
    (1, PERSON, N, False),
    (2, FIAT, P, False),
    (2, CAR, P, False),
    (2, DOG, N, False),
    (3, LEMON, P, False),
    (4, PERSON, P, False),
    (4, CAT, P, False),
    (4, DOG, N, False),
    (4, CAR, N, False),
    (5, DOG, P, False),
    ("0000000000000005,verification,/m/0bt9lr", True),  # malformed: 3 fields
    (6, CAT, P, False),
    (6, FLOWER, N, False),
    (7, FLOWER, P, False),
    (7, DUCK, N, False),
    (8, CAR, P, False),
    (8, PERSON, P, False),
    (8, FIAT, N, False),
    (9, DUCK, N, False),  # only a verified negative: still a known label
    (10, PERSON, P, False),
    (10, NOT_A_CLASS, P, True),
    (11, DOG, P, False),
    (11, CAT, "0.5", True),
    (12, CAR, P, False),
    (12, CAR, N, True),  # conflict: kept positive
    (13, LEMON, P, False),
    (13, DUCK, N, False),
    (13, LEMON, P, True),  # duplicate
    (13, DUCK, N, True),  # duplicate
    (14, FLOWER, P, False),
    (14, CAT, N, False),
    (15, PERSON, P, False),
    (15, DOG, P, False),
    (15, CAT, P, False),
    (15, CAR, P, False),
    (15, FLOWER, P, False),
    (15, DUCK, N, False),
    (15, FIAT, N, False),
    (15, LEMON, N, False),
    (16, PERSON, P, False),
    (16, DOG, P, False),
    (16, CAT, N, False),
    (16, CAR, N, False),
    (16, FLOWER, N, False),
    (16, DUCK, N, False),
    (",verification,/m/01g317,1", True),  # no ImageID
    (17, CAT, P, False),
    (17, DOG, N, False),
    (17, PERSON, N, False),
    (17, CAR, N, False),
    (17, FIAT, N, False),
    (18, CAR, P, False),
    (19, FIAT, P, False),
    (19, CAR, N, False),
    (20, PERSON, P, False),
    (20, LEMON, N, False),
    (21, DOG, P, False),
    (21, CAT, P, False),
    (22, DUCK, P, False),
    (22, FLOWER, P, False),
    (23, CAR, N, False),
    (23, PERSON, P, False),
    (24, LEMON, P, False),
    (24, DUCK, P, False),
    (24, FIAT, P, False),
    (25, DOG, P, True),
    (25, CAT, N, True),
    (26, PERSON, P, True),
    (27, CAR, P, True),
    (28, TREE, P, True),
    ("000000000000001c,verification,/m/07j7r,1,extra", True),  # malformed: 5 fields
    (29, DOG, P, False),
    (30, PERSON, P, False),
    (31, CAT, P, False),
]

# The rotation CSV: OpenImages' columns (a few of them), with an empty value, float degrees and
# an image that has no labels.
ROTATION_CSV = (
    "ImageID,Subset,OriginalURL,Title,Rotation\n"
    f'{image_id(1)},train,https://example.org/1.jpg,"A title, with a comma",\n'
    f"{image_id(2)},train,https://example.org/2.jpg,t,0.0\n"
    f"{image_id(29)},train,https://example.org/29.jpg,t,90.0\n"
    f"{image_id(30)},train,https://example.org/30.jpg,t,180\n"
    f"{image_id(31)},train,https://example.org/31.jpg,t,270.0\n"
    f"{image_id(99)},train,https://example.org/99.jpg,t,90.0\n"
)
ROTATIONS = {29: 90, 30: 180, 31: 270}


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    channels = len(mode)
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array, mode)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


def image_bytes(k: int) -> bytes | None:
    kind, width, height = IMAGES[k]
    if kind == "missing":
        return None
    if kind == "text":
        return b"this is not an image, whatever its name says\n" * 20
    if kind == "PNG":
        return encode(noise_image(width, height, "RGBA", seed=k), "PNG")
    if kind == "WEBP":
        return encode(noise_image(width, height, seed=k), "WEBP", quality=80)
    if kind == "JPEG-L":
        return encode(noise_image(width, height, "L", seed=k), "JPEG", quality=90)
    data = encode(noise_image(width, height, seed=k), "JPEG", quality=90)
    return data[: len(data) // 2] if kind == "truncated" else data


@dataclass
class OpenImagesData:
    root: Path
    classes: Path
    labels: Path
    images: Path
    trainable: Path
    rotation: Path
    clean: bool
    written_ids: list[str] = field(default_factory=list)  # images expected in the shards

    def args(self, out, *extra, rotation: bool = True) -> list[str]:
        """`mlc shard openimages ...` arguments (without "shard")."""
        args = ["openimages", "--classes", str(self.classes), "--labels", str(self.labels)]
        args += ["--images", str(self.images), "--out", str(out), "--quiet"]
        if rotation:
            args += ["--rotation", str(self.rotation)]
        return args + [str(x) for x in extra]


def make_openimages(root: Path, clean: bool = False) -> OpenImagesData:
    """Write the dataset under ``root``; ``clean`` leaves out every broken item."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    images.mkdir()
    classes = root / "class-descriptions.csv"
    classes.write_text("\n".join(CLASS_LINES) + "\n")
    lines = ["ImageID,Source,LabelName,Confidence"]
    for row in ROWS:
        if clean and row[-1]:
            continue
        if len(row) == 2:
            lines.append(row[0])
        else:
            k, cid, conf, _ = row
            source = "verification" if k % 2 else "crowdsource-verification"
            lines.append(f"{image_id(k)},{source},{cid},{conf}")
    labels = root / "image-labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    written = []
    for k in IMAGES:
        if clean and k in BAD_IMAGES:
            continue
        data = image_bytes(k)
        if data is not None:
            (images / f"{image_id(k)}.jpg").write_bytes(data)
        if k not in BAD_IMAGES:
            written.append(image_id(k))
    trainable = root / "trainable.txt"
    trainable.write_text("\n".join(TRAINABLE) + "\n")
    rotation = root / "rotation.csv"
    rotation.write_text(ROTATION_CSV)
    return OpenImagesData(root, classes, labels, images, trainable, rotation, clean, written)


@pytest.fixture(scope="session")
def oi(tmp_path_factory) -> OpenImagesData:
    """The dataset with its broken items (read-only: tests write their outputs elsewhere)."""
    return make_openimages(tmp_path_factory.mktemp("openimages"))


@pytest.fixture(scope="session")
def oi_clean(tmp_path_factory) -> OpenImagesData:
    """The same without any broken item: nothing is skipped."""
    return make_openimages(tmp_path_factory.mktemp("openimages-clean"), clean=True)
