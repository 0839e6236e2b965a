"""mlc.data.ShardLoader against the guarantees of docs/loader.md, on small `mlc shard` datasets
(tests/mlc/data/conftest.py): batch layout, labels from the manifest, equal batch counts per rank,
eval coverage with padding, train epochs, exact resume, damaged data, URLs and pipe: refusal.

Ranks are simulated (``rank=r, world_size=2`` in one process); test_torchrun_ddp runs the loader
under a real 2-process torch.distributed job (tests/mlc/data/ddp_loader_job.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlc.data.ring
import mlc.data.urls
from mlc.data import (
    LoaderConfig,
    Shard,
    ShardLoader,
    counts,
    dataset_shards,
    normalize,
    url_shards,
)
from mlc.data.decode import decode_eval, decode_train
from mlc.data.pipeline import (
    _WRITTEN,
    BatchImages,
    Piece,
    batches_per_slot,
    parse_labels,
    sample_rng,
    split_shards,
)
from mlc.data.urls import ShardOpenError, open_url
from mlc.dist import free_port
from mlc.format import OPENCLIP_SIZES_FILE, encode_sample_json

from .conftest import Dataset, sample_images, tar_members, write_tar

SIZE = 32


def eval_config(**kwargs) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": 5, "image_size": SIZE, "mode": "eval", **kwargs})


def train_config(**kwargs) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": 4, "image_size": SIZE, "mode": "train", **kwargs})


def run_epochs(loader: ShardLoader, epochs: int) -> list[list]:
    """The batches of the first ``epochs`` epochs of an (endless) train loader, by epoch."""
    out = [[] for _ in range(epochs)]
    stream = iter(loader)
    for batch in stream:
        if loader.epoch >= epochs:
            break
        out[loader.epoch].append(batch)
    stream.close()
    return out


def valid_keys(batches) -> list[str]:
    return [k for b in batches for k, v in zip(b.keys, b.valid.tolist(), strict=True) if v]


def check_labels(ds: Dataset, batches) -> None:
    """targets and mask of every valid entry are the manifest's; padding is all zeros."""
    for b in batches:
        for i, (key, valid) in enumerate(zip(b.keys, b.valid.tolist(), strict=True)):
            if valid:
                targets, mask = ds.expected(key)
                assert b.targets[i].numpy().tolist() == targets.tolist(), key
                assert b.mask[i].numpy().tolist() == mask.tolist(), key
            else:
                assert key == ""
                assert not b.targets[i].any() and not b.mask[i].any() and not b.images[i].any()


def check_layout(batch, batch_size: int, num_classes: int, channels: int = 3) -> None:
    assert batch.images.dtype == torch.uint8
    assert batch.images.shape == (batch_size, channels, SIZE, SIZE)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    for t in (batch.targets, batch.mask):
        assert t.dtype == torch.uint8 and t.shape == (batch_size, num_classes)
    assert batch.valid.dtype == torch.bool and batch.valid.shape == (batch_size,)
    assert isinstance(batch.keys, list) and len(batch.keys) == batch_size
    assert all(isinstance(k, str) for k in batch.keys)


def chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("channels", [3, 1])
def test_eval_batch_layout_and_pixels(partial_ds, num_workers, channels):
    loader = partial_ds.loader(eval_config(num_workers=num_workers, channels=channels))
    batches = list(loader)
    stored = sample_images(partial_ds)
    assert len(batches) == loader.batches_per_epoch()
    for b in batches:
        check_layout(b, 5, partial_ds.num_classes, channels)
        for i, key in enumerate(b.keys):
            if key:  # the pixels are the eval decode of the stored bytes, in NCHW order
                expected = decode_eval(stored[key], SIZE, channels=channels)
                assert torch.equal(b.images[i], chw(expected)), key
    assert sorted(valid_keys(batches)) == sorted(partial_ds.keys)


@pytest.mark.parametrize("ds_name", ["partial_ds", "full_ds"])
def test_targets_and_mask_match_manifest(request, ds_name):
    ds: Dataset = request.getfixturevalue(ds_name)
    batches = list(ds.loader(eval_config(num_workers=2)))
    keys = valid_keys(batches)
    assert sorted(keys) == sorted(ds.keys)
    check_labels(ds, batches)
    masks = torch.cat([b.mask[b.valid] for b in batches])
    if ds.full:  # every label known
        assert bool((masks == 1).all())
    else:  # known = positives + verified negatives only: some labels unknown
        assert 0 < masks.float().mean() < 1
        assert any(ds.manifest[k]["negatives"] for k in keys)


def test_train_batch_labels_and_augmentation(full_ds):
    """Train batches: labels from the manifest, pixels = decode_train with the (seed, epoch,
    key) randomness that docs/loader.md promises (so a resume reproduces them)."""
    config = train_config(num_workers=2, seed=5)
    loader = full_ds.loader(config)
    stored = sample_images(full_ds)
    (epoch0,) = run_epochs(loader, 1)
    for b in epoch0:
        check_layout(b, 4, full_ds.num_classes)
        assert bool(b.valid.all())
        for i, key in enumerate(b.keys):
            rng = sample_rng(config.seed, 0, key)
            assert torch.equal(b.images[i], chw(decode_train(stored[key], SIZE, rng))), key
    check_labels(full_ds, epoch0)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("channels", [3, 1])
def test_reused_worker_buffers_carry_exactly_their_batch(partial_ds, monkeypatch, mode, channels):
    """DataLoader workers hand batches over in reused shared-memory buffers (mlc.data.ring):
    with each batch dropped once read, the buffers really are reused, and every batch is
    exactly its own (pixels, labels, zeroed padding), as a held list of batches shows too."""
    taken = Counter()
    take = mlc.data.ring.BatchRing.take

    def counting_take(self, worker, number, buffer):
        taken["first use" if buffer is not None else "reuse"] += 1
        return take(self, worker, number, buffer)

    monkeypatch.setattr(mlc.data.ring.BatchRing, "take", counting_take)
    make = eval_config if mode == "eval" else train_config
    config = make(num_workers=2, batch_size=2, channels=channels, seed=3)
    stored = sample_images(partial_ds)
    copies = []
    batches = partial_ds.loader(config)  # eval: one pass; train: endless, 40 batches taken
    for b in batches if mode == "eval" else itertools.islice(batches, 40):  # each one dropped
        copies.append(
            (b.images.clone(), b.targets.clone(), b.mask.clone(), b.valid.clone(), b.keys)
        )
    assert taken["reuse"] > 0 and taken["first use"] <= 2 * mlc.data.ring.SLOTS
    for images, targets, mask, valid, keys in copies:
        for i, key in enumerate(keys):
            if not valid[i]:
                assert not images[i].any() and not targets[i].any() and not mask[i].any()
                continue
            if mode == "eval":
                expected = decode_eval(stored[key], SIZE, channels=channels)
            else:
                rng = sample_rng(config.seed, 0, key)
                expected = decode_train(stored[key], SIZE, rng, channels=channels)
            assert torch.equal(images[i], chw(expected)), key
            want_targets, want_mask = partial_ds.expected(key)
            assert targets[i].tolist() == want_targets.tolist(), key
            assert mask[i].tolist() == want_mask.tolist(), key
    if mode == "eval":
        assert sorted(k for *_, keys in copies for k in keys if k) == sorted(partial_ds.keys)
        assert any(not bool(v.all()) for *_, v, _ in copies)  # padding was checked


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("paste", [True, False])
@pytest.mark.parametrize("arrays", [False, True])
@pytest.mark.parametrize(("channels", "gray_share"), [(3, 1.0), (3, 0.5), (1, 1.0), (3, 0.0)])
def test_batch_images_rows_and_flips(monkeypatch, padded, paste, arrays, channels, gray_share):
    """Each row is its image's as_array, mirrored when flipped, whatever mix of grayscale and
    RGB images the batch holds; the same with PIL's in-place paste and without it, and for
    pixels given as arrays (HxW, HxWx3: a stored PNM at the eval size)."""
    monkeypatch.setattr(BatchImages, "paste", paste)
    rng = np.random.default_rng(channels + int(4 * gray_share))
    batch, size = 6, 5
    gray = rng.random(batch) < gray_share
    images = [
        Image.fromarray(rng.integers(0, 256, (size, size), np.uint8), "L")
        if g or channels == 1
        else Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8), "RGB")
        for g in gray
    ]
    flips = rng.random(batch) < 0.5
    out = np.full((batch, size, size, channels), 99, np.uint8)
    rows = BatchImages(out)
    filled = batch - 1 if padded else batch  # padding: the last row stays as it was
    for i in range(filled):
        rows.put(i, np.asarray(images[i]) if arrays else images[i], bool(flips[i]))
    rows.finish()
    for i in range(filled):
        pixels = np.broadcast_to(np.asarray(images[i]).reshape(size, size, -1), out.shape[1:])
        assert np.array_equal(out[i], pixels[:, ::-1] if flips[i] else pixels), i
    assert not padded or (out[-1] == 99).all()


# ---------------------------------------------------------------- eval over ranks


@pytest.mark.parametrize("ds_name", ["partial_ds", "full_ds", "two_shard_ds"])
@pytest.mark.parametrize("batch_size", [3, 5])
def test_eval_two_ranks_two_workers_cover_every_key_once(request, ds_name, batch_size):
    ds: Dataset = request.getfixturevalue(ds_name)
    config = eval_config(num_workers=2, batch_size=batch_size)
    per_rank = [list(ds.loader(config, rank=r, world_size=2)) for r in range(2)]
    counts = [len(batches) for batches in per_rank]
    assert counts[0] == counts[1]
    for r in range(2):
        assert ds.loader(config, rank=r, world_size=2).batches_per_epoch() == counts[r]
    keys = Counter(k for batches in per_rank for k in valid_keys(batches))
    assert set(keys) == ds.keys and set(keys.values()) == {1}
    entries = sum(counts) * batch_size
    padding = sum(int((~b.valid).sum()) for batches in per_rank for b in batches)
    assert padding == entries - len(ds.keys)
    for batches in per_rank:
        check_labels(ds, batches)


def test_valid_rows_drops_exactly_the_padding(partial_ds):
    """Batch.valid_rows() (what inference runs on) keeps every valid row, in order, with its
    labels, and nothing else: a channels_last view when the padding is at the end, as the
    loader writes it; a copy for padding anywhere else."""
    config = eval_config(num_workers=2, batch_size=5)
    batches = [b for r in range(2) for b in partial_ds.loader(config, rank=r, world_size=2)]
    trimmed = [b.valid_rows() for b in batches]
    assert any(len(t.keys) < len(b.keys) for t, b in zip(trimmed, batches, strict=True))
    assert [k for t in trimmed for k in t.keys] == valid_keys(batches)
    for t, b in zip(trimmed, batches, strict=True):
        n = int(b.valid.sum())
        assert t.images.shape[0] == len(t.keys) == n and bool(t.valid.all())
        assert torch.equal(t.images, b.images[:n]) and torch.equal(t.targets, b.targets[:n])
        assert torch.equal(t.mask, b.mask[:n])
        assert t.images.is_contiguous(memory_format=torch.channels_last)
        assert n == 0 or t.images.data_ptr() == b.images.data_ptr()  # a view
    batch = batches[0]
    assert bool(batch.valid.all())  # a full batch comes back as it is
    assert batch.valid_rows() is batch
    inner = type(batch)(
        batch.images,
        batch.targets,
        batch.mask,
        torch.tensor([True, False, True, False, True]),
        batch.keys,
    )
    picked = inner.valid_rows()
    assert picked.keys == [batch.keys[i] for i in (0, 2, 4)]
    assert torch.equal(picked.images, batch.images[[0, 2, 4]])
    assert torch.equal(picked.targets, batch.targets[[0, 2, 4]])
    assert picked.images.is_contiguous(memory_format=torch.channels_last)


def test_eval_padding_is_present_with_uneven_shards(partial_ds):
    """The uneven case really pads (so the test above checks padding, not only coverage)."""
    config = eval_config(num_workers=2, batch_size=5)
    batches = [b for r in range(2) for b in partial_ds.loader(config, rank=r, world_size=2)]
    assert sum(int((~b.valid).sum()) for b in batches) > 0


# ---------------------------------------------------------------- train


def check_train_epochs(ds: Dataset, config: LoaderConfig, epochs: int = 2, world: int = 2):
    """Every rank yields batches_per_epoch() full batches in each epoch, and the ranks' batches
    of an epoch hold every key of the split exactly once, plus the repeats the loaders counted
    (which fill the slots' last batches: fewer than a batch per slot)."""
    loaders = [ds.loader(config, rank=r, world_size=world) for r in range(world)]
    streams = [iter(loader) for loader in loaders]
    slots = world * max(1, config.num_workers)
    repeats = 0
    for epoch in range(epochs):
        count = loaders[0].batches_per_epoch(epoch)
        assert count >= 1
        keys = Counter()
        for loader, stream in zip(loaders, streams, strict=True):
            assert loader.batches_per_epoch(epoch) == count
            batches = list(itertools.islice(stream, count))
            assert len(batches) == count
            assert all(bool(b.valid.all()) for b in batches)
            check_labels(ds, batches)
            keys.update(k for b in batches for k in b.keys)
        unseen = ds.keys - set(keys)
        assert not unseen, f"epoch {epoch}: {len(unseen)} of {len(ds.keys)} keys never seen"
        assert set(keys) == ds.keys
        assert sum(keys.values()) == world * count * config.batch_size
        extra = sum(keys.values()) - len(ds.keys)
        assert extra < slots * config.batch_size
        repeats += extra
    for stream in streams:
        stream.close()
    assert sum(loader.repeated for loader in loaders) == repeats  # every repeat is counted
    assert all(not loader.problems and not loader.lost for loader in loaders)
    return repeats


@pytest.mark.parametrize("ds_name", ["partial_ds", "two_shard_ds"])
def test_train_equal_counts_every_key_once_all_valid(request, ds_name):
    ds: Dataset = request.getfixturevalue(ds_name)
    batch_size = 4 if ds_name == "partial_ds" else 2
    check_train_epochs(ds, train_config(num_workers=2, batch_size=batch_size))


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shards_every_sample_once_per_epoch(uneven_ds, workers):
    """Issue 19, item 1: shards of 60, 5, 5 and 5 samples over 2 ranks (x 2 workers). Every
    epoch reads every sample once, whatever the shard sizes: the large shard is cut into sample
    ranges across slots, and the slots' last batches are filled with counted repeats, never by
    dropping samples."""
    config = train_config(num_workers=workers, batch_size=4, seed=7)
    repeats = check_train_epochs(uneven_ds, config, epochs=3)
    assert repeats == 3 * 5  # 75 samples: 2 ranks x 10 batches of 4 = 80 entries an epoch
    assert uneven_ds.loader(config, rank=0, world_size=2).batches_per_epoch() == 10


def test_split_shards_cuts_shards_into_equal_ranges():
    shards = [Shard("a", 60), Shard("b", 5), Shard("c", 0), Shard("d", 5), Shard("e", 5)]
    plan = split_shards(shards, 4)
    assert [sum(p.size for p in pieces) for pieces in plan] == [18, 19, 19, 19]
    assert plan[0] == [Piece("a", 60, 0, 18)]
    assert plan[3] == [Piece("a", 60, 56, 60), Piece("b", 5, 0, 5), Piece("d", 5, 0, 5),
                       Piece("e", 5, 0, 5)]  # fmt: skip
    covered = Counter((p.url, i) for pieces in plan for p in pieces for i in range(p.start, p.stop))
    assert sorted(covered) == [(s.url, i) for s in shards for i in range(s.samples)]
    assert set(covered.values()) == {1}
    few = split_shards([Shard("a", 3)], 4)  # fewer samples than slots: empty slots
    assert [len(pieces) for pieces in few] == [0, 1, 1, 1]
    assert batches_per_slot(plan, 4) == 5 and batches_per_slot(few, 4) == 1


def test_train_refuses_when_a_slot_cannot_fill_a_batch(two_shard_ds):
    with pytest.raises(ValueError, match="full batch"):
        two_shard_ds.loader(train_config(num_workers=2, batch_size=8), rank=0, world_size=2)


def test_epochs_see_different_shard_orders(partial_ds):
    """No sample shuffle (shuffle_buffer=0): the order in which shards appear is the per-epoch
    shard order, which changes from epoch to epoch (and is fixed by seed + epoch)."""
    config = train_config(num_workers=0, shuffle_buffer=0, batch_size=4)

    def shard_orders(loader):
        orders = []
        for batches in run_epochs(loader, 2):
            shards = [partial_ds.manifest[k]["shard"] for b in batches for k in b.keys]
            orders.append(list(dict.fromkeys(shards)))
        return orders

    first, second = shard_orders(partial_ds.loader(config)), shard_orders(partial_ds.loader(config))
    assert first == second  # the same seed gives the same orders
    assert first[0] != first[1]
    assert len(first[0]) >= 7 and len(first[1]) >= 7  # (almost) all shards read every epoch


def test_epochs_see_different_sample_orders(partial_ds):
    loader = partial_ds.loader(train_config(num_workers=2))
    e0, e1 = ([k for b in batches for k in b.keys] for batches in run_epochs(loader, 2))
    assert e0 != e1
    common = [k for k in e0 if k in set(e1)]
    assert len(common) > 20
    assert common != [k for k in e1 if k in set(e0)]  # not only another subset: another order
    assert e0 != sorted(e0)  # the shuffle buffer shuffles within shards too


# ---------------------------------------------------------------- resume

RESUME_POINTS = {  # name -> batches taken before state_dict(), from N = batches in epoch 0
    "epoch0-even": lambda n: 2,
    "epoch0-odd": lambda n: 3,
    "epoch0-end": lambda n: n,
    "epoch1-even": lambda n: n + 2,
    "epoch1-odd": lambda n: n + 1,
}
RESUME_CASES = [
    pytest.param(
        workers,
        point,
        id=f"{workers}w-{point}",
    )
    for workers in (0, 2)
    for point in RESUME_POINTS
]


@pytest.fixture(scope="module")
def uninterrupted(partial_ds):
    """num_workers -> (config, N, the first epochs' batches of an uninterrupted rank 1 of 2)."""
    runs = {}
    for workers in (0, 2):
        config = train_config(num_workers=workers, seed=3, shuffle_buffer=16)
        loader = partial_ds.loader(config, rank=1, world_size=2)
        n0, n1 = loader.batches_per_epoch(0), loader.batches_per_epoch(1)
        batches = list(itertools.islice(loader, n0 + n1 + 3))  # into epoch 2
        runs[workers] = (config, n0, batches)
    return runs


@pytest.mark.parametrize(("workers", "point"), RESUME_CASES)
def test_resume_continues_exactly(partial_ds, uninterrupted, workers, point):
    config, n0, reference = uninterrupted[workers]
    k = RESUME_POINTS[point](n0)
    first = partial_ds.loader(config, rank=1, world_size=2)
    taken = list(itertools.islice(first, k))
    state = first.state_dict()
    assert [b.keys for b in taken] == [b.keys for b in reference[:k]]  # deterministic
    json.dumps(state)  # goes into a checkpoint

    resumed = partial_ds.loader(config, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed, len(reference) - k))
    assert [b.keys for b in rest] == [b.keys for b in reference[k:]]
    for got, want in zip(rest, reference[k:], strict=True):
        assert torch.equal(got.images, want.images)
        assert torch.equal(got.targets, want.targets) and torch.equal(got.mask, want.mask)


def test_resume_after_odd_count_has_the_right_samples(partial_ds, uninterrupted):
    """What the odd-count resume bug leaves right: the rest of the epoch holds the same batches
    (only their order differs), so one resume loses or repeats nothing."""
    config, n0, reference = uninterrupted[2]
    resumed = partial_ds.loader(config, rank=1, world_size=2)
    resumed.load_state_dict({"epoch": 0, "batch": 3})
    rest = list(itertools.islice(resumed, n0 - 3))
    assert sorted(b.keys for b in rest) == sorted(b.keys for b in reference[3:n0])


def test_two_resumes_lose_and_repeat_nothing(partial_ds, uninterrupted):
    config, n0, reference = uninterrupted[2]
    keys = []
    state = {"epoch": 0, "batch": 0}
    for take in (3, 1, n0 - 4):  # resume after 3 batches, then after 1 more
        loader = partial_ds.loader(config, rank=1, world_size=2)
        loader.load_state_dict(state)
        keys += [k for b in itertools.islice(loader, take) for k in b.keys]
        state = loader.state_dict()
    assert state == {"epoch": 0, "batch": n0}
    assert sorted(keys) == sorted(k for b in reference[:n0] for k in b.keys)


# ---------------------------------------------------------------- damaged data


def test_corrupt_samples_skipped_and_counted(corrupt_ds):
    ds = corrupt_ds.ds
    loader = ds.loader(eval_config(num_workers=2))
    batches = list(loader)
    keys = Counter(valid_keys(batches))
    assert set(keys) == ds.keys - {corrupt_ds.garbage_key, corrupt_ds.no_json_key}
    assert set(keys.values()) == {1}
    assert loader.problems == Counter({"corrupt sample": 1, "incomplete sample": 1})
    assert corrupt_ds.garbage_key in loader.skipped_keys
    assert len(batches) == loader.batches_per_epoch()
    check_labels(ds, batches)


def test_skipped_samples_name_their_shard_and_count_as_lost(corrupt_ds, caplog):
    ds = corrupt_ds.ds
    url = str(ds.path / next(iter(ds.shard_lengths())))
    loader = ds.loader(eval_config(num_workers=0))
    with caplog.at_level(logging.WARNING, logger="mlc.data"):
        list(loader)
    assert f"corrupt sample {corrupt_ds.garbage_key} of shard {url} skipped" in caplog.text
    assert f"incomplete sample {corrupt_ds.no_json_key} of shard {url} skipped" in caplog.text
    assert loader.counts() == {
        "expected": len(ds.keys),
        "lost": 2,
        "lost_by_shard": {url: 2},
        "repeated": 0,
        "problems": {"corrupt sample": 1, "incomplete sample": 1},
    }


def test_incomplete_sample_key_in_skipped_keys(corrupt_ds):
    loader = corrupt_ds.ds.loader(eval_config(num_workers=0))
    list(loader)
    assert corrupt_ds.no_json_key in loader.skipped_keys


def test_corrupt_samples_in_train_mode(corrupt_ds):
    ds = corrupt_ds.ds
    config = train_config(num_workers=2)
    loaders = [ds.loader(config, rank=r, world_size=2) for r in range(2)]
    bad = {corrupt_ds.garbage_key, corrupt_ds.no_json_key}
    for loader in loaders:
        (batches,) = run_epochs(loader, 1)
        assert len(batches) == loaders[0].batches_per_epoch(0)
        assert not bad & {k for b in batches for k in b.keys}
        assert all(bool(b.valid.all()) for b in batches)
    assert sum(loader.problems["incomplete sample"] for loader in loaders) >= 1


def _with_json(ds: Dataset, root: Path, document: bytes) -> tuple[Dataset, str]:
    """A copy of ``ds`` whose first shard's second sample has ``document`` as its json."""
    shutil.copytree(ds.path, root)
    shard = root / next(iter(ds.shard_lengths()))
    members = tar_members(shard)
    key = sorted({n.partition(".")[0] for n, _ in members})[1]
    members = [(n, document if n == f"{key}.json" else d) for n, d in members]
    write_tar(shard, members)
    return Dataset(root, ds.split, ds.num_classes, ds.full, dict(ds.manifest)), key


def test_unparsable_json_is_a_corrupt_sample(full_ds, tmp_path):
    ds, key = _with_json(full_ds, tmp_path / "ds", b"{not json")
    loader = ds.loader(eval_config(num_workers=0))
    assert set(valid_keys(list(loader))) == ds.keys - {key}
    assert loader.problems == Counter({"corrupt sample": 1})
    assert loader.skipped_keys == [key]


@pytest.mark.parametrize(
    "document", [b'{"id": "x"}', b'{"positives": [99], "negatives": []}'], ids=["no-lists", "idx"]
)
def test_json_without_valid_labels_is_a_corrupt_sample(full_ds, tmp_path, document):
    ds, key = _with_json(full_ds, tmp_path / "ds", document)
    loader = ds.loader(eval_config(num_workers=0))
    assert set(valid_keys(list(loader))) == ds.keys - {key}
    assert loader.problems["corrupt sample"] == 1


@pytest.mark.parametrize("seed", range(3))
def test_parse_labels_reads_what_the_writer_writes_and_any_other_json(seed):
    """The writer's layout (read by a regular expression) and any other json (read by the json
    module) give the labels json.loads gives; ids with quotes, backslashes, escapes and label
    lookalikes inside do not confuse it."""
    rng = np.random.default_rng(seed)
    ids = ["plain", 'q"uote', "back\\slash", "tab\there", "caf\u00e9", '"positives":[7]', ""]
    for i in range(200):
        positives = sorted(set(rng.integers(0, 1000, rng.integers(0, 6)).tolist()))
        negatives = sorted(set(rng.integers(0, 1000, rng.integers(0, 6)).tolist()))
        record = {"id": ids[i % len(ids)], "positives": positives, "negatives": negatives}
        record.update(width=56, height=56, source="x")
        written = encode_sample_json(record)
        assert _WRITTEN.match(written), written  # the fast path reads it
        assert parse_labels(written, 1000) == (positives, negatives)
        spaced = json.dumps(dict(reversed(list(record.items())))).encode()  # another layout
        assert not _WRITTEN.match(spaced)
        assert parse_labels(spaced, 1000) == (positives, negatives)
    for bad in (b'{"id":"a","positives":[3,1000],"negatives":[]}',  # index out of range
                b'{"id":"a","positives":[01],"negatives":[]}',  # not JSON
                b'{"id":"a","positives":[1.0],"negatives":[]}',
                b'{"id":"a","positives":[true],"negatives":[]}'):  # fmt: skip
        with pytest.raises(ValueError):
            parse_labels(bad, 1000)


def _truncated(ds: Dataset, root: Path, sample: int, inside: bool) -> tuple[Dataset, str, set]:
    """A copy of ``ds`` whose first shard stops at its sample number ``sample``: cut off inside
    the tar header of that sample's first member (``inside``) or cleanly before it. Returns the
    copy, the shard's path and the keys before the cut."""
    shutil.copytree(ds.path, root)
    path = root / next(iter(ds.shard_lengths()))
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.partition(".")[0] for m in members))
    first = next(m for m in members if m.name.startswith(f"{keys[sample]}."))
    path.write_bytes(path.read_bytes()[: first.offset + (100 if inside else 0)])
    return (
        Dataset(root, ds.split, ds.num_classes, ds.full, dict(ds.manifest)),
        str(path),
        set(keys[:sample]),
    )


@pytest.mark.parametrize(
    ("inside", "why"), [(True, "truncated tar header"), (False, "the shard ends after 6 of 13")]
)
def test_truncated_shard_reports_what_was_read_and_lost(full_ds, tmp_path, caplog, inside, why):
    """Issue 19, item 2: a tar that stops in the middle (broken or clean): its samples before
    the cut are used, the rest are lost samples of that shard, and the message says so."""
    ds, url, before = _truncated(full_ds, tmp_path / "ds", 6, inside)
    loader = ds.loader(eval_config(num_workers=0))
    with caplog.at_level(logging.ERROR, logger="mlc.data"):
        keys = Counter(valid_keys(list(loader)))
    in_shard = {k for k, row in ds.manifest.items() if row["shard"] == Path(url).name}
    assert set(keys) == ds.keys - (in_shard - before) and set(keys.values()) == {1}
    assert f"shard {url}: read 6 of 13 samples ({why}); 7 lost" in caplog.text
    assert "skipping shard" not in caplog.text
    assert loader.counts() == {
        "expected": 60,
        "lost": 7,
        "lost_by_shard": {url: 7},
        "repeated": 0,
        "problems": {"damaged shard": 1},
    }


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_damaged_shard_cut_across_slots_counts_once(uneven_ds, tmp_path, mode):
    """The 60-sample shard, broken after 25 samples, is read by several slots (2 ranks x 2
    workers): over the ranks its 35 lost samples and the damaged shard are counted once per
    epoch; the other samples are all used, and batch counts stay equal."""
    ds, url, before = _truncated(uneven_ds, tmp_path / "ds", 25, inside=True)
    lost = {k for k, row in ds.manifest.items() if row["shard"] == Path(url).name} - before
    make = eval_config if mode == "eval" else train_config
    config = make(num_workers=2, batch_size=4, seed=1)
    loaders = [ds.loader(config, rank=r, world_size=2) for r in range(2)]
    count = loaders[0].batches_per_epoch(0)
    per_rank = [list(itertools.islice(loader, count)) for loader in loaders]
    assert [len(batches) for batches in per_rank] == [count, count]
    keys = Counter(valid_keys([b for batches in per_rank for b in batches]))
    assert set(keys) == ds.keys - lost
    total = counts.merge([loader.counts() for loader in loaders])
    assert total["lost"] == 35 and total["lost_by_shard"] == {url: 35}
    assert total["problems"] == {"damaged shard": 1}
    assert total["expected"] == 75
    if mode == "train":  # the slots that came up short filled their batches with repeats
        assert total["repeated"] == sum(keys.values()) - len(keys) == 2 * count * 4 - 40
    else:
        assert set(keys.values()) == {1} and total["repeated"] == 0
    assert "35 of 75 samples lost (46.67%: " in counts.describe(total)
    with pytest.raises(counts.DataLossError, match=r"35 of 75 samples lost.*--allow-lost"):
        counts.check(total, 0.4, "test split", "--allow-lost")
    counts.check(total, 0.5, "test split", "--allow-lost")


def _missing_shard(ds: Dataset, tmp_path: Path, index: int = 2) -> tuple[list[Shard], str]:
    shards = dataset_shards(ds.path, ds.split)
    lost = shards[index]
    shards[index] = Shard(str(tmp_path / "no-such-shard.tar"), lost.samples)
    return shards, Path(lost.url).name


@pytest.mark.parametrize("retries", [1, 2])
def test_missing_shard_retried_then_skipped_in_eval(partial_ds, tmp_path, monkeypatch, retries):
    waits = []
    monkeypatch.setattr(mlc.data.urls.time, "sleep", waits.append)
    shards, lost = _missing_shard(partial_ds, tmp_path)
    config = eval_config(num_workers=0, retries=retries)
    loader = ShardLoader(shards, partial_ds.num_classes, config, rank=0, world_size=1)
    batches = list(loader)
    assert waits == [1.0, 2.0][:retries]
    assert loader.problems == Counter({"unreadable shard": 1})
    keys = Counter(valid_keys(batches))
    expected = {k for k, row in partial_ds.manifest.items() if row["shard"] != lost}
    assert set(keys) == expected and set(keys.values()) == {1}
    assert len(batches) == loader.batches_per_epoch()
    missing = str(tmp_path / "no-such-shard.tar")
    assert loader.lost == Counter({missing: partial_ds.shard_lengths()[lost]})
    assert loader.counts()["expected"] == len(partial_ds.keys)


def test_missing_shard_in_train_keeps_counts_equal(partial_ds, tmp_path, monkeypatch):
    """The slot that lost a shard repeats its own samples to fill its batches: every rank still
    yields batches_per_epoch() full batches (a DDP job does not hang)."""
    monkeypatch.setattr(mlc.data.urls.time, "sleep", lambda s: None)  # forked workers inherit
    shards, lost = _missing_shard(partial_ds, tmp_path)
    lost_keys = {k for k, row in partial_ds.manifest.items() if row["shard"] == lost}
    config = train_config(num_workers=2, retries=1)
    loaders = [
        ShardLoader(shards, partial_ds.num_classes, config, rank=r, world_size=2) for r in range(2)
    ]
    per_rank = [run_epochs(loader, 2) for loader in loaders]
    for e in range(2):
        expected = loaders[0].batches_per_epoch(e)
        assert loaders[1].batches_per_epoch(e) == expected
        for r in range(2):
            batches = per_rank[r][e]
            assert len(batches) == expected, (r, e)
            assert all(bool(b.valid.all()) for b in batches)
            assert not lost_keys & {k for b in batches for k in b.keys}
    assert sum(loader.problems["unreadable shard"] for loader in loaders) >= 2  # once per epoch
    missing = str(tmp_path / "no-such-shard.tar")
    lost_per_epoch = partial_ds.shard_lengths()[lost]
    assert sum(loader.lost[missing] for loader in loaders) >= 2 * lost_per_epoch


# ---------------------------------------------------------------- URLs


def test_pipe_urls_refused_by_default(full_ds, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(mlc.data.urls.time, "sleep", waits.append)
    marker = tmp_path / "ran"
    with pytest.raises(ShardOpenError, match="allow_pipe"):
        open_url(f"pipe:touch {marker}")
    assert not marker.exists()
    shards = [Shard(f"pipe:cat {s.url}", s.samples) for s in dataset_shards(full_ds.path, "train")]
    with pytest.raises(ValueError, match="pipe: URLs, which run commands"):  # refused up front
        ShardLoader(shards, full_ds.num_classes, eval_config(num_workers=0), rank=0)
    assert waits == []


def test_pipe_urls_with_allow_pipe(full_ds):
    shards = [Shard(f"pipe:cat {s.url}", s.samples) for s in dataset_shards(full_ds.path, "train")]
    config = eval_config(num_workers=2, allow_pipe=True)
    loader = ShardLoader(shards, full_ds.num_classes, config, full_annotation=True, rank=0)
    batches = list(loader)
    assert sorted(valid_keys(batches)) == sorted(full_ds.keys)
    assert not loader.problems
    check_labels(full_ds, batches)


def test_failing_pipe_command_is_an_unreadable_shard(full_ds, tmp_path):
    shards = dataset_shards(full_ds.path, "train")
    shards.append(Shard(f"pipe:cat {tmp_path / 'no-such-shard.tar'}", 10))
    config = eval_config(num_workers=0, allow_pipe=True, retries=0)
    loader = ShardLoader(shards, full_ds.num_classes, config, full_annotation=True, rank=0)
    assert sorted(valid_keys(list(loader))) == sorted(full_ds.keys)
    assert loader.problems == Counter({"unreadable shard": 1})


def test_file_urls_with_explicit_sizes(full_ds):
    sizes = full_ds.shard_lengths()
    shards = url_shards(f"file://{full_ds.path}/train-{{000000..000004}}.tar", sizes)
    assert [s.samples for s in shards] == list(sizes.values())
    loader = ShardLoader(shards, full_ds.num_classes, eval_config(num_workers=0), rank=0)
    assert sorted(valid_keys(list(loader))) == sorted(full_ds.keys)


def test_url_shards_reads_sizes_json(full_ds):
    spec = f"{full_ds.path}/train-{{000000..000004}}.tar"
    shards = url_shards(spec)
    assert [Path(s.url).name for s in shards] == list(full_ds.shard_lengths())
    assert [s.samples for s in shards] == list(full_ds.shard_lengths().values())
    assert shards == dataset_shards(full_ds.path, "train")
    two = url_shards(f"{full_ds.path}/train-000000.tar::{full_ds.path}/train-000004.tar")
    assert [s.samples for s in two] == [13, 8]


def test_url_shards_without_counts_errors_clearly(full_ds, tmp_path):
    for name in full_ds.shard_lengths():
        shutil.copy(full_ds.path / name, tmp_path / name)
    with pytest.raises(ValueError, match="sample counts unknown for 5 shard.*sizes.json"):
        url_shards(f"{tmp_path}/train-{{000000..000004}}.tar")
    with pytest.raises(ValueError, match="sample counts unknown"):
        url_shards("https://example.org/train-{000000..000001}.tar")
    (tmp_path / OPENCLIP_SIZES_FILE).write_text(json.dumps({"train-000000.tar": 13}))
    with pytest.raises(ValueError, match="sample counts unknown for 4 shard"):
        url_shards(f"{tmp_path}/train-{{000000..000004}}.tar")


def test_url_shards_dot_slash_relative_path(full_ds, monkeypatch):
    monkeypatch.chdir(full_ds.path.parent)
    shards = url_shards(f"./{full_ds.path.name}/train-{{000000..000004}}.tar")
    assert [s.samples for s in shards] == list(full_ds.shard_lengths().values())


def test_url_shards_file_url_reads_sizes_json(full_ds):
    shards = url_shards(f"file://{full_ds.path}/train-{{000000..000004}}.tar")
    assert [s.samples for s in shards] == list(full_ds.shard_lengths().values())


# ---------------------------------------------------------------- normalize


def test_normalize():
    images = torch.tensor([0, 255, 51, 204], dtype=torch.uint8).repeat(2, 3, 2, 1)  # [2,3,2,4]
    images = images.contiguous(memory_format=torch.channels_last)
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert bool((out[..., 0] == -1).all()) and bool((out[..., 1] == 1).all())
    assert torch.allclose(out[..., 2], torch.tensor(-0.6)) and torch.allclose(
        out[..., 3], torch.tensor(0.6)
    )
    assert images[0, 0, 0, 1] == 255  # the input is not changed


# ---------------------------------------------------------------- a real DDP job


def test_torchrun_ddp(partial_ds, tmp_path):
    """Two processes, gloo: a train epoch with an all_reduce per batch and an eval pass with an
    all_reduce per batch and an all_gather_object of the keys. Unequal batch counts would hang
    (the job's own collective timeout and this test's timeout turn that into a failure)."""
    result = tmp_path / "result.json"
    job = Path(__file__).with_name("ddp_loader_job.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(job),
        str(partial_ds.path),
        str(result),
    ]
    # A session of its own, so that a hung job is ended with all its processes.
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the DDP job did not finish within 60 s (a hang?):\n{output[-3000:]}")
    assert proc.returncode == 0, output[-6000:]
    report = json.loads(result.read_text())
    assert report["eval_keys_once"] is True
    assert report["eval_keys"] == report["eval_valid_all_reduced"] == len(partial_ds.keys)
    assert report["train_batches"] == [report["expected_train_batches"]] * 2
    assert report["eval_batches"][0] == report["eval_batches"][1] > 0


def test_an_eval_loader_can_be_iterated_again(full_ds):
    # Training code builds its validation loader once and runs it after every epoch.
    loader = ShardLoader.from_dataset(full_ds.path, "train", eval_config(num_workers=0), rank=0)
    first, second = valid_keys(list(loader)), valid_keys(list(loader))
    assert sorted(first) == sorted(full_ds.keys) and second == first
