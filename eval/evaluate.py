"""`mlc eval --checkpoint`: a trained checkpoint scores a sharded split; MAP@K, CIs, the report.

One pass of the eval-mode loader (every sample exactly once over all processes) feeds, batch by
batch, the streaming class-wise accumulator, the per-image AP@K sum, the Poisson bootstrap and,
when asked, a predictions file; memory is bounded by the classes, K and the replicates, not by
the number of images (full AP, which needs every score, is computed only below a size limit).
Under torchrun every process scores its share and rank 0 merges the per-process summaries
exactly: the result is the single-process one.

This is the layer that joins the metric library to mlc (checkpoints, loader, model); the metric
modules themselves (eval/metrics.py, eval/streaming.py, eval/bootstrap.py) import no mlc, and
nothing here imports the training job (pyproject.toml's import contracts).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from eval.bootstrap import PoissonBootstrap
from eval.classmap import ClassMatch, match_classes, read_class_map
from eval.io import read_weights
from eval.metrics import KnownItems, full_ap, mostly_unknown
from eval.report import (
    DEFAULT_REPLICATES,
    FULL_AP_LIMIT,
    ClassTable,
    Report,
    bootstrap_replicates,
    class_summary,
    score_batch,
)
from eval.streaming import MAPAccumulator
from mlc import dist as mlc_dist
from mlc.accel import resolve_precision
from mlc.config import Config
from mlc.data import ShardLoader, counts
from mlc.data.urls import read_dataset_json
from mlc.format import CLASSES_FILE, stats_name
from mlc.inference import batch_logits, eval_loader_config, load_model, prepare_for_inference
from mlc.io import Classes, InputFileError
from mlc.predictions import PredictionsWriter
from mlc.storage import Folder, is_local, local_path

EVAL_BATCH = 256
# The metrics run on chunks of batches, since most of their cost per call is fixed (measured
# by benchmarks/bench_eval.py). A chunk holds at most CHUNK_IMAGES images and, past that,
# CHUNK_SCORES scores (20 MB with the labels), but always at least the batch that fills it.
CHUNK_IMAGES = 2048
CHUNK_SCORES = 4_000_000


# ---------------------------------------------------------------- classes


def _data_classes(data: str) -> tuple[list[str], list[str], str]:
    try:
        doc = read_dataset_json(data, CLASSES_FILE)
    except FileNotFoundError as e:
        raise InputFileError(str(e)) from None
    classes = doc["classes"]
    return [c["id"] for c in classes], [c.get("name", c["id"]) for c in classes], doc["annotation"]


def _train_stats(name: str, folders: tuple[str, str], notes: list[str]) -> str | None:
    """The first of ``folders`` (the checkpoint's dataset, then --data; paths or URLs) that
    holds the training split's stats ``name``: its location, or None. The checkpoint's dataset
    may be out of reach from here (another machine's path, a bucket without credentials):
    that is a note, and the search goes on."""
    *elsewhere, data = folders
    for location in elsewhere:
        try:
            folder = Folder(location)
            if folder.is_file(name):
                return folder.join(name)
        except Exception as e:  # noqa: BLE001 (a missing package, credentials, network, ...)
            notes.append(f"training stats not looked up in {location}: {e}")
    folder = Folder(data)  # reached already (its classes.json): its errors are errors
    return folder.join(name) if folder.is_file(name) else None


def _read_weights(spec: str, vocab: Classes):
    """eval.io.read_weights of "uniform", "positives", a local file or a file at a URL (read
    through mlc.storage into a temporary file; the source and errors name the URL)."""
    if spec in ("uniform", "positives") or is_local(spec):
        return read_weights(spec, vocab)
    parent, _, name = spec.rstrip("/").rpartition("/")
    try:
        data = Folder(parent).read_bytes(name)
    except FileNotFoundError as e:
        raise InputFileError(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="mlc-weights-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            weights = read_weights(str(path), vocab)
        except InputFileError as e:
            raise InputFileError(str(e).replace(str(path), spec)) from None
    return dataclasses.replace(weights, source=weights.source.replace(str(path), spec))


def _weights(spec: str, config: Config, data: str, match: ClassMatch):
    """(weights for the metric, their source, reference counts per class or None, notes).

    "auto": the training split's positive counts (its stats.json, in the checkpoint's dataset
    folder or in ``data``, local or by URL), else the evaluated positives. The reference counts
    of the table and the frequency plot are the training counts whatever the weights, when they
    can be found.
    """
    vocab = Classes(match.ids, match.names)
    name = stats_name(config.data.train_split)
    notes = []
    train_stats = _train_stats(name, (str(config.data.dataset), data), notes)
    reference = _read_weights(train_stats, vocab) if train_stats else None
    if spec != "auto":
        chosen = _read_weights(spec, vocab)
    elif reference is not None:
        chosen = reference
    else:
        notes.append(
            f"no training stats ({name} in {config.data.dataset} or {data}): weighted by the "
            "evaluated positives instead"
        )
        chosen = read_weights("positives", vocab)
    if reference is None and not isinstance(chosen.values, str):
        reference = chosen  # a weights file is the reference frequency
    if chosen.unlisted:
        notes.append(f"{chosen.unlisted} evaluated class(es) have no weight in {spec}: weight 0")
    reference_counts = None if reference is None else np.asarray(reference.values, dtype=float)
    return chosen.values, chosen.source, reference_counts, notes


def _exact_add(partials: list[float], values: np.ndarray) -> None:
    """Add values to a sum held exactly as non-overlapping partials (Shewchuk; math.fsum's
    algorithm). Partials of several processes concatenate, and math.fsum of them is the
    correctly rounded total: the image-wise mean does not depend on the process count."""
    for x in values.tolist():
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]


# ---------------------------------------------------------------- the pass


class _RankState:
    """What one process accumulates: O(classes x K x replicates), not O(images)."""

    def __init__(
        self, classes: int, k: int, replicates: int, seed: int, keep_full: bool, keep_images: bool
    ):
        self.k = k
        self.accumulator = MAPAccumulator(classes, k)
        self.bootstrap = PoissonBootstrap(classes, k, replicates, seed) if replicates else None
        self.image_partials: list[float] = []
        self.images_with_ap = self.images_without_ap = 0
        self.full = ([], []) if keep_full else None
        self.image_rows = [] if keep_images else None
        self.chunk = max(1, min(CHUNK_IMAGES, CHUNK_SCORES // classes))
        self._pending: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
        self._pending_images = 0

    def update(self, keys: list[str], scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Queue a batch; the metrics see it with the rest of its chunk (``flush``)."""
        self._pending.append((keys, scores, labels))
        self._pending_images += len(keys)
        if self._pending_images >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        if len(self._pending) == 1:
            keys, scores, labels = self._pending[0]
        else:
            keys = [key for batch in self._pending for key in batch[0]]
            scores = torch.cat([batch[1] for batch in self._pending])
            labels = torch.cat([batch[2] for batch in self._pending])
        self._pending, self._pending_images = [], 0
        self._update(keys, scores, labels)

    def _update(self, keys: list[str], scores: torch.Tensor, labels: torch.Tensor) -> None:
        batch = KnownItems.of(scores, labels) if mostly_unknown(labels) else labels
        images = score_batch(keys, scores, batch, self.k, self.accumulator, self.bootstrap)
        defined = ~np.isnan(images.ap)
        _exact_add(self.image_partials, images.ap[defined])
        self.images_with_ap += int(defined.sum())
        self.images_without_ap += int((~defined).sum())
        if self.full is not None:
            self.full[0].append(scores)
            self.full[1].append(labels)
        if self.image_rows is not None:
            self.image_rows += [
                [key, int(p), int(n), None if math.isnan(a) else float(a)]
                for key, p, n, a in zip(
                    keys, images.positives, images.known, images.ap, strict=True
                )
            ]

    def state(self) -> dict:
        self.flush()
        return {
            "accumulator": self.accumulator.state_dict(),
            "bootstrap": self.bootstrap.state_dict() if self.bootstrap else None,
            "image_partials": self.image_partials,
            "images_with_ap": self.images_with_ap,
            "images_without_ap": self.images_without_ap,
            "full": self.full,
            "image_rows": self.image_rows,
        }


def _score_pass(model, loader, match, device, precision, state, writer, progress, total, desc):
    """One pass of the eval loader: the valid rows (eval padding dropped), forward, labels in
    {1, 0, -1}, the evaluated columns, then the accumulators and the scores file."""
    from tqdm import tqdm

    model_cols, data_cols = torch.from_numpy(match.model_cols), torch.from_numpy(match.data_cols)
    bar = tqdm(
        total=total,
        unit="img",
        desc=desc,
        mininterval=1.0,
        disable=not progress,
        dynamic_ncols=True,
    )
    with torch.inference_mode(), bar:
        for batch in loader:
            batch = batch.valid_rows()  # eval padding (docs/loader.md)
            if not batch.keys:
                continue
            logits = batch_logits(model, batch.images, device, precision)
            labels = torch.where(batch.mask.bool(), batch.targets.to(torch.int8), -1)
            if not match.identity:
                logits, labels = logits[:, model_cols], labels[:, data_cols]
            state.update(batch.keys, logits, labels)
            if writer is not None:
                writer.write(batch.keys, logits, labels)
            bar.update(len(batch.keys))


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    weights: str = "auto",
    k: int = 100,
    mode: str = "class",
    class_map: str | None = None,
    predictions: str | Path | None = None,
    batch_size: int = EVAL_BATCH,
    workers: int | None = None,
    bootstrap: int = DEFAULT_REPLICATES,
    seed: int = 0,
    full_ap_limit: int = FULL_AP_LIMIT,
    fold: bool = True,
    progress: bool = True,
    max_lost_fraction: float = 0.0,
    device: str = "auto",
    precision: str = "auto",
) -> Report | None:
    """Score ``data``'s ``split`` with the checkpoint; the Report on rank 0, None elsewhere.

    Samples of the split that the loader could not deliver (missing or damaged shards, corrupt
    samples) are an error beyond ``max_lost_fraction`` of the split: every process raises
    DataLossError, and nothing is written. ``device`` and ``precision``: where and how the
    network runs (mlc.accel)."""
    if mode not in ("class", "image"):
        raise InputFileError(f"mode must be 'class' or 'image', got {mode!r}")
    rank, world, device = mlc_dist.setup(device)
    precision = resolve_precision(precision, device, training=False)
    data = str(local_path(data)) if is_local(data) else str(data).rstrip("/")  # path or URL
    loaded = load_model(checkpoint)
    config, model_ids, info = loaded.config, loaded.class_ids, loaded.info
    data_ids, data_names, annotation = _data_classes(data)
    mapping = read_class_map(class_map) if class_map else None
    match = match_classes(
        model_ids,
        data_ids,
        data_names,
        mapping,
        f"{info['kind']} {checkpoint}",
        Folder(data).join(CLASSES_FILE),
        f"--class-map {class_map}",
    )
    weight_values, weight_source, reference, notes = _weights(weights, config, data, match)
    loader_settings = eval_loader_config(config, batch_size, workers)
    loader = ShardLoader.from_dataset(
        data, split, loader_settings, rank=rank, world_size=world, pin_memory=device.type == "cuda"
    )
    total = sum(s.samples for s in loader.shards)
    classes = len(match.ids)
    replicates = bootstrap_replicates(bootstrap, classes, k)
    keep_full = classes * total <= full_ap_limit
    state = _RankState(classes, k, replicates, seed, keep_full, mode == "image")
    writer = (
        PredictionsWriter(predictions, match.ids, match.ids, annotation == "partial", rank, world)
        if predictions
        else None
    )
    model = prepare_for_inference(loaded.model, fold, device)
    if world > 1:
        dist.barrier()  # the pass is timed from a common start ...
    start = time.perf_counter()
    _score_pass(
        model,
        loader,
        match,
        device,
        precision,
        state,
        writer,
        progress and rank == 0,
        math.ceil(total / world),
        f"eval {split}",
    )
    if writer is not None:
        writer.close()
    data_counts = counts.merge(mlc_dist.all_gather(loader.counts(), world))
    try:
        counts.check(data_counts, max_lost_fraction, f"{data} split {split}", "--allow-lost")
    except counts.DataLossError:
        if writer is not None:
            writer.discard()
        raise
    states = mlc_dist.gather_to_first(state.state(), rank, world)
    seconds = time.perf_counter() - start  # ... until the last process's share is in
    if rank != 0:
        return None
    if writer is not None:
        writer.finish()
    if not keep_full:
        notes.append(
            f"full mAP not computed: {classes} classes x {total} images exceed the limit of "
            f"{full_ap_limit} scores held in memory"
        )
    report = _report(states, match, k, mode, weight_values, reference, replicates, seed)
    s = report.summary
    s.update(
        checkpoint=str(checkpoint),
        checkpoint_samples=info["samples"],
        weights_from=info["weights"],
        model=config.model.name,
        data=str(data),
        split=split,
        split_images=total,  # the split's stats; `images` were scored
        lost_samples=data_counts["lost"],
        lost_by_shard=data_counts["lost_by_shard"],
        loader_problems=data_counts["problems"],
        weights=weight_source,
        processes=world,
        device=str(device),
        precision=str(precision),
        seconds=round(seconds, 3),
        images_per_s=round(s["images"] / max(seconds, 1e-9), 1),
        model_classes_not_evaluated=match.model_not_evaluated,
        data_classes_not_evaluated=match.data_not_evaluated,
        predictions_file=str(predictions) if predictions else None,
        notes=notes,
    )
    return report


def _report(states, match, k, mode, weights, reference, replicates, seed) -> Report:
    total = MAPAccumulator.from_state_dict(states[0]["accumulator"])
    for st in states[1:]:
        total.merge(MAPAccumulator.from_state_dict(st["accumulator"]))
    result = total.compute(weights)
    boot = None
    if replicates:
        boot = PoissonBootstrap.from_state_dict(states[0]["bootstrap"])
        for st in states[1:]:
            boot.merge(PoissonBootstrap.from_state_dict(st["bootstrap"]))
    full = None
    if states[0]["full"] is not None:
        scores = [s for st in states for s in st["full"][0]]
        labels = [s for st in states for s in st["full"][1]]
        if scores:
            full = full_ap(torch.cat(scores), torch.cat(labels))
    with_ap = sum(st["images_with_ap"] for st in states)
    image_sum = math.fsum(x for st in states for x in st["image_partials"])
    image_map = image_sum / with_ap if with_ap else float("nan")
    table = ClassTable(result, match.ids, match.names, reference, full)
    summary = {
        "k": k,
        "mode": mode,
        "images": total.images,
        "classes": len(match.ids),
        **class_summary(
            table,
            image_map,
            with_ap,
            sum(st["images_without_ap"] for st in states),
            boot,
            weights,
        ),
    }
    image_rows = None
    if mode == "image":
        image_rows = [row for st in states for row in st["image_rows"]]
    return Report(summary, "per_class.csv", table.header(), table.rows(), table, image_rows)
