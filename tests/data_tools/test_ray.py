"""`mlc shard --distributor ray`: on a local Ray with 2 CPUs, the output folder equals a
single-process run's, file for file and byte for byte (bookkeeping included); a task that
fails (an OSError, a worker that dies) is retried and resumes, and the output is still the
same; --partition, --strict and a refused re-run behave as without Ray; a missing ray package
is one line naming mlc[ray].

One Ray is started for the module (4 s) and used by every test but the first, which runs the
command as a user does: in its own process, starting and stopping its own Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from data_tools.catalog import FileLoader
from data_tools.distribute import RayShardWriter, task_partitions
from data_tools.merge import merge_split
from data_tools.sources.openimages import read_openimages
from data_tools.writer import ShardOptions, write_split
from mlc.cli import main

from .conftest import image_id, make_openimages

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
SHARD_SIZE = 4  # 30 candidates -> 8 shards


def shard(data, out, *extra) -> int:
    return main(["shard", *data.args(out, "--shard-size", SHARD_SIZE, *extra)])


def folder_digests(out: Path) -> dict[str, str]:
    """sha256 of every file under ``out`` (shards, manifest, stats, report, sizes.json,
    _info.json, classes.json, and the bookkeeping in _parts/), by relative path."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ref(oi, tmp_path_factory) -> Path:
    """A single-process run (no Ray) into a folder named "out", as every run below: _info.json
    names its folder. Read-only."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert shard(oi, out) == 0
    return out


@pytest.fixture(scope="module")
def ray_session(request):
    """A local Ray with 2 CPUs for the module, started as `mlc shard` starts one (token in the
    environment, no dashboard, Ray's output kept out of the tests'). The local S3 server's
    settings are put in the environment first, when it can run: Ray's worker processes take
    the environment of ray.init."""
    with contextlib.suppress(pytest.skip.Exception):
        request.getfixturevalue("s3_server")
    with RayShardWriter(cpus=2) as writer:
        yield writer


def test_the_command_starts_a_local_ray_and_writes_what_one_process_writes(oi, ref, tmp_path):
    out = tmp_path / "out"
    args = [*oi.args(out, "--shard-size", SHARD_SIZE), "--distributor", "ray", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "mlc.cli", "shard", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # nothing from Ray: no log lines, no warnings
    assert done.stdout.splitlines()[-1] == f"wrote {out}"
    assert folder_digests(out) == folder_digests(ref)


def test_task_partitions_split_a_partition_into_disjoint_parts():
    assert task_partitions((0, 1), 100, 2) == [(m, 8) for m in range(8)]
    assert task_partitions((0, 1), 3, 2) == [(0, 3), (1, 3), (2, 3)]  # no task without shards
    assert task_partitions((0, 1), 0, 2) == [(0, 1)]  # one task still writes the plan
    for partition, shards in (((1, 3), 50), ((0, 2), 7), ((2, 3), 2)):
        parts = task_partitions(partition, shards, 2)
        covered = sorted(j for i, p in parts for j in range(i, shards, p))
        assert covered == list(range(partition[0], shards, partition[1]))


def test_ray_partition_then_local_partition_then_merge(oi, ref, ray_session, tmp_path):
    out = tmp_path / "out"
    assert shard(oi, out, "--distributor", "ray", "--partition", "0/2") == 0
    assert shard(oi, out, "--partition", "1/2") == 0
    assert main(["shard", "merge", "--out", str(out), "--split", "train"]) == 0
    assert folder_digests(out) == folder_digests(ref)


def test_ray_tasks_write_into_s3_what_one_process_writes_locally(oi, ref, ray_session, s3_bucket):
    import fsspec

    url = f"{s3_bucket}/out"
    assert shard(oi, url, "--distributor", "ray") == 0
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    written = {
        path[len(root) + 1 :]: hashlib.sha256(fs.cat_file(path)).hexdigest()
        for path in fs.find(root)
    }
    assert written == folder_digests(ref)


@dataclass(frozen=True)
class FlakyLoader:
    """Reads files like FileLoader, but the first load of ``fails`` (in any process) raises an
    OSError or kills its process; the marker file says it happened."""

    root: str
    fails: str = field(repr=False)
    marker: str = field(repr=False)
    crash: bool = field(repr=False, default=False)

    def load(self, locator: str) -> bytes:
        if locator == self.fails:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                if self.crash:
                    os._exit(1)
                raise OSError(f"injected failure reading {locator}")
        return FileLoader(self.root).load(locator)


@pytest.mark.parametrize("crash", [False, True], ids=["oserror", "worker-dies"])
def test_a_failed_task_is_retried_and_the_output_is_the_same(oi, ray_session, tmp_path, crash):
    catalog = read_openimages(oi.classes, [oi.labels], oi.images, None, oi.rotation)
    fails = sorted(catalog.table["locator"].to_pylist())[3]
    marker = tmp_path / "failed-once"
    loader = FlakyLoader(str(oi.images), fails, str(marker), crash)
    catalog = dataclasses.replace(catalog, loader=loader)
    options = ShardOptions(shard_size=SHARD_SIZE)

    # What one process writes (the failure already spent: it reads every image).
    marker.touch()
    ref = tmp_path / "ref" / "out"
    write_split(catalog, ref, "train", options, progress=False)
    merge_split(ref, "train")

    marker.unlink()
    out = tmp_path / "ray" / "out"
    skips = ray_session.write_split(catalog, out, "train", options, progress=False)
    assert marker.is_file()  # the failure happened, and the task was run again
    assert skips.total == 3  # in the shards (image 28, without known labels, is the catalog's)
    merge_split(out, "train")
    assert folder_digests(out) == folder_digests(ref)


def test_strict_refuses_as_without_ray_and_resumes_once_fixed(tmp_path, ray_session, capsys):
    data = make_openimages(tmp_path / "data", clean=True)
    path = data.images / f"{image_id(3)}.jpg"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    local, out = tmp_path / "local" / "out", tmp_path / "ray" / "out"
    assert shard(data, local, "--strict") == 1
    expected = capsys.readouterr().err.replace(str(local), str(out))
    assert shard(data, out, "--strict", "--distributor", "ray") == 1
    assert capsys.readouterr().err == expected
    assert not list(out.glob("train*"))  # nothing published

    path.write_bytes(good)
    assert shard(data, local, "--strict") == 0
    assert shard(data, out, "--strict", "--distributor", "ray") == 0
    assert folder_digests(out) == folder_digests(local)


def test_a_rerun_with_other_options_is_refused_in_one_line(oi, ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard(oi, out, "--partition", "0/2") == 0
    capsys.readouterr()
    assert shard(oi, out, "--distributor", "ray", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "written from other inputs or options" in err


def test_without_ray_one_line_names_the_extra(oi, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "out"
    assert shard(oi, out, "--distributor", "ray") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "mlc shard: error: --distributor ray needs the ray package: pip install 'mlc[ray]'"
    ]
    assert not out.exists()  # refused before reading anything


def test_ray_address_needs_the_ray_distributor(oi, tmp_path, capsys):
    assert shard(oi, tmp_path / "out", "--ray-address", "auto") == 2
    assert "--ray-address needs --distributor ray" in capsys.readouterr().err


def test_a_memory_out_is_refused(oi, capsys):
    assert shard(oi, "memory://ds", "--distributor", "ray") == 2
    assert "memory:// is private to a process" in capsys.readouterr().err


def test_on_shard_reports_each_shard_once(oi, tmp_path):
    catalog = read_openimages(oi.classes, [oi.labels], oi.images, None, oi.rotation)
    options = ShardOptions(shard_size=SHARD_SIZE)
    seen = []
    write_split(catalog, tmp_path, "train", options, progress=False, on_shard=_append(seen))
    assert sorted(name for name, _, _ in seen) == [f"train-{j:06d}.tar" for j in range(8)]
    assert sum(images for _, images, _ in seen) == 30
    assert not any(kept for _, _, kept in seen)
    again = []
    write_split(
        catalog, tmp_path, "train", options, (1, 2), progress=False, on_shard=_append(again)
    )
    assert [(n, k) for n, _, k in again] == [(f"train-{j:06d}.tar", True) for j in (1, 3, 5, 7)]


def _append(seen: list):
    return lambda *args: seen.append(args)


class _Cluster:
    """ray's nodes() of a cluster of ``n`` live nodes."""

    def __init__(self, n: int):
        self.n = n

    def nodes(self):
        return [{"Alive": True}] * self.n + [{"Alive": False}]


@pytest.mark.parametrize(
    "nodes, out, warned",
    [(1, "data/out", False), (2, "data/out", True), (2, "s3://bucket/out", False)],
)
def test_a_local_out_on_a_cluster_of_several_nodes_is_warned_about(nodes, out, warned, capsys):
    writer = RayShardWriter()
    writer.ray = _Cluster(nodes)
    writer._warn_if_not_shared(out)
    err = capsys.readouterr().err
    assert ("is a local folder and the Ray cluster has 2 nodes" in err) == warned
