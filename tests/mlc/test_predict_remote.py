"""`mlc predict` on a dataset by URL (a local S3 API server through s3fs, and http): the
predictions file of the local folder, bit for bit; shard URLs find the classes.json and
sizes.json beside them; a missing dataset and an output URL are one-line errors."""

import pyarrow.parquet as pq
import pytest

from mlc.cli import main
from tests.helpers import mlc_error

from .test_predict import shard_predictions  # noqa: F401 (a fixture: the local folder's file)


def predict(checkpoint, inputs: list[str], out, *extra: str, code: int = 0) -> None:
    args = ["predict", "--checkpoint", str(checkpoint), *inputs, "--out", str(out), "--quiet"]
    assert main([*args, *extra]) == code


@pytest.mark.parametrize("where, workers", [("s3", "2"), ("http", "0")])
def test_a_dataset_url_predicts_as_the_local_folder(
    tiny_checkpoint,
    shard_predictions,  # noqa: F811
    where,
    workers,
    request,
    tmp_path,
    capsys,
):
    url = request.getfixturevalue(f"{where}_mosaics")
    out = tmp_path / "p.parquet"
    predict(tiny_checkpoint, [url], out, "--workers", workers)
    assert pq.read_table(out).equals(pq.read_table(shard_predictions))
    assert f"with the labels of {url} split test" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["s3", "http"])
def test_shard_urls_read_classes_and_sizes_beside_them(
    tiny_checkpoint,
    shard_predictions,  # noqa: F811
    where,
    request,
    tmp_path,
):
    url = request.getfixturevalue(f"{where}_mosaics")
    out = tmp_path / "p.parquet"
    predict(tiny_checkpoint, [f"{url}/test-{{000000..000001}}.tar"], out)
    assert pq.read_table(out).equals(pq.read_table(shard_predictions))


@pytest.mark.parametrize("where", ["s3", "http"])
def test_a_missing_dataset_url_says_how_to_make_it(tiny_checkpoint, where, request, capsys):
    if where == "s3":
        url = request.getfixturevalue("s3_bucket") + "/nothing"
    else:
        url = request.getfixturevalue("http_server")[1] + "/nothing"
    err = mlc_error(capsys, ["predict", "--checkpoint", str(tiny_checkpoint), url])
    assert f"{url}: no classes.json there, so not an `mlc shard` dataset" in err
    assert "mlc shard ... --out" in err


def test_an_output_url_is_refused_before_any_work(
    tiny_checkpoint, s3_mosaics, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    base = ["--checkpoint", str(tiny_checkpoint), s3_mosaics]
    err = mlc_error(capsys, ["predict", *base, "--out", "s3://bucket/p.parquet"])
    assert "--out s3://bucket/p.parquet" in err and "local path" in err
    err = mlc_error(capsys, ["predict", *base, "--top-k", "3", "--table", "s3://bucket/t.csv"])
    assert "--table s3://bucket/t.csv" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["s3", "http"])
def test_class_names_from_a_dataset_url(mosaics, where, request):
    from mlc.inference import class_names
    from mlc.io import read_classes

    url = request.getfixturevalue(f"{where}_mosaics")
    local = read_classes(mosaics / "classes.json")
    ids = [*local.ids[::-1], "not-a-class"]
    names, found = class_names(ids, f"{url}/classes.json")
    assert names == [*local.names[::-1], "not-a-class"] and found == len(local)
