"""What the benchmarks share: their data, child processes, baseline bracketing, the record of
the machine, and the result files (benchmarks/results/<name>.json, read by benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mlc.dist import free_port
from mlc.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEMO_DATA = ROOT / "runs" / "demo" / "data"  # what `mlc demo` shards
MADE_DATA = ROOT / "runs" / "bench" / "data"  # made here once when the demo's is missing
OPENIMAGES_CLASSES = ROOT.parent / "shared" / "data" / "openimages" / "oidv6-class-descriptions.csv"
RESULT = "RESULT "  # prefix of a child's JSON line on stdout (jobs print their own lines too)
# Instruction-set flags of /proc/cpuinfo that decide which kernels oneDNN and MKL can use.
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


# ---------------------------------------------------------------- arguments


def parse_args(parser: argparse.ArgumentParser, quick: dict, argv=None) -> argparse.Namespace:
    """The parser's arguments plus --quick, which swaps in ``quick`` as defaults: a short run
    to check that the benchmark works, not a measurement (its result file says quick, and
    benchmarks/report.py leaves it out of the docs). Options given explicitly still win."""
    shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"a short check run: {shown}")
    args, _ = parser.parse_known_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- data


def make_jpegs(folder: Path, n: int, unique: int = 120) -> list[Path]:
    """``n`` photo-like 1024x768 JPEGs (smooth fields plus sensor noise, quality 90, ~250-280
    KB each) in ``folder``; files past the first ``unique`` are copies of those (generating
    one costs ~30 ms)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if i >= unique:
            path.write_bytes(paths[i % unique].read_bytes())
            paths.append(path)
            continue
        a, b = rng.uniform(10, 60, 2)
        field = np.sin(x / a + i)[..., None] * 60 + np.cos(y / b)[..., None] * 60 + 128
        noise = rng.normal(0, 10, (768, 1024, 3)).astype(np.float32)
        pixels = np.clip(field + noise + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def _has_splits(folder: Path) -> bool:
    return all(
        (folder / f).is_file() for f in ("classes.json", "train.stats.json", "test.stats.json")
    )


def demo_data(given: str | None = None) -> Path:
    """The Fashion-MNIST mosaics (56x56) that the training and evaluation benchmarks run on:
    ``given`` if set; else runs/demo/data (what `mlc demo` shards) if it has both splits; else
    runs/bench/data, made once by `mlc shard fashion-mnist` (20,000 train and 10,000 test
    mosaics) and kept for the next runs (runs/ is git-ignored)."""
    if given:
        return Path(given)
    for folder in (DEMO_DATA, MADE_DATA):
        if _has_splits(folder):
            return folder
    MADE_DATA.parent.mkdir(parents=True, exist_ok=True)
    print(f"{DEMO_DATA} has no train and test splits: sharding Fashion-MNIST into {MADE_DATA}")
    # Made beside the final folder and renamed into place: an interrupted run leaves no
    # half-made dataset behind for the next one to use.
    with tempfile.TemporaryDirectory(dir=MADE_DATA.parent, prefix=".data-") as tmp:
        out = Path(tmp) / "data"
        run(
            mlc_command(
                "shard",
                "fashion-mnist",
                "--out",
                str(out),
                "--train-count",
                "20000",
                "--test-count",
                "10000",
                "--quiet",
            ),
            timeout=1800,
        )
        shutil.rmtree(MADE_DATA, ignore_errors=True)
        out.rename(MADE_DATA)
    return MADE_DATA


def classes_count(data: str | Path) -> int:
    """Classes of an `mlc shard` folder (its classes.json)."""
    return len(json.loads((Path(data) / "classes.json").read_text())["classes"])


# ---------------------------------------------------------------- processes


def mlc_command(*args: str) -> list[str]:
    """The `mlc` command line with this interpreter (so a checkout's code runs, not an
    installed copy's)."""
    return [sys.executable, "-m", "mlc.cli", *args]


def run(cmd: list[str], env: dict | None = None, timeout: float | None = None):
    """Run ``cmd`` in the repository root, output captured; (the completed process, wall
    seconds). A failure stops the benchmark with the ends of its output."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(
            f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
            f"{done.stderr[-4000:]}"
        )
    return done, wall


# Runs argv[2:] and writes its peak RSS (KB, from wait4) to the file argv[1]; exits with its
# code. A process's peak RSS starts at its parent's RSS when it is forked (the pages it shares
# until its exec count), so the command is forked by this small launcher, not by a benchmark
# that holds gigabytes of test data.
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_with_peak(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` (repository root, output captured): (wall seconds, the peak RSS of that
    process alone in MB, stdout). Not getrusage(RUSAGE_CHILDREN), whose peak is the largest of
    every child waited for so far (a server started earlier, ...), and not the benchmark's own
    fork (see _LAUNCHER); the floor is the launcher's small Python process."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        launcher = [sys.executable, "-c", _LAUNCHER, str(peak_file), *cmd]
        t0 = time.perf_counter()
        done = subprocess.run(launcher, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(
                f"{shlex.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            )
        return wall, int(peak_file.read_text()) / 1024, done.stdout


def child_main(functions: dict[str, Callable[..., dict]], argv=None) -> bool:
    """In a process started by children(): run the function it names on its JSON arguments,
    print the result after RESULT and return True. False in any other process."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "--child":
        return False
    result = functions[argv[1]](**json.loads(argv[2]))
    print(RESULT + json.dumps(result), flush=True)
    return True


def children(benchmark: str, kind: str, count: int = 1, env: dict | None = None, **kwargs):
    """``count`` fresh processes at once, each running ``kind`` of benchmarks.<benchmark> (its
    child_main table) on ``kwargs``: a measurement alone in its process, with nothing left
    over from the others. Their results, in order."""
    cmd = [sys.executable, "-m", f"benchmarks.{benchmark}", "--child", kind, json.dumps(kwargs)]
    running = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    results = []
    for process in running:
        out, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"{benchmark} {kind} failed:\n{out[-2000:]}\n{err[-4000:]}")
        lines = [x for x in out.splitlines() if x.startswith(RESULT)]
        results.append(json.loads(lines[-1][len(RESULT) :]))
    return results


def child(benchmark: str, kind: str, env: dict | None = None, **kwargs) -> dict:
    return children(benchmark, kind, 1, env, **kwargs)[0]


# ---------------------------------------------------------------- bracketing


@dataclass
class Round:
    """One measurement with the baseline runs just before and just after it."""

    number: int  # 1, 2, ...: the round
    index: int  # which of the measurements
    result: dict
    before: dict
    after: dict

    def reference(self, key: str) -> float:
        return (self.before[key] + self.after[key]) / 2

    def ratio(self, key: str, baseline_key: str | None = None) -> float:
        """The measurement's ``key`` over the mean of the baseline's ``baseline_key`` (the same
        key by default) on either side."""
        return self.result[key] / self.reference(baseline_key or key)


def bracketed(
    baseline: Callable[[], dict],
    measurements: Sequence[Callable[[], dict]],
    rounds: int,
    first: dict | None = None,
) -> tuple[list[dict], list[Round]]:
    """baseline, measurement, baseline, measurement, ..., baseline: ``rounds`` rounds over the
    measurements, each run between two baseline runs (``first``: one already taken, used as
    the first). These 2-core machines drift by 10-20% within minutes, more than a target's
    margin; the ratio to the mean of the baseline runs either side cancels a steady drift,
    and median() over rounds ignores a disturbed one. Returns (every baseline run, the rounds)."""
    baselines = [first if first is not None else baseline()]
    out = []
    for number in range(1, rounds + 1):
        for index, measure in enumerate(measurements):
            result = measure()
            baselines.append(baseline())
            out.append(Round(number, index, result, baselines[-2], baselines[-1]))
    return baselines, out


def median(values) -> float:
    return statistics.median(list(values))


# ---------------------------------------------------------------- the machine


def _proc(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _field(text: str, name: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def machine() -> dict:
    """What the figures depend on: the CPU and its instruction sets, cores, memory, Python,
    torch and its threads, and how busy the machine was when the run started."""
    import torch

    cpuinfo = _proc("/proc/cpuinfo")
    flags = set((_field(cpuinfo, "flags") or "").split())
    memory_kb = (_field(_proc("/proc/meminfo"), "MemTotal") or "0 kB").split()[0]
    return {
        "cpu": _field(cpuinfo, "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(memory_kb) / 2**20, 1),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "system": platform.platform(),
        "load_average": list(os.getloadavg()),
    }


def describe(m: dict) -> str:
    """One line for the docs: CPU, cores, memory, Python, torch, instruction sets."""
    isa = " ".join(m["isa"]) or "none listed"
    amx = "" if any(f.startswith("amx") for f in m["isa"]) else ", no AMX"
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, Python "
        f"{'.'.join(m['python'].split('.')[:2])}, torch {m['torch']}; ISA {isa}{amx}"
    )


def _commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------- results


def shown(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column, l or r (l by default)."""
    align = align.ljust(len(columns), "l")
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Result:
    """What one run of a benchmark found, printed as it comes and written by write() to
    benchmarks/results/<name>.json: the command, date, commit and machine; the tables and the
    targets as printed (benchmarks/report.py renders them into docs/benchmarks.md); notes;
    and the raw measurements."""

    def __init__(self, name: str, args: argparse.Namespace, argv=None):
        argv = sys.argv[1:] if argv is None else argv
        self.name = name
        self.started = time.perf_counter()
        self.data: dict = {
            "benchmark": name,
            "command": shlex.join(["python", "-m", f"benchmarks.{name}", *argv]),
            "quick": bool(getattr(args, "quick", False)),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(),
            "machine": machine(),
            "args": vars(args),
            "tables": [],
            "targets": [],
            "notes": [],
            "measurements": {},
        }

    def table(
        self, columns: Sequence[str], rows: Sequence[Sequence], align: str = "", title: str = ""
    ) -> str:
        """Record a table (cells as they should read) and print it."""
        rows = [[str(c) for c in row] for row in rows]
        self.data["tables"].append(
            {"title": title, "columns": list(columns), "align": align, "rows": rows}
        )
        text = markdown_table(columns, rows, align)
        print(f"\n{title}\n{text}" if title else f"\n{text}", flush=True)
        return text

    def target(
        self, met: bool, text: str, value: float | None = None, target: float | None = None
    ) -> None:
        """Record and print a target's verdict: ``text`` says what it is and what was got."""
        self.data["targets"].append(
            {"met": bool(met), "text": text, "value": value, "target": target}
        )
        print(f"{'met' if met else 'MISSED'}: {text}", flush=True)

    def note(self, text: str) -> None:
        """Record and print a line the figures need beside them (data, a disturbed run)."""
        self.data["notes"].append(text)
        print(text, flush=True)

    def measure(self, **values) -> None:
        """Record raw measurements (JSON values) under their names."""
        self.data["measurements"].update(values)

    def write(self) -> Path:
        self.data["seconds"] = round(time.perf_counter() - self.started, 1)
        self.data["load_average_end"] = list(os.getloadavg())
        path = RESULTS / f"{self.name}.json"
        atomic_write_json(path, self.data)  # never a half-written result file
        print(f"\nresult: {shown(path)}" + (" (quick run)" if self.data["quick"] else ""))
        return path


# ---------------------------------------------------------------- a local S3 API server


def _wait_until_answering(endpoint: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=5).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local server did not start on {endpoint}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def _server_process(*args: str):
    """``python -m ARGS`` ("{port}" in them: a free port), quiet, until it answers on
    127.0.0.1; yields its URL; stops it afterwards."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", *(a.format(port=port) for a in args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_answering(endpoint, server)
        yield endpoint
    finally:
        server.terminate()
        server.wait()


def null_s3_endpoint():
    """benchmarks.null_s3 (takes an s3fs put, discards the bytes) in its own process, bound to
    127.0.0.1; yields its URL."""
    return _server_process("benchmarks.null_s3", "{port}")


@contextlib.contextmanager
def local_s3_server():
    """moto's standalone S3 server in its own process, bound to 127.0.0.1, with its endpoint
    and dummy keys in this process's environment (so child processes reach it too, and nothing
    reaches a real cloud endpoint); yields the endpoint URL. The tests' S3 fixtures
    (tests/conftest.py) and bench_shard use it."""
    with _server_process("moto.server", "-H", "127.0.0.1", "-p", "{port}") as endpoint:
        settings = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
        }
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
