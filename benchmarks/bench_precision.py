"""`mlc demo` in fp32 and in bf16 autocast, side by side in one run: does bf16 train as well, and
is the demo faster end to end? It decides what `train.precision: auto` picks on a CPU with
bf16 instructions (mlc.accel.CPU_AUTO_BF16).

The Fashion-MNIST mosaics are sharded once; then each precision runs the demo's training and
evaluation (`mlc.demo.run_demo`, `--set train.precision=P`) in a fresh process, in the order
given. The figures are fwMAP@100 on the test split with its 95% bootstrap interval, and the
training and evaluation seconds. Targets: bf16's fwMAP@100 inside fp32's interval, and bf16's
training + evaluation faster than fp32's.

    python -m benchmarks.bench_precision [--samples 150000] [--precisions fp32,bf16]
                                         [--out runs/bench/precision] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from benchmarks import harness

NAME = "bench_precision"
FULL = (60_000, 10_000)  # the demo's mosaics (train, test)
QUICK = (2_000, 1_000)


def shard(out: str, train: int, test: int) -> dict:
    from data_tools.sources.fashion_mnist import DEFAULT_ROOT
    from mlc.demo import build_dataset

    counts = {"train": train, "test": test}
    build_dataset(Path(out), "fashion-mnist", counts, DEFAULT_ROOT, 2, progress=False)
    return {}


def demo(out: str, data: str, precision: str, samples: int | None, train: int, test: int) -> dict:
    """One demo run on the sharded ``data`` (linked into ``out``, so the shard stage only checks
    it); its stage times and evaluation summary."""
    from mlc.accel import resolve_precision
    from mlc.demo import run_demo
    from mlc.runtime import keep_freed_memory

    keep_freed_memory()  # as the `mlc` command runs
    folder = Path(out)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    name = "data" if (train, test) == FULL else f"data-fashion-mnist-{train}-{test}"
    (folder / name).symlink_to(Path(data).resolve(), target_is_directory=True)
    result = run_demo(
        folder,
        "fashion-mnist",
        train_count=train,
        test_count=test,
        samples=samples,
        overrides=[f"train.precision={precision}"],
        progress=False,
        log=lambda *a, **k: None,
    )
    if "summary" not in result:  # stopped by a signal before its evaluation
        raise SystemExit(f"the {precision} demo stopped: {result['train']['stopped_by']}")
    s = result["summary"]
    resolved = resolve_precision(precision, torch.device("cpu"))
    return {
        "precision": str(resolved),
        "times": result["times"],
        "fwmap": s["weighted_map_at_k"],
        "interval": s["confidence_intervals"]["weighted_map_at_k"],
        "samples_per_s": result["train"]["samples_per_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=None, help="training samples (demo's: 150000)")
    p.add_argument("--precisions", default="fp32,bf16", help="in this order")
    p.add_argument("--out", default=str(harness.ROOT / "runs" / "bench" / "precision"))
    args = harness.parse_args(p, quick={"samples": 3_000})
    train, test = QUICK if args.quick else FULL
    result = harness.Result(NAME, args)
    m = result.data["machine"]
    result.note(
        f"{m['cpu']}, {m['torch_threads']} torch threads, ISA: {' '.join(m['isa']) or '?'}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; load average at the "
        f"start {' '.join(f'{x:.2f}' for x in m['load_average'])}"
    )
    data = Path(args.out) / "data"
    if not (data / f"data-{train}-{test}.done").is_file():
        shutil.rmtree(data, ignore_errors=True)
        harness.child(NAME, "shard", out=str(data), train=train, test=test)
        (data / f"data-{train}-{test}.done").touch()
    runs = {}
    for precision in args.precisions.split(","):
        runs[precision] = harness.child(
            NAME,
            "demo",
            out=str(Path(args.out) / precision),
            data=str(data),
            precision=precision,
            samples=args.samples,
            train=train,
            test=test,
        )
        r = runs[precision]
        print(f"{precision}: fwMAP@100 {r['fwmap']:.4f}, {r['times']}", flush=True)
    result.measure(runs=runs)
    rows = []
    for r in runs.values():
        t = r["times"]
        low, high = r["interval"]
        rows.append(
            [
                r["precision"],
                f"{r['fwmap']:.4f} [{low:.4f}, {high:.4f}]",
                f"{r['samples_per_s']:.0f}",
                f"{t['train']:.1f}",
                f"{t['eval']:.1f}",
                f"{t['train'] + t['eval']:.1f}",
            ]
        )
    result.table(
        [
            "precision",
            "fwMAP@100 [95% CI]",
            "training samples/s",
            "train s",
            "eval s",
            "train + eval s",
        ],
        rows,
        "lrrrrr",
    )
    if {"fp32", "bf16"} <= runs.keys():
        fp32, bf16 = runs["fp32"], runs["bf16"]
        low, high = fp32["interval"]
        result.target(
            low <= bf16["fwmap"] <= high,
            f"bf16 fwMAP@100 inside fp32's 95% interval (got {bf16['fwmap']:.4f} against "
            f"[{low:.4f}, {high:.4f}])",
            bf16["fwmap"],
        )
        seconds = {k: r["times"]["train"] + r["times"]["eval"] for k, r in runs.items()}
        speedup = seconds["fp32"] / seconds["bf16"]
        result.target(
            speedup > 1,
            f"bf16 training + evaluation faster than fp32 (got {speedup:.2f}x: "
            f"{seconds['bf16']:.1f} s against {seconds['fp32']:.1f} s)",
            speedup,
            1.0,
        )
    result.write()


if __name__ == "__main__":
    if not harness.child_main({"shard": shard, "demo": demo}):
        main()
