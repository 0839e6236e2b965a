"""Small PNG line charts drawn with Pillow (no plotting library needed for a curve or two)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def _label(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value / 1000:.0f}k"
    return f"{value:.3g}"


def line_chart(
    series: dict[str, tuple[list[float], list[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (640, 400),
) -> bytes:
    """PNG bytes of one or more (x, y) series on shared axes, with a legend."""
    width, height = size
    left, right, top, bottom = 64, 16, 36, 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    xs = [x for xs_, _ in series.values() for x in xs_]
    ys = [y for _, ys_ in series.values() for y in ys_]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x1 = x0 + 1

    def point(x, y):
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline=(80, 80, 80))
    for tick in _ticks(x0, x1):
        px, _ = point(tick, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill=(80, 80, 80))
        draw.text((px - 10, height - bottom + 6), _label(tick), fill="black", font=font)
    for tick in _ticks(y0, y1):
        _, py = point(x0, tick)
        draw.line([left - 4, py, left, py], fill=(80, 80, 80))
        draw.line([left, py, width - right, py], fill=(235, 235, 235))
        draw.text((4, py - 6), _label(tick), fill="black", font=font)
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = [point(x, y) for x, y in zip(sx, sy, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points if len(points) < 30 else []:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((left + 8, top + 6 + 14 * i), f"- {name}", fill=color, font=font)
    draw.text((left, 10), title, fill="black", font=font)
    draw.text(((width - len(xlabel) * 6) / 2, height - 18), xlabel, fill="black", font=font)
    draw.text((4, 10), ylabel, fill="black", font=font)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def write_png(path: str | Path, data: bytes) -> None:
    from eval.io import atomic_write_bytes

    atomic_write_bytes(path, data)
