"""Training job throughput (loader + model + optimizer + logging) against the bare model step.

The job: `mlc train` in-process (mlc.train.loop.train) with configs/demo.yaml on the
Fashion-MNIST mosaics (harness.demo_data), xception-tiny at 64x64, batch 64, no validation,
default logging; its samples/s from its own per-window records, the first window left out.
The bare step: the same model, optimizer and loss on in-memory uint8 batches. Every
measurement is a fresh process; each job runs between two bare runs and is judged against
their mean, median over --rounds. Target: the job >= 90% of the bare step's samples/s.

    python -m benchmarks.bench_train [--workers 0,1] [--rounds 1] [--image-size 64]
                                     [--samples 0] [--job-seconds 40] [--bare-seconds 25]
                                     [--data DIR] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import harness

NAME = "bench_train"
CONFIG = harness.ROOT / "configs" / "demo.yaml"
MODEL = "xception-tiny"
BATCH = 64
LOG_EVERY = 5_000  # the default; the job's windows are this long
TARGET = 0.90


def job_config(
    data: str, image_size: int, workers: int, samples: int, out: str, log_every: int = LOG_EVERY
):
    from mlc.config import load_config

    return load_config(
        CONFIG,
        [
            f"data.dataset={data}",
            f"data.image_size={image_size}",
            f"data.num_workers={workers}",
            "data.val_split=null",
            f"data.batch_size={BATCH}",
            f"model.name={MODEL}",
            f"train.samples={samples}",
            f"train.log_every={log_every}",
            "train.checkpoint_every=1000000000",
            f"train.out={out}",
        ],
    )


# ---------------------------------------------------------------- the children
# Each runs in its own process, with the `mlc` command's malloc setting.


def build_model(config, classes: int):
    """The job's model, as `mlc train` builds it."""
    from mlc.models import build_model

    return build_model(config.model, num_classes=classes, in_channels=config.data.channels)


def training_parts(config, classes: int):
    """The job's model, optimizer and loss function, as `mlc train` makes them."""
    from mlc.train.optim import make_optimizer, masked_bce

    model = build_model(config, classes)
    return model, make_optimizer(config, model.parameters()), masked_bce


def train_loader(config):
    """The job's train loader, in this process (num_workers=0)."""
    from mlc.data import ShardLoader

    d = config.data
    settings = replace(d, mode="train", num_workers=0, batch_size=BATCH)
    return ShardLoader.from_dataset(d.dataset, d.train_split, settings)


def run_bare(data: str, image_size: int, seconds: float) -> dict:
    import torch

    from mlc.data import normalize
    from mlc.runtime import keep_freed_memory

    keep_freed_memory()
    config = job_config(data, image_size, 1, BATCH, "unused")
    d = config.data
    classes = harness.classes_count(data)
    torch.manual_seed(config.train.seed)
    model, optimizer, masked_bce = training_parts(config, classes)
    model.train()
    shape = (BATCH, d.channels, d.image_size, d.image_size)
    batches = [
        (
            torch.randint(0, 256, shape, dtype=torch.uint8).contiguous(
                memory_format=torch.channels_last
            ),
            (torch.rand(BATCH, classes) < 0.3).to(torch.uint8),
            torch.ones(BATCH, classes, dtype=torch.uint8),
        )
        for _ in range(8)
    ]

    def step(i: int) -> None:
        raw, targets, mask = batches[i % len(batches)]
        loss = masked_bce(model(normalize(raw)), targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(3):
        step(i)
    steps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        step(steps)
        steps += 1
    return {
        "samples_per_s": steps * BATCH / elapsed,
        "steps": steps,
        "seconds": elapsed,
        "threads": torch.get_num_threads(),
    }


def run_loader(data: str, image_size: int, warmup: int = 10, batches: int = 60) -> dict:
    import torch

    from mlc.runtime import keep_freed_memory

    keep_freed_memory()
    loader = train_loader(job_config(data, image_size, 0, BATCH, "unused"))
    it = iter(loader)
    for _ in range(warmup):  # the shuffle buffer fills during these
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    return {"samples_per_s": batches * BATCH / elapsed, "threads": torch.get_num_threads()}


def run_job(data: str, image_size: int, workers: int, samples: int, log_every: int) -> dict:
    import torch

    from mlc.data import ShardLoader
    from mlc.runtime import keep_freed_memory
    from mlc.train.loop import train

    keep_freed_memory()
    waits: list[tuple[float, float]] = []  # (time the batch arrived, seconds waited for it)
    original = ShardLoader.__iter__

    def timed_iter(self):
        batches = original(self)
        while True:
            t0 = time.time()
            try:
                batch = next(batches)
            except StopIteration:
                return
            t1 = time.time()
            waits.append((t1, t1 - t0))
            yield batch

    ShardLoader.__iter__ = timed_iter  # this child process only
    with tempfile.TemporaryDirectory(prefix="bench_train_") as out:
        config = job_config(data, image_size, workers, samples, out, log_every)
        summary = train(config, log=lambda *a, **k: print(*a, **k, file=sys.stderr))
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").open()]
    windows = [r for r in records if r["kind"] == "train"]
    if len(windows) < 2:
        raise SystemExit(f"only {len(windows)} logging window(s): raise --samples")
    seconds, counted, rates = 0.0, 0, []
    for prev, r in itertools.pairwise(windows):  # the first window is the warm-up
        n = r["samples"] - prev["samples"]
        seconds += n / r["samples_per_s"]
        counted += n
        rates.append(r["samples_per_s"])
    start, end = windows[0]["time"], windows[-1]["time"]
    wait = sum(w for t, w in waits if start < t <= end)
    steps = windows[-1]["step"] - windows[0]["step"]
    return {
        "samples_per_s": counted / seconds,
        "window_rates": rates,
        "first_window": windows[0]["samples_per_s"],
        "summary_samples_per_s": summary["samples_per_s"],
        "summary_seconds": summary["seconds"],
        "samples": summary["samples"],
        "steps": steps,
        "step_ms": 1000 * (end - start) / steps,
        "wait_ms": 1000 * wait / steps,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- the parent


def main() -> None:
    if harness.child_main({"bare": run_bare, "loader": run_loader, "job": run_job}):
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="0,1", help="data.num_workers settings of the job")
    p.add_argument("--rounds", type=int, default=1, help="job runs per setting (median kept)")
    p.add_argument("--image-size", type=int, default=64, help="both sides (the data is 56x56)")
    p.add_argument("--samples", type=int, default=0, help="train.samples (0: from --job-seconds)")
    p.add_argument("--job-seconds", type=float, default=40.0)
    p.add_argument("--bare-seconds", type=float, default=25.0)
    p.add_argument(
        "--log-every", type=int, default=LOG_EVERY, help="train.log_every (quick checks)"
    )
    p.add_argument("--data", help="an `mlc shard` folder (default: harness.demo_data)")
    quick = {"workers": "0", "job_seconds": 5.0, "bare_seconds": 3.0, "log_every": 1000}
    args = harness.parse_args(p, quick=quick)
    result = harness.Result(NAME, args)
    data = str(harness.demo_data(args.data))

    def measure(what: str, **extra) -> dict:
        return harness.child(NAME, what, data=data, image_size=args.image_size, **extra)

    def bare() -> dict:
        return measure("bare", seconds=args.bare_seconds)

    m = result.data["machine"]
    result.note(
        f"{MODEL} at {args.image_size}x{args.image_size} (data: {data}, 56x56 mosaics), "
        f"batch {BATCH}, torch {m['torch']}, torch.get_num_threads() = {m['torch_threads']}"
    )
    first = bare()
    samples = args.samples or max(
        3 * args.log_every,
        math.ceil(first["samples_per_s"] * args.job_seconds / args.log_every) * args.log_every,
    )
    loader = measure("loader")
    workers = [int(w) for w in args.workers.split(",")]
    jobs = [
        lambda w=w: measure("job", workers=w, samples=samples, log_every=args.log_every)
        for w in workers
    ]
    bares, rounds = harness.bracketed(bare, jobs, args.rounds, first=first)
    fastest = max(b["samples_per_s"] for b in bares)
    result.measure(
        bare=bares,
        loader=loader,
        samples=samples,
        jobs=[
            {
                "round": r.number,
                "workers": workers[r.index],
                **r.result,
                "bracket": r.reference("samples_per_s"),
            }
            for r in rounds
        ],
    )

    result.note(
        f"train.samples = {samples} per job; threads in the children: {bares[0]['threads']}"
    )
    table = []
    for i, b in enumerate(bares):
        when = "before the jobs" if i == 0 else f"after job {i}"
        table.append(
            [
                f"bare step {i}, in-memory tensors ({when})",
                f"{b['samples_per_s']:.1f}",
                "-",
                f"{b['samples_per_s'] / fastest:.3f}",
                f"{b['steps']} steps in {b['seconds']:.1f} s",
            ]
        )
    for i, r in enumerate(rounds, 1):
        j, w, bracket = r.result, workers[r.index], r.reference("samples_per_s")
        spread = f"{min(j['window_rates']):.0f}-{max(j['window_rates']):.0f}"
        table.append(
            [
                f"job {i} (round {r.number}), num_workers={w}, "
                f"windows 2-{len(j['window_rates']) + 1}",
                f"{j['samples_per_s']:.1f}",
                f"{j['samples_per_s'] / bracket:.3f}",
                f"{j['samples_per_s'] / fastest:.3f}",
                f"windows {spread}/s; first window {j['first_window']:.0f}/s; whole run "
                f"{j['summary_samples_per_s']:.1f}/s ({j['samples']} samples in "
                f"{j['summary_seconds']:.1f} s, start-up and final checkpoint included)",
            ]
        )
    table.append(
        [
            "loader alone, num_workers=0 (1 process, no model)",
            f"{loader['samples_per_s']:.1f}",
            "-",
            "-",
            f"keeping up with the fastest bare step takes "
            f"{fastest / loader['samples_per_s']:.2f} of a core",
        ]
    )
    result.table(
        ["setting", "samples/s", "x its bare bracket", "x fastest bare", "note"], table, "lrrrl"
    )

    table = []
    for i, r in enumerate(rounds, 1):
        j, w = r.result, workers[r.index]
        rest, bracket_ms = j["step_ms"] - j["wait_ms"], 1000 * BATCH / r.reference("samples_per_s")
        table.append(
            [
                f"job {i}, num_workers={w}",
                f"{j['step_ms']:.1f}",
                f"{j['wait_ms']:.1f}",
                f"{rest:.1f}",
                f"{rest / bracket_ms:.3f} (bracket {bracket_ms:.1f} ms)",
            ]
        )
    result.table(
        [
            "job, measured windows",
            "ms/step",
            "data wait ms/step",
            "rest ms/step",
            "rest / bare bracket step",
        ],
        table,
        "lrrrr",
    )

    for index, w in enumerate(workers):
        mine = [r for r in rounds if r.index == index]
        ratio = harness.median(r.ratio("samples_per_s") for r in mine)
        conservative = harness.median(r.result["samples_per_s"] for r in mine) / fastest
        result.target(
            ratio >= TARGET,
            f"job (num_workers={w}) >= {TARGET:.0%} of the bare step ({ratio:.1%} of its "
            f"bracket, median of {len(mine)} round(s); {conservative:.1%} of the fastest bare "
            "run)",
            ratio,
            TARGET,
        )
    result.write()


if __name__ == "__main__":
    main()
