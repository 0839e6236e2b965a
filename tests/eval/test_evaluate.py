"""`mlc eval --checkpoint` on real shards (Fashion-MNIST mosaics), checked against computations
that do not go through it: the model run by hand on images read straight from the tar files,
labels from the manifest, and the dense metric library on the same scores."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from eval.metrics import class_ap_at_k, full_ap, image_ap_at_k, weighted_mean
from mlc.cli import main
from mlc.config import load_config, to_dict
from mlc.dist import free_port
from mlc.models import build_model

ROOT = Path(__file__).resolve().parents[2]
K = 100


@pytest.fixture(scope="module")
def checkpoint(mosaics, tmp_path_factory):
    """An untrained xception-tiny (width 1/8) with random batch-norm statistics (so folding
    them into the convolutions changes the weights), saved as `mlc train` saves."""
    config = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"data.dataset={mosaics}", "model.width=0.125", "data.num_workers=0"],
    )
    class_ids = [c["id"] for c in json.loads((mosaics / "classes.json").read_text())["classes"]]
    torch.manual_seed(0)
    model = build_model(config.model, len(class_ids), config.data.channels)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    state = {"model": model.state_dict(), "config": to_dict(config), "class_ids": class_ids}
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({**state, "samples": 0, "step": 0}, path)
    return path, model.eval(), class_ids


def run_eval(checkpoint_path, data, out, *extra, code=0):
    args = ["eval", "--checkpoint", str(checkpoint_path), "--data", str(data)]
    assert main([*args, "--output", str(out), "--quiet", *extra]) == code
    if code == 0:
        return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def single(checkpoint, mosaics, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    summary = run_eval(checkpoint[0], mosaics, out, "--predictions", str(out / "scores.parquet"))
    return out, summary


def by_hand(model, dataset: Path):
    """Logits of every test image, decoded with PIL straight from the tars; manifest labels."""
    manifest = pq.read_table(dataset / "test.manifest.parquet").to_pylist()
    images = {}
    for shard in sorted({row["shard"] for row in manifest}):
        with tarfile.open(dataset / shard) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                if suffix == "ppm":  # the mosaics are binary PGMs
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    images[key] = np.asarray(image)
    keys = [row["key"] for row in manifest]
    x = torch.from_numpy(np.stack([images[k] for k in keys])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits = model(x / 127.5 - 1.0).numpy()
    labels = np.zeros((len(keys), 10), dtype=np.int8)  # fully annotated: the rest negative
    for i, row in enumerate(manifest):
        labels[i, row["positives"]] = 1
    return keys, logits, labels


def test_scores_and_metrics_match_an_independent_computation(checkpoint, mosaics, single):
    out, summary = single
    _, model, class_ids = checkpoint
    keys, logits, labels = by_hand(model, mosaics)
    written = pq.read_table(out / "scores.parquet")
    assert json.loads(written.schema.metadata[b"mlc.class_ids"]) == class_ids
    row = {k: i for i, k in enumerate(written["key"].to_pylist())}
    assert sorted(row) == sorted(keys)  # every test image exactly once
    order = [row[k] for k in keys]
    scores = np.array(written["scores"].to_pylist(), dtype=np.float32)[order]
    # The eval path folds batch norm and batches differently: equal up to float rounding.
    assert np.allclose(scores, logits, rtol=1e-4, atol=1e-4)
    positives = [sorted(p) for p in written["positives"].to_pylist()]
    assert [positives[row[k]] for k in keys] == [
        sorted(class_ids[j] for j in np.flatnonzero(lab)) for lab in labels
    ]

    # The metric library on the very scores eval used, with the training split's counts.
    stats = json.loads((mosaics / "train.stats.json").read_text())["positive_counts"]
    weights = np.array([stats[c] for c in class_ids], dtype=float)
    dense = class_ap_at_k(scores, labels, K, weights)
    assert summary["weighted_map_at_k"] == pytest.approx(dense.weighted_map, abs=1e-12)
    assert summary["unweighted_map_at_k"] == pytest.approx(dense.unweighted_map, abs=1e-12)
    full = full_ap(scores, labels)
    assert summary["full_map"] == pytest.approx(weighted_mean(full, np.ones(10)), abs=1e-12)
    images = image_ap_at_k(scores, labels, K)
    assert summary["image_map_at_k"] == pytest.approx(images.mean, abs=1e-12)
    assert summary["images"] == len(keys) == 300 and summary["classes"] == 10
    assert summary["images_evaluated"] == int((images.positives > 0).sum())
    assert (
        summary["weights"].startswith("reference counts from")
        and "train.stats.json" in (summary["weights"])
    )
    lines = (out / "per_class.csv").read_text().splitlines()
    assert lines[0].split(",") == [
        "class_id",
        "name",
        "reference_count",
        "weight",
        "positives",
        "known",
        f"ap_at_{K}",
        "full_ap",
    ]
    for line, cid, ap, f, w in zip(lines[1:], class_ids, dense.ap, full, weights, strict=True):
        fields = line.split(",")
        assert fields[0] == cid and int(fields[2]) == w == float(fields[3])
        assert float(fields[6]) == pytest.approx(ap, abs=1e-12)
        assert float(fields[7]) == pytest.approx(f, abs=1e-12)


def test_the_scores_file_reproduces_the_report(single, mosaics, tmp_path):
    out, summary = single
    scores = str(out / "scores.parquet")
    args = ["eval", "--predictions", scores, "--labels", scores, "--output", str(tmp_path)]
    assert main([*args, "--weights", str(mosaics / "train.stats.json")]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    for key in ("weighted_map_at_k", "unweighted_map_at_k", "full_map", "image_map_at_k"):
        assert again[key] == pytest.approx(summary[key], abs=1e-12), key
    assert again["confidence_intervals"]["weighted_map_at_k"] == pytest.approx(
        summary["confidence_intervals"]["weighted_map_at_k"], abs=1e-12
    )


def test_report_files_plots_and_intervals(single):
    out, summary = single
    umask = os.umask(0)
    os.umask(umask)
    for name in ("summary.json", "per_class.csv", "report.md"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    for name in ("ap_vs_frequency.png", "best_worst_classes.png", "ap_distribution.png"):
        image = Image.open(out / name)
        image.verify()
        image = Image.open(out / name)
        image.load()
        assert image.format == "PNG" and image.width >= 600
        colors = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colors) > 3  # more than a blank canvas
        assert f"]({name})" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert f"{summary['weighted_map_at_k']:.4f}" in report
    ci = summary["confidence_intervals"]
    assert ci["replicates"] == 200 and ci["level"] == 0.95
    for key in ("weighted_map_at_k", "unweighted_map_at_k", "image_map_at_k"):
        low, high = ci[key]
        assert low < summary[key] < high, key


def test_two_processes_equal_one_process(checkpoint, mosaics, tmp_path):
    """Two ranks under torchrun and two local processes of `--processes 2` give the
    one-process result. Batches of 50 in every run (a 2-rank run pads
    to whole batches), one thread each: the same per-image arithmetic, so the scores are
    bitwise equal and so must every figure be."""
    common = ["--checkpoint", str(checkpoint[0]), "--data", str(mosaics), "--quiet"]
    common += ["--batch-size", "50", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    mlc_cli = [sys.executable, "-m", "mlc.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    for name, launcher, processes in [
        ("one", mlc_cli, []),
        ("two", [*torchrun, f"--master_port={free_port()}", "-m", "mlc.cli"], []),
        ("local", mlc_cli, ["--processes", "2"]),
    ]:
        out = tmp_path / name
        cmd = [*launcher, "eval", *common, *processes, "--output", str(out)]
        cmd += ["--predictions", str(out / "scores.parquet")]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        table = pq.read_table(out / "scores.parquet").to_pydict()
        scores = dict(zip(table["key"], table["scores"], strict=True))
        results[name] = summary, scores, (out / "per_class.csv").read_text()
    one, scores_1, table_1 = results["one"]
    assert one["processes"] == 1
    for name in ("two", "local"):
        two, scores_2, table_2 = results[name]
        assert two["processes"] == 2, name
        assert scores_1 == scores_2, name  # every image scored once, identically
        assert table_1 == table_2, name  # per-class AP@K, full AP, counts: exact
        for key in (
            "weighted_map_at_k",
            "unweighted_map_at_k",
            "full_map",
            "image_map_at_k",
            "images",
            "classes_evaluated",
            "images_evaluated",
        ):
            assert one[key] == two[key], (name, key)
        ci_1, ci_2 = one["confidence_intervals"], two["confidence_intervals"]
        assert ci_1["weighted_map_at_k"] == ci_2["weighted_map_at_k"]  # exact replicate merge
        assert ci_1["image_map_at_k"] == pytest.approx(ci_2["image_map_at_k"], abs=1e-12)


def test_metric_chunks_do_not_change_the_result(checkpoint, mosaics, tmp_path, monkeypatch):
    """The metrics see batches in chunks (eval.evaluate.CHUNK_IMAGES): one chunk of all six
    batches of 50, every batch alone, and chunks of three give the same report."""
    import eval.evaluate

    results = []
    for chunk in (2048, 1, 120):
        monkeypatch.setattr(eval.evaluate, "CHUNK_IMAGES", chunk)
        out = tmp_path / str(chunk)
        summary = run_eval(checkpoint[0], mosaics, out, "--batch-size", "50", "--workers", "0")
        results.append((summary, (out / "per_class.csv").read_text()))
    (first, table), others = results[0], results[1:]
    for summary, other_table in others:
        assert other_table == table
        for key in ("weighted_map_at_k", "unweighted_map_at_k", "full_map", "image_map_at_k"):
            assert summary[key] == first[key], key
        assert summary["images"] == first["images"] == 300
        ci, ci_first = summary["confidence_intervals"], first["confidence_intervals"]
        assert ci["weighted_map_at_k"] == ci_first["weighted_map_at_k"]
        assert ci["image_map_at_k"] == pytest.approx(ci_first["image_map_at_k"], abs=1e-12)


def test_local_processes_fail_together(mosaics, tmp_path):
    """A failing rank ends the group: every rank says why (with its rank), the exit code is the
    error's, nothing keeps running."""
    cmd = [sys.executable, "-m", "mlc.cli", "eval", "--checkpoint", str(tmp_path / "none.pt")]
    cmd += ["--data", str(mosaics), "--processes", "2", "--output", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "[rank 0] mlc eval: error:" in done.stderr and "no such checkpoint" in done.stderr
    assert not (tmp_path / "out").exists()


def test_processes_inside_torchrun_is_refused(checkpoint, mosaics, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the ranks exist already
    run_eval(checkpoint[0], mosaics, tmp_path, "--processes", "2", code=2)
    assert "nproc-per-node" in capsys.readouterr().err


def test_classes_are_matched_by_id(checkpoint, mosaics, single, tmp_path, capsys):
    path, model, class_ids = checkpoint
    state = torch.load(path, weights_only=True)
    reference = {
        line.split(",")[0]: float(line.split(",")[6])
        for line in (single[0] / "per_class.csv").read_text().splitlines()[1:]
    }
    # The same network with its outputs in another order, and its class list permuted alike.
    order = [3, 0, 9, 1, 8, 2, 7, 4, 6, 5]
    permuted = dict(state, class_ids=[class_ids[i] for i in order])
    permuted["model"] = dict(state["model"])
    for name in ("head.weight", "head.bias"):
        permuted["model"][name] = state["model"][name][order]
    torch.save(permuted, tmp_path / "permuted.pt")
    out = tmp_path / "permuted"
    run_eval(tmp_path / "permuted.pt", mosaics, out, "--bootstrap", "0", "--no-plots")
    rows = [line.split(",") for line in (out / "per_class.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == permuted["class_ids"]  # the model's order
    for r in rows:
        assert float(r[6]) == pytest.approx(reference[r[0]], abs=1e-9), r[0]

    # Another vocabulary: a clear error, exit code 2.
    renamed = dict(state, class_ids=["jacket" if c == "coat" else c for c in class_ids])
    torch.save(renamed, tmp_path / "renamed.pt")
    capsys.readouterr()
    run_eval(tmp_path / "renamed.pt", mosaics, tmp_path / "x", code=2)
    err = capsys.readouterr().err
    assert "does not score: 'coat'" in err and "no labels in" in err and "'jacket'" in err
    assert "--class-map" in err

    # --class-map: the shared classes only, each with the AP it has in the full evaluation.
    out = tmp_path / "subset"
    summary = run_eval(
        tmp_path / "renamed.pt",
        mosaics,
        out,
        "--class-map",
        "common",
        "--bootstrap",
        "0",
        "--mode",
        "image",
    )
    assert summary["classes"] == 9 and summary["model_classes_not_evaluated"] == 1
    assert summary["data_classes_not_evaluated"] == 1
    rows = [line.split(",") for line in (out / "per_class.csv").read_text().splitlines()[1:]]
    assert "coat" not in [r[0] for r in rows]
    assert all(float(r[6]) == reference[r[0]] for r in rows)
    assert len((out / "per_image.csv").read_text().splitlines()) == 301


def test_a_lost_shard_is_an_error_unless_allowed(
    checkpoint, mosaics, tmp_path, capsys, monkeypatch
):
    """Issue 19, item 2: a shard deleted from the split stops `mlc eval` (exit 2, the shard
    named, nothing written); with --allow-lost the rest is scored, and summary.json, the printed
    summary and report.md say how many of the split's images were scored and what was lost."""
    import mlc.data.urls

    monkeypatch.setattr(mlc.data.urls.time, "sleep", lambda s: None)  # the retries' waits
    data = tmp_path / "data"
    shutil.copytree(mosaics, data)
    stats = json.loads((data / "test.stats.json").read_text())
    gone = data / stats["shards"][1]
    assert stats["shard_lengths"][1] == 100
    gone.unlink()

    capsys.readouterr()
    run_eval(checkpoint[0], data, tmp_path / "refused", "--bootstrap", "0", code=2)
    err = capsys.readouterr().err
    assert f"100 of 300 samples lost (33.33%: {gone} 100; unreadable shard: 1)" in err
    assert "--allow-lost" in err
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "allowed"
    extra = ["--bootstrap", "0", "--no-plots", "--allow-lost", "0.5"]
    summary = run_eval(checkpoint[0], data, out, *extra)
    printed = capsys.readouterr().out
    assert summary["images"] == 200 and summary["split_images"] == 300
    assert summary["lost_samples"] == 100 and summary["lost_by_shard"] == {str(gone): 100}
    assert summary["loader_problems"] == {"unreadable shard": 1}
    line = "200 of the split's 300 images scored; 100 of 300 samples lost (33.33%: "
    assert f"data: {line}" in printed
    assert f"- data: {line}" in (out / "report.md").read_text()
