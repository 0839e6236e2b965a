"""Server 0's main thread: the job's clock, log, validation, checkpoints and the end.

While RPC threads apply the workers' pushes, this loop watches the sample count (server 0 gets
every push) and, as it crosses ``train.log_every`` / ``eval_every`` / ``checkpoint_every``,
logs the counters of every server (staleness histograms, drops, throughput), validates the
gathered model with the synchronous job's ``validate`` and writes checkpoints of one
consistent cut (group.py, cut.py) with the synchronous job's atomic saver. Every
``protocol.PING_EVERY`` seconds it pings the other servers and looks at the workers
(liveness.py: lost, rejoined). The job ends when the budget is spent, on SIGTERM, on a
worker's non-finite loss or when every worker is gone for good.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from mlc.train.async_ps import protocol
from mlc.train.async_ps.cut import check_resumable, checkpoint_state, gathered_state, server_parts
from mlc.train.async_ps.group import ServerGroup
from mlc.train.async_ps.liveness import WorkerWatch
from mlc.train.checkpoint import find_resume, save_checkpoint
from mlc.train.logs import (
    MetricsLog,
    format_duration,
    format_metric,
    summary_writer_class,
    write_curves,
)
from mlc.train.loop import TrainingError
from mlc.train.optim import learning_rate
from mlc.train.validate import validate

POLL = 0.05  # seconds between looks at the counters
INTERVALS = ("log_every", "eval_every", "checkpoint_every")  # train.* in samples


class Marks:
    """Which of the INTERVALS the sample count crossed since the last look."""

    def __init__(self, train, samples: int):
        self.train = train
        self.counts = self._counts(samples)

    def _counts(self, samples: int) -> dict[str, int]:
        return {k: samples // getattr(self.train, k) for k in INTERVALS}

    def crossed(self, samples: int) -> set[str]:
        counts = self._counts(samples)
        crossed = {k for k in INTERVALS if counts[k] > self.counts[k]}
        self.counts = counts
        return crossed


class Coordinator:
    def __init__(self, config, plan, model, class_ids, reference, stop_signal, log=print):
        self.config, self.plan, self.model = config, plan, model
        self.class_ids, self.reference = class_ids, reference
        self.stop_signal = stop_signal  # {"signal": name or None}, set by the SIGTERM handler
        self.say = log
        self.out = Path(config.train.out)
        self.servers = ServerGroup(len(plan), config.ps.rpc_timeout)
        self.best, self.last_checkpoint = -math.inf, None
        self.workers: WorkerWatch | None = None  # from run() on

    def run(self, resume: str | None) -> dict:
        """The whole job from server 0's side; returns the summary."""
        # The launcher has said whether TensorBoard logging is on (and stopped if it cannot be).
        writer = summary_writer_class(self.config.train.tensorboard, say=lambda *_: None)
        self.metrics = MetricsLog(self.out, writer=writer)
        self.workers = WorkerWatch(self.config, self.metrics, self.say)
        try:
            self.start(resume)
            began = time.time()
            start_samples = protocol.SERVER.samples
            self.window = (began, start_samples)  # (time, samples) of the last log record
            self._loop(start_samples)
            self._end()
            return self._summary(began, start_samples)
        finally:
            self.metrics.close()

    def finish(self, ended: bool) -> bool:
        """Tell every other process that the job is over (each leaves the RPC group and exits);
        ``ended``: run() returned. True when all processes, this one too, leave the group
        together: the run ended, every worker slot's process is done, none was lost or failed,
        and every process got the message. Otherwise each leaves on its own (a dead process
        would never join the others)."""
        record = protocol.WORKERS
        lost = self.workers.lost if self.workers is not None else set()
        together = (
            ended
            and not lost
            and not record.not_done(self.config.ps.workers, set())
            and record.first_failure() is None
        )
        names = [name for w, name in sorted(record.current_names().items()) if w not in lost]
        answered = self.servers.finish_others(names, together)
        return together and answered

    # ------------------------------------------------------------------ start and resume

    def start(self, resume: str | None) -> None:
        """Every server gets its state (a resumed one, or its initial weights) and is ready."""
        found = find_resume(self.out, resume, self.say)
        parts = [None] * len(self.plan)  # None: keep the initial weights
        if found is not None:
            path, state = found
            check_resumable(path, state, self.plan, self.class_ids, self.config.ps)
            parts = server_parts(self.plan, self.model, state)
            protocol.SERVER.load(parts[0])
        for s in range(1, len(self.plan)):
            self.servers.call(s, protocol.load, parts[s])
        protocol.READY.set()
        if found is not None:
            self.best = state["best"]
            self.say(f"resumed from {path} at {state['samples']} samples, version {state['step']}")

    # ------------------------------------------------------------------- the main loop

    def _loop(self, start_samples: int) -> None:
        """Until the job is over: the log, validation and checkpoints at their intervals, a
        look at the other processes every PING_EVERY seconds."""
        marks = Marks(self.config.train, start_samples)
        last_ping = time.time()
        while True:
            time.sleep(POLL)
            samples = protocol.SERVER.samples
            self._raise_on_failure()
            crossed = marks.crossed(samples)
            if time.time() - last_ping > protocol.PING_EVERY:
                self.servers.ping_others()
                self.workers.check()
                last_ping = time.time()
            if self._over(samples):
                return
            self._at_marks(crossed)

    def _raise_on_failure(self) -> None:
        """A worker reported a non-finite loss: stop, naming the checkpoint to resume from."""
        failure = protocol.WORKERS.first_failure()
        if failure is None:
            return
        self.servers.stop(self.say)
        last = self.last_checkpoint or "none (no checkpoint written yet)"
        raise TrainingError(
            f"{failure}; the last good checkpoint is {last}. Lower the learning "
            "rate or check the data, then resume from it."
        )

    def _over(self, samples: int) -> bool:
        """The budget is spent, a stop signal came, or every worker is gone for good."""
        return (
            samples >= self.config.train.samples
            or bool(self.stop_signal["signal"])
            or self.workers.every_worker_gone()
        )

    def _at_marks(self, crossed: set[str]) -> None:
        if "log_every" in crossed:
            self._log()
        is_best = bool(self.config.data.val_split) and "eval_every" in crossed and self._validate()
        if "checkpoint_every" in crossed or is_best:
            self._checkpoint(is_best)

    def _end(self) -> None:
        """The workers finish their pushes in flight and leave, then the last log, validation
        and checkpoint."""
        self.servers.stop(self.say)
        self.workers.wait_until_done()
        self._log()
        is_best = bool(self.config.data.val_split) and self._validate()
        self._checkpoint(is_best)
        if self.stop_signal["signal"]:
            self.say(
                f"{self.stop_signal['signal']}: checkpoint written at "
                f"{protocol.SERVER.samples} samples; resume with --resume auto"
            )
        elif protocol.SERVER.samples < self.config.train.samples:
            raise TrainingError(
                f"every worker is gone at {protocol.SERVER.samples} samples; checkpoint "
                f"{self.last_checkpoint}: resume with --resume auto"
            )

    def _summary(self, began: float, start_samples: int) -> dict:
        srv, restarts = protocol.SERVER, protocol.WORKERS.restart_counts()
        lost = self.workers.lost
        elapsed = time.time() - began
        summary = {
            "samples": srv.samples,
            "steps": srv.version,
            "best_fwmap": self.best if self.best > -math.inf else None,
            "seconds": elapsed,
            "samples_per_s": (srv.samples - start_samples) / max(elapsed, 1e-9),
            "checkpoint": str(self.last_checkpoint),
            "stopped_by": self.stop_signal["signal"],
            "lost_workers": sorted(lost),
            "restarts": {str(w): k for w, k in sorted(restarts.items()) if k},
            "pushes": dict(srv.pushes),
            "mode": "async",
        }
        self.metrics.write(summary, kind="summary")
        summary["curves"] = str(write_curves(self.out))
        self.say(
            f"done: {srv.samples} samples in {format_duration(elapsed)}, best val fwMAP "
            f"{format_metric(summary['best_fwmap'])}, last checkpoint {summary['checkpoint']}"
            + (f"; lost workers {sorted(lost)}" if lost else "")
        )
        return summary

    # ------------------------------------------------------- log, validation, checkpoint

    def _log(self) -> None:
        stats = self.servers.each(protocol.stats)
        now, (since, before) = time.time(), self.window
        samples = stats[0]["samples"]
        rate = (samples - before) / max(now - since, 1e-9)
        self.window = (now, samples)
        if not stats[0]["loss_count"]:
            return  # no push since the last record
        record = train_record(self.config, stats, rate, self.workers.lost)
        self.metrics.write(record)
        worst = max((max(s["staleness"], default=0) for s in stats), default=0)
        self.say(
            f"{samples:>10} samples  loss {format_metric(record['loss'])}  "
            f"lr {record['lr']:.2e}  {rate:7.1f} samples/s  versions {record['versions']}  "
            f"staleness max {worst}  dropped {sum(record['dropped'])}"
        )

    def _validate(self) -> bool:
        """Validate the model of one cut; True if it is the best so far."""
        snaps = self.servers.cut()
        self.model.load_state_dict(gathered_state(self.plan, self.model, snaps))
        result = validate(
            self.model, self.config, self.class_ids, self.reference, 0, 1, torch.device("cpu")
        )
        result.update(samples=snaps[0]["samples"], step=snaps[0]["version"])
        self.metrics.write(result, kind="val")
        k = self.config.train.eval_k
        self.say(
            f"{result['samples']:>10} samples  val fwMAP@{k} {result['fwmap']:.4f}  "
            f"MAP@{k} {result['map']:.4f}  loss {format_metric(result.get('loss'))}"
        )
        if result["fwmap"] > self.best:
            self.best = result["fwmap"]
            return True
        return False

    def _checkpoint(self, is_best: bool = False) -> None:
        snaps = self.servers.cut()
        state = checkpoint_state(
            self.config, self.plan, self.model, snaps, self.best, self.class_ids
        )
        t = self.config.train
        self.last_checkpoint = save_checkpoint(
            self.out, state, snaps[0]["samples"], t.keep_last, is_best
        )


def train_record(config, stats: list[dict], rate: float, lost: set[int]) -> dict:
    """The log record (kind train) from every server's counters; server 0 gets every push, so
    its counters are the job's."""
    first = stats[0]
    samples = first["samples"]
    return {
        "samples": samples,
        "step": first["version"],
        "loss": first["loss_sum"] / first["loss_count"],
        "lr": learning_rate(config, samples, config.data.batch_size),
        "samples_per_s": rate,
        "versions": [s["version"] for s in stats],
        "dropped": [s["dropped"] for s in stats],
        # per server: staleness -> applied updates (cumulative over the run)
        "staleness": [{str(k): v for k, v in sorted(s["staleness"].items())} for s in stats],
        "own_staleness_max": {str(w): v for w, v in sorted(first["own_staleness_max"].items())},
        "pushes": first["pushes"],  # per worker process (a replacement has its own name)
        "lost_workers": sorted(lost),
    }


__all__ = ["Coordinator"]
