"""mlc.data.decode: eval and train decoding to the model's input size (docs/loader.md), checked
against independent PIL computations; JPEG draft mode; crop box rules; image modes; errors."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin, PngImagePlugin

from mlc.data.decode import (
    CROP_RATIO,
    CROP_SCALE,
    DecodeError,
    KeyedRandom,
    center_crop_box,
    decode_eval,
    decode_train,
    random_crop_box,
    resize_eval,
)
from mlc.data.decode import _open as open_image


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus a low-frequency pattern: content where a sub-pixel difference in the crop
    or a DCT-scaled decode changes pixel values by little."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [
        255 * xx / width,
        255 * yy / height,
        127.5 + 100 * np.sin(2 * np.pi * (xx / width + yy / height) + phase[2]),
    ]
    return Image.fromarray(np.clip(np.dstack(channels), 0, 255).astype(np.uint8), "RGB")


def reference_eval(im: Image.Image, size: int, fraction: float = 0.875) -> np.ndarray:
    """Independent: crop the central square of fraction * shorter side (rounded to whole
    pixels), then resize it to size x size with PIL."""
    w, h = im.size
    side = round(min(w, h) * fraction)
    left, top = round((w - side) / 2), round((h - side) / 2)
    crop = im.convert("RGB").crop((left, top, left + side, top + side))
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------- eval


def test_decode_eval_png_matches_independent_center_crop():
    im = smooth_image(400, 300)
    out = decode_eval(encode(im, "PNG"), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert mean_abs_diff(out, reference_eval(im, 64)) < 1.5
    # a wrong crop (the whole image, or no crop fraction) is far off
    assert mean_abs_diff(out, np.asarray(im.resize((64, 64), Image.Resampling.BILINEAR))) > 5
    assert mean_abs_diff(out, reference_eval(im, 64, fraction=1.0)) > 3


def test_decode_eval_jpeg_matches_independent_center_crop():
    im = smooth_image(400, 300, seed=1)
    data = encode(im, "JPEG", quality=95)
    out = decode_eval(data, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    full = Image.open(io.BytesIO(data))  # full-size decode, no draft
    assert mean_abs_diff(out, reference_eval(full, 64)) < 3


def test_decode_eval_crop_fraction_and_portrait():
    im = smooth_image(300, 400, seed=2)
    data = encode(im, "PNG")
    for fraction in (0.5, 1.0):
        out = decode_eval(data, 48, crop_fraction=fraction)
        assert out.shape == (48, 48, 3)
        assert mean_abs_diff(out, reference_eval(im, 48, fraction)) < 1.5


def test_decode_eval_at_the_stored_size_gives_the_stored_pixels():
    """The whole image at its own size is not resized at all: the pixels come back exactly."""
    gray = np.asarray(smooth_image(40, 40, seed=3).convert("L"))
    rgb = np.asarray(smooth_image(40, 40, seed=4))
    pgm = b"P5\n40 40\n255\n" + gray.tobytes()
    ppm = b"P6\n40 40\n255\n" + rgb.tobytes()
    assert isinstance(resize_eval(pgm, 40, 1.0), np.ndarray)  # no PIL image made at all
    assert isinstance(resize_eval(ppm, 40, 1.0, channels=3), np.ndarray)
    cases = {
        "pgm": (pgm, gray),
        "ppm": (ppm, rgb),
        "png gray": (encode(Image.fromarray(gray), "PNG"), gray),
        "png rgb": (encode(Image.fromarray(rgb), "PNG"), rgb),
    }
    for name, (data, expected) in cases.items():
        for channels in (1, 3):
            out = decode_eval(data, 40, crop_fraction=1.0, channels=channels)
            want = expected if expected.ndim == 3 else np.dstack([expected] * 3)
            want = want if channels == 3 else np.asarray(Image.fromarray(want).convert("L"))
            np.testing.assert_array_equal(out.reshape(want.shape), want, err_msg=name)
    jpeg = encode(Image.fromarray(rgb), "JPEG", quality=90)
    for mode, channels in (("RGB", 3), ("L", 1)):  # a JPEG decodes straight to the mode
        full = Image.open(io.BytesIO(jpeg))
        full.draft(mode, full.size)
        out = decode_eval(jpeg, 40, crop_fraction=1.0, channels=channels)
        np.testing.assert_array_equal(out.reshape(40, 40, -1), np.asarray(full).reshape(40, 40, -1))
    # a square JPEG cut short (headers intact) fails at its own size too: it is decoded
    # inside the error handling, not later by whoever reads the pixels
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    cut = encode(Image.fromarray(noise), "JPEG", quality=90)
    Image.open(io.BytesIO(cut[: len(cut) // 2]))  # opens
    with pytest.raises(DecodeError):
        decode_eval(cut[: len(cut) // 2], 40, crop_fraction=1.0)


def test_center_crop_box():
    assert center_crop_box(400, 300, 0.875) == pytest.approx((68.75, 18.75, 331.25, 281.25))
    assert center_crop_box(300, 400, 1.0) == pytest.approx((0, 50, 300, 350))


# ---------------------------------------------------------------- JPEG draft mode


class DraftSpy:
    """Wraps JpegImageFile.draft: records the requested size and the size decoded at."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, tuple[int, int], tuple[int, int], tuple[int, int]]] = []
        original = JpegImagePlugin.JpegImageFile.draft
        spy = self

        def draft(im, mode, size):
            before = im.size
            result = original(im, mode, size)
            spy.calls.append((mode, size, before, im.size))
            return result

        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)


def test_eval_uses_draft_at_the_smallest_sufficient_scale(monkeypatch):
    spy = DraftSpy(monkeypatch)
    data = encode(smooth_image(1024, 768), "JPEG", quality=90)
    out = decode_eval(data, 64)
    assert out.shape == (64, 64, 3)
    assert len(spy.calls) == 1
    _, requested, before, after = spy.calls[0]
    assert before == (1024, 768)
    crop = 0.875 * 768  # the eval crop's side in source pixels
    scale = after[0] / before[0]
    assert crop * scale >= 64  # the crop still has >= 64 pixels after the DCT scaling
    assert requested[0] * crop / 1024 >= 64 - 1 and requested[1] * crop / 768 >= 64 - 1
    assert after == (128, 96)  # 1/8: the smallest scale libjpeg offers, and enough here


def test_train_draft_keeps_the_crop_at_least_size(monkeypatch):
    spy = DraftSpy(monkeypatch)
    data = encode(smooth_image(1024, 768), "JPEG", quality=90)
    scales = set()
    for seed in range(40):
        box = random_crop_box(1024, 768, np.random.default_rng(seed))
        decode_train(data, 64, np.random.default_rng(seed))
        _, _, before, after = spy.calls[-1]
        sx, sy = after[0] / before[0], after[1] / before[1]
        assert (box[2] - box[0]) * sx >= 64 - 1e-6 and (box[3] - box[1]) * sy >= 64 - 1e-6
        scales.add(after)
    assert len(scales) > 1  # small crops decode at larger scales than large ones


def test_draft_decode_is_faster_than_a_full_decode():
    data = encode(smooth_image(1024, 768, seed=3), "JPEG", quality=90)
    box = center_crop_box(1024, 768, 0.875)

    def full_decode():
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.resize((64, 64), Image.Resampling.BILINEAR, box=box)

    def best(f, runs=7) -> float:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)

    best(full_decode, 2), best(lambda: decode_eval(data, 64), 2)  # warm up
    assert best(lambda: decode_eval(data, 64)) < 0.75 * best(full_decode)


def test_png_is_not_drafted(monkeypatch):
    spy = DraftSpy(monkeypatch)
    decode_eval(encode(smooth_image(200, 150), "PNG"), 32)
    assert spy.calls == []


# ---------------------------------------------------------------- train


def test_decode_train_seeded():
    data = encode(smooth_image(400, 300, seed=4), "JPEG", quality=90)
    outs = [decode_train(data, 64, np.random.default_rng(seed)) for seed in range(6)]
    for out in outs:
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    again = decode_train(data, 64, np.random.default_rng(0))
    assert np.array_equal(outs[0], again)
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not np.array_equal(outs[i], outs[j]), (i, j)


def test_color_resize_is_pils_bilinear_filter():
    """Color crops are resized by torch (_resize_rgb): the box cut out, then resized, equals
    PIL's crop + BILINEAR resize within 2 levels, down- and upscaling, square or not; a
    sub-pixel box is cut at the nearest whole pixels, which on smooth content moves the pixels
    by little; the mirrored output is the mirror of the unmirrored one."""
    from mlc.data.decode import _resize_rgb

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), "RGB")
    smooth = smooth_image(400, 300, seed=7)
    boxes = [(0, 0, 400, 300), (88, 24, 400, 290), (10, 20, 30, 50), (5, 5, 105, 205)]
    for im in (noise, smooth):
        for box in boxes:
            for size in (16, 48, 299):
                out = _resize_rgb(im, box, size, flip=False)
                ref = np.asarray(im.crop(box).resize((size, size), Image.Resampling.BILINEAR))
                assert out.shape == (size, size, 3) and out.dtype == np.uint8
                assert np.abs(out.astype(np.int16) - ref).max() <= 2, (box, size)
                assert out.flags.c_contiguous  # as the batch takes it in one copy
                mirrored = _resize_rgb(im, box, size, flip=True)
                np.testing.assert_array_equal(mirrored, out[:, ::-1])
    for box in [(10.4, 20.6, 200.3, 250.5), (0.3, 0.2, 399.6, 299.7)]:
        out = _resize_rgb(smooth, box, 64, flip=False)
        ref = np.asarray(smooth.resize((64, 64), Image.Resampling.BILINEAR, box=box))
        assert mean_abs_diff(out, ref) < 1.5, box
    # a wrong filter is far from it: nearest-neighbour sampling of the noise image
    out = _resize_rgb(noise, (0, 0, 400, 300), 48, flip=False)
    nearest = np.asarray(noise.resize((48, 48), Image.Resampling.NEAREST))
    assert mean_abs_diff(out, nearest) > 20


def test_decode_train_flips_half_the_time():
    """The same crop with and without the flip: the output is the mirror image."""
    data = encode(smooth_image(300, 300, seed=5), "PNG")
    flipped = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        box = random_crop_box(300, 300, rng)
        flip = rng.random() < 0.5
        out = decode_train(data, 48, np.random.default_rng(seed))
        im = Image.open(io.BytesIO(data)).convert("RGB")
        whole = tuple(round(v) for v in box)  # color crops are cut out at whole pixels
        expected = np.asarray(im.crop(whole).resize((48, 48), Image.Resampling.BILINEAR))
        mirrored = expected[:, ::-1]
        want, wrong = (mirrored, expected) if flip else (expected, mirrored)
        assert np.abs(out.astype(np.int16) - want).max() <= 2, seed
        assert mean_abs_diff(out, wrong) > 5, seed
        flipped += flip
    assert 15 < flipped < 45


SIZES = [(400, 300), (300, 400), (64, 64), (1000, 600), (37, 91), (2000, 1499)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_random_crop_box_rules(width, height):
    for seed in range(300):
        left, top, right, bottom = random_crop_box(width, height, np.random.default_rng(seed))
        eps = 1e-9 * max(width, height)
        assert -eps <= left < right <= width + eps and -eps <= top < bottom <= height + eps
        w, h = right - left, bottom - top
        assert CROP_SCALE[0] - 1e-9 <= w * h / (width * height) <= CROP_SCALE[1] + 1e-9
        assert CROP_RATIO[0] - 1e-9 <= w / h <= CROP_RATIO[1] + 1e-9


def test_random_crop_box_varies():
    boxes = {random_crop_box(400, 300, np.random.default_rng(s)) for s in range(50)}
    assert len(boxes) == 50
    areas = [(b[2] - b[0]) * (b[3] - b[1]) / 120000 for b in boxes]
    assert min(areas) < 0.3 and max(areas) > 0.7


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1000, 50, (500 - 100 / 3, 0, 500 + 100 / 3, 50)),  # 20:1 -> the central 4:3 box
        (50, 1000, (0, 500 - 100 / 3, 50, 500 + 100 / 3)),  # 1:20 -> the central 3:4 box
    ],
)
def test_random_crop_box_extreme_aspect_ratio_fallback(width, height, expected):
    for seed in range(20):
        box = random_crop_box(width, height, np.random.default_rng(seed))
        assert box == pytest.approx(expected)


class _MaxRng:
    """Every draw at the top of its range: area 100% at ratio 4/3, which never fits a portrait
    image, so all 10 tries fail."""

    def uniform(self, low, high):
        return high


def test_random_crop_box_fallback_within_ratios_is_whole_image():
    assert random_crop_box(300, 400, _MaxRng()) == pytest.approx((0, 0, 300, 400))
    # 1:2 is outside the ratios: the largest central 3:4 box
    assert random_crop_box(200, 400, _MaxRng()) == pytest.approx((0, 200 / 3, 200, 1000 / 3))


# ---------------------------------------------------------------- image modes


def _modes() -> dict[str, bytes]:
    base = smooth_image(240, 160, seed=6)  # the eval crop is (50, 10, 190, 150): whole pixels
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((240, 160)))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    return {
        "L jpeg": encode(base.convert("L"), "JPEG", quality=90),
        "CMYK jpeg": encode(base.convert("CMYK"), "JPEG", quality=90),
        "RGB jpeg": encode(base, "JPEG", quality=90),
        "RGBA png": encode(rgba, "PNG"),
        "LA png": encode(base.convert("LA"), "PNG"),
        "P png": encode(palette, "PNG"),
        "P png transparency": encode(transparent, "PNG"),
        "L png": encode(base.convert("L"), "PNG"),
        "RGB webp": encode(base, "WEBP", quality=90),
    }


MODES = _modes()


@pytest.mark.parametrize("name", list(MODES))
def test_modes_give_rgb_or_gray(name):
    data = MODES[name]
    rgb = decode_eval(data, 32)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    gray = decode_eval(data, 32, channels=1)
    assert gray.shape == (32, 32, 1) and gray.dtype == np.uint8
    rng = np.random.default_rng(0)
    assert decode_train(data, 32, rng).shape == (32, 32, 3)
    assert decode_train(data, 32, rng, channels=1).shape == (32, 32, 1)
    source = Image.open(io.BytesIO(data))
    expected = reference_eval(source, 32)
    assert mean_abs_diff(rgb, expected) < 3, name  # the right colours, not only the shape
    if source.mode in ("L", "LA"):
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def test_cmyk_colours():
    red = encode(Image.new("RGB", (40, 30), (220, 30, 40)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(red)).mode == "CMYK"
    pixel = decode_eval(red, 16)[8, 8].astype(int)
    assert np.abs(pixel - [220, 30, 40]).max() < 12


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_eval(data, 32, crop_fraction=1.0)
    expected = reference_eval(Image.fromarray((ramp >> 8).astype(np.uint8)), 32, 1.0)
    assert mean_abs_diff(out, expected) < 3


def _pngs() -> dict[str, tuple[bytes, bool]]:
    """name -> (PNG bytes, whether the short reader takes it rather than PIL's full one)."""
    base = smooth_image(37, 23, seed=3)
    gray16 = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    with_text = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "ancillary chunks are skipped")
    base.save(with_text, "PNG", pnginfo=info)
    return {
        "L": (encode(base.convert("L"), "PNG"), True),
        "RGB": (encode(base, "PNG"), True),
        "RGB, tiny IDAT chunks": (encode(base, "PNG", compress_level=0), True),
        "RGB with a text chunk": (with_text.getvalue(), True),
        "L with transparency": (encode(base.convert("L"), "PNG", transparency=7), False),
        "RGBA": (encode(base.convert("RGBA"), "PNG"), False),
        "P": (encode(base.convert("P"), "PNG"), False),
        "16-bit": (encode(gray16, "PNG"), False),
        "interlaced": (_with_header_byte(encode(base, "PNG"), 12, 1), False),
    }


def _with_header_byte(png: bytes, offset: int, value: int) -> bytes:
    """The PNG with IHDR byte ``offset`` set (12: interlace method; PIL cannot write Adam7)."""
    header = bytearray(png[12:29])  # "IHDR" + 13 bytes
    header[4 + offset] = value
    crc = zlib.crc32(bytes(header)).to_bytes(4, "big")
    return png[:12] + bytes(header) + crc + png[33:]


def check_short_reader(data: bytes, short: bool, monkeypatch) -> None:
    """The short reader takes what it should (PIL's Image.open is not called) and gives PIL's
    pixels; anything else goes to Image.open."""
    declined = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: declined.append(1))
    im = open_image(data)
    monkeypatch.undo()
    assert declined == ([] if short else [1])
    if short:
        full = Image.open(io.BytesIO(data))
        assert im.mode == full.mode and im.size == full.size
        assert np.array_equal(np.asarray(im), np.asarray(full))


@pytest.mark.parametrize("name", list(_pngs()))
def test_png_short_reader_equals_pil(name, monkeypatch):
    check_short_reader(*_pngs()[name], monkeypatch)


def _pnms() -> dict[str, tuple[bytes, bool]]:
    """name -> (binary PGM/PPM bytes, whether the short reader takes it)."""
    base = smooth_image(37, 23, seed=4)
    gray = encode(base.convert("L"), "PPM")
    pixels = gray[len(b"P5\n37 23\n255\n") :]
    return {
        "P5 (PGM)": (gray, True),
        "P6 (PPM)": (encode(base, "PPM"), True),
        "other whitespace": (b"P5  37\r\n23\t255\n" + pixels, True),
        "a comment": (b"P5\n# made by hand\n37 23\n255\n" + pixels, False),
        "16-bit": (encode(Image.fromarray(np.full((23, 37), 300, np.uint16)), "PPM"), False),
    }


@pytest.mark.parametrize("name", list(_pnms()))
def test_pnm_short_reader_equals_pil(name, monkeypatch):
    data, short = _pnms()[name]
    check_short_reader(data, short, monkeypatch)
    assert decode_eval(data, 16).shape == (16, 16, 3)  # either reader decodes it


def test_pnm_with_missing_or_extra_pixels_is_a_decode_error():
    data = encode(smooth_image(20, 10), "PPM")
    for damaged in (data[:-1], data + b"\0"):
        with pytest.raises(DecodeError, match="pixel bytes for a 20x10 RGB PNM"):
            decode_eval(damaged, 8)


def test_png_short_reader_detects_damage():
    data = encode(smooth_image(40, 30), "PNG")
    start = data.index(b"IDAT") + 20
    flipped = data[:start] + bytes([data[start] ^ 1]) + data[start + 1 :]
    with pytest.raises(DecodeError, match="damaged PNG chunk b'IDAT'"):
        decode_eval(flipped, 16)
    # a consistent chunk (CRC recomputed) whose compressed pixels are cut short
    idat = data.index(b"IDAT") - 4
    length = int.from_bytes(data[idat : idat + 4], "big")
    body = data[idat + 8 : idat + 8 + length // 2]
    chunk = (len(body)).to_bytes(4, "big") + b"IDAT" + body
    chunk += zlib.crc32(chunk[4:]).to_bytes(4, "big")
    short = data[:idat] + chunk + data[idat + 12 + length :]
    with pytest.raises(DecodeError):
        decode_eval(short, 16)


# ---------------------------------------------------------------- errors


def _garbage() -> dict[str, bytes]:
    jpeg = encode(smooth_image(64, 48), "JPEG", quality=90)
    png = encode(smooth_image(64, 48), "PNG")
    broken_png = png[:40] + bytes(b ^ 0x5A for b in png[40:-12]) + png[-12:]
    return {
        "text": b"this is not an image\n" * 10,
        "empty": b"",
        "zeros": bytes(1000),
        "jpeg header only": jpeg[:30],
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "scrambled png": broken_png,
    }


@pytest.mark.parametrize("name", list(_garbage()))
def test_garbage_raises_decode_error(name):
    data = _garbage()[name]
    with pytest.raises(DecodeError):
        decode_eval(data, 32)
    with pytest.raises(DecodeError):
        decode_train(data, 32, np.random.default_rng(0))
    assert issubclass(DecodeError, ValueError)  # the loader catches ValueError


def test_sanity_of_constants():
    assert CROP_SCALE == (0.08, 1.0)
    assert math.isclose(CROP_RATIO[0], 3 / 4) and math.isclose(CROP_RATIO[1], 4 / 3)
    assert math.isclose(CROP_RATIO[0] * CROP_RATIO[1], 1.0)


def test_keyed_random_is_blake2b_in_counter_mode():
    """The draws are the 53 high bits of the digest's 64-bit words, last word first, with the
    block number as the salt; the same key gives the same draws in any process."""
    r = KeyedRandom("0:1:42")
    draws = [r.random() for _ in range(20)]  # three digests
    expected = []
    for block in range(3):
        salt = block.to_bytes(16, "little")
        digest = hashlib.blake2b(b"0:1:42", digest_size=64, salt=salt).digest()
        expected += [(w >> 11) / 2**53 for w in reversed(struct.unpack("<8Q", digest))]
    assert draws == expected[:20]
    assert KeyedRandom("0:1:42").uniform(2.0, 4.0) == 2.0 + 2.0 * draws[0]
    assert KeyedRandom("0:1:43").random() != draws[0]


def test_keyed_random_is_uniform():
    values = np.array([KeyedRandom(f"k{i}").random() for i in range(4000)])
    assert values.min() >= 0 and values.max() < 1
    counts = np.histogram(values, bins=10, range=(0, 1))[0]
    chi2 = (((counts - 400) ** 2) / 400).sum()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom: exceeded with probability 0.001
