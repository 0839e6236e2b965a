"""Training job throughput (loader + model + optimizer + logging) against the bare model step.

    python benchmarks/bench_train.py [--workers 0,1] [--rounds 1] [--image-size 64] [--samples 0]
                                     [--job-seconds 40] [--bare-seconds 25] [--data DIR]

The job is mlc.train.loop.train(load_config("configs/demo.yaml", overrides)) on the Fashion-MNIST
mosaic dataset (56x56 PGMs; runs/demo/data if it has a train split, else `mlc shard
fashion-mnist` of 20,000 + 1,000 images into a temporary folder) with model.name=xception-tiny,
data.image_size=64 (the loader's random crop is resized up to 64x64), train.batch_size=64,
data.num_workers from --workers (the demo's is 0), data.val_split=null (no validation),
log_every 5000 (the default: the normal logging is in the measurement), checkpoint_every
10^9 (only the final checkpoint, written after the last measured window). train.samples is a
multiple of 5000 sized from the bare step's rate for about --job-seconds, at least 15,000 (3
logging windows).

Job samples/s: from the per-window samples_per_s records of <out>/metrics.jsonl (each window is
timed by the job itself from one log line to the next); the first window (DataLoader worker
start-up, the shuffle buffer filling, the first steps) is left out and the later windows are
combined as their samples over their seconds. The job's own summary figure (whole run: start-up
and the final checkpoint included) is printed beside it. While the job runs, the time its main
process waits in next() on the loader is recorded (ShardLoader.__iter__ wrapped in the job's
process), so each step splits into data wait and the rest (copy, normalize, forward, loss,
backward, optimizer, logging).

The bare step: the job's model (create_model with the job's config: xception-tiny, 10 classes,
64x64 input, channels_last), make_optimizer with the job's config (AdamW), masked_bce, on
in-memory random uint8 [64, 3, 64, 64] channels_last batches (8 of them, cycled) normalised by
mlc.data.normalize every step, random multi-hot targets and an all-ones mask (the mosaic data is
fully annotated); 3 untimed warm-up steps, then steps for at least --bare-seconds. It runs
before the first job and after every job, so each job sits between two bare runs: its reference
is their mean (this machine's speed drifts by up to 10% over minutes; the bracket cancels a
steady drift, and the target is judged on it). The ratio to the fastest bare run of the whole
benchmark is printed beside it (the conservative figure). With --rounds R the sequence of jobs
runs R times (bare, job, bare, job, ..., bare) and each setting's verdict is the median of its
rounds. For scale, the loader alone (num_workers=0, in one process, no model) gives the data
pipeline's samples/s on one core.

Every measurement runs in its own fresh subprocess of this one run (as in bench_map.py). torch's
intra-op threads are left at their default (2 on this 2-core machine); DataLoader workers are
extra processes that share those cores with the job's main process, which is part of what is
measured. Target: the job at >= 90% of the bare step's samples/s (<= 10% overhead).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = ROOT / "runs" / "demo" / "data"
MODEL = "xception-tiny"
BATCH = 64
LOG_EVERY = 5_000  # the default; the job's windows are this long
TARGET = 0.90
RESULT = "RESULT "  # prefix of a child's JSON line on stdout (the job prints its log lines too)


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
            f"model.name={MODEL}",
            f"train.batch_size={BATCH}",
            f"train.samples={samples}",
            f"train.log_every={log_every}",
            "train.checkpoint_every=1000000000",
            f"train.out={out}",
        ],
    )


# ---------------------------------------------------------------- the children


def run_bare(data: str, image_size: int, seconds: float) -> dict:
    import torch

    from mlc.data import normalize
    from mlc.train.loop import build_model, make_optimizer, masked_bce

    config = job_config(data, image_size, 1, BATCH, "unused")
    d = config.data
    classes = len(json.loads((Path(data) / "classes.json").read_text())["classes"])
    torch.manual_seed(config.train.seed)
    model = build_model(config, classes)
    optimizer = make_optimizer(config, model.parameters())
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

    from mlc.data import ShardLoader
    from mlc.train.loop import loader_config

    config = job_config(data, image_size, 0, BATCH, "unused")
    d = config.data
    loader = ShardLoader.from_dataset(
        d.dataset, d.train_split, replace(loader_config(config, "train"), num_workers=0)
    )
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
    from mlc.train.loop import train

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


def find_data(arg: str | None, tmp: str) -> str:
    if arg:
        return arg
    if (DEMO_DATA / "train.stats.json").is_file() and (DEMO_DATA / "classes.json").is_file():
        return str(DEMO_DATA)
    from mlc.cli import main

    out = str(Path(tmp) / "data")
    print(f"{DEMO_DATA} has no train split: sharding Fashion-MNIST into {out}")
    main(["shard", "fashion-mnist", "--out", out, "--train-count", "20000"]
         + ["--test-count", "1000", "--quiet"])  # fmt: skip
    return out


def main() -> None:
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
    p.add_argument("--data", help="an `mlc shard` folder (default: runs/demo/data or a new one)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one measurement in this process
    p.add_argument("--num-workers", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        from mlc.runtime import keep_freed_memory

        keep_freed_memory()  # as the `mlc` command runs
        if args.run == "bare":
            result = run_bare(args.data, args.image_size, args.bare_seconds)
        elif args.run == "loader":
            result = run_loader(args.data, args.image_size)
        elif args.run == "job":
            result = run_job(
                args.data, args.image_size, args.num_workers, args.samples, args.log_every
            )
        else:
            raise SystemExit(f"unknown measurement {args.run}")
        print(RESULT + json.dumps(result))
        return

    import torch

    with tempfile.TemporaryDirectory(prefix="bench_train_data_") as tmp:
        data = find_data(args.data, tmp)

        def measure(what: str, **extra) -> dict:
            cmd = [sys.executable, __file__, "--run", what, "--data", data]
            cmd += ["--image-size", str(args.image_size), "--bare-seconds", str(args.bare_seconds)]
            for key, value in extra.items():
                cmd += [f"--{key.replace('_', '-')}", str(value)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
            lines = [x for x in done.stdout.splitlines() if x.startswith(RESULT)]
            return json.loads(lines[-1][len(RESULT) :])

        print(
            f"{MODEL} at {args.image_size}x{args.image_size} (data: {data}, 56x56 mosaics), "
            f"batch {BATCH}, torch {torch.__version__}, torch.get_num_threads() = "
            f"{torch.get_num_threads()}"
        )
        bare = [measure("bare")]
        samples = args.samples or max(
            3 * args.log_every,
            math.ceil(bare[0]["samples_per_s"] * args.job_seconds / args.log_every)
            * args.log_every,
        )
        loader = measure("loader")
        workers = [int(w) for w in args.workers.split(",")]
        jobs = []  # (round, workers, result, bracket): bare, job, bare, job, ..., bare
        for r in range(1, args.rounds + 1):
            for w in workers:
                job = measure("job", num_workers=w, samples=samples, log_every=args.log_every)
                bare.append(measure("bare"))
                bracket = (bare[-2]["samples_per_s"] + bare[-1]["samples_per_s"]) / 2
                jobs.append((r, w, job, bracket))
    fastest = max(b["samples_per_s"] for b in bare)

    print(f"train.samples = {samples} per job; threads in the children: {bare[0]['threads']}")
    print(
        "\n| setting | samples/s | x its bare bracket | x fastest bare | note |"
        "\n|---|---:|---:|---:|---|"
    )
    for i, b in enumerate(bare):
        when = "before the jobs" if i == 0 else f"after job {i}"
        print(
            f"| bare step {i}, in-memory tensors ({when}) | {b['samples_per_s']:.1f} | - | "
            f"{b['samples_per_s'] / fastest:.3f} | {b['steps']} steps in {b['seconds']:.1f} s |"
        )
    for i, (r, w, j, bracket) in enumerate(jobs, 1):
        spread = f"{min(j['window_rates']):.0f}-{max(j['window_rates']):.0f}"
        print(
            f"| job {i} (round {r}), num_workers={w}, windows 2-{len(j['window_rates']) + 1} | "
            f"{j['samples_per_s']:.1f} | {j['samples_per_s'] / bracket:.3f} | "
            f"{j['samples_per_s'] / fastest:.3f} | windows {spread}/s; first window "
            f"{j['first_window']:.0f}/s; whole run {j['summary_samples_per_s']:.1f}/s "
            f"({j['samples']} samples in {j['summary_seconds']:.1f} s, start-up and final "
            "checkpoint included) |"
        )
    print(
        f"| loader alone, num_workers=0 (1 process, no model) | {loader['samples_per_s']:.1f} | "
        f"- | - | keeping up with the fastest bare step takes "
        f"{fastest / loader['samples_per_s']:.2f} of a core |"
    )

    print(
        "\n| job, measured windows | ms/step | data wait ms/step | rest ms/step | "
        "rest / bare bracket step |\n|---|---:|---:|---:|---:|"
    )
    for i, (_, w, j, bracket) in enumerate(jobs, 1):
        rest, bracket_ms = j["step_ms"] - j["wait_ms"], 1000 * BATCH / bracket
        print(
            f"| job {i}, num_workers={w} | {j['step_ms']:.1f} | {j['wait_ms']:.1f} | "
            f"{rest:.1f} | {rest / bracket_ms:.3f} (bracket {bracket_ms:.1f} ms) |"
        )

    for w in workers:
        mine = [(j["samples_per_s"], bracket) for _, v, j, bracket in jobs if v == w]
        ratio = statistics.median(rate / bracket for rate, bracket in mine)
        conservative = statistics.median(rate for rate, _ in mine) / fastest
        print(
            f"{'met' if ratio >= TARGET else 'MISSED'}: job (num_workers={w}) >= "
            f"{TARGET:.0%} of the bare step ({ratio:.1%} of its bracket, median of "
            f"{len(mine)} round(s); {conservative:.1%} of the fastest bare run)"
        )


if __name__ == "__main__":
    main()
