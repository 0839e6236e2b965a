"""Small PNG charts drawn with Pillow: line, scatter (optionally log x), horizontal bars and
histogram. A report needs a handful of plain charts; a plotting library would be a heavy new
dependency for that."""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mlc.io import atomic_write_bytes

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
GRID, FRAME = (235, 235, 235), (80, 80, 80)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def _log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 x powers of ten within [low, high] (both > 0); only the powers of ten when those
    are many; the two ends when there are fewer than 2."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    ticks = [m * 10.0**e for e in range(first, last + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
    if len(ticks) > 8:
        ticks = [t for t in ticks if math.log10(t).is_integer()]
    return ticks if len(ticks) >= 2 else [low, high]


def _count_ticks(high: int) -> list[float]:
    """Whole-number ticks from 0 to at least ``high``."""
    step = max(1, math.ceil(high / 5))
    return [float(t) for t in range(0, high + step, step)]


def _label(value: float) -> str:
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g}M"
    if abs(value) >= 1000:
        return f"{value / 1000:.3g}k"
    return f"{value:.3g}"


class _Axes:
    """A white canvas with a framed plot area and data -> pixel mapping (linear or log10 x)."""

    def __init__(self, size, xrange, yrange, log_x=False, left=64, right=16, top=36, bottom=48):
        self.width, self.height = size
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.log_x = log_x
        (x0, x1), (y0, y1) = xrange, yrange
        if log_x:
            x0, x1 = math.log10(x0), math.log10(x1)
        if x1 <= x0:
            x0, x1 = x0 - 0.5, x1 + 0.5
        if y1 <= y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1
        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default()

    def point(self, x: float, y: float) -> tuple[float, float]:
        if self.log_x:
            x = math.log10(x)
        span_x, span_y = self.width - self.left - self.right, self.height - self.top - self.bottom
        px = self.left + (x - self.x0) / (self.x1 - self.x0) * span_x
        py = self.height - self.bottom - (y - self.y0) / (self.y1 - self.y0) * span_y
        return px, py

    def text(self, xy, text: str, color="black") -> None:
        self.draw.text(xy, text, fill=color, font=self.font)

    def frame(self, title: str, xlabel: str, ylabel: str, xticks=None, yticks=None) -> None:
        d, w, h = self.draw, self.width, self.height
        if xticks is None:
            xticks = _ticks(self.x0, self.x1)
            if self.log_x:
                xticks = _log_ticks(10**self.x0, 10**self.x1)
        for tick in xticks:
            px, _ = self.point(tick, self.y0)
            d.line([px, h - self.bottom, px, h - self.bottom + 4], fill=FRAME)
            self.text((px - 10, h - self.bottom + 6), _label(tick))
        for tick in _ticks(self.y0, self.y1) if yticks is None else yticks:
            _, py = self.point(10**self.x0 if self.log_x else self.x0, tick)
            d.line([self.left - 4, py, self.left, py], fill=FRAME)
            d.line([self.left + 1, py, w - self.right - 1, py], fill=GRID)
            self.text((4, py - 6), _label(tick))
        # The frame last: grid lines at the ends of the y range would cover it.
        d.rectangle([self.left, self.top, w - self.right, h - self.bottom], outline=FRAME)
        self.text((self.left, 10), title)
        self.text(((w - len(xlabel) * 6) / 2, h - 18), xlabel)
        self.text((4, 10), ylabel)

    def png(self) -> bytes:
        out = io.BytesIO()
        self.image.save(out, "PNG")
        return out.getvalue()


def _extent(values: list[float], fallback=(0.0, 1.0)) -> tuple[float, float]:
    return (min(values), max(values)) if values else fallback


def line_chart(
    series: dict[str, tuple[list[float], list[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (640, 400),
) -> bytes:
    """PNG bytes of one or more (x, y) series on shared axes, with a legend."""
    xs = [x for xs_, _ in series.values() for x in xs_]
    ys = [y for _, ys_ in series.values() for y in ys_]
    axes = _Axes(size, _extent(xs), _extent(ys))
    axes.frame(title, xlabel, ylabel)
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = [axes.point(x, y) for x, y in zip(sx, sy, strict=True)]
        if len(points) > 1:
            axes.draw.line(points, fill=color, width=2)
        for px, py in points if len(points) < 30 else []:
            axes.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        axes.text((axes.left + 8, axes.top + 6 + 14 * i), f"- {name}", color)
    return axes.png()


def scatter_chart(
    series: dict[str, tuple[list[float], list[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    yrange: tuple[float, float] | None = None,
    size: tuple[int, int] = (640, 400),
) -> bytes:
    """PNG bytes of (x, y) point sets; ``log_x`` puts x on a log10 scale (x must be > 0, other
    points are left out and the count is printed on the chart)."""
    dropped = 0
    if log_x:
        kept = {}
        for name, (sx, sy) in series.items():
            pairs = [(x, y) for x, y in zip(sx, sy, strict=True) if x > 0]
            dropped += len(sx) - len(pairs)
            kept[name] = ([x for x, _ in pairs], [y for _, y in pairs])
        series = kept
    xs = [x for xs_, _ in series.values() for x in xs_]
    ys = [y for _, ys_ in series.values() for y in ys_]
    x0, x1 = _extent(xs, (1.0, 10.0))
    # A margin of 5% of the span (in log space on a log axis) keeps points off the frame.
    if log_x:
        pad = (x1 / x0) ** 0.05 if x1 > x0 else 2.0
        x0, x1 = x0 / pad, x1 * pad
    else:
        pad = (x1 - x0) * 0.05 or 0.5
        x0, x1 = x0 - pad, x1 + pad
    axes = _Axes(size, (x0, x1), yrange or _extent(ys), log_x=log_x)
    axes.frame(title, xlabel, ylabel)
    radius = 3 if len(xs) < 2000 else 1
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        for x, y in zip(sx, sy, strict=True):
            px, py = axes.point(x, y)
            axes.draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=color)
        if len(series) > 1:
            axes.text((axes.left + 8, axes.top + 6 + 14 * i), f"o {name}", color)
    if dropped:
        axes.text((axes.width - 200, 10), f"{dropped} point(s) with x <= 0 not shown")
    return axes.png()


def bar_chart(
    labels: list[str],
    values: list[float],
    title: str,
    xlabel: str,
    colors: list[int] | None = None,
    xrange: tuple[float, float] = (0.0, 1.0),
    legend: list[str] = (),
    width: int = 720,
) -> bytes:
    """PNG bytes of horizontal bars, one per label, top to bottom; ``colors`` picks a color of
    COLORS per bar, ``legend`` names them."""
    label_width = min(300, 12 + 6 * max((len(s) for s in labels), default=1))
    row = 16
    height = 36 + 48 + row * max(1, len(labels))
    axes = _Axes(
        (width, height), xrange, (0.0, float(max(1, len(labels)))), left=label_width, right=48
    )
    axes.frame(title, xlabel, "", yticks=[])
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        color = COLORS[(colors[i] if colors else 0) % len(COLORS)]
        _, top = axes.point(xrange[0], len(labels) - i)
        x_end, _ = axes.point(min(max(value, xrange[0]), xrange[1]), 0)
        if x_end > axes.left + 1:  # a zero-length bar has nothing to draw
            axes.draw.rectangle([axes.left + 1, top + 2, x_end, top + row - 3], fill=color)
        axes.text((4, top + 2), label[: (label_width - 8) // 6])
        axes.text((x_end + 4, top + 2), f"{value:.3f}")
    for i, name in enumerate(legend):  # in the title line, right-aligned
        axes.text((width - 48 - 60 * (len(legend) - i), 10), f"# {name}", COLORS[i % len(COLORS)])
    return axes.png()


def histogram(
    values: list[float],
    title: str,
    xlabel: str,
    bins: int = 20,
    xrange: tuple[float, float] = (0.0, 1.0),
    size: tuple[int, int] = (640, 400),
) -> bytes:
    """PNG bytes of a histogram of ``values`` in ``bins`` equal bins over ``xrange`` (values
    outside it go to the end bins)."""
    low, high = xrange
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - low) / (high - low) * bins)))] += 1
    yticks = _count_ticks(max(counts, default=0) or 1)
    axes = _Axes(size, xrange, (0.0, yticks[-1]))
    axes.frame(title, xlabel, "count", yticks=yticks)
    for i, count in enumerate(counts):
        x0, y_top = axes.point(low + (high - low) * i / bins, count)
        x1, y_base = axes.point(low + (high - low) * (i + 1) / bins, 0)
        if count:
            axes.draw.rectangle([x0 + 1, y_top, x1 - 1, y_base], fill=COLORS[0])
    return axes.png()


def write_png(path: str | Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
