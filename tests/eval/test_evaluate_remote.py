"""`mlc eval --checkpoint CK --data URL`: a dataset on a local S3 API server (moto, through
s3fs) or served over http gives the report of the local folder; the training split's stats
for the weights are read by URL too; a missing dataset and an output URL are one-line
errors."""

import pytest
import torch

from tests.helpers import mlc_error

from .test_evaluate import checkpoint, run_eval  # noqa: F401 (checkpoint: a fixture)

TIMED = {"seconds", "images_per_s"}


def comparable(summary: dict, *more: str) -> dict:
    """A summary without its timings, the data's location and ``more``."""
    return {k: v for k, v in summary.items() if k not in TIMED | {"data", *more}}


@pytest.fixture(scope="module")
def local(checkpoint, mosaics, tmp_path_factory):  # noqa: F811 (the imported fixture)
    out = tmp_path_factory.mktemp("local")
    return out, run_eval(checkpoint[0], mosaics, out)


@pytest.mark.parametrize("where, workers", [("s3", "2"), ("http", "0")])
def test_a_dataset_by_url_gives_the_local_report(
    checkpoint,  # noqa: F811
    local,
    where,
    workers,
    request,
    tmp_path,
):
    url = request.getfixturevalue(f"{where}_mosaics")
    summary = run_eval(checkpoint[0], url, tmp_path, "--workers", workers)
    assert summary["data"] == url
    assert comparable(summary) == comparable(local[1])
    assert (tmp_path / "per_class.csv").read_text() == (local[0] / "per_class.csv").read_text()


def test_training_stats_by_url_weight_the_metric(
    checkpoint,  # noqa: F811
    local,
    s3_mosaics,
    tmp_path,
):
    """A checkpoint trained on a dataset by URL: the weights are the training split's counts,
    read from its stats by URL (here the checkpoint's dataset, a bucket that does not exist,
    has none; the --data URL has them)."""
    state = torch.load(checkpoint[0], weights_only=True)
    state["config"]["data"]["dataset"] = "s3://no-such-bucket-mlc/ds"
    moved = tmp_path / "moved.pt"
    torch.save(state, moved)
    summary = run_eval(moved, s3_mosaics, tmp_path / "out")
    assert summary["weights"] == f"reference counts from {s3_mosaics}/train.stats.json"
    assert summary["notes"] == local[1]["notes"]
    assert comparable(summary, "weights", "checkpoint", "notes") == comparable(
        local[1], "weights", "checkpoint", "notes"
    )
    # --weights by URL: the same file, the same figures
    again = run_eval(
        moved, s3_mosaics, tmp_path / "again", "--weights", f"{s3_mosaics}/train.stats.json"
    )
    assert comparable(again, "notes") == comparable(summary, "notes")


def test_a_missing_dataset_url_is_named(checkpoint, s3_bucket, tmp_path, capsys):  # noqa: F811
    url = f"{s3_bucket}/nothing"
    err = mlc_error(capsys, ["eval", "--checkpoint", str(checkpoint[0]), "--data", url])
    assert f"{url}/classes.json: no such file (is {url} an `mlc shard` folder?)" in err


def test_an_output_url_is_refused_before_any_work(
    checkpoint,  # noqa: F811
    s3_mosaics,
    tmp_path,
    monkeypatch,
    capsys,
):
    monkeypatch.chdir(tmp_path)
    base = ["--checkpoint", str(checkpoint[0]), "--data", s3_mosaics]
    err = mlc_error(capsys, ["eval", *base, "--out", "s3://bucket/report"])
    assert "--out s3://bucket/report" in err and "local path" in err
    err = mlc_error(capsys, ["eval", *base, "--predictions", "s3://bucket/p.parquet", "--out", "r"])
    assert "--predictions s3://bucket/p.parquet" in err
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_training_dataset_is_a_note(checkpoint, local, mosaics, tmp_path):  # noqa: F811
    """The checkpoint's dataset URL does not answer (another network, no credentials): the
    search for the training stats goes on in --data, and the report says so."""
    state = torch.load(checkpoint[0], weights_only=True)
    state["config"]["data"]["dataset"] = "http://127.0.0.1:9/ds"  # nothing listens on port 9
    moved = tmp_path / "moved.pt"
    torch.save(state, moved)
    summary = run_eval(moved, mosaics, tmp_path / "out")
    assert summary["weights"] == local[1]["weights"]
    assert summary["notes"][0].startswith("training stats not looked up in http://127.0.0.1:9/ds:")
    assert comparable(summary, "checkpoint", "notes") == comparable(local[1], "checkpoint", "notes")
