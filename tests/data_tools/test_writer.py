"""`mlc shard openimages` end to end on the small dataset of conftest.py, and the writer's library
functions: every output file present and consistent with the others (shards read back with
plain webdataset), the seeded order, byte-identical output whatever the number of workers or
partitions, resuming after SIGKILL, damaged shards rewritten, re-runs with other options refused,
--strict, --select densest:N, and `python -m mlc.cli`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from data_tools.catalog import Catalog, FileLoader, Skip, catalog_table
from data_tools.merge import merge_split
from data_tools.select import select_densest
from data_tools.sources.openimages import read_openimages
from data_tools.writer import ShardError, ShardOptions, write_split
from mlc.cli import main
from mlc.format import SAMPLE_FIELDS

from .conftest import (
    CLASS_IDS,
    CLASS_NAMES,
    IMAGES,
    ROTATIONS,
    encode,
    image_id,
    make_openimages,
    noise_image,
)
from .test_openimages import EXPECTED, EXPECTED_TRAINABLE, LABEL_ROW_SKIPS

REPO = Path(__file__).resolve().parents[2]
SHARD_SIZE = 4  # 30 catalog rows -> 8 shards
N_SHARDS = 8
OUTPUTS = ["train.manifest.parquet", "train.stats.json", "train.report.json"]
IMAGE_SKIPS = {"corrupt image": 2, "missing file": 1, "no known labels": 1}


def shard(data, out, *extra) -> int:
    """`mlc shard openimages` on ``data`` into ``out`` with shards of SHARD_SIZE."""
    return main(["shard", *data.args(out, "--shard-size", SHARD_SIZE, *extra)])


def shard_names(n: int = N_SHARDS) -> list[str]:
    return [f"train-{j:06d}.tar" for j in range(n)]


def result_files(out: Path) -> dict[str, bytes]:
    """The split's shards, manifest, stats and report, and the folder-wide files whose content
    does not name the folder."""
    names = sorted(p.name for p in out.glob("train-*.tar"))
    names += OUTPUTS + ["classes.json", "sizes.json"]
    return {name: (out / name).read_bytes() for name in names}


def timm_info(out: Path) -> dict:
    info = json.loads((out / "_info.json").read_text())
    assert info.pop("name") == out.name
    return info


def digests(files: dict[str, bytes]) -> dict[str, str]:
    """sha256 per file: a readable diff when outputs differ."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "train.manifest.parquet").to_pylist()


def temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp-*"))


@pytest.fixture(scope="module")
def ref(oi, tmp_path_factory) -> Path:
    """One uninterrupted run with one worker: what every other way of writing must equal.
    Read-only."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert shard(oi, out) == 0
    return out


# ---------------------------------------------------------------- the outputs, consistent


def test_outputs_exist(ref):
    names = {p.name for p in ref.iterdir()}
    assert names == {
        *shard_names(),
        *OUTPUTS,
        "classes.json",
        "sizes.json",
        "_info.json",
        "_parts",
    }
    parts = {p.name for p in (ref / "_parts" / "train").iterdir()}
    assert parts == {"plan.json", *(f"{name}.json" for name in shard_names())}
    assert temporaries(ref) == []


def test_classes_json(ref):
    assert json.loads((ref / "classes.json").read_text()) == {
        "format_version": 1,
        "annotation": "partial",
        "classes": [
            {"index": i, "id": cid, "name": name}
            for i, (cid, name) in enumerate(zip(CLASS_IDS, CLASS_NAMES, strict=True))
        ],
    }


def test_shards_read_back_with_webdataset_equal_the_manifest(oi, ref):
    rows = manifest(ref)
    urls = [str(ref / name) for name in shard_names()]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [r["key"] for r in rows]
    keys = [r["key"] for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(len(k) == 9 and k.isdigit() for k in keys)
    assert sorted(r["id"] for r in rows) == sorted(oi.written_ids)
    suffix = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
    for sample, row in zip(samples, rows, strict=True):
        assert Path(sample["__url__"]).name == row["shard"]
        (ext,) = set(sample) - {"__key__", "__url__", "__local_path__", "json"}
        assert json.loads(sample["json"]) == {field: row[field] for field in SAMPLE_FIELDS}
        data = sample[ext]
        assert len(data) == row["bytes"]
        im = Image.open(io.BytesIO(data))
        im.load()
        assert im.size == (row["width"], row["height"])
        assert ext == suffix[im.format]
        k = int(row["id"], 16)
        assert row["source"] == f"{row['id']}.jpg"
        assert (row["positives"], row["negatives"]) == EXPECTED[k]
        kind, width, height = IMAGES[k]
        if k in ROTATIONS:  # re-encoded, turned
            assert ext == "jpg" and data != (oi.images / row["source"]).read_bytes()
            turned = ROTATIONS[k] in (90, 270)
            assert im.size == ((height, width) if turned else (width, height))
        else:  # pass-through: the input file, byte for byte
            assert data == (oi.images / row["source"]).read_bytes()
            assert ext == {"PNG": "png", "WEBP": "webp"}.get(kind, "jpg")


def test_tar_members_have_fixed_metadata(ref):
    for name in shard_names():
        data = (ref / name).read_bytes()
        if len(data) > 512:
            assert data[257:265] == b"ustar\x0000"  # POSIX ustar, not GNU or pax
        with tarfile.open(ref / name) as tar:
            members = tar.getmembers()
        for member in members:
            assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)
            assert (member.uname, member.gname) == ("", "")
            assert member.isfile()
        # Each sample: the image, then its json, under one key.
        keys = [m.name.split(".")[0] for m in members]
        assert keys[0::2] == keys[1::2]
        assert all(m.name.endswith(".json") for m in members[1::2])


def test_stats_equal_counts_from_the_manifest(ref):
    rows = manifest(ref)
    stats = json.loads((ref / "train.stats.json").read_text())
    positives = Counter(CLASS_IDS[i] for r in rows for i in r["positives"])
    negatives = Counter(CLASS_IDS[i] for r in rows for i in r["negatives"])
    per_shard = Counter(r["shard"] for r in rows)
    assert stats == {
        "format_version": 1,
        "split": "train",
        "samples": len(rows),
        "annotation": "partial",
        "num_classes": len(CLASS_IDS),
        "shards": shard_names(),
        "shard_lengths": [per_shard[name] for name in shard_names()],
        "positive_counts": {c: positives[c] for c in CLASS_IDS},
        "negative_counts": {c: negatives[c] for c in CLASS_IDS},
    }
    assert len(rows) == 27


def test_sizes_and_info_agree_with_the_shard_files(ref):
    lengths = []
    for name in shard_names():
        with tarfile.open(ref / name) as tar:
            lengths.append(len({m.name.split(".")[0] for m in tar.getmembers()}))
    assert json.loads((ref / "sizes.json").read_text()) == dict(
        zip(shard_names(), lengths, strict=True)
    )
    assert timm_info(ref) == {
        "splits": {
            "train": {
                "name": "train",
                "num_samples": sum(lengths),
                "filenames": shard_names(),
                "shard_lengths": lengths,
            }
        }
    }
    assert sum(lengths) == 27


def test_report_reconciles_and_counts_every_skip(oi, ref):
    report = json.loads((ref / "train.report.json").read_text())
    assert report["images_read"] == report["written"] + report["skipped"]
    assert (report["images_read"], report["written"], report["skipped"]) == (31, 27, 4)
    assert report["shards"] == N_SHARDS
    counts = {reason: e["count"] for reason, e in report["image_skips"].items()}
    assert counts == IMAGE_SKIPS
    assert sorted(report["image_skips"]["corrupt image"]["examples"]) == [
        f"{image_id(26)}: truncated JPEG (no end marker)",
        f"{image_id(27)}: not a recognised image format",
    ]
    (missing,) = report["image_skips"]["missing file"]["examples"]
    assert missing.startswith(f"{image_id(25)}: ") and missing.endswith(f"{image_id(25)}.jpg")
    assert report["image_skips"]["no known labels"]["examples"] == [image_id(28)]
    rows = {reason: e["count"] for reason, e in report["label_row_skips"].items()}
    assert rows == LABEL_ROW_SKIPS
    assert report["label_rows_read"] == 75
    assert report["label_rows_skipped"] == sum(LABEL_ROW_SKIPS.values())
    # Used: the labels of the 27 images written (one row each), counted from the hand-written
    # catalog; the 4 rows of the missing and corrupt images 25-27 are not among them.
    assert report["label_rows_used"] == 62
    assert report["label_rows_of_skipped_images"] == 4
    assert report["options"] == {
        "shard_size": SHARD_SIZE,
        "max_side": None,
        "quality": 90,
        "verify": "decode",
        "seed": 0,
        "select": None,
        "trainable": None,
        "rotation": str(oi.rotation),
    }
    assert str(oi.labels) in report["source"]


def test_report_counts_only_label_rows_of_written_images_as_used(oi, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard(oi, out, "--trainable", oi.trainable, "--select", "densest:5") == 0
    report = json.loads((out / "train.report.json").read_text())
    assert report["options"]["trainable"] == str(oi.trainable)
    assert report["options"]["select"] == "densest:5"
    written = [int(r["id"], 16) for r in manifest(out)]
    used = sum(len(p) + len(n) for k, (p, n) in EXPECTED_TRAINABLE.items() if k in written)
    assert report["label_rows_used"] == used
    skipped = report["label_rows_skipped"]
    assert report["label_rows_of_skipped_images"] == 75 - skipped - used > 0
    printed = capsys.readouterr().out
    assert (
        f"label rows: 75 read = {used} used + {75 - skipped - used} of skipped images + "
        f"{skipped} skipped"
    ) in printed


def test_max_side_end_to_end(oi, tmp_path):
    out = tmp_path / "out"
    assert shard(oi, out, "--max-side", 20, "--quality", 80) == 0
    for row in manifest(out):
        kind, width, height = IMAGES[int(row["id"], 16)]
        if ROTATIONS.get(int(row["id"], 16)) in (90, 270):
            width, height = height, width
        assert (row["width"], row["height"]) == ((20, 15) if width > height else (15, 20))
    samples = list(
        webdataset.WebDataset(str(out / "train-{000000..000007}.tar"), shardshuffle=False)
    )
    assert len(samples) == 27
    for sample in samples:
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"jpg", "json"}
        meta = json.loads(sample["json"])
        assert Image.open(io.BytesIO(sample["jpg"])).size == (meta["width"], meta["height"])


# ---------------------------------------------------------------- the library functions


def test_library_functions_write_what_the_command_writes(oi, ref, tmp_path):
    catalog = read_openimages(oi.classes, [oi.labels], oi.images, rotation_csv=oi.rotation)
    out = tmp_path / "out"
    skips = write_split(catalog, out, "train", ShardOptions(shard_size=SHARD_SIZE), progress=False)
    assert dict(skips.counts) == {"corrupt image": 2, "missing file": 1}  # its shards' skips
    report = merge_split(out, "train")
    assert report == json.loads((ref / "train.report.json").read_text())
    assert digests(result_files(out)) == digests(result_files(ref))


class _MemoryLoader:
    """A picklable loader of generated images; "bad" locators are skipped."""

    def load(self, locator: str) -> bytes:
        if locator.startswith("bad"):
            raise Skip("unreadable file", locator)
        return encode(noise_image(8, 6, seed=int(locator)), "PNG")


def test_write_split_with_any_catalog_and_full_annotation(tmp_path):
    table = catalog_table(
        ["a", "b", "c", "d", "e"],
        ["1", "2", "bad-3", "4", "5"],
        [[0], [0, 1], [1], [], [1]],
        [[], [], [], [], []],
    )
    catalog = Catalog(["x", "y"], ["X", "Y"], table, _MemoryLoader(), "full", images_read=5)
    out = tmp_path / "out"
    write_split(catalog, out, "val", ShardOptions(shard_size=2, seed=3), workers=2, progress=False)
    report = merge_split(out, "val")
    assert (report["written"], report["skipped"], report["shards"]) == (4, 1, 3)
    stats = json.loads((out / "val.stats.json").read_text())
    rows = pq.read_table(out / "val.manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == ["a", "b", "d", "e"]
    # "full": every sample without the class is a negative.
    assert stats["positive_counts"] == {"x": 2, "y": 2}
    assert stats["negative_counts"] == {"x": 2, "y": 2}
    assert all(r["width"] == 8 and r["height"] == 6 for r in rows)


def test_file_loader_refuses_paths_outside_its_root(tmp_path):
    (tmp_path / "secret.jpg").write_bytes(b"x")
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    loader = FileLoader(str(root))
    assert loader.load("a.jpg") == b"a"
    for locator in ("../secret.jpg", str(tmp_path / "secret.jpg")):
        with pytest.raises(Skip) as e:
            loader.load(locator)
        assert e.value.reason == "path outside the image root"
    with pytest.raises(Skip) as e:
        loader.load("nope.jpg")
    assert e.value.reason == "missing file"


def test_bad_arguments(tmp_path):
    catalog = Catalog(["x"], ["X"], catalog_table([], [], [], []), FileLoader("."), "full", 0)
    with pytest.raises(ValueError, match="partition"):
        write_split(catalog, tmp_path / "out", "train", partition=(3, 3), progress=False)
    for kwargs in ({"shard_size": 0}, {"max_side": 0}, {"quality": 101}, {"verify": "no"}):
        with pytest.raises(ValueError):
            ShardOptions(**kwargs)


# ---------------------------------------------------------------- order and determinism


def test_seed_shuffles_the_order(oi, ref, tmp_path):
    orders = {0: [r["id"] for r in manifest(ref)]}
    for seed in (1, 2):
        assert shard(oi, tmp_path / f"seed{seed}", "--seed", seed) == 0
        orders[seed] = [r["id"] for r in manifest(tmp_path / f"seed{seed}")]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])
    assert orders[0] != orders[1] != orders[2] != orders[0]
    in_file_order = [i for i in map(image_id, EXPECTED) if i in set(orders[0])]
    assert orders[0] != in_file_order  # shuffled, not the labels file's order
    # The same seed again: the same bytes.
    assert shard(oi, tmp_path / "again") == 0
    assert digests(result_files(tmp_path / "again")) == digests(result_files(ref))


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_give_byte_identical_output(oi, ref, tmp_path, workers):
    out = tmp_path / "out"
    assert shard(oi, out, "--workers", workers) == 0
    assert digests(result_files(out)) == digests(result_files(ref))
    assert timm_info(out) == timm_info(ref)


def test_partitions_then_merge_equal_one_run(oi, ref, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard(oi, out, "--partition", "0/3") == 0
    assert shard(oi, out, "--partition", "1/3") == 0
    assert not (out / "train.manifest.parquet").exists()
    assert not list(out.glob("train-*.tar"))  # staged: nothing is published before the merge
    written = sorted(p.name for p in (out / "_parts" / "train").glob("train-*.tar"))
    assert written == [n for j, n in enumerate(shard_names()) if j % 3 in (0, 1)]
    capsys.readouterr()

    # Merging too early names what is missing.
    assert main(["shard", "merge", "--out", str(out), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert "2 of 8 shards of 'train' are not written yet" in err
    assert "train-000002.tar, train-000005.tar" in err
    assert "run every partition" in err
    assert not (out / "train.manifest.parquet").exists()

    assert shard(oi, out, "--partition", "2/3") == 0
    assert main(["shard", "merge", "--out", str(out), "--split", "train"]) == 0
    assert digests(result_files(out)) == digests(result_files(ref))
    assert timm_info(out) == timm_info(ref)
    assert temporaries(out) == []
    assert not list((out / "_parts" / "train").glob("*.tar"))  # all moved into place


def test_merge_of_nothing_fails_clearly(tmp_path, capsys):
    assert main(["shard", "merge", "--out", str(tmp_path), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert "plan.json not found" in err and "no shards of split 'train'" in err


# ---------------------------------------------------------------- resuming


def many_images(root: Path, n: int):
    """n images, one label row each: a dataset where every image is written."""
    data = make_openimages(root, clean=True)
    for p in data.images.iterdir():
        p.unlink()
    lines = ["ImageID,Source,LabelName,Confidence"]
    for k in range(1, n + 1):
        (data.images / f"{image_id(k)}.jpg").write_bytes(
            encode(noise_image(40, 30, seed=k), "JPEG", quality=90)
        )
        lines.append(f"{image_id(k)},verification,{CLASS_IDS[k % 8]},{k % 2}")
    data.labels.write_text("\n".join(lines) + "\n")
    return data


def part_files(out: Path) -> list[Path]:
    parts = out / "_parts" / "train"
    if not parts.is_dir():
        return []
    return [
        Path(e.path)
        for e in os.scandir(parts)
        if e.name.endswith(".tar.json") and not e.name.startswith(".")
    ]


def kill_after_parts(cmd: list[str], out: Path, after: int, n_shards: int) -> list[Path] | None:
    """Run cmd, SIGKILL it as soon as ``after`` part files exist; the part files then, or None
    if the run finished (or wrote every part) before it could be killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while proc.poll() is None:
            if len(part_files(out)) >= after:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.0005)
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()
            return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    parts = part_files(out)
    return parts if len(parts) < n_shards else None


@pytest.mark.parametrize("after", [1, 10])
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, after):
    """Killed once ``after`` shards are complete (of 20 with 60 images), then run again."""
    for n in (60, 240, 960):
        data = many_images(tmp_path / f"data{n}", n)
        args = data.args(tmp_path / f"killed{n}", "--shard-size", 3, rotation=False)
        out = tmp_path / f"killed{n}"
        cmd = [sys.executable, "-m", "mlc.cli", "shard", *args]
        parts = kill_after_parts(cmd, out, after, n // 3)
        if parts is not None:
            break
    else:
        pytest.skip("every run finished before it could be killed: nothing to resume")
    assert not (out / "train.manifest.parquet").exists()
    # Shards whose part file exists are complete (staged until the merge publishes them): the
    # re-run must keep them, not rewrite them.
    kept = {p.name[: -len(".json")]: p.with_suffix("").stat().st_ino for p in parts}

    assert main(["shard", *args]) == 0  # the same command again
    reference = tmp_path / "reference"
    assert main(["shard", *data.args(reference, "--shard-size", 3, rotation=False)]) == 0
    files = result_files(out)
    assert len([name for name in files if name.endswith(".tar")]) == n // 3
    assert digests(files) == digests(result_files(reference))
    assert temporaries(out) == []
    assert {name: (out / name).stat().st_ino for name in kept} == kept


def test_damaged_shards_and_parts_are_rewritten(oi, ref, tmp_path):
    out = tmp_path / "out"
    assert shard(oi, out) == 0
    inode = {name: (out / name).stat().st_ino for name in shard_names()}
    with (out / "train-000003.tar").open("r+b") as f:  # truncated
        f.truncate(f.seek(0, io.SEEK_END) // 2)
    data = bytearray((out / "train-000001.tar").read_bytes())  # same size, one byte changed
    data[600] ^= 0xFF
    (out / "train-000001.tar").write_bytes(bytes(data))
    (out / "train-000005.tar").unlink()  # gone
    (out / "_parts" / "train" / "train-000006.tar.json").write_text("{")  # damaged part file
    (out / "_parts" / "train" / "train-000007.tar.json").unlink()  # no part file
    (out / "_parts" / "train" / ".train-000002.tar.tmp-12345").write_bytes(b"left by a kill")

    assert shard(oi, out) == 0
    assert digests(result_files(out)) == digests(result_files(ref))
    assert temporaries(out) == []
    for j in (0, 2, 4):  # intact: kept as they were
        assert (out / shard_names()[j]).stat().st_ino == inode[shard_names()[j]]


@pytest.mark.parametrize(
    "other",
    [["--max-side", 20], ["--seed", 1], ["--verify", "structure"], ["--shard-size", 5]],
    ids=["max-side", "seed", "verify", "shard-size"],
)
def test_rerun_with_other_options_fails(oi, tmp_path, capsys, other):
    out = tmp_path / "out"
    assert shard(oi, out) == 0
    before = result_files(out)
    capsys.readouterr()
    assert shard(oi, out, *other) == 2
    err = capsys.readouterr().err
    assert "mlc shard: error: " in err
    assert "other inputs or options" in err and "new output folder" in err
    assert result_files(out) == before


def test_rerun_with_other_classes_fails(oi, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard(oi, out) == 0
    capsys.readouterr()
    assert shard(oi, out, "--trainable", oi.trainable) == 2
    err = capsys.readouterr().err
    assert "classes.json lists other classes" in err


def test_refused_rerun_leaves_the_folder_as_it_was(oi, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard(oi, out) == 0
    before = result_files(out)
    plan = (out / "_parts" / "train" / "plan.json").read_bytes()
    assert shard(oi, out, "--max-side", 20) == 2
    assert main(["shard", "merge", "--out", str(out), "--split", "train"]) == 0
    report = json.loads((out / "train.report.json").read_text())
    assert report["options"]["max_side"] is None
    assert (out / "_parts" / "train" / "plan.json").read_bytes() == plan
    assert result_files(out) == before


def test_rerun_with_another_image_folder_fails(oi, tmp_path):
    out = tmp_path / "out"
    assert shard(oi, out) == 0
    other = tmp_path / "other-images"
    shutil.copytree(oi.images, other)
    (other / f"{image_id(1)}.jpg").write_bytes(encode(noise_image(64, 48, seed=99), "JPEG"))
    args = [a if a != str(oi.images) else str(other) for a in oi.args(out)]
    assert main(["shard", *args, "--shard-size", str(SHARD_SIZE)]) == 2


def test_a_temporary_of_another_split_does_not_stop_a_run(oi, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = out / ".train-extra-000000.tar.tmp-12345"  # another split's run, killed or running
    other.write_bytes(b"")
    assert shard(oi, out) == 0
    assert other.exists()  # not this split's: not removed


# ---------------------------------------------------------------- --strict, --select


def published(out: Path) -> list[str]:
    """What a split's publication puts in the dataset folder."""
    return sorted(p.name for p in out.glob("*") if p.name != "_parts")


def test_strict_refuses_label_problems_before_writing_anything(oi, oi_clean, tmp_path, capsys):
    out = tmp_path / "a"
    assert shard(oi, out, "--strict") == 1
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    assert not out.exists()  # not even classes.json: no image was read
    # Images apart from label rows, each reason with its count and an example.
    err = captured.err.splitlines()
    assert err[:5] == [
        f"mlc shard: --strict: refused before writing any shard to {out}; skipped:",
        "train: 1 image(s) and 9 label row(s) skipped",
        "  images skipped: 1",
        f"    {'no known labels':<38}{1:>7}   e.g. {image_id(28)}",
        "  label rows skipped: 9",
    ]
    assert {line[4:42].strip(): int(line[42:49]) for line in err[5:]} == LABEL_ROW_SKIPS
    assert all(" e.g. " in line for line in err[5:])

    assert shard(oi_clean, tmp_path / "b", "--strict") == 0
    report = json.loads((tmp_path / "b" / "train.report.json").read_text())
    assert (report["written"], report["skipped"], report["label_rows_skipped"]) == (27, 0, 0)
    assert sorted(r["id"] for r in manifest(tmp_path / "b")) == sorted(oi_clean.written_ids)


def test_strict_counts_label_rows_alone(oi_clean, tmp_path, capsys):
    """A dataset whose images are all written but one label row was skipped: still exit 1."""
    data = make_openimages(tmp_path / "data", clean=True)
    data.labels.write_text(data.labels.read_text() + f"{image_id(1)},verification,/m/0xx,1\n")
    assert shard(data, tmp_path / "out", "--strict") == 1
    err = capsys.readouterr().err
    assert "train: 0 image(s) and 1 label row(s) skipped\n" in err
    assert "images skipped" not in err and "  label rows skipped: 1\n" in err
    assert not (tmp_path / "out").exists()


def test_strict_publishes_nothing_when_images_are_broken_and_resumes_once_fixed(tmp_path, capsys):
    data = make_openimages(tmp_path / "data", clean=True)
    good = {k: (data.images / f"{image_id(k)}.jpg").read_bytes() for k in (3, 5)}
    (data.images / f"{image_id(3)}.jpg").write_bytes(good[3][: len(good[3]) // 2])
    (data.images / f"{image_id(5)}.jpg").unlink()
    out = tmp_path / "out"
    assert shard(data, out, "--strict") == 1
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    assert published(out) == ["classes.json"]  # no shard, manifest, stats or report
    err = captured.err.splitlines()
    assert err[0] == (
        f"mlc shard: --strict: nothing published in {out} (the shards written wait in "
        f"{out / '_parts'} for a re-run); skipped:"
    )
    assert err[1:4] == [
        "train: 2 image(s) and 0 label row(s) skipped",
        "  images skipped: 2",
        f"    {'corrupt image':<38}{1:>7}   e.g. {image_id(3)}: truncated JPEG (no end marker)",
    ]
    assert err[4].startswith(f"    {'missing file':<38}{1:>7}   e.g. {image_id(5)}: ")
    assert len(err) == 5  # no label rows
    staged = {p.name: p.stat().st_ino for p in (out / "_parts" / "train").glob("*.tar")}
    assert len(staged) == N_SHARDS - 1  # 27 images in shards of 4

    # Fixed: the same command publishes, rewriting only the shards that skipped an image.
    for k, data_bytes in good.items():
        (data.images / f"{image_id(k)}.jpg").write_bytes(data_bytes)
    assert shard(data, out, "--strict") == 0
    assert f"wrote {out}" in capsys.readouterr().out
    reference = tmp_path / "reference"
    assert shard(data, reference) == 0
    assert digests(result_files(out)) == digests(result_files(reference))
    kept = [name for name in staged if (out / name).stat().st_ino == staged[name]]
    assert len(kept) == len(staged) - 2  # the two shards with a skipped image were rewritten


def test_strict_accepts_what_select_and_trainable_leave_out(oi_clean, tmp_path):
    out = tmp_path / "out"
    args = ["--strict", "--trainable", oi_clean.trainable, "--select", "densest:5"]
    assert shard(oi_clean, out, *args) == 0
    report = json.loads((out / "train.report.json").read_text())
    assert set(report["image_skips"]) == {"no trainable labels", "not selected (densest:5)"}
    assert set(report["label_row_skips"]) == {"not a trainable class"}
    assert report["written"] == 5


def test_strict_with_partitions_and_merge(tmp_path, capsys):
    data = make_openimages(tmp_path / "data", clean=True)
    (data.images / f"{image_id(3)}.jpg").write_bytes(b"broken")
    out = tmp_path / "out"
    codes = [shard(data, out, "--strict", "--partition", f"{i}/2") for i in range(2)]
    assert sorted(codes) == [0, 1]  # the partition whose shards hold image 3 fails
    capsys.readouterr()
    merge = ["shard", "merge", "--out", str(out), "--split", "train"]
    assert main([*merge, "--strict"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mlc shard: --strict: nothing published in {out}; skipped:\n")
    assert "train: 1 image(s) and 0 label row(s) skipped" in err
    assert published(out) == ["classes.json"]
    assert main(merge) == 0  # without --strict: published, the skip reported
    assert len(manifest(out)) == 26


@pytest.mark.parametrize("n", [4, 5, 7])
def test_select_densest(oi, tmp_path, n):
    out = tmp_path / "out"
    assert shard(oi, out, "--select", f"densest:{n}") == 0
    # Known labels per catalog image, from the hand-written catalog (broken images included:
    # they have at most 2, fewer than the threshold of any n here).
    known = {image_id(k): len(p) + len(q) for k, (p, q) in EXPECTED.items()}
    threshold = sorted(known.values(), reverse=True)[n - 1]
    assert threshold >= 3
    must = {i for i, c in known.items() if c > threshold}
    may = {i for i, c in known.items() if c == threshold}
    selected = {r["id"] for r in manifest(out)}
    assert len(selected) == n
    assert must <= selected <= must | may
    if n in (4, 7):  # no tie at the threshold
        assert selected == {i for i, c in known.items() if c >= threshold}
    report = json.loads((out / "train.report.json").read_text())
    counts = {reason: e["count"] for reason, e in report["image_skips"].items()}
    assert counts == {f"not selected (densest:{n})": len(EXPECTED) - n, "no known labels": 1}
    assert report["images_read"] == report["written"] + report["skipped"] == 31


def test_select_more_than_there_are(oi, ref, tmp_path):
    out = tmp_path / "out"
    assert shard(oi, out, "--select", "densest:1000") == 0
    files, expected = result_files(out), result_files(ref)
    report, expected_report = (json.loads(f.pop("train.report.json")) for f in (files, expected))
    assert digests(files) == digests(expected)
    assert report.pop("options") == {**expected_report.pop("options"), "select": "densest:1000"}
    assert report.pop("selection") == {"requested": 1000, "short": 1000 - 27}
    assert report == expected_report


def broken_densest(root: Path):
    """The clean dataset with its two densest images broken: image 15 (8 known labels) corrupt,
    16 (6) missing. The next densest are 17 (5 known labels), 4 (4), then 2, 8 and 24 (3 each,
    in an order the seed's tie-break decides)."""
    data = make_openimages(root, clean=True)
    (data.images / f"{image_id(15)}.jpg").write_bytes(b"not an image")
    (data.images / f"{image_id(16)}.jpg").unlink()
    return data


def test_select_densest_replaces_broken_images_by_the_next_densest(tmp_path, capsys):
    data = broken_densest(tmp_path / "data")
    out = tmp_path / "out"
    assert shard(data, out, "--select", "densest:3") == 0
    selected = {int(r["id"], 16) for r in manifest(out)}
    assert len(selected) == 3
    assert {17, 4} < selected < {17, 4, 2, 8, 24}
    report = json.loads((out / "train.report.json").read_text())
    assert (report["images_read"], report["written"], report["skipped"]) == (27, 3, 24)
    assert report["image_skips"] == {
        "corrupt image": {
            "count": 1,
            "examples": [f"{image_id(15)}: not a recognised image format"],
        },
        "missing file": {
            "count": 1,
            "examples": [f"{image_id(16)}: {data.images / image_id(16)}.jpg"],
        },
        "not selected (densest:3)": {
            "count": 22,
            "examples": report["image_skips"]["not selected (densest:3)"]["examples"],
        },
    }
    assert report["selection"] == {"requested": 3, "short": 0}
    # The same selection and bytes with more workers, and with partitions then a merge.
    select = ["--select", "densest:3"]
    for extra in (["--workers", 3], ["--partition", "0/2"]):
        assert shard(data, tmp_path / extra[0], *select, *extra) == 0
    assert shard(data, tmp_path / "--partition", *select, "--partition", "1/2") == 0
    assert main(["shard", "merge", "--out", str(tmp_path / "--partition"), "--split", "train"]) == 0
    for other in ("--workers", "--partition"):
        assert digests(result_files(tmp_path / other)) == digests(result_files(out))


def test_select_densest_says_when_fewer_can_be_written(oi, tmp_path, capsys):
    """30 candidates of which 3 are broken: densest:29 writes the 27 others, and says so."""
    out = tmp_path / "out"
    assert shard(oi, out, "--select", "densest:29") == 0
    assert len(manifest(out)) == 27
    report = json.loads((out / "train.report.json").read_text())
    assert report["selection"] == {"requested": 29, "short": 2}
    assert {reason: e["count"] for reason, e in report["image_skips"].items()} == IMAGE_SKIPS
    printed = capsys.readouterr().out
    assert "--select densest:29: 2 fewer images than asked" in printed


class _CountingLoader(_MemoryLoader):
    loads = 0

    def load(self, locator: str) -> bytes:
        type(self).loads += 1
        return super().load(locator)


def test_select_checks_in_rank_order_and_saves_the_outcomes(tmp_path):
    # Known labels: a 4, b 3 (broken), c 2 (broken), d 2, e 1, f 0.
    table = catalog_table(
        ["a", "b", "c", "d", "e", "f"],
        ["1", "bad-2", "bad-3", "4", "5", "6"],
        [[0, 1], [0, 1, 2], [1, 2], [0], [2], []],
        [[2, 3], [], [], [1], [], []],
    )
    catalog = Catalog(
        ["w", "x", "y", "z"], ["W", "X", "Y", "Z"], table, _CountingLoader(), "partial", 6
    )
    options = ShardOptions(shard_size=2)
    out = tmp_path / "out"
    _CountingLoader.loads = 0
    selected = select_densest(catalog, 2, options, out, "val", progress=False)
    assert selected.table["id"].to_pylist() == ["a", "d"]
    assert _CountingLoader.loads == 4  # a, b, c (round 1: a b; round 2: c), d: not e or f
    assert selected.image_skips.to_dict() == {
        "unreadable file": {"count": 2, "examples": ["b: bad-2", "c: bad-3"]},
        "not selected (densest:2)": {"count": 2, "examples": ["e", "f"]},
    }
    assert selected.options == {"select": "densest:2"}
    # A re-run (or another partition) uses the saved outcomes: no image is read again.
    again = select_densest(catalog, 2, options, out, "val", workers=2, progress=False)
    assert _CountingLoader.loads == 4
    assert again.table.equals(selected.table)
    assert again.image_skips.to_dict() == selected.image_skips.to_dict()
    # recheck (--strict) reads the broken ones again, in case they were fixed.
    select_densest(catalog, 2, options, out, "val", progress=False, recheck=True)
    assert _CountingLoader.loads == 8
    # Other options into the same folder: refused.
    with pytest.raises(ShardError, match="selection made from other inputs or options"):
        select_densest(catalog, 2, ShardOptions(shard_size=2, max_side=4), out, "val")


# ---------------------------------------------------------------- python -m mlc.cli


def test_python_m_mlc_cli(oi_clean, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlc.cli", "shard", *oi_clean.args(out), "--strict"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train: 27 images read" in done.stdout
    assert len(manifest(out)) == 27
