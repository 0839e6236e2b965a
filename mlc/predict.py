"""A trained model on new images: `mlc.load` (Predictor, for notebooks and services) and the
pass of `mlc predict` (predictions files).

Both take a checkpoint of `mlc train` or an `mlc export` folder and run the network as `mlc eval`
does (mlc.inference: the same weights, batch norm folded, the eval preprocessing). `mlc predict`
reads an `mlc shard` split or shard URLs with the eval loader, or image files decoded one by one
by the loader's own eval decoding, and streams the scores into the predictions file that `mlc
eval --predictions` reads (mlc.predictions; with the labels when the images are shards).
Under torchrun each process scores a share and rank 0 joins the parts, as `mlc eval` does.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import urllib.error
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch

from mlc import dist as mlc_dist
from mlc.accel import resolve_device, resolve_precision
from mlc.data import ShardLoader, dataset_shards, url_shards
from mlc.data.decode import DecodeError
from mlc.data.pipeline import SAMPLE_REASONS
from mlc.data.preprocess import IMAGE_FILE_SUFFIXES, EvalTransform
from mlc.data.urls import expand
from mlc.format import CLASSES_FILE
from mlc.inference import (
    LoadedModel,
    batch_logits,
    eval_loader_config,
    eval_transform,
    load_model,
    prepare_for_inference,
)
from mlc.io import InputFileError, atomic_write_csv
from mlc.predictions import CLASS_IDS_METADATA, PredictionsWriter
from mlc.storage import READ_ONLY_PROTOCOLS, Folder, join, open_input, protocol

DEFAULT_BATCH = 256
SHOWN_SKIPS = 20  # skipped images named as they happen, per process; all are in the list file


# ---------------------------------------------------------------- the Python API


class Label(NamedTuple):
    id: str
    name: str
    score: float  # sigmoid probability


class Predictor:
    """A model ready for inference: ``model`` (eval mode, on ``device``; batch norm folded unless
    ``fold=False``), ``transform`` (its eval preprocessing: one image -> uint8 HxWxC pixels),
    ``class_ids`` and ``class_names`` in output order, ``config`` (the training config) and
    ``info`` (where the weights came from)."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device | str | None = None,
        fold: bool = True,
        precision: str = "auto",
    ):
        self.device = resolve_device(str(device or "auto"))
        self.precision = resolve_precision(precision, self.device, training=False)
        self.model = prepare_for_inference(loaded.model, fold, self.device)
        self.config, self.info = loaded.config, loaded.info
        self.class_ids, self.class_names = loaded.class_ids, loaded.class_names
        self.transform: EvalTransform = eval_transform(loaded.config)

    def __repr__(self) -> str:
        t = self.transform
        return (
            f"Predictor({self.info['path']!r}: {self.config.model.name}, "
            f"{len(self.class_ids)} classes, {t.channels}x{t.image_size}x{t.image_size} input, "
            f"{self.device}, {self.precision.name})"
        )

    def preprocess(self, images) -> torch.Tensor:
        """uint8 [N, C, H, W] (channels_last) of one image or a list of them, as the eval loader
        makes its batches."""
        pixels = [self._read(i, image) for i, image in enumerate(_as_list(images)[0])]
        return stack(pixels, self.transform)

    def _read(self, i: int, image) -> np.ndarray:
        try:
            return self.transform(image)
        except (OSError, ValueError) as e:
            named = isinstance(image, (str, os.PathLike))
            what = str(image) if named else f"image {i} ({type(image).__name__})"
            raise InputFileError(f"{what}: cannot read as an image: {e}") from e

    @torch.inference_mode()
    def logits(self, images, batch_size: int = 64) -> torch.Tensor:
        """float32 [N, classes] logits (CPU) of one image or a list: file paths, bytes, PIL
        images, uint8 arrays (HxW or HxWxC, or NxHxWxC for several) or uint8 tensors (CxHxW, or
        NxCxHxW)."""
        items, _ = _as_list(images)
        out = []
        for start in range(0, len(items), batch_size):
            batch = self.preprocess(items[start : start + batch_size])
            out.append(batch_logits(self.model, batch, self.device, self.precision))
        if not out:
            return torch.zeros(0, len(self.class_ids))
        return torch.cat(out)

    def predict(
        self, images, top_k: int | None = 5, threshold: float | None = None, batch_size: int = 64
    ) -> list[Label] | list[list[Label]]:
        """The ``top_k`` classes of each image (None: all) with probability >= ``threshold``
        (None: any), best first, as Labels (id, name, probability); a list of them for one
        image, a list of such lists for several."""
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] or None, got {threshold}")
        items, single = _as_list(images)
        logits = self.logits(items, batch_size)
        results = []
        for row in logits:
            columns, probabilities = top_classes(row, top_k, threshold)
            results.append(
                [
                    Label(self.class_ids[c], self.class_names[c], p)
                    for c, p in zip(columns, probabilities, strict=True)
                ]
            )
        return results[0] if single else results


def load(
    path: str | Path,
    device: torch.device | str | None = None,
    fold: bool = True,
    precision: str = "auto",
) -> Predictor:
    """A Predictor of a checkpoint (`mlc train`'s .pt) or an `mlc export` folder, on ``device``
    (default: the GPU when torch sees one) in ``precision`` (mlc.accel: auto, fp32, bf16,
    fp16)."""
    return Predictor(load_model(path), device, fold, precision)


def _as_list(images) -> tuple[list, bool]:
    """(the images as a list, whether one image was given)."""
    if isinstance(images, (list, tuple)):
        return list(images), False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), False
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images), False
    return [images], True


def stack(pixels: list[np.ndarray], transform: EvalTransform) -> torch.Tensor:
    """uint8 [N, C, H, W] channels_last (NHWC storage, as the loader's batches) of HxWxC rows."""
    if not pixels:
        size, c = transform.image_size, transform.channels
        return torch.zeros(0, size, size, c, dtype=torch.uint8).permute(0, 3, 1, 2)
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)


def top_classes(
    logits: torch.Tensor, top_k: int | None, threshold: float | None
) -> tuple[list[int], list[float]]:
    """(class columns, sigmoid probabilities) of one image's best classes, best first (ties:
    the lower column first): at most ``top_k`` (None: all), those >= ``threshold`` (None: all)."""
    probabilities = torch.sigmoid(logits.float())
    order = torch.argsort(-probabilities, stable=True)
    if top_k is not None:
        order = order[:top_k]
    kept = probabilities[order]
    if threshold is not None:
        order, kept = order[kept >= threshold], kept[kept >= threshold]
    return order.tolist(), kept.tolist()


# ---------------------------------------------------------------- the inputs of `mlc predict`


@dataclass
class Shards:
    """An `mlc shard` split or shard URLs, read by the eval loader; labels from the samples."""

    shards: list
    class_ids: list[str]  # the data's classes (of the labels)
    partial: bool  # partial annotation: verified negatives are stored too
    where: str  # how the input is named in messages


@dataclass
class Files:
    """Image files, each decoded by the eval loader's decoding; no labels."""

    items: list[tuple[str, Path]]  # (key, path) in input order
    ignored: Counter = field(default_factory=Counter)  # folder -> files without an image suffix


def is_shard_input(text: str) -> bool:
    if "://" in text or text.startswith("pipe:"):
        return True
    return any(url.endswith(".tar") for url in expand(text))


def dataset_folder(text: str) -> Folder | None:
    """The `mlc shard` folder ``text`` names (a folder holding classes.json: a local path, or a
    URL such as s3://bucket/ds or https://host/ds), or None. A URL that names a shard (.tar, a
    brace pattern) or a command (pipe:) is not looked up."""
    if "://" not in text:
        path = Path(text)
        return Folder(path) if path.is_dir() and (path / CLASSES_FILE).is_file() else None
    if text.startswith("pipe:") or expand(text) != [text] or text.endswith(".tar"):
        return None
    folder = Folder(text)
    try:
        return folder if folder.is_file(CLASSES_FILE) else None
    except urllib.error.HTTPError as e:  # a server that answers 403 for what it does not have
        if e.code in (401, 403, 404, 410):
            return None
        raise


def _names_a_folder(text: str) -> bool:
    """Whether ``text`` is a URL that can only name a folder: no .tar, no brace pattern, and no
    suffix in its last part (s3://bucket/ds, https://host/ds/)."""
    if "://" not in text or text.startswith("pipe:") or expand(text) != [text]:
        return False
    last = text.rstrip("/").rpartition("/")[2]
    return "." not in last and "?" not in last


def resolve_inputs(
    inputs: list[str], split: str = "test", classes: str | None = None, key: str = "path"
) -> Shards | Files:
    """What ``inputs`` are: one `mlc shard` folder (a folder with classes.json, by path or URL),
    shard URLs (``.tar`` files, brace patterns, URLs with a scheme), or image files, folders of
    them (walked, in name order) and file lists (one path per line, relative to the list's
    folder; blank lines and lines starting with # skipped)."""
    if not inputs:
        raise InputFileError("no input: give image files, folders, file lists or shards")
    dataset = dataset_folder(inputs[0])
    if dataset is not None:
        first = str(dataset)  # a local path as Path writes it, or the URL
        if len(inputs) > 1:
            raise InputFileError(f"{first} is an `mlc shard` folder: give it alone")
        if classes:
            raise InputFileError(f"--classes is for shard URLs: {first} has its classes.json")
        ids, partial = _data_classes(dataset.join(CLASSES_FILE))
        return Shards(dataset_shards(first, split), ids, partial, f"{first} split {split}")
    if classes is None and _names_a_folder(inputs[0]):
        made = f"`mlc shard ... --out {inputs[0]}`"
        if protocol(inputs[0]) in READ_ONLY_PROTOCOLS:  # made elsewhere, then served
            made = f"`mlc shard ... --out DIR`, served at {inputs[0]}"
        raise InputFileError(
            f"{inputs[0]}: no {CLASSES_FILE} there, so not an `mlc shard` dataset (make one "
            f"with {made}); shard URLs end in .tar, or come with --classes"
        )
    shard_inputs = [text for text in inputs if is_shard_input(text)]
    if shard_inputs:
        other = [text for text in inputs if text not in shard_inputs]
        if other:
            raise InputFileError(
                f"{shard_inputs[0]} is a shard and {other[0]} is not: give shards or image "
                "files, not both"
            )
        urls = [url for text in inputs for url in expand(text)]
        if classes is None:
            if urls[0].startswith("pipe:"):
                raise InputFileError(
                    f"{urls[0]}: pipe: shards need --classes (the dataset's classes.json)"
                )
            local = urls[0].removeprefix("file://")
            beside = local if "://" not in local else urls[0]
            classes = join(beside.rpartition("/")[0] or ".", CLASSES_FILE)
        ids, partial = _data_classes(classes)
        return Shards(url_shards(urls), ids, partial, f"{len(urls)} shard(s) from {urls[0]}")
    if classes:
        raise InputFileError("--classes is for shard inputs; image files have no labels")
    return _files(inputs, key)


def _data_classes(location: str | Path) -> tuple[list[str], bool]:
    """(class ids, partial annotation) of a dataset's classes.json, by path or URL."""
    try:
        with open_input(location) as f:
            text = f.read()
    except FileNotFoundError:
        raise InputFileError(f"{location}: no such file (the dataset's classes.json)") from None
    try:
        document = json.loads(text)
        return [str(c["id"]) for c in document["classes"]], document["annotation"] == "partial"
    except (ValueError, KeyError, TypeError) as e:
        raise InputFileError(f"{location}: not an `mlc shard` classes.json: {e!r}") from None


def _files(inputs: list[str], key: str) -> Files:
    found = Files([])
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix.lower() in IMAGE_FILE_SUFFIXES:
                    found.items.append((str(file), file))
                else:
                    found.ignored[text] += 1
        elif not path.exists():
            raise InputFileError(f"{text}: no such file or folder")
        elif path.suffix.lower() in IMAGE_FILE_SUFFIXES:
            found.items.append((text, path))
        else:
            found.items.extend(_file_list(path))
    if not found.items:
        raise InputFileError(
            f"no image files in {', '.join(inputs)} (suffixes {' '.join(IMAGE_FILE_SUFFIXES)})"
        )
    if key != "path":
        found.items = [(_key(name, key), path) for name, path in found.items]
    seen: dict[str, str] = {}
    for name, path in found.items:
        if name in seen:
            raise InputFileError(
                f"key {name!r} given twice ({seen[name]} and {path}): the predictions need "
                "unique keys" + (" (try --key path)" if key != "path" else "")
            )
        seen[name] = str(path)
    return found


def _file_list(path: Path) -> list[tuple[str, Path]]:
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise InputFileError(
            f"{path}: not a text file list of images (and its suffix is no image's: "
            f"{' '.join(IMAGE_FILE_SUFFIXES)})"
        ) from None
    return [
        (line.strip(), path.parent / line.strip())
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _key(name: str, key: str) -> str:
    """The key of an image named ``name`` (its path as given): path, file name or stem."""
    if key == "name":
        return Path(name).name
    if key == "stem":
        return Path(name).stem
    raise ValueError(f"key must be path, name or stem, got {key!r}")


# ---------------------------------------------------------------- the pass


class _FileImages(torch.utils.data.Dataset):
    """(key, path, pixels or None, problem or None) of each file: decoding runs in the
    DataLoader's workers; an unreadable file is passed on, not raised."""

    def __init__(self, items: list[tuple[str, Path]], transform: EvalTransform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, path = self.items[i]
        try:
            return key, path, self.transform(path), None
        except DecodeError as e:  # not an image, or a damaged one
            return key, path, None, str(e)
        except (OSError, ValueError) as e:  # missing, unreadable
            return key, path, None, f"{type(e).__name__}: {e}"


class _FilePass:
    """This process's contiguous share of the image files (the parts, joined in rank order,
    keep the input order), decoded by a DataLoader; no labels."""

    def __init__(
        self, files: Files, settings, loaded: LoadedModel, out, rank, world, strict, pin=False
    ):
        n = len(files.items)
        self.share = files.items[n * rank // world : n * (rank + 1) // world]
        self.total, self.settings, self.strict, self.pin = n, settings, strict, pin
        self.transform = EvalTransform.from_config(settings)
        self.writer = PredictionsWriter(out, loaded.class_ids, rank=rank, world=world)
        self.skipped: list[tuple[str, str]] = []  # (file, problem)

    def batches(self):
        """(keys, uint8 batch, labels None, files read) per batch."""
        loader = torch.utils.data.DataLoader(
            _FileImages(self.share, self.transform),
            batch_size=self.settings.batch_size,
            num_workers=self.settings.num_workers,
            collate_fn=list,
            prefetch_factor=2 if self.settings.num_workers else None,
        )
        for items in loader:
            keys, pixels = [], []
            for key, path, image, problem in items:
                if image is None:
                    self._skip(path, problem)
                    continue
                keys.append(key)
                pixels.append(image)
            images = stack(pixels, self.transform)
            if self.pin:  # pinned NHWC storage, so that the copy to the GPU does not wait
                images = images.permute(0, 2, 3, 1).pin_memory().permute(0, 3, 1, 2)
            yield keys, images, None, len(items)

    def _skip(self, path: Path, problem: str) -> None:
        if self.strict:
            raise InputFileError(f"{path}: cannot read as an image: {problem}")
        self.skipped.append((str(path), problem))
        if len(self.skipped) <= SHOWN_SKIPS:
            print(f"mlc predict: skipped {path}: {problem}", file=sys.stderr)

    def report(self) -> dict:
        return {"rows": self.writer.rows, "skipped": self.skipped, "problems": {}}


class _ShardPass:
    """This process's share of the shards, read by the eval loader (the same batches as `mlc
    eval`); labels from the samples, in the data's class ids."""

    def __init__(
        self, source: Shards, settings, loaded: LoadedModel, out, rank, world, strict, pin=False
    ):
        self.source, self.strict = source, strict
        self.loader = ShardLoader(
            source.shards,
            len(source.class_ids),
            settings,
            full_annotation=not source.partial,
            rank=rank,
            world_size=world,
            pin_memory=pin,
        )
        self.total = sum(s.samples for s in source.shards)
        self.writer = PredictionsWriter(
            out, loaded.class_ids, source.class_ids, source.partial, rank, world
        )

    def batches(self):
        """(keys, uint8 batch, labels in {1, 0, -1}, images) per batch."""
        for batch in self.loader:
            if self.strict and self.loader.problems:
                reason, count = next(iter(self.loader.problems.items()))
                keys = ", ".join(self.loader.skipped_keys[:5])
                raise InputFileError(
                    f"{self.source.where}: {count} {reason}(s)"
                    + (f" (keys {keys})" if keys else "")
                )
            batch = batch.valid_rows()  # eval padding (docs/loader.md)
            labels = torch.where(batch.mask.bool(), batch.targets.to(torch.int8), -1)
            yield batch.keys, batch.images, labels, len(batch.keys)

    def report(self) -> dict:
        skipped = [(key, "corrupt or incomplete sample") for key in self.loader.skipped_keys]
        return {"rows": self.writer.rows, "skipped": skipped, "problems": self.loader.problems}


def predict_to_file(
    model_path: str | Path,
    inputs: list[str],
    out: str | Path,
    split: str = "test",
    classes: str | None = None,
    key: str = "path",
    batch_size: int = DEFAULT_BATCH,
    workers: int | None = None,
    fold: bool = True,
    strict: bool = False,
    allow_pipe: bool = False,
    top_k: int | None = None,
    threshold: float | None = None,
    table: str | Path | None = None,
    progress: bool = True,
    device: str = "auto",
    precision: str = "auto",
) -> dict | None:
    """Score every input image and write the predictions file ``out``; a summary on rank 0
    (None elsewhere). Unreadable images are skipped, counted and listed beside ``out`` in
    <name>.skipped.csv (``strict``: the first one is an error naming it). With ``top_k`` or
    ``threshold``, also the compact table (write_table) at ``table`` (default <name>.top.csv).
    ``device`` and ``precision``: where and how the network runs (mlc.accel)."""
    rank, world, device = mlc_dist.setup(device)
    precision = resolve_precision(precision, device, training=False)
    out = Path(out)
    loaded = load_model(model_path)
    source = resolve_inputs(inputs, split, classes, key)
    settings = replace(
        eval_loader_config(loaded.config, batch_size, workers), allow_pipe=allow_pipe
    )
    kind = _ShardPass if isinstance(source, Shards) else _FilePass
    run = kind(source, settings, loaded, out, rank, world, strict, device.type == "cuda")
    model = prepare_for_inference(loaded.model, fold, device)
    start = time.perf_counter()
    _score(model, run, device, precision, -(-run.total // world), progress and rank == 0)
    parts = mlc_dist.gather_to_first(run.report(), rank, world)
    seconds = time.perf_counter() - start
    if rank != 0:
        return None
    run.writer.finish()
    summary = _summary(parts, source, loaded, out, seconds, world)
    summary.update(device=str(device), precision=str(precision))
    skipped = [row for part in parts for row in part["skipped"]]
    if skipped:
        summary["skipped_list"] = str(out.with_name(out.stem + ".skipped.csv"))
        atomic_write_csv(summary["skipped_list"], ["image", "problem"], skipped)
    if top_k is not None or threshold is not None:
        table = Path(table) if table else out.with_name(out.stem + ".top.csv")
        names = dict(zip(loaded.class_ids, loaded.class_names, strict=True))
        rows = write_table(out, table, names, top_k, threshold)
        summary.update(table=str(table), table_rows=rows)
    return summary


def _score(model, run, device, precision, total: int, progress: bool) -> None:
    """Every batch of ``run`` through the model into its writer; the part is removed when the
    pass fails."""
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="img",
        desc="predict",
        mininterval=1.0,
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        with torch.inference_mode(), bar:
            for keys, images, labels, read in run.batches():
                if keys:
                    logits = batch_logits(model, images, device, precision)
                    run.writer.write(keys, logits, labels)
                bar.update(read)
        run.writer.close()
    except BaseException:
        run.writer.discard()
        raise


def _summary(parts, source, loaded: LoadedModel, out: Path, seconds: float, world: int) -> dict:
    problems: Counter = Counter()
    for part in parts:
        problems.update(part["problems"])
    images = sum(part["rows"] for part in parts)
    skipped = [name for part in parts for name, _ in part["skipped"]]
    summary = {
        "predictions": str(out),
        "model": loaded.info["path"],
        "images": images,
        "classes": len(loaded.class_ids),
        # Files that could not be read; corrupt or incomplete shard samples.
        "skipped": len(skipped)
        if isinstance(source, Files)
        else sum(problems[reason] for reason in SAMPLE_REASONS),
        "skipped_examples": skipped[:SHOWN_SKIPS],
        "loader_problems": dict(problems),  # shards: by reason, unreadable shards too
        "processes": world,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / max(seconds, 1e-9), 1),
    }
    if isinstance(source, Shards):
        summary["labels"] = source.where
    else:
        summary["ignored_files"] = dict(source.ignored)
    return summary


# ---------------------------------------------------------------- the compact table


def write_table(
    predictions: str | Path,
    table: str | Path,
    names: dict[str, str],
    top_k: int | None,
    threshold: float | None,
    batch_rows: int = 4096,
) -> int:
    """From a predictions file, a CSV of each image's best classes: ``key, rank, class_id, name,
    score`` (sigmoid probability), at most ``top_k`` per image with score >= ``threshold``; the
    number of rows."""
    file = pq.ParquetFile(predictions)
    ids = json.loads(file.schema_arrow.metadata[CLASS_IDS_METADATA])
    rows = []
    for batch in file.iter_batches(batch_size=batch_rows, columns=["key", "scores"]):
        keys = batch.column(0).to_pylist()
        flat = batch.column(1).flatten().to_numpy(zero_copy_only=False)
        scores = torch.tensor(flat.reshape(len(keys), len(ids)))
        for image, row in zip(keys, scores, strict=True):
            columns, probabilities = top_classes(row, top_k, threshold)
            rows += [
                [image, rank + 1, ids[c], names.get(ids[c], ids[c]), f"{p:.6f}"]
                for rank, (c, p) in enumerate(zip(columns, probabilities, strict=True))
            ]
    atomic_write_csv(table, ["key", "rank", "class_id", "name", "score"], rows)
    return len(rows)


def format_table(path: str | Path, limit: int) -> str | None:
    """The table's text for the terminal when it has at most ``limit`` rows, else None."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) - 1 > limit:
        return None
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


__all__ = ["Label", "Predictor", "load", "predict_to_file", "top_classes", "write_table"]
