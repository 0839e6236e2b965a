"""Procedural multi-label mosaics: the demo's dataset on machines without Fashion-MNIST.

2x2 mosaics (56x56 grayscale, the Fashion-MNIST mosaics' geometry) of 1-4 of 8 shapes with a
random size, position, brightness and stroke, and a long-tailed class prior. A catalog row's
locator is the mosaic's recipe, "<image seed>:<shape index or -1 per cell>"; ``ShapesLoader``
renders it, so the catalog is made instantly and the images while sharding.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from data_tools.catalog import Catalog, catalog_table

SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond", "bar", "plus"]
CELL, GRID = 28, 2  # the Fashion-MNIST mosaics' geometry: 56x56 images


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, ink: int, width: int) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=ink)
    elif shape == "square":
        draw.rectangle(box, fill=ink)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=ink)
    elif shape == "cross":
        draw.line([(x0, y0), (x1, y1)], fill=ink, width=width)
        draw.line([(x0, y1), (x1, y0)], fill=ink, width=width)
    elif shape == "ring":
        draw.ellipse(box, outline=ink, width=width)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=ink)
    elif shape == "bar":
        draw.rectangle([x0, cy - width, x1, cy + width], fill=ink)
    else:  # plus
        draw.rectangle([x0, cy - width / 2, x1, cy + width / 2], fill=ink)
        draw.rectangle([cx - width / 2, y0, cx + width / 2, y1], fill=ink)


class ShapesLoader:
    """Renders a locator "<image seed>:<shape or -1 per cell>" as a grayscale binary PGM (as
    the Fashion-MNIST mosaics: nothing to decode): each shape with a random size, position,
    brightness and stroke, fixed by the seed. Picklable."""

    def __repr__(self) -> str:  # in the shard plan: a rerun must recognise its own shards
        return f"ShapesLoader(cell={CELL}, grid={GRID}, shapes={len(SHAPES)}, pgm)"

    def load(self, locator: str) -> bytes:
        seed, cells = locator.split(":")
        rng = np.random.default_rng(int(seed))
        image = Image.new("L", (CELL * GRID, CELL * GRID), 0)
        draw = ImageDraw.Draw(image)
        for i, shape in enumerate(int(c) for c in cells.split(",")):
            if shape < 0:
                continue
            size = int(rng.integers(14, 25))
            x = (i % GRID) * CELL + int(rng.integers(1, CELL - size))
            y = (i // GRID) * CELL + int(rng.integers(1, CELL - size))
            ink, width = int(rng.integers(110, 256)), int(rng.integers(2, 5))
            _draw(draw, SHAPES[shape], (x, y, x + size, y + size), ink, width)
        out = io.BytesIO()
        image.save(out, format="PPM")
        return out.getvalue()


def shapes_catalog(split: str, count: int, seed: int = 0):
    """A Catalog of ``count`` procedural 2x2 mosaics of 1-4 shapes with a long-tailed class
    prior (class r drawn with probability proportional to 1/(r+1)); labels = the shapes drawn."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    prior = 1.0 / np.arange(1, len(SHAPES) + 1)
    items = rng.integers(1, GRID * GRID + 1, size=count)
    cells = np.full((count, GRID * GRID), -1, dtype=np.int64)
    for row, k in enumerate(items):
        where = rng.permutation(GRID * GRID)[:k]
        cells[row, where] = rng.choice(len(SHAPES), size=k, p=prior / prior.sum())
    seeds = rng.integers(0, 2**31, size=count)
    positives = [sorted(set(r[r >= 0].tolist())) for r in cells]
    table = catalog_table(
        [f"shapes-{split}-{i:07d}" for i in range(count)],
        [
            f"{s}:{','.join(map(str, r))}"
            for s, r in zip(seeds.tolist(), cells.tolist(), strict=True)
        ],
        positives,
        pa.array([[]] * count, pa.list_(pa.int32())),
    )
    return Catalog(
        class_ids=list(SHAPES),
        class_names=[s.capitalize() for s in SHAPES],
        table=table,
        loader=ShapesLoader(),
        annotation="full",
        images_read=count,
        source=f"procedural shapes ({split}): {count} 2x2 mosaics, seed {seed}",
    )
