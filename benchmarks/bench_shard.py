"""`mlc shard` throughput against a plain tarfile copy and a minimal re-encode loop, one run.

On generated photo-like 1024x768 JPEGs: pass-through (verify=decode, verify=structure) against
Python's tarfile adding the same files to one tar, and --max-side 512 against a single-core
loop of open + draft + resize + JPEG encode, with 1 and 2 workers; pass-through into s3:// on a
local S3 server (moto) against the same into a local folder, with s3fs puts of the same files
to that server and to a null endpoint (benchmarks/null_s3.py) beside them; then the peak memory of
`mlc shard openimages` on a generated label CSV (images absent: the label pipeline and the
writer's bookkeeping). Targets: pass-through (verify=structure) >= 80% of the tarfile copy;
--max-side 512 >= 80% of the loop per worker; s3:// >= 80% of the local folder; peak memory
<= 2 GB at 1M label rows.

    python -m benchmarks.bench_shard [--images 2000] [--csv-rows 1000000] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import harness
from data_tools.catalog import Catalog, FileLoader, catalog_table
from data_tools.merge import merge_split
from data_tools.writer import ShardOptions, write_split

NAME = "bench_shard"
TARGET_COPY = 0.80  # pass-through, verify=structure, 2 workers: of the tarfile copy
TARGET_LOOP = 0.80  # --max-side 512: of the minimal loop, per worker
TARGET_RAY = 0.90  # --distributor ray, 2 CPUs: of the pool of 2 workers (start apart)
TARGET_S3 = 0.80  # pass-through into the local S3 server, 2 workers: of the same into a folder
TARGET_PEAK_MB = 2048
SHARD_SIZE = 100


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


def file_catalog(paths: list[Path]) -> Catalog:
    """The files as a catalog of one class (every image positive)."""
    ids = [p.stem for p in paths]
    table = catalog_table(ids, [p.name for p in paths], [[0]] * len(ids), [[]] * len(ids))
    return Catalog(["c"], ["c"], table, FileLoader(str(paths[0].parent)), "full", len(ids))


def mlc_shard(paths: list[Path], out: Path, workers: int, **options) -> float:
    catalog = file_catalog(paths)
    t0 = time.perf_counter()
    write_split(
        catalog,
        out,
        "train",
        ShardOptions(shard_size=SHARD_SIZE, **options),
        workers=workers,
        progress=False,
    )
    return len(paths) / (time.perf_counter() - t0)


# ---------------------------------------------------------------- Ray against the pool


def distributed(kind: str, src: str, out: str, images: int, cpus: int, max_side: int) -> dict:
    """In a fresh process (harness.children): the first ``images`` files of ``src`` written
    with --max-side ``max_side`` by a pool of ``cpus`` processes (kind "pool") or by the tasks
    of a local Ray with ``cpus`` CPUs (kind "ray"), then published. Ray's start (ray.init) and
    shutdown are timed apart from the writing, which is timed from the call that hands the
    shards out to the return of the last one (the pool's start, and the Ray workers' first
    imports, are in it)."""
    from data_tools.distribute import RayShardWriter

    catalog = file_catalog(sorted(Path(src).glob("*.jpg"))[:images])
    options = ShardOptions(shard_size=SHARD_SIZE, max_side=max_side)
    times = {"start_s": 0.0, "shutdown_s": 0.0}
    if kind == "pool":
        t0 = time.perf_counter()
        write_split(catalog, out, "train", options, workers=cpus, progress=False)
        times["seconds"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        with RayShardWriter(cpus=cpus) as writer:
            t1 = time.perf_counter()
            writer.write_split(catalog, out, "train", options, progress=False)
            t2 = time.perf_counter()
        times.update(start_s=t1 - t0, seconds=t2 - t1, shutdown_s=time.perf_counter() - t2)
    merge_split(out, "train")
    return {**times, "images_per_s": images / times["seconds"]}


def folder_digest(folder: Path) -> str:
    """One sha256 over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- S3 output against a local disk


@contextlib.contextmanager
def local_s3_bucket():
    """A bucket on a local S3 server (harness.local_s3_server): s3://bench."""
    import s3fs

    with harness.local_s3_server():
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        yield "s3://bench"


def object_digest(url: str) -> str:
    """folder_digest of a folder in an object store."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    digest = hashlib.sha256()
    for key in sorted(fs.find(root)):
        digest.update(key[len(root) + 1 :].encode() + b"\0" + fs.cat_file(key))
    return digest.hexdigest()


def s3_against_local(result: harness.Result, paths: list[Path], tmp: Path, rounds: int):
    """Rounds of local, S3, upload, local, ...: `mlc shard`'s pass-through (verify=structure,
    2 workers) into the local S3 server against the same into a local folder, each timed from
    the call to the published split; the same bytes both ways. The upload (s3fs ``put`` of the
    last local output folder, concurrent requests from one client) shows what the server takes
    in at best: it runs on the same 2 cores, a handicap a real S3 does not have. Returns the
    median ratios to the local folder and to the upload."""
    digests, local_outputs = [], []

    def run(where: str, root: str) -> dict:
        out = f"{root}/out-{len(digests)}/ds"  # the same folder name: _info.json names it
        catalog = file_catalog(paths)
        options = ShardOptions(shard_size=SHARD_SIZE, verify="structure")
        t0 = time.perf_counter()
        write_split(catalog, out, "train", options, workers=2, progress=False)
        merge_split(out, "train")
        seconds = time.perf_counter() - t0
        if where == "local":
            local_outputs.append(out)
            digests.append(folder_digest(Path(out)))
        else:
            digests.append(object_digest(out))
        return {"seconds": seconds, "images_per_s": len(paths) / seconds}

    def upload(bucket: str, endpoint: str | None = None) -> dict:
        import s3fs

        options = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        fs = s3fs.S3FileSystem(**options)  # one instance per endpoint (fsspec's cache)
        t0 = time.perf_counter()
        fs.put(local_outputs[-1], f"{bucket}/upload-{len(digests)}", recursive=True)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "images_per_s": len(paths) / seconds}

    with local_s3_bucket() as bucket, harness.null_s3_endpoint() as null:
        locals_, rounds_ = harness.bracketed(
            lambda: run("local", str(tmp)),
            [lambda: run("s3", bucket), lambda: upload(bucket), lambda: upload(bucket, null)],
            rounds,
        )
    if len(set(digests)) != 1:
        raise SystemExit(
            f"the S3 output differs from the local folder: {len(set(digests))} digests"
        )
    s3_runs = [r.result for r in rounds_ if r.index == 0]
    uploads = [r.result for r in rounds_ if r.index == 1]
    null_uploads = [r.result for r in rounds_ if r.index == 2]
    null_ratio = harness.median(r.ratio("images_per_s") for r in rounds_ if r.index == 2)
    ratio = harness.median(r.ratio("images_per_s") for r in rounds_ if r.index == 0)
    to_upload = harness.median(
        s["images_per_s"] / u["images_per_s"] for s, u in zip(s3_runs, uploads, strict=True)
    )
    local_rate = harness.median(x["images_per_s"] for x in locals_)
    s3_rate = harness.median(r["images_per_s"] for r in s3_runs)
    upload_rate = harness.median(r["images_per_s"] for r in uploads)
    null_rate = harness.median(r["images_per_s"] for r in null_uploads)
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    result.measure(
        s3={
            "images": len(paths),
            "megabytes": megabytes,
            "local": locals_,
            "s3": s3_runs,
            "upload": uploads,
            "null_upload": null_uploads,
            "ratio": ratio,
            "ratio_to_upload": to_upload,
            "null_upload_ratio": null_ratio,
        }
    )
    result.table(
        ["run", "images/s", "MB/s", "vs local", "vs upload"],
        [
            [
                "mlc shard into a local folder (baseline)",
                f"{local_rate:.0f}",
                f"{local_rate * megabytes / len(paths):.0f}",
                "",
                "",
            ],
            [
                "mlc shard into s3:// (local S3 server)",
                f"{s3_rate:.0f}",
                f"{s3_rate * megabytes / len(paths):.0f}",
                f"{ratio:.0%}",
                f"{to_upload:.0%}",
            ],
            [
                "s3fs put of the local output (the server's intake)",
                f"{upload_rate:.0f}",
                f"{upload_rate * megabytes / len(paths):.0f}",
                "",
                "",
            ],
            [
                "s3fs put of the same to a null endpoint (discards it: any server's ceiling)",
                f"{null_rate:.0f}",
                f"{null_rate * megabytes / len(paths):.0f}",
                f"{null_ratio:.0%}",
                "",
            ],
        ],
        "lrrrr",
        title=f"pass-through (verify=structure, 2 workers) into S3 against a local folder: "
        f"{len(paths)} images ({megabytes:.0f} MB), shards of {SHARD_SIZE}, published; medians "
        f"of {rounds} round(s), each S3 run and upload between two local runs, the same bytes "
        "both ways; the S3 server (moto) and the null endpoint (benchmarks/null_s3.py) run on "
        "the same cores",
    )
    return ratio, to_upload, null_ratio


def ray_against_pool(result: harness.Result, src: Path, tmp: Path, images: int, rounds: int):
    """Rounds of pool, Ray, pool, ...: Ray's images/s over the mean of the pool runs either
    side (harness.bracketed); every output folder byte-identical. Returns the median ratio."""
    cpus, max_side, runs = 2, 512, []

    def run(kind: str) -> dict:
        out = tmp / f"{kind}-{len(runs)}" / "out"  # the same folder name: _info.json names it
        measured = harness.child(
            NAME, kind, src=str(src), out=str(out), images=images, cpus=cpus, max_side=max_side
        )
        measured["digest"] = folder_digest(out)
        shutil.rmtree(out.parent)
        runs.append((kind, measured))
        return measured

    pools, rounds_ = harness.bracketed(lambda: run("pool"), [lambda: run("ray")], rounds)
    digests = {m["digest"] for _, m in runs}
    if len(digests) != 1:
        raise SystemExit(
            f"--distributor ray wrote other bytes than the pool: {len(digests)} digests"
        )
    ratio = harness.median(r.ratio("images_per_s") for r in rounds_)
    rays = [r.result for r in rounds_]
    start = harness.median(r["start_s"] for r in rays)
    shutdown = harness.median(r["shutdown_s"] for r in rays)
    pool_rate = harness.median(p["images_per_s"] for p in pools)
    ray_rate = harness.median(r["images_per_s"] for r in rays)
    pool_s = harness.median(p["seconds"] for p in pools)
    ray_s = harness.median(r["seconds"] for r in rays)
    with_start = pool_s / (ray_s + start + shutdown)
    result.measure(
        ray={
            "images": images,
            "cpus": cpus,
            "max_side": max_side,
            "pool": pools,
            "ray": rays,
            "ratio": ratio,
            "ratio_with_start": with_start,
        }
    )
    result.table(
        ["run", "CPUs", "seconds", "images/s", "vs pool"],
        [
            [
                "pool of processes (`--workers 2`, baseline)",
                cpus,
                f"{pool_s:.2f}",
                f"{pool_rate:.0f}",
                "",
            ],
            [
                "Ray tasks (`--distributor ray --workers 2`)",
                cpus,
                f"{ray_s:.2f}",
                f"{ray_rate:.0f}",
                f"{ratio:.0%}",
            ],
            [
                "Ray's start + shutdown (ray.init, ray.shutdown)",
                "",
                f"{start:.2f} + {shutdown:.2f}",
                "",
                "",
            ],
            [
                "Ray tasks, start and shutdown included",
                cpus,
                f"{ray_s + start + shutdown:.2f}",
                f"{images / (ray_s + start + shutdown):.0f}",
                f"{with_start:.0%}",
            ],
        ],
        "lrrrr",
        title=f"--distributor ray against the pool: {images} images, --max-side {max_side}, "
        f"shards of {SHARD_SIZE}, the same shards; medians of {rounds} round(s), each Ray run "
        "between two pool runs, every output folder byte-identical",
    )
    return ratio, with_start


def label_csv_peak_memory(rows: int, folder: Path) -> tuple[float, float]:
    """Peak RSS (MB) and seconds of `mlc shard openimages` on a generated CSV of ``rows`` rows
    (the real class list when shared/ has it)."""
    real = harness.OPENIMAGES_CLASSES
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
    cmd = harness.mlc_command(
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
    )
    seconds, peak, _ = harness.run_with_peak(cmd)
    return peak, seconds


def main() -> None:
    if harness.child_main(
        {
            "pool": functools.partial(distributed, "pool"),
            "ray": functools.partial(distributed, "ray"),
        }
    ):
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--ray-images", type=int, default=6000)
    p.add_argument("--ray-rounds", type=int, default=2)
    p.add_argument("--s3-rounds", type=int, default=3)
    p.add_argument("--csv-rows", type=int, default=1_000_000)
    args = harness.parse_args(
        p,
        quick={
            "images": 240,
            "ray_images": 400,
            "ray_rounds": 1,
            "s3_rounds": 1,
            "csv_rows": 50_000,
        },
    )
    result = harness.Result(NAME, args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        paths = harness.make_jpegs(tmp / "src", args.images)
        size_kb = np.mean([p.stat().st_size for p in paths]) / 1024
        machine = result.data["machine"]
        result.note(
            f"{args.images} JPEGs 1024x768, {size_kb:.0f} KB average, {machine['cores']} cores "
            f"(load average {machine['load_average'][0]:.1f} at the start: other work running "
            "lowers the 2-worker figures)"
        )
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
        result.measure(
            runs=[
                {"run": name, "workers": w, "images_per_s": rate, "ratio": ratio}
                for name, w, rate, ratio in rows
            ]
        )
        table = []
        for name, workers, rate, ratio in rows:
            shown = ["", ""] if ratio is None else [f"{ratio:.0%}", f"{ratio / workers:.0%}"]
            table.append([name, workers, f"{rate:.0f}", *shown])
        result.table(["run", "workers", "images/s", "vs baseline", "per worker"], table, "lrrrr")
        s3_ratio, s3_to_upload, null_ratio = s3_against_local(result, paths, tmp, args.s3_rounds)
        harness.make_jpegs(tmp / "src", args.ray_images)  # the same files, more copies
        ray_ratio, ray_with_start = ray_against_pool(
            result, tmp / "src", tmp, args.ray_images, args.ray_rounds
        )
        (tmp / "csv").mkdir()
        peak, seconds = label_csv_peak_memory(args.csv_rows, tmp / "csv")
        result.measure(label_csv={"rows": args.csv_rows, "peak_mb": peak, "seconds": seconds})
    ratios = {(name, w): ratio for name, w, _, ratio in rows}
    structure = ratios["mlc pass-through, verify=structure", 2]
    result.target(
        structure >= TARGET_COPY,
        f"pass-through (verify=structure), 2 workers >= {TARGET_COPY:.0%} of the tarfile copy "
        f"(got {structure:.0%})",
        structure,
        TARGET_COPY,
    )
    for workers in (1, 2):
        resize = ratios["mlc --max-side 512", workers] / workers
        result.target(
            resize >= TARGET_LOOP,
            f"--max-side 512, {workers} worker(s) >= {TARGET_LOOP:.0%} of the minimal loop per "
            f"worker (got {resize:.0%})",
            resize,
            TARGET_LOOP,
        )
    result.target(
        s3_ratio >= TARGET_S3,
        f"pass-through into s3:// (local S3 server), 2 workers >= {TARGET_S3:.0%} of the same "
        f"into a local folder (got {s3_ratio:.0%}; {s3_to_upload:.0%} of an s3fs put of the same "
        f"files; an s3fs put to a null endpoint reaches {null_ratio:.0%} of the local folder)",
        s3_ratio,
        TARGET_S3,
    )
    result.target(
        ray_ratio >= TARGET_RAY,
        f"--distributor ray, 2 CPUs >= {TARGET_RAY:.0%} of the pool of 2 workers writing the "
        f"same shards, Ray's start and shutdown apart (got {ray_ratio:.0%}; "
        f"{ray_with_start:.0%} with them)",
        ray_ratio,
        TARGET_RAY,
    )
    result.target(
        peak <= TARGET_PEAK_MB,
        f"mlc shard openimages on a {args.csv_rows:,}-row label CSV: peak RSS <= "
        f"{TARGET_PEAK_MB} MB (got {peak:.0f} MB, {seconds:.1f} s)",
        peak,
        TARGET_PEAK_MB,
    )
    result.write()


if __name__ == "__main__":
    main()
