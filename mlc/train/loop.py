"""`mlc train`: shards -> Xception -> checkpoints, in one process or under torchrun (DDP).

Read top to bottom: setup, resume, the loop (one step per batch), then the helpers it calls.
Everything is counted in samples seen by all processes together.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from eval.metrics import full_ap, weighted_mean
from eval.streaming import MAPAccumulator
from mlc.config import Config, to_dict
from mlc.data import LoaderConfig, ShardLoader, normalize
from mlc.format import CLASSES_FILE, stats_name
from mlc.models import create_model
from mlc.train.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from mlc.train.logs import MetricsLog, write_curves


class TrainingError(RuntimeError):
    """The job cannot go on (NaN loss, bad resume); the message says what to do."""


def loader_config(config: Config, mode: str) -> LoaderConfig:
    """The loader settings of a training config, for the train or the validation split."""
    d, t = config.data, config.train
    return LoaderConfig(
        batch_size=t.batch_size,
        image_size=d.image_size,
        mode=mode,
        channels=d.channels,
        shuffle_buffer=d.shuffle_buffer,
        crop_scale=tuple(d.crop_scale),
        crop_fraction=d.crop_fraction,
        seed=t.seed,
        num_workers=d.num_workers,
        allow_pipe=d.allow_pipe,
    )


def build_model(config: Config, num_classes: int):
    """The config's Xception preset with its overrides (weights not loaded yet)."""
    m, d = config.model, config.data
    overrides = {k: v for k, v in {"width": m.width, "middle_blocks": m.middle_blocks}.items() if v}
    return create_model(
        m.name,
        num_classes=num_classes,
        in_channels=d.channels,
        input_size=d.image_size,
        fc_layers=tuple(m.fc_layers),
        dropout=m.dropout,
        head_prior=m.head_prior,
        channels_last=m.channels_last,
        **overrides,
    )


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sigmoid binary cross-entropy averaged over the known labels only (mask == 1)."""
    mask = mask.float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def learning_rate(config: Config, samples: int, world_batch: int) -> float:
    """Staircase exponential decay in samples, linear warm-up, explicit batch scaling."""
    o = config.optim
    lr = o.lr * (world_batch / o.lr_batch_size if o.lr_batch_size else 1.0)
    lr *= o.decay_rate ** (samples // o.decay_every) if o.decay_every else 1.0
    if o.warmup and samples < o.warmup:
        lr *= (samples + world_batch) / o.warmup
    return lr


def make_optimizer(config: Config, params) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "rmsprop":  # the paper's JFT recipe (TF-style epsilon and decay)
        return torch.optim.RMSprop(
            params,
            lr=o.lr,
            alpha=o.rmsprop_alpha,
            eps=o.rmsprop_eps,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
        )
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def train(config: Config, resume: str | None = None, log=print) -> dict:
    rank, world, device = setup_distributed()
    t, d = config.train, config.data
    out = Path(t.out)
    say = log if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(t.seed + rank)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)

    classes = json.loads((Path(d.dataset) / CLASSES_FILE).read_text())
    class_ids = [c["id"] for c in classes["classes"]]
    train_stats = json.loads((Path(d.dataset) / stats_name(d.train_split)).read_text())
    reference = np.array([train_stats["positive_counts"][c] for c in class_ids], dtype=float)

    model = build_model(config, len(class_ids))
    if config.model.init:
        _load_init(model, config.model.init, config.model.init_drop_head)
    model.to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = make_optimizer(config, model.parameters())
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay)
        )
        if t.ema_decay
        else None
    )
    scaler = torch.amp.GradScaler("cuda", enabled=t.precision == "fp16" and device.type == "cuda")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)

    loader = ShardLoader.from_dataset(
        d.dataset, d.train_split, loader_config(config, "train"), rank=rank, world_size=world
    )
    samples, step, best = 0, 0, -math.inf
    checkpoint = _find_resume(out, resume, say)
    if checkpoint is not None:
        path, state = checkpoint
        if state.get("mode", "sync") != "sync":
            raise TrainingError(f"{path} was written by train.mode={state['mode']}: resume there")
        if state["class_ids"] != class_ids:
            raise TrainingError(f"{path} was trained on other classes than {d.dataset}'s")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        loader.load_state_dict(state["loader"][rank] if world > 1 else state["loader"][0])
        torch.set_rng_state(state["rng"][rank] if world > 1 else state["rng"][0])
        samples, step, best = state["samples"], state["step"], state["best"]
        say(f"resumed from {path} at {samples} samples")

    stop = {"signal": None}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in handlers:
        signal.signal(sig, lambda s, _f: stop.update(signal=signal.Signals(s).name))
    metrics = MetricsLog(out, enabled=rank == 0)
    try:
        world_batch = t.batch_size * world
        last_saved = state_path = None
        window_loss, window_steps, window_start, run_start = 0.0, 0, time.time(), time.time()
        start_samples = samples
        batches = iter(loader)

        def state_dict() -> dict:
            loaders = _gather(loader.state_dict(), world)
            rngs = _gather(torch.get_rng_state(), world)
            return {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema else None,
                "loader": loaders,
                "rng": rngs,
                "samples": samples,
                "step": step,
                "best": best,
                "config": to_dict(config),
                "class_ids": class_ids,
            }

        def save(is_best: bool = False) -> Path | None:
            state = state_dict()  # every rank takes part in the gathers
            if rank != 0:
                return None
            return save_checkpoint(out, state, samples, t.keep_last, is_best)

        model.train()
        while samples < t.samples:
            batch = next(batches)
            lr = learning_rate(config, samples, world_batch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = normalize(batch.images.to(device, non_blocking=True))
            targets, mask = batch.targets.to(device), batch.mask.to(device)
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = ddp(images)
            loss = masked_bce(logits, targets, mask)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            samples += world_batch
            step += 1

            value = loss.detach()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            value = value.item()
            if not math.isfinite(value):
                last = state_path or "none (no checkpoint written yet)"
                raise TrainingError(
                    f"loss is {value} at step {step} ({samples} samples); the last "
                    f"good checkpoint is {last}. Lower the learning rate or check "
                    "the data, then resume from it."
                )
            window_loss += value
            window_steps += 1

            finished = samples >= t.samples
            if _crossed(samples, world_batch, t.log_every) or finished:
                elapsed = time.time() - window_start
                rate = window_steps * world_batch / max(elapsed, 1e-9)
                eta = (t.samples - samples) / max(rate, 1e-9)
                record = {
                    "samples": samples,
                    "step": step,
                    "loss": window_loss / window_steps,
                    "lr": lr,
                    "samples_per_s": rate,
                }
                metrics.write(record)
                say(
                    f"{samples:>10} samples  loss {record['loss']:.4f}  lr {lr:.2e}  "
                    f"{rate:7.1f} samples/s  ETA {_duration(eta)}"
                )
                window_loss, window_steps, window_start = 0.0, 0, time.time()

            is_best = False
            if d.val_split and (_crossed(samples, world_batch, t.eval_every) or finished):
                result = evaluate(
                    ema.module if ema else model, config, class_ids, reference, rank, world, device
                )
                result.update(samples=samples, step=step)
                metrics.write(result, kind="val")
                say(
                    f"{samples:>10} samples  val fwMAP@{t.eval_k} {result['fwmap']:.4f}  "
                    f"MAP@{t.eval_k} {result['map']:.4f}  full mAP {_fmt(result['full_map'])}"
                )
                if result["fwmap"] > best:
                    best, is_best = result["fwmap"], True
                model.train()
            if (
                _crossed(samples, world_batch, t.checkpoint_every)
                or finished
                or is_best
                or stop["signal"]
            ):
                saved = save(is_best)
                state_path = saved or state_path
                last_saved = samples
            if stop["signal"]:
                say(
                    f"{stop['signal']}: checkpoint written at {samples} samples; resume with "
                    f"--resume auto"
                )
                break

        summary = {
            "samples": samples,
            "steps": step,
            "best_fwmap": best if best > -math.inf else None,
            "seconds": time.time() - run_start,
            "samples_per_s": (samples - start_samples) / max(time.time() - run_start, 1e-9),
            "checkpoint": str(state_path) if state_path else None,
            "stopped_by": stop["signal"],
            "last_saved": last_saved,
        }
        if rank == 0:
            metrics.write(summary, kind="summary")
            summary["curves"] = str(write_curves(out))
            say(
                f"done: {samples} samples in {_duration(summary['seconds'])}, best val fwMAP "
                f"{_fmt(summary['best_fwmap'])}, last checkpoint {summary['checkpoint']}"
            )
    finally:  # the caller (a test, a notebook) gets its own Ctrl-C back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        metrics.close()
    return summary


@torch.no_grad()
def evaluate(
    model,
    config: Config,
    class_ids: list[str],
    reference: np.ndarray,
    rank: int,
    world: int,
    device: torch.device,
) -> dict:
    """fwMAP@K weighted by the training split's positive counts, plain MAP@K, and full mAP when
    the scores fit in memory; every rank scores its share, the accumulators merge exactly."""
    d, t = config.data, config.train
    loader = ShardLoader.from_dataset(
        d.dataset,
        d.val_split,
        loader_config(config, "eval"),
        rank=rank,
        world_size=world,
    )
    model.eval()
    accumulator = MAPAccumulator(len(class_ids), k=t.eval_k)
    kept_scores, kept_labels, seen = [], [], 0
    loss_sum, loss_count = 0.0, 0  # the loss over every known label of the split
    for batch in loader:
        batch = batch.valid_rows()  # eval padding: no forward for it
        if not batch.keys:
            continue
        logits = model(normalize(batch.images.to(device))).float().cpu()
        labels = torch.where(batch.mask.bool(), batch.targets.long(), -1)
        accumulator.update(logits, labels)
        known = batch.mask.bool()
        losses = F.binary_cross_entropy_with_logits(logits, batch.targets.float(), reduction="none")
        loss_sum += float(losses[known].double().sum())
        loss_count += int(known.sum())
        if len(class_ids) * (seen + len(batch.keys)) <= 50_000_000:  # full AP needs them all
            kept_scores.append(logits)
            kept_labels.append(labels)
        seen += len(batch.keys)
        if t.eval_max_samples and seen >= t.eval_max_samples // world:
            break
    states = _gather(accumulator.state_dict(), world)
    total = MAPAccumulator.from_state_dict(states[0])
    for state in states[1:]:
        total.merge(MAPAccumulator.from_state_dict(state))
    weights = reference if reference.sum() > 0 else "uniform"
    result = total.compute(weights)
    full_map = None
    parts = _gather((kept_scores, kept_labels, seen, loss_sum, loss_count), world)
    if all(sum(len(s) for s in p[0]) == p[2] for p in parts):
        scores = torch.cat([s for p in parts for s in p[0]])
        labels = torch.cat([s for p in parts for s in p[1]])
        full = full_ap(scores, labels)
        full_map = weighted_mean(full, np.ones_like(full))
    return {
        "fwmap": result.weighted_map,
        "map": result.unweighted_map,
        "full_map": full_map,
        "loss": sum(p[3] for p in parts) / max(sum(p[4] for p in parts), 1),
        "images": total.images,
        "classes_evaluated": int((result.positives > 0).sum()),
    }


def _crossed(samples: int, step_samples: int, every: int) -> bool:
    """Did the last step pass a multiple of ``every`` samples?"""
    return samples // every != (samples - step_samples) // every


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _find_resume(out: Path, resume: str | None, say) -> tuple[Path, dict] | None:
    if resume is None:
        return None
    if resume == "auto":
        found = latest_valid_checkpoint(out, log=say)
        if found is None:
            say(f"--resume auto: no checkpoint in {out / 'checkpoints'}; starting fresh")
        return found
    path = Path(resume)
    if not path.is_file():
        raise TrainingError(f"--resume {resume}: no such checkpoint")
    return path, load_checkpoint(path)


def _load_init(model, spec: str, drop_head: bool) -> None:
    from mlc.models import weights

    kind, _, path = spec.partition(":")
    if kind == "keras":
        weights.load_keras_h5(model, path, drop_head=drop_head)
    elif kind == "timm":
        weights.load_timm_file(model, path, drop_head=drop_head)
    else:
        raise TrainingError(f"model.init must be keras:PATH or timm:PATH, got {spec!r}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
