"""Fixtures shared by several test folders.

mosaics: a small real dataset, Fashion-MNIST 2x2 mosaics, sharded once per session (the training
tests in tests/mlc/train and `mlc eval --checkpoint` in tests/eval).
s3_server, s3_bucket: a local S3 API server and a fresh bucket on it; http_server: a local HTTP
server over a folder. s3_mosaics, http_mosaics: copies of `mosaics` on them (their URLs).
"""

import functools
import http.server
import shutil
import threading
import uuid
from pathlib import Path

import pytest

from benchmarks.harness import local_s3_server
from mlc.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def mosaics(tmp_path_factory):
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST missing (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("mosaics")
    args = [
        "shard",
        "fashion-mnist",
        "--out",
        str(out),
        "--train-count",
        "1200",
        "--test-count",
        "300",
        "--shard-size",
        "200",
        "--quiet",
    ]
    assert main(args) == 0
    return out


# ---------------------------------------------------------------- object storage on localhost


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 API server (moto's standalone server in its own process, bound to 127.0.0.1)
    for the whole session, reached through s3fs as users reach S3. The endpoint and dummy
    credentials go into the environment, so subprocesses (`mlc shard --out s3://...`) use it
    too and no test can reach a real cloud endpoint. Yields the endpoint URL."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new empty bucket on the local S3 server; yields its URL, s3://<name>."""
    import s3fs

    name = "mlc-" + uuid.uuid4().hex[:12]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """A local read-only HTTP server (Python's http.server on 127.0.0.1) over a folder; yields
    (folder, base URL)."""
    root = tmp_path_factory.mktemp("http")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def s3_mosaics(mosaics, s3_server):
    """The `mosaics` dataset uploaded to a bucket of the local S3 server: s3://<bucket>/mosaics."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = "mlc-mosaics-" + uuid.uuid4().hex[:8]
    fs.mkdir(bucket)
    fs.put(str(mosaics), f"{bucket}/mosaics", recursive=True)
    return f"s3://{bucket}/mosaics"


@pytest.fixture(scope="session")
def http_mosaics(mosaics, http_server):
    """The `mosaics` dataset served by the local http server: http://127.0.0.1:<port>/mosaics."""
    root, base = http_server
    shutil.copytree(mosaics, root / "mosaics")
    return f"{base}/mosaics"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
