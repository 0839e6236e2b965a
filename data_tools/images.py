"""Check, and where asked reduce, one image: the per-sample work of `mlc shard`.

Without ``max_side`` (and without a rotation to apply) a decodable JPEG, PNG or WebP passes
through byte for byte; any other decodable format is re-encoded as JPEG. With ``max_side`` the
image is decoded at reduced size where JPEG allows (draft mode: libjpeg's DCT scaling does most
of the shrinking for free), resized so its longer side is at most ``max_side`` (aspect kept,
never enlarged), and re-encoded as JPEG at ``quality``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from data_tools.catalog import Skip
from mlc.format import IMAGE_EXTENSIONS
from mlc.io import to_8bit

# "decode": every image is decoded (JPEG at 1/8 scale: still every entropy-coded block, so
# truncated or corrupt data fails); "structure": headers and end markers only, far less work
# for pass-through (measured in docs/benchmarks.md).
VERIFY_MODES = ("decode", "structure")
ROTATIONS = {
    0: None,
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}  # counter-clockwise, as OpenImages gives them


@dataclass
class PreparedImage:
    data: bytes
    ext: str  # tar member suffix: jpg, png or webp
    width: int
    height: int


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Skip("corrupt image", "not a recognised image format") from None
    except Exception as e:  # noqa: BLE001 (PIL raises many types on bad headers)
        raise Skip("corrupt image", f"{type(e).__name__}: {e}") from None


def _structure_ok(fmt: str, data: bytes) -> bool:
    """End markers that a truncated file lacks."""
    if fmt == "JPEG":
        return data.rstrip(b"\0")[-2:] == b"\xff\xd9"
    if fmt == "PNG":
        return data[-12:-4] == b"\0\0\0\0IEND"
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return True


def _decode(im: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode, at reduced size for JPEG when ``size`` allows; Skip on any decoding error."""
    try:
        if im.format == "JPEG":
            im.draft("RGB" if im.mode not in ("L", "CMYK") else im.mode, size or (1, 1))
        im.load()
    except Exception as e:  # noqa: BLE001
        raise Skip("corrupt image", f"{type(e).__name__}: {e}") from None
    return im


def _to_rgb_or_gray(im: Image.Image) -> Image.Image:
    if im.mode in ("RGB", "L"):
        return im
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grayscale
        return to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(
    data: bytes,
    max_side: int | None = None,
    quality: int = 90,
    rotation: int = 0,
    verify: str = "decode",
) -> PreparedImage:
    """Return the bytes to store for this image, or raise Skip with the reason."""
    if rotation not in ROTATIONS:
        raise Skip("bad rotation", f"{rotation} (expected 0, 90, 180 or 270)")
    im = _open(data)
    fmt, (width, height) = im.format, im.size
    if not _structure_ok(fmt, data):
        raise Skip("corrupt image", f"truncated {fmt} (no end marker)")
    passthrough = (
        fmt in IMAGE_EXTENSIONS
        and not rotation
        and (not max_side or max(width, height) <= max_side)
    )
    if passthrough:
        if verify == "decode":
            _decode(im)
        return PreparedImage(data, IMAGE_EXTENSIONS[fmt], width, height)
    target = _target_size(width, height, max_side)
    im = _to_rgb_or_gray(_decode(im, target))
    if im.size != target:
        im = im.resize(target, Image.Resampling.BICUBIC, reducing_gap=None)
    if ROTATIONS[rotation] is not None:
        im = im.transpose(ROTATIONS[rotation])
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return PreparedImage(out.getvalue(), "jpg", im.width, im.height)
