"""`mlc train` on a dataset by URL (a local S3 API server through s3fs, and http): the same
losses and validation as on the local folder; a dataset missing at a URL and an output given
as a URL are one-line errors before any work."""

import json

import pytest

from mlc.cli import main
from tests.helpers import mlc_error

from .conftest import tiny_config

SHORT = ["data.num_workers=2", "train.samples=160"]  # 10 steps, then validation


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def records(out) -> list[dict]:
    """metrics.jsonl without the timings and the run folder."""
    timed = {"time", "samples_per_s", "seconds", "curves", "checkpoint"}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timed} for line in lines]


@pytest.fixture(scope="module")
def local_run(mosaics, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    args = tiny_config(mosaics, out, *SHORT)
    assert main(["train", *sets(args)]) == 0
    return out


@pytest.mark.parametrize("where", ["s3", "http"])
def test_training_from_a_url_equals_the_local_run(where, local_run, request, tmp_path):
    """DataLoader workers (2, forked) read the shards by URL for training and validation; the
    loader's order is deterministic, so the losses and the validation are the local run's."""
    url = request.getfixturevalue(f"{where}_mosaics")
    out = tmp_path / "run"
    args = tiny_config(url, out, *SHORT)
    assert main(["train", *sets(args)]) == 0
    remote, local = records(out), records(local_run)
    assert [r["kind"] for r in remote] == ["train", "val", "summary"]
    assert remote == local
    assert all(r["data"]["lost"] == 0 for r in remote if "data" in r)


@pytest.mark.parametrize("where", ["s3", "http"])
def test_a_dataset_missing_at_a_url_says_how_to_make_it(where, request, capsys):
    if where == "s3":
        url = request.getfixturevalue("s3_bucket") + "/nothing"
    else:
        url = request.getfixturevalue("http_server")[1] + "/nothing"
    err = mlc_error(capsys, ["train", "--set", f"data.dataset={url}"])
    assert f"data.dataset {url}: no classes.json" in err and "mlc shard" in err


def test_an_output_url_is_refused_before_any_work(mosaics, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = mlc_error(capsys, ["train", *sets(tiny_config(mosaics, "s3://bucket/run"))])
    assert "train.out s3://bucket/run" in err and "local path" in err
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket/run


def test_shard_to_s3_then_train_and_evaluate_from_s3(s3_bucket, tmp_path, monkeypatch):
    """The whole path on object storage: `mlc shard --out s3://...`, `mlc train` reading it,
    `mlc eval --data s3://...`."""
    from tests.conftest import FASHION

    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST missing (apt-get install dataset-fashion-mnist)")
    monkeypatch.chdir(tmp_path)  # nothing may be written here: no ./s3:/... folder
    url = f"{s3_bucket}/fm"
    counts = ["--train-count", "200", "--test-count", "100", "--shard-size", "100"]
    assert main(["shard", "fashion-mnist", "--out", url, *counts, "--quiet"]) == 0
    assert read_json(url, "test.stats.json")["samples"] == 100
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "run"
    args = tiny_config(url, out, "train.samples=80", "train.log_every=80")
    assert main(["train", *sets(args)]) == 0
    assert [r["kind"] for r in records(out)] == ["train", "val", "summary"]
    checkpoint = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    report = tmp_path / "eval"
    eval_args = ["--checkpoint", str(checkpoint), "--data", url, "--out", str(report)]
    assert main(["eval", *eval_args, "--quiet", "--bootstrap", "0", "--no-plots"]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["images"] == 100 and summary["data"] == url
    assert summary["weights"] == f"reference counts from {url}/train.stats.json"


def read_json(url: str, name: str):
    """A file of the folder at ``url``, or None."""
    from mlc.storage import Folder

    try:
        return Folder(url).read_json(name)
    except FileNotFoundError:
        return None
