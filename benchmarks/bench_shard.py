"""`mlc shard` throughput against a plain tarfile copy and a minimal re-encode loop, one run.

    python benchmarks/bench_shard.py [--images 2000] [--csv-rows 1000000]

On generated 1024x768 JPEGs (photo-like: smooth fields plus sensor noise, ~280 KB each):
- baseline "tarfile copy": Python's tarfile adding the same files to one tar (the I/O floor);
- baseline "minimal loop": open, draft, resize to 512 max side, encode JPEG q90, single core;
- mlc pass-through (verify=decode and verify=structure) and --max-side 512, 1 and 2 workers.
Then the peak memory of `mlc shard openimages` on a generated 1M-row label CSV (images absent,
so the run measures the label pipeline and the writer's bookkeeping), in a child process.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.catalog import Catalog, FileLoader, catalog_table  # noqa: E402
from data_tools.writer import ShardOptions, write_split  # noqa: E402


def make_jpegs(folder: Path, n: int, unique: int = 120) -> list[Path]:
    """n files, copies of ``unique`` generated images (generating each costs ~30 ms)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
    paths = []
    for i in range(n):
        if i >= unique:
            path = folder / f"{i:06d}.jpg"
            path.write_bytes(paths[i % unique].read_bytes())
            paths.append(path)
            continue
        a, b = rng.uniform(10, 60, 2)
        field = np.sin(x / a + i)[..., None] * 60 + np.cos(y / b)[..., None] * 60 + 128
        noise = rng.normal(0, 10, (768, 1024, 3)).astype(np.float32)
        pixels = np.clip(field + noise + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def tarfile_copy(paths: list[Path], out: Path) -> float:
    t0 = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for p in paths:
            tar.add(p, arcname=p.name)
    return len(paths) / (time.perf_counter() - t0)


def minimal_loop(paths: list[Path], max_side: int = 512) -> float:
    t0 = time.perf_counter()
    for p in paths:
        im = Image.open(p)
        scale = max_side / max(im.size)
        size = (round(im.width * scale), round(im.height * scale))
        im.draft("RGB", size)
        im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        im.save(io.BytesIO(), "JPEG", quality=90)
    return len(paths) / (time.perf_counter() - t0)


def mlc_shard(paths: list[Path], out: Path, workers: int, **options) -> float:
    ids = [p.stem for p in paths]
    table = catalog_table(ids, [p.name for p in paths], [[0]] * len(ids), [[]] * len(ids))
    catalog = Catalog(["c"], ["c"], table, FileLoader(str(paths[0].parent)), "full", len(ids))
    t0 = time.perf_counter()
    write_split(
        catalog,
        out,
        "train",
        ShardOptions(shard_size=100, **options),
        workers=workers,
        progress=False,
    )
    return len(paths) / (time.perf_counter() - t0)


def label_csv_peak_memory(rows: int, folder: Path) -> tuple[float, float]:
    """Peak RSS (MB) and seconds of `mlc shard openimages` on a generated CSV of ``rows`` rows."""
    real = ROOT.parent / "shared" / "data" / "openimages" / "oidv6-class-descriptions.csv"
    classes = folder / "classes.csv"
    if real.is_file():
        classes.write_bytes(real.read_bytes())
        ids = [line.split(",")[0] for line in real.read_text().splitlines()]
    else:
        ids = [f"/m/0x{i:05x}" for i in range(20_000)]
        classes.write_text("".join(f"{c},Class {i}\n" for i, c in enumerate(ids)))
    rng = np.random.default_rng(1)
    images = rng.integers(0, rows // 7, rows)
    cls = np.minimum(rng.zipf(1.3, rows) - 1, len(ids) - 1)
    conf = rng.integers(0, 2, rows)
    labels = folder / "labels.csv"
    with labels.open("w") as f:
        f.write("ImageID,Source,LabelName,Confidence\n")
        for i, c, k in zip(images, cls, conf, strict=True):
            f.write(f"{i:016x},verification,{ids[c]},{k}\n")
    cmd = [
        sys.executable,
        "-m",
        "mlc.cli",
        "shard",
        "openimages",
        "--classes",
        str(classes),
        "--labels",
        str(labels),
        "--images",
        str(folder / "no-images"),
        "--out",
        str(folder / "out"),
        "--quiet",
        "--shard-size",
        "5000",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--csv-rows", type=int, default=1_000_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        paths = make_jpegs(tmp / "src", args.images)
        size_kb = np.mean([p.stat().st_size for p in paths]) / 1024
        print(f"{args.images} JPEGs 1024x768, {size_kb:.0f} KB average, {os.cpu_count()} cores")
        copy = tarfile_copy(paths, tmp / "copy.tar")
        loop = minimal_loop(paths)
        rows = [
            ("tarfile copy (baseline)", 1, copy, None),
            ("minimal re-encode loop", 1, loop, None),
        ]
        runs = [
            ("pass-through, verify=decode", {"verify": "decode"}, copy),
            ("pass-through, verify=structure", {"verify": "structure"}, copy),
            ("--max-side 512", {"max_side": 512}, loop),
        ]
        for name, options, baseline in runs:
            for workers in (1, 2):
                out = tmp / f"out-{len(rows)}"
                rate = mlc_shard(paths, out, workers, **options)
                rows.append((f"mlc {name}", workers, rate, rate / baseline))
        print("| run | workers | images/s | vs baseline | per worker |\n|---|---:|---:|---:|---:|")
        for name, workers, rate, ratio in rows:
            shown = "| |" if ratio is None else f"| {ratio:.0%} | {ratio / workers:.0%} |"
            print(f"| {name} | {workers} | {rate:.0f} {shown}")
        (tmp / "csv").mkdir()
        peak, seconds = label_csv_peak_memory(args.csv_rows, tmp / "csv")
        print(
            f"mlc shard openimages on a {args.csv_rows:,}-row label CSV: peak RSS "
            f"{peak:.0f} MB, {seconds:.1f} s (target <= 2048 MB)"
        )


if __name__ == "__main__":
    main()
