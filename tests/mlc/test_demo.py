"""`mlc demo` end to end on a tiny budget, and its procedural fallback dataset."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_tools.sources.shapes import CELL, GRID, SHAPES, shapes_catalog
from mlc.cli import main


def test_demo_without_fashion_mnist_falls_back_to_shapes(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--fashion-mnist", str(tmp_path / "nowhere"), "--quiet"]
    args += ["--train-count", "320", "--test-count", "120", "--samples", "160", "--workers", "1"]
    for value in ["data.image_size=32", "model.width=0.125", "data.batch_size=16"]:
        args += ["--set", value]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "apt-get install dataset-fashion-mnist" in printed  # how to get the real data
    assert "procedural shapes" in printed

    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["images"] == 120 and summary["classes"] == len(SHAPES)
    assert summary["checkpoint_samples"] == 160
    assert f"fwMAP@100  {summary['weighted_map_at_k']:.4f}" in printed
    assert f"report:      {out / 'eval' / 'report.md'}" in printed
    for name in ("report.md", "per_class.csv", "ap_vs_frequency.png"):
        assert (out / "eval" / name).is_file()
    assert "time:        shard" in printed and "total" in printed
    # The training job validated the same checkpoint on the same split by its own code path
    # (unfolded batch norm, the job's loader): the same figure up to float rounding.
    records = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"][-1]
    assert abs(val["fwmap"] - summary["weighted_map_at_k"]) < 0.02

    # A second run starts training afresh instead of mixing with the first one's files.
    assert main(args) == 0
    records = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["kind"] == "summary"]) == 1


def test_shapes_are_drawn_where_their_labels_say():
    catalog = shapes_catalog("test", 40, seed=3)
    rows = catalog.table.to_pylist()
    assert catalog.class_ids == SHAPES and catalog.annotation == "full"
    for row in rows:
        png = catalog.loader.load(row["locator"])
        assert png == catalog.loader.load(row["locator"])  # the same image every time
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        assert pixels.shape == (CELL * GRID, CELL * GRID)
        cells = [int(c) for c in row["locator"].split(":")[1].split(",")]
        for i, shape in enumerate(cells):
            tile = pixels[i // GRID * CELL : (i // GRID + 1) * CELL, i % GRID * CELL :][:, :CELL]
            assert (tile.max() > 100) == (shape >= 0), (row["locator"], i)
        assert row["positives"] == sorted({c for c in cells if c >= 0})
    # Long-tailed: the first class is drawn most often, the last least.
    counts = np.bincount(
        [c for r in shapes_catalog("train", 2000).table.to_pylist() for c in r["positives"]],
        minlength=len(SHAPES),
    )
    assert counts[0] > 2 * counts[-1] > 0


def test_a_demo_stopped_during_training_does_not_evaluate(tmp_path, monkeypatch, capsys):
    import mlc.train.loop

    def stopped_train(config, **kwargs):  # what train() returns after Ctrl-C / SIGTERM
        return {"stopped_by": "SIGINT", "samples": 64, "checkpoint": "ckpt.pt"}

    monkeypatch.setattr(mlc.train.loop, "train", stopped_train)
    args = ["demo", "--out", str(tmp_path), "--source", "shapes", "--quiet", "--workers", "1"]
    assert main([*args, "--train-count", "40", "--test-count", "20"]) == 130
    assert "SIGINT: stopped after 64 samples" in capsys.readouterr().out
    assert not (tmp_path / "eval").exists()


def test_bad_demo_options_stop_before_sharding(tmp_path, capsys):
    out = tmp_path / "demo"
    for option in (["--samples", "-5"], ["--train-count", "0"]):
        with pytest.raises(SystemExit) as stop:
            main(["demo", "--out", str(out), *option])
        assert stop.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--set", "train.samples=-5", "--quiet"]) == 2
    assert "train.samples must be >= 1" in capsys.readouterr().err
    assert not out.exists()  # nothing sharded
