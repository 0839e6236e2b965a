"""MAP@100 at FastEval14k scale: mlc's dense and streaming paths against torchmetrics and sklearn.

Each method runs in its own fresh process on the same generated data (14,000 images x 6,000
classes, ~36 positives per image); torchmetrics RetrievalMAP(top_k=100) and sklearn
average_precision_score run on --slice classes and are extrapolated linearly (their cost is).
Targets: dense <= 1.0 s; >= 20x faster than RetrievalMAP, >= 40x than sklearn; streaming
within 2x of dense (and the same value).

    python -m benchmarks.bench_map [--images 14000] [--classes 6000] [--slice 200] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "bench_map"


def make_data(images: int, classes: int, seed: int = 0):
    """Dense labels, ~36 positives per image over a long-tailed (Zipf-like) class prior."""
    rng = np.random.default_rng(seed)
    prior = 1.0 / np.arange(10, classes + 10) ** 0.8
    prior *= 36.0 / prior.sum()
    prior = np.minimum(prior, 0.9)
    labels = (rng.random((images, classes), dtype=np.float32) < prior).astype(np.int8)
    scores = rng.standard_normal((images, classes), dtype=np.float32)
    scores += np.float32(1.5) * labels  # float32 logits, as a model gives them
    return scores, labels


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def run_one(method: str, images: int, classes: int, slice_: int) -> dict:
    """One method in this (fresh) process: seconds (extrapolated to every class for the sliced
    competitors) and the peak memory above what the data itself holds."""
    import torch

    scores, labels = make_data(images, classes)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter to now
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    scale, extra = 1.0, {}
    if method == "dense":
        from eval.metrics import class_ap_at_k

        value = class_ap_at_k(scores, labels, k=100, weights="uniform").unweighted_map
    elif method == "streaming":
        from eval.streaming import MAPAccumulator

        acc = MAPAccumulator(classes, k=100)
        for i in range(0, images, 1000):
            acc.update(scores[i : i + 1000], labels[i : i + 1000])
        value = acc.compute("uniform").unweighted_map
        state = acc.state_dict()
        extra["state_mb"] = sum(t.nbytes for t in state.values() if hasattr(t, "nbytes")) / 2**20
    elif method == "topk_only":
        value = float(torch.topk(torch.from_numpy(scores.T.copy()), 100, dim=1).values.mean())
    elif method == "torchmetrics":
        from torchmetrics.retrieval import RetrievalMAP

        s = torch.from_numpy(np.ascontiguousarray(scores[:, :slice_].T)).flatten()
        t = torch.from_numpy(np.ascontiguousarray(labels[:, :slice_].T)).flatten().bool()
        idx = torch.arange(slice_).repeat_interleave(images)
        value = float(RetrievalMAP(top_k=100)(s, t, indexes=idx))
        scale = classes / slice_
    elif method == "sklearn":
        from sklearn.metrics import average_precision_score

        aps = [average_precision_score(labels[:, c], scores[:, c]) for c in range(slice_)]
        value = float(np.mean(aps))
        scale = classes / slice_
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    peak_mb = (_rss_kb("VmHWM") - base) / 1024
    return {
        "seconds": seconds * scale,
        "measured_seconds": seconds,
        "scale": scale,
        "peak_mb": peak_mb,
        "value": value,
        **extra,
    }


def main() -> None:
    if harness.child_main({"method": run_one}):
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=14_000)
    p.add_argument("--classes", type=int, default=6_000)
    p.add_argument("--slice", type=int, default=200, help="classes run by the slow competitors")
    args = harness.parse_args(p, quick={"images": 2000, "classes": 1000, "slice": 50})
    result = harness.Result(NAME, args)

    def measure(method: str, images: int) -> dict:
        return harness.child(
            NAME, "method", method=method, images=images, classes=args.classes, slice_=args.slice
        )

    m = result.data["machine"]
    result.note(
        f"N={args.images} images x C={args.classes} classes, K=100, "
        f"torch {m['torch']}, {m['torch_threads']} threads"
    )
    rows = {
        "mlc dense": measure("dense", args.images),
        "mlc streaming (batches of 1,000)": measure("streaming", args.images),
        f"mlc streaming, N={args.images // 2}": measure("streaming", args.images // 2),
        "numpy [C, N] copy + torch.topk, for scale": measure("topk_only", args.images),
        "torchmetrics RetrievalMAP(top_k=100)": measure("torchmetrics", args.images),
        "sklearn average_precision_score": measure("sklearn", args.images),
    }
    result.measure(methods=rows)
    dense = rows["mlc dense"]["seconds"]
    table = []
    for name, r in rows.items():
        note = (
            f"{r['measured_seconds']:.2f} s on {args.slice} classes, x{r['scale']:.0f}"
            if r["scale"] != 1
            else ""
        )
        table.append(
            [
                name,
                f"{r['seconds']:.3f}",
                f"{r['seconds'] / dense:.1f}",
                f"{r['peak_mb']:.0f}",
                note,
            ]
        )
    result.table(["method", "seconds", "x dense", "peak extra MB", "note"], table, "lrrrl")
    d, s = rows["mlc dense"], rows["mlc streaming (batches of 1,000)"]
    assert d["value"] == s["value"], "streaming and dense disagree"
    result.note(
        f"dense MAP@100 {d['value']:.6f} == streaming {s['value']:.6f}; "
        f"accumulator state {s['state_mb']:.1f} MB for any N"
    )
    torchmetrics = rows["torchmetrics RetrievalMAP(top_k=100)"]["seconds"] / dense
    sklearn = rows["sklearn average_precision_score"]["seconds"] / dense
    streaming = s["seconds"] / dense
    result.target(dense <= 1.0, f"dense AP@100 <= 1.0 s (got {dense:.3f} s)", dense, 1.0)
    result.target(
        torchmetrics >= 20,
        f">= 20x faster than RetrievalMAP (got {torchmetrics:.1f}x)",
        torchmetrics,
        20,
    )
    result.target(sklearn >= 40, f">= 40x faster than sklearn (got {sklearn:.1f}x)", sklearn, 40)
    result.target(
        streaming <= 2, f"streaming within 2x of dense (got {streaming:.1f}x)", streaming, 2
    )
    result.write()


if __name__ == "__main__":
    main()
