"""The GPU path in one run: the model alone, the CPU loader alone, and the whole `mlc train` job.

On generated photo-like 1024x768 JPEGs (harness.make_jpegs) sharded by data_tools, at 299x299,
with the precision `auto` picks on the GPU (bf16 autocast, or fp16 on GPUs without bf16):

- model only: `xception` training steps (uint8 batch on the device -> normalize -> forward ->
  masked BCE -> backward -> SGD) and folded-batch-norm inference, channels_last, eager and
  torch.compile; images/s, TFLOP/s and model FLOP utilisation (MFU) against the GPU's dense
  bf16 peak (PEAK_BF16_TFLOPS, by device name, or --peak-tflops);
- the loader alone: mlc.data.ShardLoader in train mode (CPU decode) with 1 and N workers,
  images/s and per worker;
- the job: `mlc train` on the same shards (no validation), its images/s from its own log
  windows (the first left out), as a fraction of the model-only training step.

Targets: the job >= 90% of the model-only step; the loader with N workers >= 1.1x the model's
training images/s (below it, the CPU decode cannot feed the GPU: a GPU JPEG decode is needed).
The MFU figures are recorded, not judged.

    python -m benchmarks.bench_gpu [--batch 128] [--workers N] [--images 4096]
                                   [--job-seconds 60] [--peak-tflops T] [--skip-compile]
                                   [--quick]

Without a CUDA GPU only --quick runs (xception-tiny at 64x64 on the CPU, a few steps): it
checks that the script works and says that its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import harness

NAME = "bench_gpu"
CLASSES = 1000
TARGET_JOB = 0.90  # of the model-only training step's images/s
TARGET_LOADER = 1.1  # x the model-only training images/s

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by a part
# of torch.cuda.get_device_name(); the first match wins (so the longer names come first).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def gpu_peak(name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU by its torch name, None when not listed."""
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in name), None)


# ---------------------------------------------------------------- the model alone


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, batch: int, warmup: int, min_iters: int, min_seconds: float) -> float:
    """images/s of ``fn`` (one batch per call) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    iters, t0 = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - t0 < min_seconds:
        fn()
        iters += 1
        if iters % 5 == 0 or iters >= min_iters:
            synchronize(device)
    synchronize(device)
    return batch * iters / (time.perf_counter() - t0)


def model_rates(args, device, precision, flops: dict) -> list[dict]:
    """Training and inference images/s of the model alone, eager and compiled."""
    from mlc.data import normalize
    from mlc.models import create_model
    from mlc.models.fuse import fold_batch_norm
    from mlc.train.optim import masked_bce

    torch.manual_seed(0)
    base = create_model(args.model, num_classes=CLASSES)  # channels_last
    pixels = torch.randint(0, 256, (args.batch, args.image_size, args.image_size, 3))
    images = pixels.to(torch.uint8).to(device).permute(0, 3, 1, 2)  # NHWC storage, as a Batch
    targets = (torch.rand(args.batch, CLASSES, device=device) < 0.01).to(torch.uint8)
    mask = torch.ones_like(targets)
    settings = ["eager"] + ([] if args.skip_compile else ["torch.compile"])
    rows = []
    for mode in ("train", "infer"):
        for setting in settings:
            t0 = time.perf_counter()
            model = copy.deepcopy(base).to(device)
            if mode == "infer":
                model = fold_batch_norm(model).eval()
            forward = torch.compile(model) if setting == "torch.compile" else model
            if mode == "train":
                model.train()
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                scaler = torch.amp.GradScaler("cuda", enabled=precision.scaled)

                def step(forward=forward, optimizer=optimizer, scaler=scaler):
                    with precision.autocast(device):
                        logits = forward(normalize(images))
                    loss = masked_bce(logits, targets, mask)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
            else:

                def step(forward=forward):
                    with torch.inference_mode(), precision.autocast(device):
                        forward(normalize(images))

            first = time.perf_counter()
            step()  # the first call (compiles)
            synchronize(device)
            first = time.perf_counter() - first
            rate = timed(step, device, args.batch, args.warmup, args.min_iters, args.min_seconds)
            tflops = rate * flops[mode] / 1e12
            rows.append({"mode": mode, "setting": setting, "images_per_s": rate, "tflops": tflops})
            rows[-1]["first_call_s"] = first
            print(
                f"  model {mode} {setting}: {rate:.1f} images/s, {tflops:.2f} TFLOP/s "
                f"(first call {first:.1f} s, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            model = forward = step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def model_flops(model_name: str, image_size: int) -> dict:
    """FLOPs per image: forward (inference) and forward + backward (training), counted on the
    CPU in fp32 (bench_model.count_flops: convolutions and matrix products)."""
    from benchmarks.bench_model import count_flops
    from mlc.models import create_model

    model = create_model(model_name, num_classes=CLASSES)
    x = torch.randn(2, 3, image_size, image_size)
    y = (torch.rand(2, CLASSES) < 0.01).float()
    forward, total, _ = count_flops(model, x, y)
    return {"infer": forward / 2, "train": total / 2}


# ---------------------------------------------------------------- data, the loader alone


def make_dataset(folder: Path, images: int, shard_size: int) -> Path:
    """``images`` generated 1024x768 JPEGs with 8 random labels of CLASSES each, as an `mlc
    shard` dataset with a train split."""
    from data_tools.catalog import Catalog, FileLoader, catalog_table
    from data_tools.merge import merge_split
    from data_tools.writer import ShardOptions, write_split

    sources = folder / "jpegs"
    sources.mkdir(parents=True)
    files = harness.make_jpegs(sources, min(images, 120))
    rng = np.random.default_rng(1)
    ids = [f"img{i:06d}" for i in range(images)]
    locators = [files[i % len(files)].name for i in range(images)]
    labels = [rng.choice(CLASSES, 8, replace=False).tolist() for _ in range(images)]
    table = catalog_table(ids, locators, [x[:3] for x in labels], [x[3:] for x in labels])
    class_ids = [f"c{i}" for i in range(CLASSES)]
    catalog = Catalog(class_ids, class_ids, table, FileLoader(str(sources)), "partial", images)
    data = folder / "data"
    options = ShardOptions(shard_size=shard_size, verify="structure")
    write_split(catalog, data, "train", options, workers=os.cpu_count() or 1, progress=False)
    merge_split(data, "train")
    return data


def loader_rate(data: Path, args, workers: int, seconds: float) -> float:
    """images/s of the train-mode ShardLoader (CPU decode) with ``workers`` processes, timed
    from its first batch."""
    from mlc.config import LoaderConfig
    from mlc.data import ShardLoader

    settings = LoaderConfig(
        batch_size=args.batch,
        image_size=args.image_size,
        num_workers=workers,
        shuffle_buffer=256,
    )
    loader = ShardLoader.from_dataset(data, "train", settings)
    batches = iter(loader)
    next(batches)
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        images += len(next(batches).keys)
    rate = images / (time.perf_counter() - t0)
    del batches  # ends the workers
    return rate


# ---------------------------------------------------------------- the job


def job_rate(data: Path, args, workers: int, samples: int, out: Path) -> dict:
    """`mlc train` on ``data``: its images/s over its log windows after the first."""
    every = max(args.batch, samples // 8 // args.batch * args.batch)
    sets = [
        f"data.dataset={data}",
        "data.val_split=null",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={workers}",
        "data.shuffle_buffer=256",
        f"model.name={args.model}",
        "optim.name=sgd",
        f"train.samples={samples}",
        f"train.log_every={every}",
        "train.checkpoint_every=1000000000",
        "train.tensorboard=false",
        f"train.out={out}",
    ]
    command = harness.mlc_command("train", *[x for s in sets for x in ("--set", s)])
    _, wall = harness.run(command, timeout=1800)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["kind"] == "train"][1:]
    summary = next(r for r in records if r["kind"] == "summary")
    rate = harness.median(r["samples_per_s"] for r in windows) if windows else None
    return {
        "images_per_s": rate,
        "windows": len(windows),
        "wall_s": wall,
        "precision": summary.get("precision"),
        "device": summary.get("device"),
    }


# ---------------------------------------------------------------- main


QUICK = {
    "model": "xception-tiny",
    "image_size": 64,
    "batch": 16,
    "images": 256,
    "shard_size": 64,
    "workers": 1,
    "warmup": 1,
    "min_iters": 2,
    "min_seconds": 0.5,
    "loader_seconds": 2.0,
    "job_seconds": 5.0,
    "skip_compile": True,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="xception", help="an mlc.models preset")
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--batch", type=int, default=128, help="images per step (model, loader, job)")
    cpus = len(os.sched_getaffinity(0))
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, cpus - 2),
        help="loader processes for the loader and the job (default: cores - 2, leaving one for "
        "the training process and one for the rest)",
    )
    p.add_argument("--images", type=int, default=4096, help="images in the generated shards")
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first call")
    p.add_argument("--min-iters", type=int, default=20, help="timed steps, at least")
    p.add_argument("--min-seconds", type=float, default=10.0, help="timed seconds, at least")
    p.add_argument("--loader-seconds", type=float, default=20.0)
    p.add_argument("--job-seconds", type=float, default=60.0, help="the job's length, roughly")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: table)")
    p.add_argument("--skip-compile", action="store_true", help="leave out torch.compile")
    args = harness.parse_args(p, quick=QUICK)
    from mlc.accel import resolve_device, resolve_precision
    from mlc.runtime import keep_freed_memory

    keep_freed_memory()  # as the `mlc` command runs
    device = resolve_device("auto")
    if device.type != "cuda" and not args.quick:
        raise SystemExit(
            "bench_gpu measures a CUDA GPU and torch sees none: run it on a GPU machine "
            "(benchmarks/gpu_check.sh); --quick checks on a CPU that the script works"
        )
    precision = resolve_precision("auto", device)
    result = harness.Result(NAME, args)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or gpu_peak(name)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        result.note(
            f"GPU: {name} (compute capability {capability}), torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}; {cpus} CPU cores; precision {precision}; dense bf16 peak "
            + (f"{peak:g} TFLOP/s" if peak else "unknown (--peak-tflops): no MFU")
        )
    else:
        peak = None
        result.note(
            f"NOT GPU FIGURES: a --quick check on the CPU ({result.data['machine']['cpu']}, "
            f"{cpus} cores; precision {precision}) that the script runs; nothing for the docs"
        )
    result.note(
        f"{args.model} at {args.image_size}x{args.image_size}, batch {args.batch}, {CLASSES} "
        f"classes; {args.images} generated 1024x768 JPEGs in shards of {args.shard_size}"
    )

    flops = model_flops(args.model, args.image_size)
    print(
        f"{flops['infer'] / 1e9:.2f} GFLOP/image forward, {flops['train'] / 1e9:.2f} training",
        flush=True,
    )
    models = model_rates(args, device, precision, flops)
    train = next(r for r in models if (r["mode"], r["setting"]) == ("train", "eager"))

    def mfu(tflops: float) -> str:
        return f"{100 * tflops / peak:.1f}%" if peak else "-"

    result.table(
        ["mode", "setting", "images/s", "TFLOP/s", "MFU (dense bf16 peak)", "first call s"],
        [
            [
                r["mode"],
                r["setting"],
                f"{r['images_per_s']:.1f}",
                f"{r['tflops']:.2f}",
                mfu(r["tflops"]),
                f"{r['first_call_s']:.1f}",
            ]
            for r in models
        ],
        "llrrrr",
        title=f"The model alone ({precision.name}, channels_last)",
    )

    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        t0 = time.perf_counter()
        data = make_dataset(Path(tmp), args.images, args.shard_size)
        print(f"{args.images} images sharded in {time.perf_counter() - t0:.0f} s", flush=True)
        loaders = []
        for workers in sorted({1, args.workers}):
            rate = loader_rate(data, args, workers, args.loader_seconds)
            loaders.append({"workers": workers, "images_per_s": rate})
            print(f"  loader, {workers} worker(s): {rate:.1f} images/s", flush=True)
        samples = int(train["images_per_s"] * args.job_seconds) // args.batch * args.batch
        samples = max(samples, 4 * args.batch)
        job = job_rate(data, args, args.workers, samples, Path(tmp) / "job")
        print(f"  job: {job}", flush=True)

    result.table(
        ["workers", "images/s", "per worker", "x model training"],
        [
            [
                r["workers"],
                f"{r['images_per_s']:.1f}",
                f"{r['images_per_s'] / r['workers']:.1f}",
                f"{r['images_per_s'] / train['images_per_s']:.2f}",
            ]
            for r in loaders
        ],
        "rrrr",
        title="The loader alone (train mode, CPU decode)",
    )
    fraction = job["images_per_s"] / train["images_per_s"] if job["images_per_s"] else None
    result.table(
        ["workers", "samples", "images/s", "of the model-only step", "precision"],
        [
            [
                args.workers,
                samples,
                f"{job['images_per_s']:.1f}" if job["images_per_s"] else "-",
                f"{fraction:.0%}" if fraction else "-",
                job["precision"],
            ]
        ],
        "rrrrl",
        title="The job (`mlc train`, no validation)",
    )
    result.measure(flops_per_image=flops, model=models, loader=loaders, job=job, peak=peak)
    best = max(loaders, key=lambda r: r["workers"])
    ratio = best["images_per_s"] / train["images_per_s"]
    result.target(
        fraction is not None and fraction >= TARGET_JOB,
        f"the job >= {TARGET_JOB:.0%} of the model-only training step (got "
        + (f"{fraction:.0%})" if fraction else "no figure)"),
        fraction,
        TARGET_JOB,
    )
    result.target(
        ratio >= TARGET_LOADER,
        f"the loader with {best['workers']} workers >= {TARGET_LOADER}x the model's training "
        f"images/s (got {ratio:.2f}x)",
        ratio,
        TARGET_LOADER,
    )
    if peak:
        for r in models:
            result.note(f"MFU, {r['mode']} {r['setting']}: {mfu(r['tflops'])}")
    result.write()


if __name__ == "__main__":
    main()
