"""`mlc predict` and `mlc.load`: the round trip through `mlc eval --predictions` equals `mlc
eval --checkpoint` exactly; image files score as their shard samples do; unreadable images are
named and counted (fatal with --strict); the compact table; several processes."""

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import mlc
from mlc.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(mosaics, tmp_path_factory):
    """The first 40 test mosaics as image files (binary PGM, as stored in the shards)."""
    folder = tmp_path_factory.mktemp("images")
    with tarfile.open(mosaics / "test-000000.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".ppm")][:40]
        for member in members:
            (folder / member.name).write_bytes(tar.extractfile(member).read())
    return folder


@pytest.fixture(scope="module")
def shard_predictions(tiny_checkpoint, mosaics, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "predictions.parquet"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tiny_checkpoint),
                str(mosaics),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    return out


def scores_by_key(path) -> dict:
    table = pq.read_table(path).to_pydict()
    return dict(zip(table["key"], table["scores"], strict=True))


def test_predict_then_eval_equals_eval_of_the_checkpoint(
    tiny_checkpoint, mosaics, shard_predictions, tmp_path
):
    """The issue's round trip: `mlc predict` on the test split, then `mlc eval --predictions`,
    gives exactly the report of `mlc eval --checkpoint` on that split."""
    direct, files = tmp_path / "direct", tmp_path / "files"
    stats = str(mosaics / "train.stats.json")
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(mosaics), "--quiet"]
    written = direct / "scores.parquet"
    assert main([*args, "--output", str(direct), "--predictions", str(written)]) == 0
    p = str(shard_predictions)
    args = ["eval", "--predictions", p, "--labels", p, "--weights", stats]
    assert main([*args, "--classes", str(mosaics / "classes.json"), "--output", str(files)]) == 0

    # The very file `mlc eval --checkpoint --predictions` writes: schema, metadata, rows.
    assert pq.read_table(shard_predictions).equals(pq.read_table(written))
    one = json.loads((direct / "summary.json").read_text())
    two = json.loads((files / "summary.json").read_text())
    inputs = {"predictions", "labels"}  # the file mode's inputs, named
    common = (set(one) & set(two)) - inputs
    assert {"weighted_map_at_k", "image_map_at_k", "full_map", "confidence_intervals"} <= common
    assert {key: one[key] for key in common} == {key: two[key] for key in common}
    assert (direct / "per_class.csv").read_text() == (files / "per_class.csv").read_text()
    assert one["images"] == 300


def test_image_files_score_as_their_shard_samples(
    tiny_checkpoint, shard_predictions, images, tmp_path, capsys
):
    out = tmp_path / "files.parquet"
    args = ["predict", "--checkpoint", str(tiny_checkpoint), str(images), "--out", str(out)]
    assert main([*args, "--key", "stem", "--quiet"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["key", "scores"]  # no labels for files
    assert table.schema.metadata == pq.read_table(shard_predictions).schema.metadata
    files, shards = scores_by_key(out), scores_by_key(shard_predictions)
    assert list(files) == sorted(p.stem for p in images.iterdir())  # in name order
    assert {key: shards[key] for key in files} == files  # bit for bit
    assert "40 images x 10 classes" in capsys.readouterr().out


def test_unreadable_images_are_named_and_counted(tiny_checkpoint, images, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    listing = tmp_path / "list.txt"
    first, second = sorted(images.iterdir())[:2]
    lines = [str(first), "# a comment", "", "broken.png", "missing.jpg", str(second)]
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "p.parquet"
    args = ["predict", "--checkpoint", str(tiny_checkpoint), str(listing), "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert pq.read_table(out)["key"].to_pylist() == [str(first), str(second)]
    assert "skipped 2 unreadable image(s)" in captured.out
    assert "skipped " + str(tmp_path / "broken.png") in captured.err
    skipped = list(csv.DictReader((tmp_path / "p.skipped.csv").open()))
    assert [Path(row["image"]).name for row in skipped] == ["broken.png", "missing.jpg"]
    assert "FileNotFoundError" in skipped[1]["problem"]

    strict = tmp_path / "strict.parquet"
    assert main([*args, "--out", str(strict), "--strict"]) == 2
    assert "broken.png: cannot read as an image" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if "strict" in p.name) == []  # no part

    assert main(["predict", "--checkpoint", str(tiny_checkpoint), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


def test_keys_must_be_unique(tiny_checkpoint, images, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    first = sorted(images.iterdir())[0]
    (other / first.name).write_bytes(first.read_bytes())
    args = ["predict", "--checkpoint", str(tiny_checkpoint), str(images), str(other), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "path.parquet")]) == 0  # keys: the paths
    assert pq.read_table(tmp_path / "path.parquet").num_rows == 41
    assert main([*args, "--key", "name", "--out", str(tmp_path / "name.parquet")]) == 2
    err = capsys.readouterr().err
    assert f"key {first.name!r} given twice ({first} and {other / first.name})" in err


def test_top_k_and_threshold_table(tiny_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "p.parquet"
    args = ["predict", "--checkpoint", str(tiny_checkpoint), str(images), "--out", str(out)]
    assert main([*args, "--quiet", "--top-k", "3", "--threshold", "0.1"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "p.top.csv").open()))
    assert f"{len(rows)} rows -> {tmp_path / 'p.top.csv'}" in printed
    scores = scores_by_key(out)
    predictor = mlc.load(tiny_checkpoint)
    by_image: dict = {}
    for row in rows:
        by_image.setdefault(row["key"], []).append(row)
    assert set(by_image) <= set(scores)
    for key, logits in scores.items():
        probabilities = torch.sigmoid(torch.tensor(logits)).numpy()
        expected = [
            c for c in np.argsort(-probabilities, kind="stable")[:3] if probabilities[c] >= 0.1
        ]
        got = by_image.get(key, [])
        assert [r["class_id"] for r in got] == [predictor.class_ids[c] for c in expected]
        assert [r["name"] for r in got] == [predictor.class_names[c] for c in expected]
        assert [int(r["rank"]) for r in got] == list(range(1, len(got) + 1))
        for r, c in zip(got, expected, strict=True):
            assert float(r["score"]) == pytest.approx(probabilities[c], abs=1e-6)


def test_two_processes_equal_one(tiny_checkpoint, images, tmp_path):
    """`--processes 2` (torchrun's environment, a share of the files each) writes the file of
    one process: the same rows in the same order, bit for bit (batches of 10 and one thread in
    every process)."""
    common = ["predict", "--checkpoint", str(tiny_checkpoint), str(images), "--batch-size", "10"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "one.parquet"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mlc.cli", *common, "--out", str(tmp_path / "two.parquet")]
    done = subprocess.run(
        [*cmd, "--processes", "2", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "40 images x 10 classes" in done.stdout and "2 process(es)" in done.stdout
    one, two = pq.read_table(tmp_path / "one.parquet"), pq.read_table(tmp_path / "two.parquet")
    assert one.num_rows == 40 and one.equals(two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet", "two.parquet"]


def test_load_takes_paths_pil_images_arrays_and_tensors(tiny_checkpoint, images):
    predictor = mlc.load(tiny_checkpoint)
    assert isinstance(predictor, mlc.Predictor)
    assert not predictor.model.training and predictor.info["weights"] == "ema"
    assert predictor.class_names[0] == "T-shirt/top"  # from the dataset's classes.json
    paths = sorted(images.iterdir())[:3]
    reference = predictor.logits(paths)
    assert reference.shape == (3, 10) and reference.dtype == torch.float32
    # The mosaics are gray (an RGB copy would be resized by another filter: other pixels).
    gray = np.stack([np.asarray(Image.open(p)) for p in paths])  # [3, 56, 56]
    for images_as in (
        [Image.open(p) for p in paths],
        [p.read_bytes() for p in paths],
        list(gray),  # HxW each
        gray[..., None],  # NxHxWxC
        torch.from_numpy(gray[:, None]),  # NxCxHxW
        [str(paths[0]), Image.open(paths[1]), torch.from_numpy(gray[2])],
    ):
        assert torch.equal(predictor.logits(images_as), reference)
    labels = predictor.predict(paths[0], top_k=4)
    assert len(labels) == 4 and labels == sorted(labels, key=lambda x: -x.score)
    assert labels[0].id == predictor.class_ids[int(reference[0].argmax())]
    assert labels[0].score == pytest.approx(float(torch.sigmoid(reference[0].max())))
    assert [len(x) for x in predictor.predict(paths, top_k=None)] == [10, 10, 10]
    assert all(x.score >= 0.11 for x in predictor.predict(paths[0], top_k=None, threshold=0.11))
    with pytest.raises(ValueError, match="uint8"):
        predictor.logits(np.zeros((32, 32), dtype=np.float32))


def test_import_mlc_does_not_import_torch():
    code = "import sys, mlc; assert 'torch' not in sys.modules; print('load' in dir(mlc))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def test_the_api_page_example_runs(tiny_checkpoint, images, tmp_path, monkeypatch):
    """docs/api.md's Python example, in a folder with the files it names."""
    model = tmp_path / "runs" / "demo" / "model"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(model)]) == 0
    (tmp_path / "photos").mkdir()
    for number, path in enumerate(sorted(images.iterdir())[:3], start=1):
        Image.open(path).convert("RGB").save(tmp_path / "photos" / f"{number}.jpg")
    page = (ROOT / "docs" / "api.md").read_text()
    blocks = page.split("```python\n")[1:]
    assert blocks, "docs/api.md has no Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block.split("```")[0], "docs/api.md", "exec"), {})
