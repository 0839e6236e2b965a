"""mlc.storage: the same folder operations on a local path, memory://, a local S3 server and
http(s) (read-only)."""

import pytest

from mlc.storage import Folder, StorageError, join, open_input, protocol


@pytest.fixture(params=["local", "memory", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return Folder(tmp_path / "ds")
    if request.param == "memory":
        return Folder(f"memory://{tmp_path.name}/ds")
    bucket = request.getfixturevalue("s3_bucket")
    return Folder(f"{bucket}/ds")


def test_protocol_and_join():
    assert protocol("/data/ds") == "file"
    assert protocol("file:///data/ds") == "file"
    assert protocol("S3://b/ds") == "s3"
    assert join("/data/ds", "a.tar") == "/data/ds/a.tar"
    assert join("file:///data/ds", "a.tar") == "/data/ds/a.tar"
    assert join("s3://b/ds/", "_parts", "a.tar") == "s3://b/ds/_parts/a.tar"


def test_write_read_list_move_remove(folder):
    folder.makedirs()
    folder.write_json("classes.json", {"a": 1})
    folder.write_bytes("x-000000.tar", b"\0" * 1000)
    assert folder.read_json("classes.json") == {"a": 1}
    assert folder.size("x-000000.tar") == 1000
    assert folder.is_file("x-000000.tar") and not folder.is_file("missing")
    assert folder.list() == ["classes.json", "x-000000.tar"]
    assert folder.list("x-") == ["x-000000.tar"]
    folder.move("x-000000.tar", "y-000000.tar")
    assert folder.list() == ["classes.json", "y-000000.tar"]
    assert folder.read_bytes("y-000000.tar") == b"\0" * 1000
    folder.remove("y-000000.tar")
    folder.remove("y-000000.tar")  # gone already: no error
    assert folder.list() == ["classes.json"]
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        folder.read_json("missing.json")


def test_a_failed_write_leaves_nothing(folder):
    folder.makedirs()
    folder.write_bytes("a.tar", b"old")
    with pytest.raises(RuntimeError), folder.writer("a.tar") as f:
        f.write(b"new, half written")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), folder.writer("b.tar") as f:
        f.write(b"half written")
        raise RuntimeError("killed")
    assert folder.read_bytes("a.tar") == b"old"
    assert [n for n in folder.list() if not n.startswith(".")] == ["a.tar"]
    assert not folder.list(".")  # no temporary left either


def test_child_folders(folder):
    folder.child("_parts", "train").write_text("plan.json", "{}")
    assert folder.child("_parts", "train").list() == ["plan.json"]
    assert folder.is_file("_parts/train/plan.json")


def test_http_reads_and_refuses_writes(http_server):
    root, url = http_server
    (root / "ds").mkdir()
    (root / "ds" / "classes.json").write_text('{"b": 2}')
    folder = Folder(f"{url}/ds")
    assert folder.read_json("classes.json") == {"b": 2}
    assert folder.is_file("classes.json") and not folder.is_file("stats.json")
    assert folder.size("classes.json") == len('{"b": 2}')
    with open_input(f"{url}/ds/classes.json", "r") as f:
        assert f.read() == '{"b": 2}'
    with pytest.raises(FileNotFoundError, match="/ds/stats.json: no such file"):
        folder.read_json("stats.json")
    with pytest.raises(StorageError, match="read-only"):
        folder.write_text("x.json", "{}")
    with pytest.raises(StorageError, match="read-only"):
        folder.require_writable()


def test_open_input_local_and_missing(tmp_path):
    (tmp_path / "labels.csv").write_text("ImageID\n")
    with open_input(tmp_path / "labels.csv", "r") as f:
        assert f.read() == "ImageID\n"
    with pytest.raises(FileNotFoundError, match="nope.csv: no such file"):
        open_input(tmp_path / "nope.csv")


def test_sizes_read_many_and_name(folder):
    folder.makedirs("sub")
    folder.write_bytes("a.tar", b"12345")
    folder.write_bytes("b.json", b"{}")
    folder.child("sub").write_bytes("c", b"x")
    assert folder.sizes() == {"a.tar": 5, "b.json": 2}  # files directly inside only
    assert folder.child("missing").sizes() == {}
    found = folder.read_many(["a.tar", "b.json", "nope"])
    assert found["a.tar"] == b"12345" and found["b.json"] == b"{}"
    assert isinstance(found["nope"], FileNotFoundError)
    assert folder.name == "ds"


def test_a_listing_is_fresh_after_another_client_writes(s3_bucket):
    """s3fs caches listings; a file another process wrote must be seen."""
    import s3fs

    folder = Folder(f"{s3_bucket}/ds")
    folder.write_bytes("a", b"1")
    assert folder.sizes() == {"a": 1} and not folder.is_file("b")
    other = s3fs.S3FileSystem(skip_instance_cache=True)
    other.pipe_file(f"{s3_bucket.removeprefix('s3://')}/ds/b", b"22")
    assert folder.is_file("b") and folder.size("b") == 2
    assert folder.sizes() == {"a": 1, "b": 2}


def test_inputs_by_url(s3_bucket, tmp_path):
    from mlc.storage import input_is_file, input_path, input_source, read_input_classes

    folder = Folder(f"{s3_bucket}/in")
    folder.write_text("classes.csv", '/m/1,"A, b"\n/m/2,C\n')
    url = f"{s3_bucket}/in/classes.csv"
    assert input_is_file(url) and not input_is_file(f"{s3_bucket}/in/nope.csv")
    classes = read_input_classes(url)
    assert classes.ids == ["/m/1", "/m/2"] and classes.names == ["A, b", "C"]
    with input_source(url) as f:
        assert f.read().startswith(b"/m/1")
    remote = input_path(url)
    assert str(remote) == url and remote.suffix == ".csv" and remote.name == "classes.csv"
    assert remote.is_file() and remote.open("rb").read() == remote.read_bytes()
    (tmp_path / "c.json").write_text('["x"]')
    assert input_path(tmp_path / "c.json") == tmp_path / "c.json"  # a local Path, as before
    with input_source(tmp_path / "c.json") as source:
        assert source == tmp_path / "c.json"
    assert read_input_classes(tmp_path / "c.json").ids == ["x"]
