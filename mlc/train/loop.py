"""`mlc train`: shards -> Xception -> checkpoints, in one process or under torchrun (DDP).

Read top to bottom: ``train`` sets up the run (``Run.create``), resumes it, then loops one step
per batch (``Run.step``), logging, validating and checkpointing on sample counts. Everything is
counted in samples seen by all processes together.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from mlc import dist
from mlc.accel import Precision, resolve_precision
from mlc.config import Config, config_from_dict, to_dict
from mlc.data import ShardLoader, counts, normalize
from mlc.data.urls import read_dataset_json
from mlc.format import CLASSES_FILE, stats_name
from mlc.models import build_model
from mlc.storage import READ_ONLY_PROTOCOLS, protocol
from mlc.train.checkpoint import find_resume, save_checkpoint, write_run_config
from mlc.train.logs import (
    MetricsLog,
    format_duration,
    format_metric,
    summary_writer_class,
    write_curves,
)
from mlc.train.optim import learning_rate, make_optimizer, masked_bce
from mlc.train.validate import validate


class TrainingError(RuntimeError):
    """The job cannot go on (NaN loss, bad resume); the message says what to do."""


def dataset_classes(config: Config) -> tuple[list[str], np.ndarray]:
    """(class ids, positive counts of the training split): the head's classes, and the
    frequency weights of validation's fwMAP. data.dataset is a folder or a URL (mlc.storage)."""
    d = config.data
    documents = {}
    for name in (CLASSES_FILE, stats_name(d.train_split)):
        try:
            documents[name] = read_dataset_json(d.dataset, name)
        except FileNotFoundError:
            make = f"`mlc shard ... --out {d.dataset}`"
            if protocol(d.dataset) in READ_ONLY_PROTOCOLS:  # made elsewhere, then served
                make = f"`mlc shard ... --out DIR`, served at {d.dataset}"
            raise TrainingError(
                f"data.dataset {d.dataset}: no {name}, so not an `mlc shard` dataset with a "
                f"{d.train_split!r} split. Make one with {make} "
                "(the demo's: `mlc demo`), or point data.dataset at one (--set data.dataset=DIR)"
            ) from None
    class_ids = [c["id"] for c in documents[CLASSES_FILE]["classes"]]
    positives = documents[stats_name(d.train_split)]["positive_counts"]
    return class_ids, np.array([positives[c] for c in class_ids], dtype=float)


@dataclass
class Run:
    """Everything one process trains with, and the position it has reached."""

    config: Config
    class_ids: list[str]
    rank: int
    world: int
    device: torch.device
    precision: Precision  # train.precision resolved for the device (mlc.accel)
    model: torch.nn.Module
    # What the step calls: the model, in DistributedDataParallel under torchrun, compiled with
    # train.compile (its parameters and state_dict are the model's).
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: torch.optim.swa_utils.AveragedModel | None
    scaler: torch.amp.GradScaler
    loader: ShardLoader
    samples: int = 0
    step: int = 0
    best: float = -math.inf
    checkpoint: Path | None = None  # the last one written

    @classmethod
    def create(
        cls,
        config: Config,
        class_ids: list[str],
        rank: int,
        world: int,
        device: torch.device,
        precision: Precision | None = None,
    ) -> Run:
        t, d = config.train, config.data
        precision = precision or resolve_precision(t.precision, device)
        model = build_model(config.model, len(class_ids), d.channels).to(device)
        # DDP first: it gives every rank rank 0's initial weights, which the EMA then copies.
        forward = model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if t.compile:
            forward = torch.compile(forward)
        optimizer = make_optimizer(config, model.parameters())
        ema = None
        if t.ema_decay:
            multi_avg = torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay)
            ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=multi_avg)
        scaler = torch.amp.GradScaler("cuda", enabled=precision.scaled and device.type == "cuda")
        # To a GPU, batches are copied from pinned memory while the GPU works (non_blocking).
        loader = ShardLoader.from_dataset(
            d.dataset,
            d.train_split,
            d,
            rank=rank,
            world_size=world,
            pin_memory=device.type == "cuda",
        )
        return cls(
            config,
            class_ids,
            rank,
            world,
            device,
            precision,
            model,
            forward,
            optimizer,
            ema,
            scaler,
            loader,
        )

    @property
    def world_batch(self) -> int:
        return self.config.data.batch_size * self.world

    def restore(self, path: Path, state: dict, say) -> None:
        """Continue from a checkpoint of this run; a checkpoint that does not fit (another
        mode, classes, model, optimizer or number of processes) is refused by name."""
        check_resumable(path, state, self.config, self.class_ids, self.world)
        parts = [
            ("model", self.model, state["model"]),
            ("optimizer", self.optimizer, state["optimizer"]),
            ("gradient scaler", self.scaler, state["scaler"]),
        ]
        if self.ema is not None and state.get("ema") is not None:
            parts.append(("EMA", self.ema, state["ema"]))
        for what, part, saved in parts:
            try:
                part.load_state_dict(saved)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                problem = str(e).strip().splitlines()[0]
                message = f"{path}: its {what} state does not fit this run: {problem}"
                raise TrainingError(message) from None
        mine = self.rank if self.world > 1 else 0
        self.loader.load_state_dict(state["loader"][mine])
        torch.set_rng_state(state["rng"][mine])
        self.samples, self.step, self.best = state["samples"], state["step"], state["best"]
        self.checkpoint = path
        say(f"resumed from {path} at {self.samples} samples")

    def state_dict(self) -> dict:
        """The checkpoint; every rank takes part (the loader positions and RNGs are gathered)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "loader": dist.all_gather(self.loader.state_dict(), self.world),
            "rng": dist.all_gather(torch.get_rng_state(), self.world),
            "samples": self.samples,
            "step": self.step,
            "best": self.best,
            "config": to_dict(self.config),
            "class_ids": self.class_ids,
        }

    def save(self, is_best: bool = False) -> None:
        state = self.state_dict()
        if self.rank == 0:
            t = self.config.train
            self.checkpoint = save_checkpoint(t.out, state, self.samples, t.keep_last, is_best)

    def data_counts(self) -> dict:
        """What the training loaders of all ranks read against the split's stats since this
        process started (mlc.data.counts); every rank takes part."""
        return counts.merge(dist.all_gather(self.loader.counts(), self.world))

    def check_data(self, data: dict, split: str) -> None:
        """DataLossError (on every rank, whose counts are the same) past
        data.max_lost_fraction of the samples expected."""
        limit = self.config.data.max_lost_fraction
        counts.check(
            data, limit, f"{split} split of {self.config.data.dataset}", "data.max_lost_fraction"
        )

    def step_on(self, batch) -> tuple[float, float]:
        """One optimisation step on ``batch``: (the loss averaged over ranks, the lr)."""
        lr = learning_rate(self.config, self.samples, self.world_batch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # uint8 to the device (4x fewer bytes than float), normalized there.
        images = normalize(batch.images.to(self.device, non_blocking=True))
        targets = batch.targets.to(self.device, non_blocking=True)
        mask = batch.mask.to(self.device, non_blocking=True)
        with self.precision.autocast(self.device):
            logits = self.forward(images)
        loss = masked_bce(logits, targets, mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.samples += self.world_batch
        self.step += 1
        value = loss.detach()
        if self.world > 1:
            torch_dist.all_reduce(value)
            value /= self.world
        value = value.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"loss is {value} at step {self.step} ({self.samples} samples); the last good "
                f"checkpoint is {self.checkpoint or 'none (no checkpoint written yet)'}. Lower "
                "the learning rate or check the data, then resume from it."
            )
        return value, lr


# Settings a checkpoint's tensors depend on: resuming with another value cannot work.
SHAPING_KEYS = [
    ("model", ["name", "width", "middle_blocks", "fc_layers"]),
    ("data", ["channels"]),
    ("optim", ["name"]),
]


def check_resumable(path: Path, state: dict, config: Config, class_ids: list[str], world: int):
    if state.get("mode", "sync") != "sync":
        raise TrainingError(f"{path} was written by train.mode={state['mode']}: resume there")
    if state["class_ids"] != class_ids:
        raise TrainingError(f"{path} was trained on other classes than {config.data.dataset}'s")
    saved = config_from_dict(state["config"], f"{path} (its config)", default_version=1)
    for section, keys in SHAPING_KEYS:
        for key in keys:
            was, now = getattr(getattr(saved, section), key), getattr(getattr(config, section), key)
            if was != now:
                raise TrainingError(
                    f"{path} was trained with {section}.{key}={was!r}, this config has {now!r}: "
                    f"resume with --set {section}.{key}={was!r}, or start a new run"
                )
    writers = len(state.get("loader") or [])
    if writers != world:
        raise TrainingError(
            f"{path} was written by {writers} process(es), this run has {world}: each process "
            f"continues its own data stream, so resume with {writers} (torchrun "
            f"--nproc_per_node {writers}), or start a new run"
        )


class LossWindow:
    """The training loss and speed since the last log line."""

    def __init__(self):
        self.loss, self.steps, self.start = 0.0, 0, time.time()

    def add(self, loss: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1

    def record(self, run: Run, lr: float) -> dict:
        rate = self.steps * run.world_batch / max(time.time() - self.start, 1e-9)
        record = {
            "samples": run.samples,
            "step": run.step,
            "loss": self.loss / self.steps,
            "lr": lr,
            "samples_per_s": rate,
        }
        self.__init__()
        return record


@contextlib.contextmanager
def stop_signals():
    """{"signal": None}, set to the signal's name on SIGTERM or SIGINT; the loop checkpoints
    and stops. The caller's handlers (a test's, a notebook's Ctrl-C) come back afterwards."""
    stop = {"signal": None}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in handlers:
        signal.signal(sig, lambda s, _f: stop.update(signal=signal.Signals(s).name))
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def crossed(samples: int, step_samples: int, every: int) -> bool:
    """Did the last step pass a multiple of ``every`` samples?"""
    return samples // every != (samples - step_samples) // every


def train(config: Config, resume: str | None = None, log=print) -> dict:
    t = config.train
    rank, world, device = dist.setup(t.device)
    precision = resolve_precision(t.precision, device)
    say = log if rank == 0 else (lambda *a, **k: None)
    board = summary_writer_class(t.tensorboard, say)  # before any work: a missing package
    torch.manual_seed(t.seed + rank)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    class_ids, reference = dataset_classes(config)
    run = Run.create(config, class_ids, rank, world, device, precision)
    say(
        f"device {device}{f' x {world} processes' if world > 1 else ''}, precision {precision}"
        + (", torch.compile" if t.compile else "")
    )
    found = find_resume(t.out, resume, say)
    if found is not None:
        run.restore(*found, say)
        if run.samples >= t.samples:
            say(
                f"nothing to train: {found[0]} is at {run.samples} samples, train.samples is "
                f"{t.samples} (raise it to train on)"
            )
            return finished_summary(run)
    if rank == 0:
        write_run_config(t.out, config, resolved={"device": str(device), "precision": precision})
    metrics = MetricsLog(t.out, enabled=rank == 0, writer=board)
    with stop_signals() as stop:
        try:
            return loop(run, reference, metrics, stop, say)
        finally:
            metrics.close()


def finished_summary(run: Run) -> dict:
    """The summary of a run resumed after its end: nothing trained, nothing logged."""
    return {
        "samples": run.samples,
        "steps": run.step,
        "best_fwmap": run.best if run.best > -math.inf else None,
        "seconds": 0.0,
        "samples_per_s": 0.0,
        "checkpoint": str(run.checkpoint),
        "stopped_by": None,
        "last_saved": run.samples,
    }


def loop(run: Run, reference: np.ndarray, metrics: MetricsLog, stop: dict, say) -> dict:
    """Steps until train.samples or a stop signal; returns the run's summary."""
    t, config = run.config.train, run.config
    start_samples, run_start, last_saved = run.samples, time.time(), None
    window = LossWindow()
    batches = iter(run.loader)
    run.model.train()
    while run.samples < t.samples:
        loss, lr = run.step_on(next(batches))
        window.add(loss)
        finished = run.samples >= t.samples

        if crossed(run.samples, run.world_batch, t.log_every) or finished:
            record = window.record(run, lr)
            record["data"] = run.data_counts()
            metrics.write(record)
            eta = (t.samples - run.samples) / max(record["samples_per_s"], 1e-9)
            lost = record["data"]["lost"]
            say(
                f"{run.samples:>10} samples  loss {record['loss']:.4f}  lr {lr:.2e}  "
                f"{record['samples_per_s']:7.1f} samples/s  ETA {format_duration(eta)}"
                + (f"  {lost} samples lost" if lost else "")
            )
            run.check_data(record["data"], config.data.train_split)

        is_best = False
        if config.data.val_split and (
            crossed(run.samples, run.world_batch, t.eval_every) or finished
        ):
            model = run.ema.module if run.ema else run.model
            result = validate(
                model,
                config,
                run.class_ids,
                reference,
                run.rank,
                run.world,
                run.device,
                run.precision,
            )
            result.update(samples=run.samples, step=run.step)
            metrics.write(result, kind="val")
            say(
                f"{run.samples:>10} samples  val fwMAP@{t.eval_k} {result['fwmap']:.4f}  "
                f"MAP@{t.eval_k} {result['map']:.4f}  full mAP {format_metric(result['full_map'])}"
                f"  ({result['images']} of {result['split_images']} images scored"
                + (f"; {counts.describe(result['data'])})" if result["data"]["lost"] else ")")
            )
            run.check_data(result["data"], config.data.val_split)
            if result["fwmap"] > run.best:
                run.best, is_best = result["fwmap"], True
            run.model.train()

        if (
            crossed(run.samples, run.world_batch, t.checkpoint_every)
            or finished
            or is_best
            or stop["signal"]
        ):
            run.save(is_best)
            last_saved = run.samples
        if stop["signal"]:
            say(
                f"{stop['signal']}: checkpoint written at {run.samples} samples; resume with "
                "--resume auto"
            )
            break

    seconds = time.time() - run_start
    data = run.data_counts()
    summary = {
        "samples": run.samples,
        "steps": run.step,
        "best_fwmap": run.best if run.best > -math.inf else None,
        "seconds": seconds,
        "samples_per_s": (run.samples - start_samples) / max(seconds, 1e-9),
        "checkpoint": str(run.checkpoint) if run.checkpoint else None,
        "stopped_by": stop["signal"],
        "last_saved": last_saved,
        "data": data,
        "device": str(run.device),
        "precision": str(run.precision),
    }
    if run.rank == 0:
        metrics.write(summary, kind="summary")
        summary["curves"] = str(write_curves(t.out))
        say(
            f"done: {run.samples} samples in {format_duration(seconds)}, best val fwMAP "
            f"{format_metric(summary['best_fwmap'])}, last checkpoint {summary['checkpoint']}; "
            f"training data: {counts.describe(data)}, {data['repeated']} repeated to fill "
            "batches"
        )
    return summary
