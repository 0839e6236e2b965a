"""data_tools.images.prepare_image on images made here: pass-through byte for byte, reduction with
--max-side (aspect kept, never enlarged), rotations (counter-clockwise, checked on a corner
marker and against numpy's rot90), re-encoding of other formats and modes, and corrupt input
caught by verify="decode" and verify="structure"."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_tools.catalog import Skip
from data_tools.images import prepare_image

from .conftest import encode, noise_image


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def jpeg(width=400, height=300, seed=0, **kwargs) -> bytes:
    return encode(noise_image(width, height, seed=seed), "JPEG", quality=90, **kwargs)


def smooth(width: int, height: int, marker: bool = True) -> np.ndarray:
    """A smooth RGB picture (small JPEG error) with a saturated red block in its top-left
    corner."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack(
        [np.zeros_like(x), 255 * x // max(width - 1, 1), 255 * y // max(height - 1, 1)], axis=-1
    ).astype(np.uint8)
    if marker:
        array[: height // 4, : width // 4] = (255, 0, 0)
    return array


def is_red(array: np.ndarray) -> bool:
    r, g, b = array.reshape(-1, 3).mean(axis=0)
    return r > 200 and g < 60 and b < 60


# ---------------------------------------------------------------- pass-through


@pytest.mark.parametrize(
    ("fmt", "ext", "mode"),
    [
        ("JPEG", "jpg", "RGB"),
        ("PNG", "png", "RGBA"),
        ("WEBP", "webp", "RGB"),
        ("JPEG", "jpg", "L"),
        ("PPM", "ppm", "L"),  # binary PGM
        ("PPM", "ppm", "RGB"),
    ],
)
@pytest.mark.parametrize("verify", ["decode", "structure"])
def test_pass_through_returns_the_original_bytes(fmt, ext, mode, verify):
    data = encode(noise_image(40, 30, mode), fmt)
    for max_side in (None, 40, 1000):  # at or above the longer side: nothing to reduce
        image = prepare_image(data, max_side=max_side, verify=verify)
        assert image.data == data
        assert (image.ext, image.width, image.height) == (ext, 40, 30)


def test_pass_through_keeps_cmyk_jpeg():
    data = encode(noise_image(40, 30).convert("CMYK"), "JPEG")
    image = prepare_image(data)
    assert image.data == data
    assert (image.ext, image.width, image.height) == ("jpg", 40, 30)


# ---------------------------------------------------------------- max_side


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((400, 300), 100, (100, 75)),
        ((300, 400), 100, (75, 100)),
        ((401, 301), 100, (100, 75)),
        ((400, 300), 399, (399, 299)),
        ((1000, 10), 100, (100, 1)),
        ((10, 1000), 7, (1, 7)),  # never below 1 pixel
    ],
)
def test_max_side_keeps_aspect(size, max_side, expected):
    data = jpeg(*size)
    image = prepare_image(data, max_side=max_side)
    assert image.ext == "jpg"
    assert (image.width, image.height) == expected
    out = decoded(image.data)
    assert out.format == "JPEG"
    assert out.size == expected
    assert out.mode == "RGB"


def test_max_side_resamples_the_picture():
    """The reduced image shows the same picture (not a crop or a blank): compare it with the
    source reduced independently."""
    array = smooth(400, 300)
    image = prepare_image(encode(Image.fromarray(array), "PNG"), max_side=100)
    out = np.asarray(decoded(image.data).convert("RGB"), dtype=np.float64)
    expected = np.asarray(Image.fromarray(array).resize((100, 75), Image.Resampling.BOX))
    assert np.abs(out - expected).mean() < 6
    assert is_red(out[2:16, 2:20])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_max_side_reencodes_every_format_as_jpeg(fmt):
    data = encode(noise_image(400, 300), fmt)
    image = prepare_image(data, max_side=100, quality=80)
    assert (image.ext, image.width, image.height) == ("jpg", 100, 75)
    assert image.data[:2] == b"\xff\xd8"
    assert decoded(image.data).size == (100, 75)


def test_max_side_never_enlarges():
    data = jpeg(40, 30)
    assert prepare_image(data, max_side=4000).data == data
    # A format that is re-encoded anyway keeps its size.
    gif = encode(noise_image(40, 30).convert("P"), "GIF")
    image = prepare_image(gif, max_side=4000)
    assert (image.ext, image.width, image.height) == ("jpg", 40, 30)
    assert decoded(image.data).size == (40, 30)


def test_quality_changes_the_reencoded_size():
    data = jpeg(400, 300)
    low = prepare_image(data, max_side=200, quality=20)
    high = prepare_image(data, max_side=200, quality=95)
    assert len(low.data) < len(high.data)


# ---------------------------------------------------------------- rotation


@pytest.mark.parametrize(
    ("rotation", "corner"),
    [(90, "bottom-left"), (180, "bottom-right"), (270, "top-right")],
)
def test_rotation_is_counter_clockwise(rotation, corner):
    """The red block starts top-left; turned counter-clockwise by 90 it ends bottom-left."""
    array = smooth(80, 60)
    image = prepare_image(encode(Image.fromarray(array), "PNG"), rotation=rotation)
    assert image.ext == "jpg"  # a rotated image is always re-encoded
    expected = np.rot90(array, k=rotation // 90)  # numpy: counter-clockwise
    assert (image.width, image.height) == (expected.shape[1], expected.shape[0])
    out = np.asarray(decoded(image.data).convert("RGB"), dtype=np.float64)
    assert out.shape == expected.shape
    assert np.abs(out - expected).mean() < 4
    h, w = out.shape[:2]
    quadrants = {
        "top-left": out[2 : h // 5, 2 : w // 5],
        "top-right": out[2 : h // 5, -w // 5 : -2],
        "bottom-left": out[-h // 5 : -2, 2 : w // 5],
        "bottom-right": out[-h // 5 : -2, -w // 5 : -2],
    }
    assert [name for name, q in quadrants.items() if is_red(q)] == [corner]


def test_rotation_90_swaps_width_and_height():
    data = jpeg(40, 30)
    image = prepare_image(data, rotation=90)
    assert (image.ext, image.width, image.height) == ("jpg", 30, 40)
    assert decoded(image.data).size == (30, 40)
    assert prepare_image(data, rotation=180).width == 40
    # With max_side: reduced first (longer side 100), then turned.
    image = prepare_image(jpeg(400, 300), max_side=100, rotation=270)
    assert (image.width, image.height) == (75, 100)
    assert decoded(image.data).size == (75, 100)


def test_rotation_0_passes_through_and_other_angles_are_skipped():
    data = jpeg(40, 30)
    assert prepare_image(data, rotation=0).data == data
    with pytest.raises(Skip) as e:
        prepare_image(data, rotation=45)
    assert e.value.reason == "bad rotation"


# ---------------------------------------------------------------- other formats and modes


@pytest.mark.parametrize(
    ("fmt", "mode"), [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("BMP", "1"), ("TIFF", "L")]
)
def test_other_formats_are_reencoded_as_jpeg(fmt, mode):
    im = Image.fromarray(smooth(80, 60)).convert(mode)
    image = prepare_image(encode(im, fmt))
    assert (image.ext, image.width, image.height) == ("jpg", 80, 60)
    out = decoded(image.data)
    assert out.format == "JPEG"
    assert out.mode == ("L" if mode == "L" else "RGB")
    # Same picture: compare with the source converted to RGB (JPEG error only; a 1-bit
    # dithered picture only on average).
    source = np.asarray(im.convert("RGB"), dtype=np.float64)
    result = np.asarray(out.convert("RGB"), dtype=np.float64)
    if mode == "1":
        assert abs(result.mean() - source.mean()) < 10
    else:
        assert np.abs(result - source).mean() < 12  # GIF: dithered palette colours


def rgba_half_transparent() -> Image.Image:
    """Left half opaque blue, right half fully transparent (with red colour values)."""
    array = np.zeros((30, 40, 4), dtype=np.uint8)
    array[:, :20] = (0, 0, 255, 255)
    array[:, 20:] = (255, 0, 0, 0)
    return Image.fromarray(array, "RGBA")


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_transparency_is_composited_on_white(fmt):
    data = encode(rgba_half_transparent(), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    image = prepare_image(data, max_side=20)
    assert (image.ext, image.width, image.height) == ("jpg", 20, 15)
    out = np.asarray(decoded(image.data).convert("RGB"), dtype=np.float64)
    assert np.abs(out[:, :8] - (0, 0, 255)).max() < 40  # opaque blue stays blue
    assert np.abs(out[:, 12:] - 255).max() < 40  # transparent -> white, not red or black


def test_palette_with_transparency_is_composited_on_white():
    im = Image.new("P", (40, 30), 0)
    im.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    im.paste(1, (20, 0, 40, 30))
    data = encode(im, "GIF", transparency=1)
    image = prepare_image(data)  # GIF: re-encoded without max_side too
    out = np.asarray(decoded(image.data).convert("RGB"), dtype=np.float64)
    assert np.abs(out[:, :16] - (0, 0, 255)).max() < 40
    assert np.abs(out[:, 24:] - 255).max() < 40


@pytest.mark.parametrize(
    ("mode", "fmt", "out_mode"),
    [
        ("RGBA", "PNG", "RGB"),
        ("LA", "PNG", "RGB"),
        ("P", "PNG", "RGB"),
        ("CMYK", "JPEG", "RGB"),
        ("L", "JPEG", "L"),
        ("L", "PNG", "L"),
        ("1", "PNG", "RGB"),
    ],
)
def test_modes_are_reencoded_as_rgb_or_gray(mode, fmt, out_mode):
    im = Image.fromarray(smooth(400, 300)).convert(mode)
    image = prepare_image(encode(im, fmt), max_side=100)
    assert (image.ext, image.width, image.height) == ("jpg", 100, 75)
    out = decoded(image.data)
    assert out.mode == out_mode
    # The picture survives (CMYK in particular is not inverted).
    expected = np.asarray(im.convert("RGB").resize((100, 75), Image.Resampling.BOX), dtype=float)
    assert np.abs(np.asarray(out.convert("RGB"), dtype=float) - expected).mean() < 25


def test_16_bit_grayscale_png_keeps_its_picture_when_reencoded():
    gradient = np.tile(np.linspace(0, 65535, 400), (300, 1)).astype(np.uint16)
    data = encode(Image.fromarray(gradient), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = prepare_image(data, max_side=100)
    out = np.asarray(decoded(image.data).convert("L"), dtype=np.float64)
    expected = np.tile(np.linspace(0, 255, 100), (75, 1))
    assert np.abs(out - expected).mean() < 10


# ---------------------------------------------------------------- corrupt input


def png(width=400, height=300) -> bytes:
    return encode(noise_image(width, height), "PNG")


def webp(width=400, height=300) -> bytes:
    return encode(noise_image(width, height), "WEBP")


CORRUPT = {
    "truncated JPEG": lambda: jpeg()[: len(jpeg()) // 2],
    "truncated PNG": lambda: png()[: len(png()) // 2],
    "truncated WebP": lambda: webp()[: len(webp()) // 2],
    "garbage": lambda: np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes(),
    "text": lambda: b"<html>404 Not Found</html>\n",
    "empty": lambda: b"",
    "JPEG header only": lambda: jpeg()[:200],
}


@pytest.mark.parametrize("name", CORRUPT)
@pytest.mark.parametrize("verify", ["decode", "structure"])
@pytest.mark.parametrize("max_side", [None, 100])
def test_corrupt_images_are_skipped(name, verify, max_side):
    with pytest.raises(Skip) as e:
        prepare_image(CORRUPT[name](), max_side=max_side, verify=verify)
    assert e.value.reason == "corrupt image"


def corrupt_middle(data: bytes) -> bytes:
    """0xFF bytes over the middle of the entropy-coded data (a run of marker prefixes: libjpeg
    gives up on it, where it only warns about many other corruptions); header and EOI intact."""
    noise = b"\xff" * 2000
    middle = len(data) // 2
    return data[:middle] + noise + data[middle + len(noise) :]


def pil_rejects(data: bytes) -> bool:
    try:
        decoded(data)
    except Exception:  # noqa: BLE001
        return True
    return False


def test_structure_misses_a_corrupted_middle_that_decode_catches():
    """The documented difference between the modes: "structure" checks headers and end
    markers only, so a JPEG whose middle is corrupt (header and EOI intact) passes through;
    "decode" decodes it (at 1/8 scale, still every entropy-coded block) and skips it when PIL
    rejects the data."""
    data = corrupt_middle(jpeg())
    assert data[-2:] == b"\xff\xd9"
    assert prepare_image(data, verify="structure").data == data
    if pil_rejects(data):
        with pytest.raises(Skip) as e:
            prepare_image(data, verify="decode")
        assert e.value.reason == "corrupt image"


def test_structure_mode_still_catches_truncation_and_non_images():
    # In pass-through even a PNG that lacks only its IEND chunk is caught.
    for data in (jpeg()[:-100], png()[:-6], webp()[:-100], b"not an image"):
        with pytest.raises(Skip, match="corrupt image"):
            prepare_image(data, verify="structure")
