"""The eval loader's preprocessing for one image that is not in a shard (`mlc predict`,
`mlc.load`): the same central crop and resize, the same uint8 pixels.

Image files and bytes go through the very function the eval loader runs on a shard's image
bytes (mlc.data.decode.decode_eval), so an image gives the same pixels from a file as from a
shard. A PIL image, numpy array or tensor is taken as decoded: cropped and resized the same way
(a JPEG is then not decoded at the reduced DCT scale the loader may use for large crops).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mlc.config import LoaderConfig
from mlc.data.decode import DecodeError, decode_eval, decode_eval_image

# What `mlc predict` takes for an image file when it walks a folder (any file given by name or
# in a list is tried, whatever its suffix).
IMAGE_FILE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".ppm",
    ".pgm",
    ".pnm",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)


@dataclass(frozen=True)
class EvalTransform:
    """One image -> uint8 HxWxC pixels at the model's input size, as the eval loader makes them
    (``normalize`` of the stacked batch gives the model's input)."""

    image_size: int
    crop_fraction: float = 0.875
    channels: int = 3

    @classmethod
    def from_config(cls, config: LoaderConfig) -> EvalTransform:
        return cls(config.image_size, config.crop_fraction, config.channels)

    def __call__(self, image) -> np.ndarray:
        """``image``: a file path, encoded bytes, a PIL image, a uint8 numpy array (HxW or
        HxWxC, C = 1, 3 or 4) or a uint8 tensor (HxW or CxHxW). DecodeError (a ValueError) for
        bytes that are no image and arrays of another type or shape."""
        args = (self.image_size, self.crop_fraction, self.channels)
        if isinstance(image, (str, os.PathLike)):
            return decode_eval(Path(image).read_bytes(), *args)
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_eval(bytes(image), *args)
        if isinstance(image, Image.Image):
            image.load()  # decoded as it is: no reduced-scale JPEG draft on the caller's image
            return decode_eval_image(image, *args)
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim not in (2, 3):
                raise DecodeError(
                    f"a tensor image must be uint8 [H, W] or [C, H, W], got {image.dtype} "
                    f"{list(image.shape)}"
                )
            pixels = image.detach().cpu()
            image = (pixels if pixels.ndim == 2 else pixels.permute(1, 2, 0)).numpy()
        if isinstance(image, np.ndarray):
            return decode_eval_image(array_image(image), *args)
        raise DecodeError(
            f"cannot take a {type(image).__name__} as an image: give a file path, bytes, a PIL "
            "image, a uint8 array or a uint8 tensor"
        )


def array_image(pixels: np.ndarray) -> Image.Image:
    """A PIL image of uint8 HxW, HxWx1 (gray), HxWx3 (RGB) or HxWx4 (RGBA) pixels."""
    if pixels.dtype != np.uint8 or not (
        pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (1, 3, 4))
    ):
        raise DecodeError(
            f"an array image must be uint8 HxW or HxWxC with C = 1, 3 or 4, got {pixels.dtype} "
            f"{list(pixels.shape)}"
        )
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(pixels))
