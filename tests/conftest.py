"""Fixtures shared by several test folders.

mosaics: a small real dataset, Fashion-MNIST 2x2 mosaics, sharded once per session (the training
tests in tests/mlc/train and `mlc eval --checkpoint` in tests/eval).
s3_server, s3_bucket: a local S3 API server and a fresh bucket on it; http_server: a local HTTP
server over a folder. s3_mosaics, http_mosaics: copies of `mosaics` on them (their URLs).
"""

import functools
import http.server
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest

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
    """A local S3 API server (moto's standalone server, bound to 127.0.0.1) for the whole
    session, reached through s3fs as users reach S3. The endpoint and dummy credentials go into
    the environment, so subprocesses (`mlc shard --out s3://...`) use it too and no test can
    reach a real cloud endpoint. Yields the endpoint URL."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
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
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
