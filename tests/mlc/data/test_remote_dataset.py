"""`mlc shard` datasets read by URL: the loader over a local S3 API server (moto, through s3fs)
and over http(s) (a local http.server) yields exactly the batches of the local folder, in the
main process and in forked DataLoader workers."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import uuid

import numpy as np
import pytest

from mlc.data import LoaderConfig, ShardLoader, dataset_shards, url_shards
from mlc.extras import MissingExtraError


def upload(local, bucket: str, name: str = "ds") -> str:
    """A copy of the local folder ``local`` at <bucket>/<name>; its URL."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    url = f"{bucket}/{name}"
    fs.put(str(local), url, recursive=True)
    return url


def serve(local, http_server) -> str:
    """A copy of the local folder ``local`` under the http server's root; its URL."""
    root, base = http_server
    name = uuid.uuid4().hex[:8]
    shutil.copytree(local, root / name)
    return f"{base}/{name}"


@pytest.fixture
def s3_ds(partial_ds, s3_bucket) -> str:
    return upload(partial_ds.path, s3_bucket)


@pytest.fixture
def http_ds(partial_ds, http_server) -> str:
    return serve(partial_ds.path, http_server)


def batches(loader: ShardLoader, count: int | None = None) -> list[tuple]:
    """Every batch (eval) or the first ``count`` (train) as plain values."""
    out = []
    for b in itertools.islice(loader, count):
        out.append(
            (
                list(b.keys),
                b.images.numpy().copy(),
                b.targets.numpy().copy(),
                b.mask.numpy().copy(),
                b.valid.numpy().copy(),
            )
        )
    return out


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        assert x[0] == y[0]
        for u, v in zip(x[1:], y[1:], strict=True):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("where", ["s3", "http"])
@pytest.mark.parametrize("workers", [0, 2])
def test_remote_dataset_gives_the_local_batches(partial_ds, where, workers, request):
    url = request.getfixturevalue(f"{where}_ds")
    for mode, count in (("eval", None), ("train", 6)):
        config = LoaderConfig(
            batch_size=8,
            image_size=24,
            mode=mode,
            num_workers=workers,
            seed=3,
            shuffle_buffer=10,
        )
        local = ShardLoader.from_dataset(partial_ds.path, "train", config)
        remote = ShardLoader.from_dataset(url, "train", config)
        assert remote.num_classes == local.num_classes
        assert remote.full_annotation == local.full_annotation
        assert [s.url for s in remote.shards] == [
            f"{url}/{name}" for name in partial_ds.shard_lengths()
        ]
        assert [s.samples for s in remote.shards] == [s.samples for s in local.shards]
        assert_same(batches(remote, count), batches(local, count))
        assert remote.counts() == local.counts() and local.counts()["lost"] == 0


def test_local_datasets_keep_plain_paths(partial_ds):
    shards = dataset_shards(partial_ds.path, "train")
    assert shards[0].url == str(partial_ds.path / next(iter(partial_ds.shard_lengths())))


def test_sizes_json_beside_url_shards(partial_ds, s3_ds, http_ds):
    """url_shards reads the sizes.json beside http and s3 shards, as beside local ones."""
    lengths = partial_ds.shard_lengths()
    for url in (s3_ds, http_ds):
        shards = url_shards([f"{url}/{name}" for name in lengths])
        assert [s.samples for s in shards] == list(lengths.values())


def test_url_shards_without_sizes_json(partial_ds, http_server):
    root, base = http_server
    name = uuid.uuid4().hex[:8]
    (root / name).mkdir()
    first = next(iter(partial_ds.shard_lengths()))
    shutil.copy(partial_ds.path / first, root / name / first)
    with pytest.raises(ValueError, match="sample counts unknown for 1 shard"):
        url_shards(f"{base}/{name}/{first}")
    assert url_shards(f"{base}/{name}/{first}", {first: 5})[0].samples == 5


@pytest.mark.parametrize("where", ["s3", "http"])
def test_missing_remote_dataset_is_named(where, request):
    if where == "s3":
        url = request.getfixturevalue("s3_bucket") + "/nothing-here"
    else:
        url = request.getfixturevalue("http_server")[1] + "/nothing-here"
    config = LoaderConfig(batch_size=8, image_size=24, mode="eval")
    with pytest.raises(FileNotFoundError) as e:
        ShardLoader.from_dataset(url, "train", config)
    assert str(e.value) == (
        f"{url}/train.stats.json: no such file (is {url} an `mlc shard` folder?)"
    )


def without_s3fs(monkeypatch):
    """As if s3fs were not installed (fsspec keeps the classes it has loaded: forget them)."""
    import fsspec  # noqa: F401 (fsspec.registry: the module, which the package's name hides)

    loaded = sys.modules["fsspec.registry"]._registry
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import raises ImportError
    for protocol in ("s3", "s3a"):
        monkeypatch.delitem(loaded, protocol, raising=False)


def test_without_s3fs_the_extra_is_named(monkeypatch):
    without_s3fs(monkeypatch)
    config = LoaderConfig(batch_size=8, image_size=24, mode="eval")
    with pytest.raises(MissingExtraError, match=r"needs the s3fs package: pip install 'mlc\[s3\]'"):
        ShardLoader.from_dataset("s3://bucket/ds", "train", config)


def test_stats_json_is_what_names_the_shards(s3_ds, partial_ds):
    """The shard list is the stats' (no listing of the bucket: http cannot list)."""
    stats = json.loads((partial_ds.path / "train.stats.json").read_text())
    assert [s.url.rpartition("/")[2] for s in dataset_shards(s3_ds, "train")] == stats["shards"]
