"""Server 0's main thread: the job's clock, log, validation and checkpoints.

While RPC threads apply the workers' pushes, this loop watches the sample count (server 0 gets
every push) and, as it crosses ``train.log_every`` / ``eval_every`` / ``checkpoint_every``,
logs the counters of every server (staleness histograms, drops, throughput), validates the
gathered model with the synchronous job's ``evaluate`` and writes checkpoints. It pings the
workers every ``protocol.PING_EVERY`` seconds: one that does not answer is lost (logged, and a
record of kind ``worker`` in metrics.jsonl); a replacement that registers for a lost slot
rejoins (the same, event ``rejoined``). A checkpoint is one consistent cut: every server stops
applying (pause), each hands over a copy of its pieces, optimizer state and counters, all go on
(resume), and the cut is written as one file with the synchronous job's atomic saver.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed.rpc as rpc

from mlc.config import to_dict
from mlc.train.async_ps import protocol
from mlc.train.async_ps.plan import assemble, split
from mlc.train.async_ps.protocol import PeerLost
from mlc.train.checkpoint import find_resume, save_checkpoint
from mlc.train.logs import MetricsLog, format_duration, format_metric, write_curves
from mlc.train.loop import TrainingError
from mlc.train.optim import learning_rate
from mlc.train.validate import validate

POLL = 0.05  # seconds between looks at the counters


# --------------------------------------------------------------------------- the loop


class Coordinator:
    def __init__(self, config, plan, model, class_ids, reference, stop_signal, log=print):
        self.config, self.plan, self.model = config, plan, model
        self.class_ids, self.reference = class_ids, reference
        self.stop_signal = stop_signal  # {"signal": name or None}, set by the SIGTERM handler
        self.say = log
        self.out = Path(config.train.out)
        self.names = [f"server{s}" for s in range(len(plan))]
        self.best, self.last_checkpoint = -math.inf, None
        self.lost: set[int] = set()
        self.lost_at: dict[int, float] = {}  # slot -> when it was found gone
        self.started = time.time()

    def call(self, s: int, func, *args, timeout=None):
        """func on server s: a direct call for this process's server, RPC for the others."""
        if s == 0:
            return getattr(protocol.SERVER, func.__name__)(*args)
        timeout = self.config.ps.rpc_timeout if timeout is None else timeout
        try:
            return protocol.call(self.names[s], func, *args, timeout=timeout)
        except RuntimeError as e:
            raise PeerLost(f"server {s} does not answer ({e})") from None

    # ------------------------------------------------------------------ start and resume

    def start(self, resume: str | None) -> None:
        ps = self.config.ps
        found = find_resume(self.out, resume, self.say)
        if found is None:
            for s in range(1, len(self.plan)):
                self.call(s, protocol.load, None)
            protocol.READY.set()
            return
        path, state = found
        if state.get("mode") != "async":
            raise TrainingError(f"{path} was written by the synchronous job; resume it there")
        if state["class_ids"] != self.class_ids:
            raise TrainingError(f"{path} was trained on other classes than the dataset's")
        plan = [[tuple(x) for x in server_plan] for server_plan in state["plan"]]
        if plan != [[(p.name, p.start, p.stop) for p in pieces] for pieces in self.plan]:
            raise TrainingError(
                f"{path} was written with ps.servers={len(plan)} (or another model); resume "
                f"with the same ps.servers and model (now {ps.servers})"
            )
        if len(state["loader"]) != ps.workers:
            raise TrainingError(
                f"{path} was written with ps.workers={len(state['loader'])}; resume with the "
                f"same number of workers (now {ps.workers}): each continues its own data"
            )
        pieces = split(self.plan, state["model"])
        trainable = {n for n, _ in self.model.named_parameters()}
        for s, counters in enumerate(state["servers"]):
            own = self.plan[s]
            part = {
                "params": [t for p, t in zip(own, pieces[s], strict=True) if p.name in trainable],
                "buffers": [
                    t for p, t in zip(own, pieces[s], strict=True) if p.name not in trainable
                ],
                "optimizer": state["optimizer"][s],
                "loader": {w: pos for w, pos in enumerate(state["loader"]) if pos is not None}
                if s == 0
                else {},
                **counters,
            }
            if s == 0:
                protocol.SERVER.load(part)
            else:
                self.call(s, protocol.load, part)
        protocol.READY.set()
        self.best = state["best"]
        self.say(f"resumed from {path} at {state['samples']} samples, version {state['step']}")

    # ------------------------------------------------------------------- the main loop

    def run(self, resume: str | None) -> dict:
        self.metrics = MetricsLog(self.out)
        try:
            self.start(resume)
            return self._loop()
        finally:
            self.metrics.close()

    def _loop(self) -> dict:
        t, d = self.config.train, self.config.data
        srv = protocol.SERVER
        start_samples = srv.samples
        marks = {
            k: srv.samples // getattr(t, k) for k in ("log_every", "eval_every", "checkpoint_every")
        }
        self.window = (time.time(), srv.samples)
        run_start, last_ping = time.time(), time.time()
        while True:
            time.sleep(POLL)
            samples = srv.samples
            finished = samples >= t.samples
            failure = protocol.WORKERS.first_failure()
            if failure is not None:
                self._stop_all()
                last = self.last_checkpoint or "none (no checkpoint written yet)"
                raise TrainingError(
                    f"{failure}; the last good checkpoint is {last}. Lower the learning "
                    "rate or check the data, then resume from it."
                )
            crossed = {k: samples // getattr(t, k) > m for k, m in marks.items()}
            marks = {k: samples // getattr(t, k) for k in marks}
            if time.time() - last_ping > protocol.PING_EVERY:
                self._ping_servers()
                self._check_workers()
                last_ping = time.time()
            if finished or self.stop_signal["signal"] or self._every_worker_gone():
                break
            if crossed["log_every"]:
                self._log()
            is_best = False
            if d.val_split and crossed["eval_every"]:
                is_best = self._validate()
            if crossed["checkpoint_every"] or is_best:
                self._checkpoint(is_best)
        # The end: workers finish their pushes in flight and leave, then the last cut.
        self._stop_all()
        self._wait_for_workers()
        self._log()
        is_best = bool(d.val_split) and self._validate()
        self._checkpoint(is_best)
        if self.stop_signal["signal"]:
            self.say(
                f"{self.stop_signal['signal']}: checkpoint written at {srv.samples} samples; "
                "resume with --resume auto"
            )
        elif srv.samples < t.samples:
            raise TrainingError(
                f"every worker is gone at {srv.samples} samples; checkpoint "
                f"{self.last_checkpoint}: resume with --resume auto"
            )
        elapsed = time.time() - run_start
        restarts = protocol.WORKERS.restart_counts()
        summary = {
            "samples": srv.samples,
            "steps": srv.version,
            "best_fwmap": self.best if self.best > -math.inf else None,
            "seconds": elapsed,
            "samples_per_s": (srv.samples - start_samples) / max(elapsed, 1e-9),
            "checkpoint": str(self.last_checkpoint),
            "stopped_by": self.stop_signal["signal"],
            "lost_workers": sorted(self.lost),
            "restarts": {str(w): k for w, k in sorted(restarts.items()) if k},
            "pushes": dict(srv.pushes),
            "mode": "async",
        }
        self.metrics.write(summary, kind="summary")
        summary["curves"] = str(write_curves(self.out))
        self.say(
            f"done: {srv.samples} samples in {format_duration(elapsed)}, best val fwMAP "
            f"{format_metric(summary['best_fwmap'])}, last checkpoint {summary['checkpoint']}"
            + (f"; lost workers {sorted(self.lost)}" if self.lost else "")
        )
        return summary

    # ----------------------------------------------------------------------- the steps

    def _log(self) -> None:
        stats = [self.call(s, protocol.stats) for s in range(len(self.plan))]
        now, (since, before) = time.time(), self.window
        samples = stats[0]["samples"]
        rate = (samples - before) / max(now - since, 1e-9)
        self.window = (now, samples)
        first = stats[0]
        if not first["loss_count"]:
            return  # no push since the last record
        loss = first["loss_sum"] / first["loss_count"]
        record = {
            "samples": samples,
            "step": first["version"],
            "loss": loss,
            "lr": learning_rate(self.config, samples, self.config.data.batch_size),
            "samples_per_s": rate,
            "versions": [s["version"] for s in stats],
            "dropped": [s["dropped"] for s in stats],
            # per server: staleness -> applied updates (cumulative over the run)
            "staleness": [{str(k): v for k, v in sorted(s["staleness"].items())} for s in stats],
            "own_staleness_max": {str(w): v for w, v in sorted(first["own_staleness_max"].items())},
            "pushes": first["pushes"],  # per worker process (a replacement has its own name)
            "lost_workers": sorted(self.lost),
        }
        self.metrics.write(record)
        worst = max((max(s["staleness"], default=0) for s in stats), default=0)
        self.say(
            f"{samples:>10} samples  loss {format_metric(loss)}  lr {record['lr']:.2e}  "
            f"{rate:7.1f} samples/s  versions "
            f"{record['versions']}  staleness max {worst}  dropped {sum(record['dropped'])}"
        )

    def _cut(self) -> list[dict]:
        paused = []
        try:
            for s in range(len(self.plan)):
                self.call(s, protocol.pause)
                paused.append(s)
            return [self.call(s, protocol.snapshot) for s in range(len(self.plan))]
        finally:
            for s in paused:
                self.call(s, protocol.resume)

    def _gathered_state(self, snaps: list[dict]) -> dict:
        trainable = {n for n, _ in self.model.named_parameters()}
        parts = []
        for pieces, snap in zip(self.plan, snaps, strict=True):
            params, buffers = iter(snap["params"]), iter(snap["buffers"])
            parts.append([next(params) if p.name in trainable else next(buffers) for p in pieces])
        full = assemble(self.plan, parts)
        return {name: full[name] for name in self.model.state_dict()}

    def _validate(self) -> bool:
        snaps = self._cut()
        self.model.load_state_dict(self._gathered_state(snaps))
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
        snaps = self._cut()
        first = snaps[0]
        state = {
            "mode": "async",
            "model": self._gathered_state(snaps),
            "optimizer": [s["optimizer"] for s in snaps],
            "servers": [
                {k: s[k] for k in ("version", "received", "samples", "staleness", "dropped")}
                for s in snaps
            ],
            "plan": [[(p.name, p.start, p.stop) for p in pieces] for pieces in self.plan],
            "loader": [first["loader"].get(w) for w in range(self.config.ps.workers)],
            "samples": first["samples"],
            "step": first["version"],
            "best": self.best,
            "config": to_dict(self.config),
            "class_ids": self.class_ids,
        }
        t = self.config.train
        self.last_checkpoint = save_checkpoint(
            self.out, state, first["samples"], t.keep_last, is_best
        )

    # ------------------------------------------------------------------------ liveness

    def finish_servers(self) -> None:
        """Tell the other servers the job is over (they exit); a dead one is passed over."""
        for name in self.names[1:]:
            with contextlib.suppress(RuntimeError):
                protocol.call(name, protocol.finish, timeout=min(10.0, self.config.ps.rpc_timeout))

    def _stop_all(self) -> None:
        for s in range(len(self.plan)):
            try:
                self.call(s, protocol.set_stop)
            except PeerLost as e:
                self.say(f"warning: {e}")

    def _ping_servers(self) -> None:
        for s in range(1, len(self.plan)):
            self.call(s, protocol.ping, timeout=min(10.0, self.config.ps.rpc_timeout))

    def _worker_alive(self, w: int) -> bool:
        ps = self.config.ps
        name = protocol.WORKERS.name(w)
        try:
            rpc.get_worker_info(name or f"worker{w}")
        except RuntimeError:  # not in the group yet (dynamic membership): give it start_timeout
            return name is None and time.time() - self.started < ps.start_timeout
        try:
            protocol.call(name or f"worker{w}", protocol.ping, timeout=min(5.0, ps.rpc_timeout))
            return True
        except RuntimeError:
            return False

    def _check_workers(self) -> None:
        # replacements that registered since the last look
        for event in protocol.WORKERS.take_joined():
            w = event["worker"]
            self.lost.discard(w)
            self.lost_at.pop(w, None)
            self.metrics.write(event, kind="worker")
            self.say(
                f"worker {w} rejoined ({event['name']}, restart {event['restart']}) at "
                f"{event['samples']} samples; its data continues from {event['position']}"
            )
        names = protocol.WORKERS.current_names()
        for w in sorted(protocol.WORKERS.not_done(self.config.ps.workers, self.lost)):
            if not self._worker_alive(w):
                if protocol.WORKERS.has_left(w):  # it said it is done (leave), then it exited
                    continue
                self.lost.add(w)
                self.lost_at[w] = time.time()
                name = names.get(w, f"worker{w}")
                samples = protocol.SERVER.samples
                self.metrics.write(
                    {"event": "lost", "worker": w, "name": name, "samples": samples}, kind="worker"
                )
                self.say(f"worker {w} is gone ({name} does not answer); the others go on")

    def _every_worker_gone(self) -> bool:
        """Every slot lost, and none can still be replaced (ps.restart_workers left, and lost
        less than ps.start_timeout ago: the launcher restarts a slot at once)."""
        ps = self.config.ps
        if len(self.lost) < ps.workers:
            return False
        restarts = protocol.WORKERS.restart_counts()
        return not any(
            restarts.get(w, 0) < ps.restart_workers
            and time.time() - self.lost_at.get(w, 0.0) < ps.start_timeout
            for w in self.lost
        )

    def _wait_for_workers(self) -> None:
        deadline = time.time() + self.config.ps.stop_timeout + self.config.ps.rpc_timeout
        while time.time() < deadline:
            self._check_workers()
            if not protocol.WORKERS.not_done(self.config.ps.workers, self.lost):
                return
            time.sleep(0.2)
        missing = protocol.WORKERS.not_done(self.config.ps.workers, self.lost)
        self.say(f"warning: workers {sorted(missing)} did not finish in time; going on without")
        self.lost |= missing


__all__ = ["Coordinator"]
