"""report.md and the PNG plots of a class-wise report (what a person reads first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.report import data_line, skip_notes
from mlc.io import atomic_write_text
from mlc.plots import bar_chart, histogram, scatter_chart, write_png

PLOTS = {
    "ap_vs_frequency.png": "AP@K of each class against its reference frequency (log scale)",
    "best_worst_classes.png": "the best and the worst classes by AP@K among the weighted ones",
    "ap_distribution.png": "the distribution of AP@K over the evaluated classes",
}
BARS = 10  # classes per side in best_worst_classes.png
LOSSES = 10  # rows of the "where fwMAP is lost" table


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _frequency(table) -> tuple[np.ndarray, str]:
    """x of the frequency plot: reference counts where known, else the evaluated positives."""
    r = table.result
    if table.reference is not None and not np.isnan(table.reference).all():
        return np.nan_to_num(table.reference, nan=0.0), "reference positive count (log scale)"
    return r.positives.astype(float), "positives in the evaluated set (log scale)"


def _plots(report, out: Path) -> list[Path]:
    table, k = report.classes, report.summary["k"]
    r = table.result
    defined = ~np.isnan(r.ap)
    x, xlabel = _frequency(table)
    charts = {
        "ap_vs_frequency.png": scatter_chart(
            {"classes": (x[defined].tolist(), r.ap[defined].tolist())},
            f"AP@{k} against class frequency ({int(defined.sum())} classes)",
            xlabel,
            f"AP@{k}",
            log_x=True,
            yrange=(0.0, 1.0),
        ),
        "ap_distribution.png": histogram(
            r.ap[defined].tolist(),
            f"AP@{k} over {int(defined.sum())} evaluated classes",
            f"AP@{k}",
        ),
    }
    weighted = np.flatnonzero(defined & (r.weights > 0))
    order = weighted[np.argsort(-r.ap[weighted], kind="stable")]
    share = r.weights / max(r.weights[weighted].sum(), 1e-300)
    if len(order) <= 2 * BARS:  # few classes: all of them, best first
        picked, colors, legend = list(order), [0] * len(order), []
        title = f"all {len(order)} weighted classes by AP@{k}"
    else:
        picked = list(order[:BARS]) + list(order[-BARS:])
        colors, legend = [0] * BARS + [1] * BARS, ["best", "worst"]
        title = f"best {BARS} and worst {BARS} of {len(order)} weighted classes by AP@{k}"
    charts["best_worst_classes.png"] = bar_chart(
        [f"{table.names[i]} (w {100 * share[i]:.1f}%)" for i in picked],
        [float(r.ap[i]) for i in picked],
        title,
        f"AP@{k} (w: share of the weight)",
        colors=colors,
        legend=legend,
    )
    paths = []
    for name, data in charts.items():
        paths.append(out / name)
        write_png(paths[-1], data)
    return paths


def _ci(s: dict, key: str) -> str:
    ci = (s.get("confidence_intervals") or {}).get(key)
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"


def _markdown(report, plots: bool) -> str:
    s, table = report.summary, report.classes
    k, r = s["k"], table.result
    source = s.get("checkpoint") or s.get("predictions")
    data = s.get("data") or s.get("labels")
    lines = [
        "# Evaluation report",
        "",
        f"- scored: `{source}`",
        f"- labels: `{data}`" + (f" (split `{s['split']}`)" if s.get("split") else ""),
        f"- weights: {s['weights']}",
        f"- K = {k}; {s['images']} images, {s['classes']} classes",
    ]
    if data_line(s):
        lines.append(f"- data: {data_line(s)}")
    lines += [
        "",
        "| metric | value | 95% CI |",
        "| --- | ---: | --- |",
        f"| fwMAP@{k} (weighted) | {_fmt(s['weighted_map_at_k'])} | "
        f"{_ci(s, 'weighted_map_at_k')} |",
        f"| MAP@{k} (unweighted) | {_fmt(s['unweighted_map_at_k'])} | "
        f"{_ci(s, 'unweighted_map_at_k')} |",
        f"| image-wise AP@{k} | {_fmt(s['image_map_at_k'])} | {_ci(s, 'image_map_at_k')} |",
        f"| full mAP (untruncated) | {_fmt(s['full_map'])} | - |",
        "",
        f"Classes: {s['classes_evaluated']} evaluated, {s['classes_excluded_no_positives']} "
        f"excluded without a positive, {s['classes_zero_weight']} with zero weight. Images: "
        f"{s['images_evaluated']} in the image-wise mean, {s['images_excluded_no_positives']} "
        "without a known positive.",
    ]
    ci = s.get("confidence_intervals")
    if ci:
        lines += [
            "",
            f"Intervals: {ci['method']}; {ci['replicates']} replicates, seed {ci['seed']}. They "
            "measure how much the figures would move on another sample of images like these, "
            "not model or training variance.",
        ]
    for note in s.get("notes", []):
        lines += ["", f"Note: {note}"]
    skipped = skip_notes(s, examples=5)
    if skipped:
        lines += ["", "## Skipped inputs", ""] + [f"- {note}" for note in skipped]
    defined = np.flatnonzero(~np.isnan(r.ap) & (r.weights > 0))
    if len(defined):
        total = r.weights[defined].sum()
        lost = r.weights[defined] * (1 - r.ap[defined]) / total
        lines += [
            "",
            f"## Where fwMAP@{k} is lost",
            "",
            f"fwMAP@{k} = 1 - sum of the `lost` column over all classes; the {LOSSES} largest:",
            "",
            f"| class | name | weight share | P_c | AP@{k} | lost |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for j in np.argsort(-lost, kind="stable")[:LOSSES]:
            i = defined[j]
            lines.append(
                f"| `{table.ids[i]}` | {table.names[i]} | {r.weights[i] / total:.3f} | "
                f"{int(r.positives[i])} | {r.ap[i]:.4f} | {lost[j]:.4f} |"
            )
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{text}]({name})\n" for name, text in PLOTS.items()]
    lines += ["", f"Per-class figures: `{report.table_name}`; all numbers: `summary.json`."]
    return "\n".join(lines) + "\n"


def write_markdown_and_plots(report, out: Path, plots: bool = True) -> list[Path]:
    paths = _plots(report, out) if plots else []
    atomic_write_text(out / "report.md", _markdown(report, plots))
    return [out / "report.md", *paths]
