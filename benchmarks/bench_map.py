"""MAP@100 at FastEval14k scale: mlc's dense and streaming paths against torchmetrics and sklearn.

    python benchmarks/bench_map.py [--images 14000] [--classes 6000] [--slice 200]

Every method runs in its own fresh subprocess of this one run (same data, same seed), so its time
and its peak memory above the data it is given are measured alone and the ratios share the
machine's state. torchmetrics RetrievalMAP(top_k=100) (one query per class) and sklearn
average_precision_score (per class) run on the first --slice classes and are extrapolated
linearly to all classes: both cost time proportional to the number of classes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=14_000)
    p.add_argument("--classes", type=int, default=6_000)
    p.add_argument("--slice", type=int, default=200, help="classes run by the slow competitors")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one method in this process
    args = p.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.images, args.classes, args.slice)))
        return

    def measure(method: str, images: int) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--run",
            method,
            "--images",
            str(images),
            "--classes",
            str(args.classes),
            "--slice",
            str(args.slice),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    import torch

    print(
        f"N={args.images} images x C={args.classes} classes, K=100, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = {
        "mlc dense": measure("dense", args.images),
        "mlc streaming (batches of 1,000)": measure("streaming", args.images),
        f"mlc streaming, N={args.images // 2}": measure("streaming", args.images // 2),
        "numpy [C, N] copy + torch.topk, for scale": measure("topk_only", args.images),
        "torchmetrics RetrievalMAP(top_k=100)": measure("torchmetrics", args.images),
        "sklearn average_precision_score": measure("sklearn", args.images),
    }
    dense = rows["mlc dense"]["seconds"]
    print("| method | seconds | x dense | peak extra MB | note |\n|---|---:|---:|---:|---|")
    for name, r in rows.items():
        note = (
            f"{r['measured_seconds']:.2f} s on {args.slice} classes, x{r['scale']:.0f}"
            if r["scale"] != 1
            else ""
        )
        print(
            f"| {name} | {r['seconds']:.3f} | {r['seconds'] / dense:.1f} | "
            f"{r['peak_mb']:.0f} | {note} |"
        )
    d, s = rows["mlc dense"], rows["mlc streaming (batches of 1,000)"]
    assert d["value"] == s["value"], "streaming and dense disagree"
    print(
        f"dense MAP@100 {d['value']:.6f} == streaming {s['value']:.6f}; "
        f"accumulator state {s['state_mb']:.1f} MB for any N"
    )
    targets = [
        ("dense AP@100 <= 1.0 s", dense <= 1.0),
        (
            ">= 20x faster than RetrievalMAP",
            rows["torchmetrics RetrievalMAP(top_k=100)"]["seconds"] / dense >= 20,
        ),
        (
            ">= 40x faster than sklearn",
            rows["sklearn average_precision_score"]["seconds"] / dense >= 40,
        ),
        ("streaming within 2x of dense", s["seconds"] <= 2 * dense),
    ]
    for name, ok in targets:
        print(f"{'met' if ok else 'MISSED'}: {name}")


if __name__ == "__main__":
    main()
