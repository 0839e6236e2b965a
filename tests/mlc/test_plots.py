"""The PIL charts: valid PNGs of the asked size, with marks where the data says."""

import io

import numpy as np
import pytest
from PIL import Image

from mlc.plots import _Axes, _log_ticks, bar_chart, histogram, line_chart, scatter_chart


def decode(png: bytes) -> np.ndarray:
    Image.open(io.BytesIO(png)).verify()  # a complete, well-formed PNG
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def colored(pixels: np.ndarray, rgb) -> np.ndarray:
    return np.all(pixels == np.array(rgb, dtype=np.uint8), axis=-1)


BLUE, RED = (31, 119, 180), (214, 39, 40)


def test_log_axis_maps_decades_to_equal_widths():
    axes = _Axes((640, 400), (1.0, 1000.0), (0.0, 1.0), log_x=True)
    x1, _ = axes.point(1, 0)
    x10, _ = axes.point(10, 0)
    x100, _ = axes.point(100, 0)
    assert x10 - x1 == pytest.approx(x100 - x10)
    assert _log_ticks(1, 1000) == [1, 10, 100, 1000]  # many: the powers of ten only
    assert _log_ticks(4890, 36600) == [5000, 10000, 20000]
    assert _log_ticks(3, 4) == [3, 4]  # nothing round inside: the ends


def test_scatter_puts_points_where_the_data_is():
    png = scatter_chart(
        {"classes": ([10.0, 1000.0, -1.0], [0.0, 1.0, 0.5])},
        "t",
        "x",
        "y",
        log_x=True,
        yrange=(0.0, 1.0),
    )
    pixels = decode(png)
    assert pixels.shape == (400, 640, 3)
    ys, xs = np.nonzero(colored(pixels, BLUE))
    # Two points (the x <= 0 one is left out): bottom left and top right of the plot area.
    assert xs.min() < 120 and ys.max() > 300 and xs.max() > 560 and ys.min() < 80


def test_bars_are_as_long_as_their_values():
    png = bar_chart(["a", "b"], [1.0, 0.25], "t", "AP", colors=[0, 1], legend=["best", "worst"])
    pixels = decode(png)
    blue_cols = np.nonzero(colored(pixels, BLUE).any(0))[0]
    red_rows, red_cols = np.nonzero(colored(pixels, RED))
    red_cols = red_cols[red_rows > 36]  # below the title line (the legend is red text too)
    blue_len = blue_cols.max() - blue_cols.min()
    assert (red_cols.max() - red_cols.min()) == pytest.approx(blue_len / 4, rel=0.08)


def test_histogram_bar_heights_follow_the_counts():
    values = [0.05] * 4 + [0.95] * 2
    pixels = decode(histogram(values, "t", "AP", bins=10))
    blue = colored(pixels, BLUE)
    left, right = blue[:, :200].sum(0).max(), blue[:, 440:].sum(0).max()
    assert left == pytest.approx(2 * right, rel=0.05)


def test_line_chart_still_draws():
    pixels = decode(line_chart({"loss": ([0, 1, 2], [3, 2, 1])}, "t", "samples", ""))
    assert colored(pixels, BLUE).sum() > 100


def test_a_report_of_many_classes_shows_the_best_and_the_worst(tmp_path):
    from eval.example import write_example
    from eval.report import evaluate_files, write_report

    paths = write_example(tmp_path / "example")  # 30 classes
    report = evaluate_files(
        paths["predictions"], paths["labels"], paths["classes"], str(paths["weights"])
    )
    write_report(report, tmp_path / "out")
    pixels = decode((tmp_path / "out" / "best_worst_classes.png").read_bytes())
    bars = colored(pixels, BLUE).any(1), colored(pixels, RED).any(1)
    # 10 blue bars above 10 red ones (bar rows are 16 px; the legend sits in the title line).
    assert bars[0][40:].sum() == pytest.approx(10 * 11, abs=10)
    assert bars[1][40:].sum() == pytest.approx(10 * 11, abs=10)
    assert np.flatnonzero(bars[0][40:]).max() < np.flatnonzero(bars[1][40:]).min()
