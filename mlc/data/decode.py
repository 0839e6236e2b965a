"""Decode one stored image straight to the model's input size, with or without augmentation.

The crop is chosen first, in the stored image's coordinates (its size is in the sample's json and in
the file header), and JPEG is then decoded at the smallest DCT scale that still leaves the crop at
least ``size`` pixels wide: a 1024x768 source for a 299 crop decodes at 1/2 scale, so the decoder
reconstructs a quarter of the pixels. Output: a grayscale image as a PIL image (the loader pastes it
into its batch), a color one as uint8 HxWx3 pixels (resized by torch), or either as uint8 HxWxC
numpy arrays (decode_eval, decode_train); the batch is normalised to [-1, 1] later, on the whole
tensor (mlc.data.pipeline.normalize).
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import re
import struct
import warnings
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from mlc.io import to_8bit

# Inception-style random resized crop: area fraction and aspect-ratio ranges.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


class KeyedRandom:
    """random() and uniform(low, high) as a pure function of a text key (the loader's is seed,
    epoch and sample key): counter-mode BLAKE2b, eight 53-bit uniforms per 64-byte digest.
    Cheaper to set up per sample than seeding a random.Random, which fills a 624-word
    Mersenne Twister state: a cost that shows beside the loading of a small training image."""

    __slots__ = ("_key", "_block", "_words")

    def __init__(self, key: str):
        self._key, self._block, self._words = key.encode(), 0, []

    def random(self) -> float:
        if not self._words:
            salt = self._block.to_bytes(16, "little")  # the counter
            digest = hashlib.blake2b(self._key, digest_size=64, salt=salt).digest()
            self._words = list(struct.unpack("<8Q", digest))
            self._block += 1
        return (self._words.pop() >> 11) * 2.0**-53

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()


# Anything with uniform(low, high) and random(): the loader passes KeyedRandom, tests numpy's.
Random = KeyedRandom | random.Random | np.random.Generator


class DecodeError(ValueError):
    """The image bytes cannot be decoded."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {0: "L", 2: "RGB"}  # color type -> mode, for the PNGs _plain_png reads itself


def _plain_png(data: bytes) -> Image.Image | None:
    """An 8-bit, non-interlaced grayscale or RGB PNG without transparency, read without PIL's
    plugin machinery (which costs more than decoding a 56x56 image): the chunks are walked
    and CRC-checked here, and PIL's own PNG ("zip") decoder unfilters the pixels. None for
    any other PNG (PIL's full reader takes it)."""
    pos, idat, header = 8, [], None
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) < length or zlib.crc32(data[pos + 4 : pos + 8 + length]) != int.from_bytes(
            data[pos + 8 + length : pos + 12 + length], "big"
        ):
            raise DecodeError(f"damaged PNG chunk {kind!r} at byte {pos}")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind in (b"tRNS", b"PLTE", b"iCCP", b"gAMA", b"sBIT") or not kind[:1].islower():
            return None  # transparency, palettes, color profiles, unknown critical chunks
        pos += 12 + length
    if header is None or kind != b"IEND":
        return None
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or interlace or color not in PNG_MODES:
        return None
    mode = PNG_MODES[color]
    try:
        return Image.frombytes(mode, (width, height), b"".join(idat), "zip", mode)
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"{type(e).__name__}: {e}") from None


PNM_MODES = {b"P5": "L", b"P6": "RGB"}
PNM_HEADER = re.compile(rb"(P[56])\s+(\d+)\s+(\d+)\s+255\s")  # magic, width, height, maxval


def _pnm_header(data: bytes) -> tuple[str, int, int, int] | None:
    """(mode, width, height, pixel offset) of a binary PGM/PPM with 8-bit samples and no
    comments; None for any other (PIL's reader takes it)."""
    header = PNM_HEADER.match(data)
    if header is None:
        return None
    mode = PNM_MODES[header[1]]
    width, height = int(header[2]), int(header[3])
    if len(data) - header.end() != width * height * len(mode):
        raise DecodeError(
            f"{len(data) - header.end()} pixel bytes for a {width}x{height} {mode} PNM"
        )
    return mode, width, height, header.end()


def _plain_pnm(data: bytes) -> Image.Image | None:
    """A plain PNM (_pnm_header) as a view of the bytes: nothing to decode."""
    header = _pnm_header(data)
    if header is None:
        return None
    mode, width, height, offset = header
    return Image.frombuffer(mode, (width, height), data[offset:], "raw", mode, 0, 1)


def _stored_pnm_pixels(data: bytes, size: int, channels: int) -> np.ndarray | None:
    """The pixels of a plain size x size PNM whose mode the model takes as they are (gray for
    any model, RGB for an RGB one), as a read-only HxW or HxWx3 view of the bytes: an eval crop
    of the whole image at the stored size needs no PIL image at all (for a small image, opening
    one is a large part of its loading). None otherwise."""
    header = _pnm_header(data) if data[:2] in PNM_MODES else None
    if header is None or header[1:3] != (size, size) or (header[0] == "RGB" and channels == 1):
        return None
    shape = (size, size) if header[0] == "L" else (size, size, 3)
    return np.frombuffer(data, np.uint8, offset=header[3]).reshape(shape)


def _open(data: bytes) -> Image.Image:
    if data[:8] == PNG_SIGNATURE:
        im = _plain_png(data)
        if im is not None:
            return im
    elif data[:2] in PNM_MODES:
        im = _plain_pnm(data)
        if im is not None:
            return im
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names the BytesIO object, not the image
        raise DecodeError("not an image format PIL can read") from None
    except Exception as e:  # noqa: BLE001 (PIL raises many types)
        raise DecodeError(f"{type(e).__name__}: {e}") from None


def random_crop_box(
    width: int, height: int, rng: Random, scale: tuple[float, float] = CROP_SCALE
) -> tuple[float, ...]:
    """(left, top, right, bottom) of an Inception-style random crop: 10 tries at a random area
    fraction and log-uniform aspect ratio, else the largest central crop within the ratios."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, width / CROP_RATIO[0]
    elif ratio > CROP_RATIO[1]:
        w, h = height * CROP_RATIO[1], height
    else:
        w, h = width, height
    return (width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2


def center_crop_box(width: int, height: int, fraction: float) -> tuple[float, ...]:
    """The central square of side fraction * shorter side."""
    side = min(width, height) * fraction
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


def _resize_box(
    im: Image.Image, box, size: int, channels: int, flip: bool = False
) -> tuple[Image.Image | np.ndarray, bool]:
    """The box of ``im`` resized to size x size, and whether it is still to be mirrored.

    Grayscale stays a PIL image of mode "L" (also for an RGB model: repeating the one channel
    is left to the batch, a third of the resize's work; so is the mirroring). RGB comes back as
    HxWx3 pixels, resized (and mirrored if ``flip``) by torch: see _resize_rgb.
    """
    width, height = im.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    mode = "L" if channels == 1 else "RGB"
    try:
        if im.format == "JPEG":
            # Request the scale at which the crop is still >= size in both directions.
            im.draft(
                mode if im.mode in ("L", "RGB") else "RGB",
                (math.ceil(width * size / crop_w), math.ceil(height * size / crop_h)),
            )
        scale = im.size[0] / width
        im = to_8bit(im)
        if im.mode != mode and not (im.mode == "L" and mode == "RGB"):
            im = im.convert("RGBA").convert(mode) if "transparency" in im.info else im.convert(mode)
        box = tuple(v * scale for v in box)
        if box == (0, 0, size, size) and im.size == (size, size):
            im.load()  # nothing to resize (eval at the stored size); PIL's resize would copy
            return im, flip
        if im.mode == "RGB":
            return _resize_rgb(im, box, size, flip), False
        return im.resize((size, size), Image.Resampling.BILINEAR, box=box), flip
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"{type(e).__name__}: {e}") from None


def _resize_rgb(im: Image.Image, box, size: int, flip: bool) -> np.ndarray:
    """The box of an RGB image cut out at whole pixels (a shift of at most half a pixel: torch
    takes no sub-pixel box), then resized to size x size by torch's antialiased bilinear
    filter on uint8, as HxWx3 pixels. That filter is PIL's BILINEAR (outputs within 2 levels of
    PIL's resize of the same cut-out; PIL's resize with a box would also read pixels just
    outside it), chosen over PIL's resize because it is several times faster on uint8 RGB, where
    the resize is a large share of loading a full-size JPEG (docs/benchmarks.md)."""
    left, top, right, bottom = (round(v) for v in box)
    box = (left, top, max(right, left + 1), max(bottom, top + 1))
    if box != (0, 0, *im.size):
        im = im.crop(box)  # PIL copies the box alone: less than np.asarray of the whole image
    with warnings.catch_warnings():  # PIL's arrays are read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.asarray(im))
    # [1, 3, H, W] with the strides of a contiguous channels_last batch: torch's fast uint8
    # kernel checks the strides as they are (numpy's [None] view, batch stride 0, takes it off
    # the fast path), and its output is then channels_last too, so that the HxWx3 result below
    # is contiguous (a planar result would make the copy into the batch a strided one).
    x = pixels.unsqueeze(0).permute(0, 3, 1, 2)
    if x.shape[2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    if flip:
        x = x.flip(3)  # torch's flip; numpy's reversed copy of 3-byte pixels is far slower
    return x[0].permute(1, 2, 0).numpy()


def as_array(im: Image.Image | np.ndarray, channels: int, flip: bool = False) -> np.ndarray:
    """HxWxC uint8 pixels of a resized image (a grayscale one for an RGB model as a broadcast
    view), mirrored left-right if ``flip``."""
    if flip and isinstance(im, Image.Image):
        # PIL's mirror: copying numpy's reversed view instead (3-byte pixels, stride -3) is
        # many times slower.
        im, flip = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), False
    pixels = np.asarray(im, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
        if channels == 3:
            pixels = np.broadcast_to(pixels, pixels.shape[:2] + (3,))
    return pixels[:, ::-1] if flip else pixels


def resize_train(
    data: bytes,
    size: int,
    rng: Random,
    channels: int = 3,
    scale: tuple[float, float] = CROP_SCALE,
) -> tuple[Image.Image | np.ndarray, bool]:
    """Random resized crop (area fraction in ``scale``) to size x size, and whether it is still
    to be flipped horizontally: color crops come back flipped already, grayscale ones are left
    to the caller (the loader flips gray rows per batch, see as_array)."""
    im = _open(data)
    box = random_crop_box(*im.size, rng, scale)
    return _resize_box(im, box, size, channels, flip=rng.random() < 0.5)


def resize_eval(
    data: bytes, size: int, crop_fraction: float = 0.875, channels: int = 3
) -> Image.Image | np.ndarray:
    """Central crop (fraction of the shorter side) resized to size x size: a PIL image (gray),
    HxWx3 pixels (color), or for the whole of a stored size x size PGM/PPM its pixels (HxW
    gray or HxWx3)."""
    if crop_fraction == 1.0:
        pixels = _stored_pnm_pixels(data, size, channels)
        if pixels is not None:
            return pixels
    im = _open(data)
    return _resize_box(im, center_crop_box(*im.size, crop_fraction), size, channels)[0]


def decode_train(
    data: bytes,
    size: int,
    rng: Random,
    channels: int = 3,
    scale: tuple[float, float] = CROP_SCALE,
) -> np.ndarray:
    """resize_train's crop as HxWxC pixels, flipped when it says so."""
    im, flip = resize_train(data, size, rng, channels, scale)
    return as_array(im, channels, flip)


def decode_eval(
    data: bytes, size: int, crop_fraction: float = 0.875, channels: int = 3
) -> np.ndarray:
    """resize_eval's crop as HxWxC pixels."""
    return as_array(resize_eval(data, size, crop_fraction, channels), channels)


def decode_eval_image(
    im: Image.Image, size: int, crop_fraction: float = 0.875, channels: int = 3
) -> np.ndarray:
    """decode_eval's crop of an image that is already decoded (a loaded PIL image: a JPEG is not
    decoded again at a reduced scale), as HxWxC pixels."""
    box = center_crop_box(*im.size, crop_fraction)
    return as_array(_resize_box(im, box, size, channels)[0], channels)
