"""mlc.data.preprocess.EvalTransform: one image through the eval loader's decoding, from a file,
bytes, a PIL image, an array or a tensor."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mlc.config import LoaderConfig
from mlc.data.decode import DecodeError, decode_eval
from mlc.data.preprocess import EvalTransform


def encoded(im: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt)
    return out.getvalue()


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_files_and_bytes_decode_as_the_loader(photo, tmp_path):
    transform = EvalTransform.from_config(LoaderConfig(image_size=24, crop_fraction=0.875))
    for fmt in ("JPEG", "PNG"):
        data = encoded(photo, fmt)
        (tmp_path / f"x.{fmt}").write_bytes(data)
        expected = decode_eval(data, 24, 0.875, 3)  # the loader's eval path on a sample's bytes
        assert expected.shape == (24, 24, 3)
        assert np.array_equal(transform(tmp_path / f"x.{fmt}"), expected)
        assert np.array_equal(transform(str(tmp_path / f"x.{fmt}")), expected)
        assert np.array_equal(transform(data), expected)


def test_decoded_images_arrays_and_tensors_agree(photo):
    transform = EvalTransform(24, 0.875, 3)
    expected = transform(encoded(photo, "PNG"))  # lossless: the same pixels as `photo`
    pixels = np.asarray(photo)
    assert np.array_equal(transform(photo), expected)
    assert np.array_equal(transform(pixels), expected)
    assert np.array_equal(transform(torch.from_numpy(pixels).permute(2, 0, 1)), expected)
    gray = EvalTransform(24, 1.0, 1)
    one = gray(photo.convert("L"))
    assert one.shape == (24, 24, 1)
    assert np.array_equal(gray(np.asarray(photo.convert("L"))[:, :, None]), one)
    assert np.array_equal(gray(photo), one)  # color to a gray model: luminance, as the loader


def test_what_is_not_an_image_is_a_decode_error(tmp_path):
    transform = EvalTransform(24)
    with pytest.raises(DecodeError, match="not an image format PIL can read"):
        transform(b"not an image")
    with pytest.raises(DecodeError, match="uint8"):
        transform(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(DecodeError, match="C = 1, 3 or 4"):
        transform(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(DecodeError, match=r"uint8 \[H, W\] or \[C, H, W\]"):
        transform(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(DecodeError, match="cannot take a int"):
        transform(3)
    with pytest.raises(FileNotFoundError):
        transform(tmp_path / "missing.jpg")
