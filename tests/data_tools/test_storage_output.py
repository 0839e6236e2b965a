"""`mlc shard` into object storage and from inputs by URL, against a real S3 API server on
localhost (moto's standalone server, through s3fs: the client path users take) and memory://.

What a local run writes is the reference: an s3:// or memory:// run must give the same files,
byte for byte, bookkeeping in _parts/ included; a run killed with SIGKILL and run again must
give the same objects as an uninterrupted run, and never show a half-written shard."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import zlib
from pathlib import Path

import pytest

from data_tools.catalog import Skip, UrlLoader, image_loader
from mlc.cli import main

from .conftest import make_openimages
from .test_writer import REPO, SHARD_SIZE, many_images

pytest.importorskip("s3fs")


def s3():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def local_files(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` by its name relative to ``out``."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def remote_files(url: str) -> dict[str, bytes]:
    """Every object under ``url`` (any fsspec protocol) by its name relative to ``url``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    root = root.rstrip("/")
    paths = fs.find(root)
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in sorted(paths)}


def differences(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    """The names that differ (missing, extra, or other bytes): a readable assertion."""
    return sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))


def shard(data, out, *extra) -> int:
    return main(["shard", *data.args(out, "--shard-size", SHARD_SIZE, *extra)])


@pytest.fixture(scope="module")
def local_ref(oi, tmp_path_factory) -> dict[str, bytes]:
    """Every file of a local run into a folder named "ds" (the URLs below end in /ds too, so
    even _info.json's name is the same)."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    assert shard(oi, out) == 0
    return local_files(out)


# ---------------------------------------------------------------- output


def test_s3_output_equals_a_local_run(oi, local_ref, s3_bucket, capsys):
    url = f"{s3_bucket}/ds"
    assert shard(oi, url, "--workers", "2") == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {url}"
    got = remote_files(url)
    assert differences(got, local_ref) == []
    assert any(name.startswith("_parts/train/") for name in got)  # the bookkeeping, as locally
    assert not os.path.exists("s3:")  # no local folder named after the URL


def test_memory_output_equals_a_local_run(oi, local_ref, tmp_path, capsys):
    url = f"memory://{uuid.uuid4().hex}/ds"
    assert shard(oi, url) == 0
    assert differences(remote_files(url), local_ref) == []
    capsys.readouterr()
    # Each worker process would write into its own copy of memory://: refused up front.
    assert shard(oi, f"memory://{uuid.uuid4().hex}/ds", "--workers", "2") == 2
    assert "memory:// is private to a process" in capsys.readouterr().err


@pytest.mark.parametrize(
    "out, message",
    [
        ("http://127.0.0.1:9/ds", "http:// locations are read-only"),
        ("https://example.org/ds", "https:// locations are read-only"),
        ("nosuchprotocol://b/ds", "Protocol not known"),
    ],
)
def test_an_output_that_cannot_be_written_stops_before_any_work(
    tmp_path, monkeypatch, capsys, out, message
):
    monkeypatch.chdir(tmp_path)
    args = ["shard", "openimages", "--classes", "nope.csv", "--labels", "nope.csv"]
    args += ["--images", "nope", "--out", out, "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err  # not "nope.csv: no such file"
    assert list(tmp_path.iterdir()) == []  # nothing written locally either
    merge = ["shard", "merge", "--out", out, "--split", "train"]
    assert main(merge) == 2
    assert message in capsys.readouterr().err


def test_a_missing_package_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed")
    monkeypatch.chdir(tmp_path)
    args = ["shard", "openimages", "--classes", "nope.csv", "--labels", "nope.csv"]
    assert main([*args, "--images", "nope", "--out", "gs://bucket/ds", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "gcsfs" in err and "pip install 'mlc[gcs]'" in err


def test_select_into_s3_equals_a_local_run(oi, s3_bucket, tmp_path):
    local = tmp_path / "ds"
    assert shard(oi, local, "--select", "densest:9") == 0
    url = f"{s3_bucket}/ds"
    assert shard(oi, url, "--select", "densest:9") == 0
    got = remote_files(url)
    assert "_parts/train/selection.json" in got
    assert differences(got, local_files(local)) == []


def test_partitions_resume_and_merge_in_s3(oi, local_ref, s3_bucket, capsys):
    """Two partitions into s3://, one of them with a damaged shard and a damaged part file
    rewritten on its re-run, then `mlc shard merge --out s3://...`. In an object store the
    shards are written under their final names (no copy on the server); the split is
    published (stats, manifest, sizes.json) by the merge."""
    url = f"{s3_bucket}/ds"
    fs = s3()
    root = url.removeprefix("s3://")
    assert shard(oi, url, "--partition", "0/2") == 0
    assert shard(oi, url, "--partition", "1/2") == 0
    # Not published before the merge: no stats, manifest or sizes.json.
    assert not [
        p
        for p in fs.ls(root, detail=False)
        if not p.endswith((".tar", "classes.json")) and "/_parts" not in p
    ]
    good = fs.cat_file(f"{root}/train-000002.tar")
    fs.pipe_file(f"{root}/train-000002.tar", good[:1000])  # cut short
    fs.pipe_file(f"{root}/_parts/train/train-000004.tar.json", b"{not json")
    assert shard(oi, url, "--partition", "0/2") == 0  # rewrites both shards
    assert fs.cat_file(f"{root}/train-000002.tar") == good
    capsys.readouterr()
    assert main(["shard", "merge", "--out", url, "--split", "train"]) == 0
    assert capsys.readouterr().out.startswith("train: ")
    assert differences(remote_files(url), local_ref) == []


# ---------------------------------------------------------------- kill -9, then the same command


def s3_part_files(fs, root: str) -> list[str]:
    fs.invalidate_cache()
    try:
        names = fs.ls(f"{root}/_parts/train", detail=False)
    except FileNotFoundError:
        return []
    return [n for n in names if n.endswith(".tar.json")]


def test_resume_after_sigkill_in_s3_equals_an_uninterrupted_run(tmp_path, s3_bucket):
    """`mlc shard --out s3://...` in a subprocess, SIGKILLed once some but not all part files
    are in the bucket; every shard object then is whole (an upload appears complete or not at
    all), and the split is not published; the same command again gives the objects of an
    uninterrupted run, byte for byte."""
    fs = s3()
    for n in (60, 240, 960):
        data = many_images(tmp_path / f"data{n}", n)
        url = f"{s3_bucket}/killed{n}/ds"
        root = url.removeprefix("s3://")
        args = data.args(url, "--shard-size", 3, rotation=False)
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # with the S3 server's endpoint and keys
        cmd = [sys.executable, "-m", "mlc.cli", "shard", *args]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        try:
            while proc.poll() is None and not s3_part_files(fs, root):
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        parts = s3_part_files(fs, root)
        if proc.returncode == -signal.SIGKILL and 0 < len(parts) < n // 3:
            break
    else:
        pytest.skip("every run finished before it could be killed: nothing to resume")

    objects = remote_files(url)
    for published in ("train.manifest.parquet", "train.stats.json", "sizes.json"):
        assert published not in objects  # the split is not published
    for name, content in objects.items():
        if name.endswith(".tar"):  # each shard complete: a valid tar to its end
            with tarfile.open(fileobj=io.BytesIO(content)) as tar:
                assert all(member.size for member in tar.getmembers())
            assert len(content) % 512 == 0 and content[-1024:] == bytes(1024)
    for part in parts:
        name = part.rsplit("/", 1)[-1]
        document = json.loads(objects[f"_parts/train/{name}"])
        shard_data = objects[name[: -len(".json")]]
        assert len(shard_data) == document["tar_bytes"]
        assert zlib.crc32(shard_data) == document["crc32"]

    assert main(["shard", *args]) == 0  # the same command again
    reference = f"{s3_bucket}/reference/ds"
    assert main(["shard", *data.args(reference, "--shard-size", 3, rotation=False)]) == 0
    got, want = remote_files(url), remote_files(reference)
    assert len([name for name in got if "/" not in name and name.endswith(".tar")]) == n // 3
    assert differences(got, want) == []


# ---------------------------------------------------------------- inputs by URL


def upload(local: Path, url: str) -> None:
    fs = s3()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{url.removeprefix('s3://')}/{path.relative_to(local)}")


def test_openimages_inputs_from_s3(tmp_path, s3_bucket):
    """--images s3://..., and the class list, label CSV, trainable classes and rotation CSV by
    URL: the same shards, manifest and stats as from local files."""
    data = make_openimages(tmp_path / "oi")
    upload(data.root, f"{s3_bucket}/input")
    by_url = {
        "--classes": f"{s3_bucket}/input/{data.classes.name}",
        "--labels": f"{s3_bucket}/input/{data.labels.name}",
        "--images": f"{s3_bucket}/input/images",
        "--rotation": f"{s3_bucket}/input/{data.rotation.name}",
        "--trainable": f"{s3_bucket}/input/{data.trainable.name}",
    }
    local_args = data.args(tmp_path / "local" / "ds", "--shard-size", SHARD_SIZE)
    local_args += ["--trainable", str(data.trainable)]
    assert main(["shard", *local_args]) == 0
    url_args = data.args(tmp_path / "url" / "ds", "--shard-size", SHARD_SIZE, "--workers", "2")
    url_args += ["--trainable", str(data.trainable)]
    for option, url in by_url.items():
        url_args[url_args.index(option) + 1] = url
    assert main(["shard", *url_args]) == 0
    want, got = local_files(tmp_path / "local" / "ds"), local_files(tmp_path / "url" / "ds")
    same = [n for n in want if n.endswith(".tar") or n.endswith((".parquet", ".stats.json"))]
    assert len(same) > 3
    assert {n: got[n] for n in same} == {n: want[n] for n in same}
    assert [got[n] == want[n] for n in ("classes.json", "sizes.json")] == [True, True]
    report = json.loads(got["train.report.json"])
    assert report["source"] == f"OpenImages labels {by_url['--labels']}"
    assert report["image_skips"]["missing file"]["count"] == 1


def test_table_root_and_label_table_over_http(tmp_path, http_server):
    """A table source whose table and image root are http(s) URLs (read-only web server)."""
    root, base = http_server
    folder = root / uuid.uuid4().hex
    data = make_openimages(folder)
    ids = sorted(p.name for p in data.images.iterdir())[:6]
    (folder / "labels.csv").write_text(
        "image,labels\n" + "".join(f"{name},a|b\n" for name in ids) + "missing.jpg,a\n"
    )
    out = tmp_path / "ds"
    args = ["shard", "table", "--table", f"{base}/{folder.name}/labels.csv"]
    args += ["--root", f"{base}/{folder.name}/images", "--out", str(out), "--quiet"]
    assert main(args) == 0
    local = tmp_path / "local"
    shutil.copytree(data.images, local / "images")
    (local / "labels.csv").write_text((folder / "labels.csv").read_text())
    args_local = ["shard", "table", "--table", str(local / "labels.csv")]
    args_local += ["--root", str(local / "images"), "--out", str(tmp_path / "l" / "ds"), "--quiet"]
    assert main(args_local) == 0
    want, got = local_files(tmp_path / "l" / "ds"), local_files(out)
    assert got["train-000000.tar"] == want["train-000000.tar"]
    report = json.loads(got["train.report.json"])
    assert report["image_skips"]["missing file"]["count"] == 1
    missing = report["image_skips"]["missing file"]["examples"][0]
    assert missing.endswith(f"{base}/{folder.name}/images/missing.jpg")


def test_url_loader(s3_bucket):
    s3().pipe_file(f"{s3_bucket.removeprefix('s3://')}/images/a/x.jpg", b"bytes")
    loader = image_loader(f"{s3_bucket}/images/")
    assert loader == UrlLoader(f"{s3_bucket}/images")
    assert loader.load("a/x.jpg") == b"bytes"
    with pytest.raises(Skip, match="missing file") as e:
        loader.load("a/y.jpg")
    assert e.value.detail == f"{s3_bucket}/images/a/y.jpg"
    outside = ["../secret.jpg", "a/../../secret.jpg", "/etc/passwd", "s3://other/x.jpg"]
    for locator in outside:
        with pytest.raises(Skip, match="path outside the image root"):
            loader.load(locator)
    # Local roots keep their text: it is part of the shard plan's fingerprint.
    assert repr(image_loader("images/")) == "FileLoader(root='images/')"
    assert repr(image_loader("file:///data/images")) == "FileLoader(root='/data/images')"
    assert pickle.loads(pickle.dumps(loader)).load("a/x.jpg") == b"bytes"


def test_an_image_root_of_an_unknown_protocol_stops_at_once():
    with pytest.raises(ValueError, match="Protocol not known"):
        image_loader("nosuchprotocol://b/images")
