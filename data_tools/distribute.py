"""Where a split's shards are written: this machine's processes, or the tasks of a Ray cluster.

`mlc shard --distributor local` (the default) runs write_split with a pool of ``--workers``
processes. `--distributor ray` runs the same shards as Ray tasks: on a local Ray started with
``--workers`` CPUs, or on an existing cluster (``--ray-address auto`` or an address). Both write
exactly the same files: the plan (which images go in which shard) is fixed before any image is
read, and a Ray task is nothing but write_split on a partition of the shards, so the driver then
publishes the split with merge_split as any unpartitioned run does.

Why partitions as tasks: write_split already keeps the complete shards of an earlier attempt and
never leaves a half-written shard under its name, so a task that Ray retries (after a worker or
node died, or an OSError such as a storage hiccup) resumes where it stopped: a retry costs at
most the shard it was writing. The catalog goes to the cluster's object store once
(``ray.put``), its rows already in the plan's order: the tasks of a node share them without a
copy (a copy of OpenImages' table per running task would take the node's memory). There are a
few tasks per CPU, so the shards spread evenly although some are slower than others, and the
per-task cost (getting the catalog, checking the plan) stays small against writing its shards.
The tasks report each finished shard to a small actor; the driver reads it to move its one
progress bar.

Ray is optional (``pip install 'mlc[ray]'``): it is imported only when asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from data_tools.catalog import Catalog, SkipLog
from data_tools.writer import ShardOptions, progress_bar, shuffled_rows, write_split
from mlc.extras import require
from mlc.storage import is_local, protocol

DISTRIBUTORS = ("local", "ray")
TASKS_PER_CPU = 4  # tasks per cluster CPU: even spread, small per-task cost
MAX_RETRIES = 3  # per task, after a worker or node died or an OSError
POLL_SECONDS = 0.25  # how often the driver's progress bar moves
# The token of the local Ray clusters this process starts (see _local_auth): one per process,
# because Ray's token loader caches the first token it reads.
_LOCAL_TOKEN = secrets.token_hex(32)


def _ray():
    return require("ray", "--distributor ray", "ray", "ray")


def check_distributor(
    distributor: str, ray_address: str | None = None, out: str | Path | None = None
) -> None:
    """Refuse what shard_writer would refuse (an unknown distributor, an address without Ray,
    Ray not installed, an --out that Ray's worker processes cannot share), before a command
    spends minutes reading its labels."""
    if distributor not in DISTRIBUTORS:
        raise ValueError(f"distributor must be one of {DISTRIBUTORS}, got {distributor!r}")
    if distributor != "ray" and ray_address is not None:
        raise ValueError("--ray-address needs --distributor ray")
    if distributor == "ray":
        if out is not None and protocol(out) == "memory":
            raise ValueError(
                f"{out}: memory:// is private to a process, and Ray's tasks run in others; "
                "use --distributor local --workers 1"
            )
        _ray()


@contextlib.contextmanager
def shard_writer(
    distributor: str = "local", workers: int = 1, ray_address: str | None = None
) -> Iterator:
    """A function with write_split's arguments but ``workers`` that writes a split's shards with
    ``distributor``: "local" (a pool of ``workers`` processes) or "ray" (Ray tasks: a local Ray
    with ``workers`` CPUs, started on entry and shut down on exit, or the cluster at
    ``ray_address``; a Ray this process had started already is used as it is)."""
    check_distributor(distributor, ray_address)
    if distributor == "local":
        yield functools.partial(write_split, workers=workers)
        return
    with RayShardWriter(ray_address, workers) as writer:
        yield writer.write_split


@contextlib.contextmanager
def _local_auth() -> Iterator[None]:
    """Token authentication for a local Ray without Ray's default token file: a new local Ray
    turns token authentication on and, unless told otherwise, writes a token to
    ~/.ray/auth_token (outside the run's folders, kept forever) and logs a warning. The token
    given in the environment instead reaches the Ray processes started here and nothing else.
    A user's own RAY_AUTH_* settings are left alone."""
    names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    if any(name in os.environ for name in names):
        yield
        return
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_LOCAL_TOKEN)
    _reread_ray_config()
    try:
        yield
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
        os.environ.pop("RAY_AUTH_TOKEN", None)


def _reread_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its configuration when it is imported; it re-reads it this
    way when it turns token authentication on itself. Rays without token authentication (before
    2.52) have nothing to re-read."""
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import Config

        Config.initialize("")


class _Progress:
    """A Ray actor that counts the images of the shards done, once per shard (a retried task
    reports again the shards it kept)."""

    def __init__(self):
        self.seen: set[str] = set()
        self.images = 0
        self.kept = 0

    def shard(self, name: str, images: int, kept: bool) -> None:
        if name not in self.seen:
            self.seen.add(name)
            self.images += images
            self.kept += images if kept else 0

    def counts(self) -> tuple[int, int]:
        return self.images, self.kept


def _write_partition(
    catalog: Catalog,
    shuffled: pa.Table,
    out: str,
    split: str,
    options: ShardOptions,
    partition: tuple[int, int],
    retry_skipped: bool,
    progress,
) -> SkipLog:
    """A Ray task: write_split on one partition of the shards, in this worker's process,
    reporting each shard done to the ``progress`` actor. ``shuffled``, the catalog's rows in
    the plan's order, comes from the object store without a copy (arrow buffers in shared
    memory, one per node), so concurrent tasks do not each hold the table."""

    def report(name: str, images: int, kept: bool) -> None:
        progress.shard.remote(name, images, kept)

    return write_split(
        catalog,
        out,
        split,
        options,
        partition,
        workers=1,
        progress=False,
        retry_skipped=retry_skipped,
        on_shard=report,
        shuffled=shuffled,
    )


def task_partitions(partition: tuple[int, int], shards: int, cpus: int) -> list[tuple[int, int]]:
    """The partitions the tasks write: partition i/P split into k = min(its shards,
    TASKS_PER_CPU x cpus) (at least 1): (i + P*m)/(P*k) for m < k, which are the shards j with
    j % P == i and (j // P) % k == m."""
    index, count = partition
    mine = len(range(index, shards, count))
    k = max(1, min(mine, TASKS_PER_CPU * max(1, cpus)))
    return [(index + count * m, count * k) for m in range(k)]


class RayShardWriter:
    """Writes splits' shards as Ray tasks (see the module's docstring). A context manager: on
    entry it joins the cluster at ``address`` ("auto", "ray://...", host:port) or, without one,
    starts a local Ray with ``cpus`` CPUs; on exit it shuts down what it started."""

    def __init__(self, address: str | None = None, cpus: int = 1):
        self.address = address
        self.cpus = max(1, cpus)
        self.ray = None
        self.started = False
        self._auth = contextlib.ExitStack()

    def __enter__(self) -> RayShardWriter:
        ray = self.ray = _ray()
        if ray.is_initialized():  # the caller's own session (a notebook, a test): used as is
            return self
        # Ray's own messages stay out of the command's output: warnings only, no dashboard, the
        # workers' output in Ray's log folder (a task's error comes back with its traceback).
        settings = dict(log_to_driver=False, logging_level=logging.WARNING)
        if self.address is None:
            self._auth.enter_context(_local_auth())
            settings.update(num_cpus=self.cpus, include_dashboard=False)
        try:
            ray.init(address=self.address, **settings)
        except BaseException:
            self._auth.close()
            raise
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
        self._auth.close()

    def _warn_if_not_shared(self, out: str) -> None:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and is_local(out):
            print(
                f"mlc shard: warning: --out {out} is a local folder and the Ray cluster has "
                f"{len(nodes)} nodes: each node writes its shards into its own {out} unless it "
                "is a shared file system mounted at that path on every node; use object "
                "storage (s3://...) otherwise",
                file=sys.stderr,
            )

    def write_split(
        self,
        catalog: Catalog,
        out: str | Path,
        split: str,
        options: ShardOptions,
        partition: tuple[int, int] = (0, 1),
        progress: bool = True,
        retry_skipped: bool = False,
    ) -> SkipLog:
        """write_split's shards of the partition (all by default) as Ray tasks; their skips.
        The shards stay staged: the caller publishes the split (merge_split) as after
        write_split. The error of a task that failed for good is raised as it was raised in
        the task (a ShardError, an OSError, ...)."""
        ray = self.ray
        out = str(out)  # a path or a URL, passed on as given
        check_distributor("ray", out=out)
        self._warn_if_not_shared(out)
        index, count = partition
        if not 0 <= index < count:
            raise ValueError(f"partition must be i/P with 0 <= i < P, got {index}/{count}")
        rows = catalog.table.num_rows
        shards = -(-rows // options.shard_size)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        partitions = task_partitions(partition, shards, cpus)
        size = options.shard_size
        total = sum(min(size, rows - j * size) for j in range(index, shards, count))

        # The catalog goes to the object store once, its rows already in the plan's order (and
        # only those: the tasks do not read its own table).
        shuffled_ref = ray.put(shuffled_rows(catalog, options.seed))
        catalog_ref = ray.put(dataclasses.replace(catalog, table=catalog.table.slice(0, 0)))
        counter = ray.remote(_Progress).options(num_cpus=0).remote()
        task = ray.remote(_write_partition).options(
            num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=[OSError]
        )
        refs = [
            task.remote(catalog_ref, shuffled_ref, out, split, options, p, retry_skipped, counter)
            for p in partitions
        ]
        bar = progress_bar(total, split, partition, progress)
        results, pending, kept = {}, list(refs), 0
        try:
            with bar:
                while pending:
                    ready, pending = ray.wait(
                        pending, num_returns=len(pending), timeout=POLL_SECONDS
                    )
                    for ref in ready:
                        results[ref] = ray.get(ref)
                    images, kept = ray.get(counter.counts.remote())
                    bar.update(images - bar.n)
                bar.update(total - bar.n)  # all done, whatever reports are still on their way
        except ray.exceptions.RayTaskError as e:
            _cancel(ray, pending)
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from e  # the task's own error: a user error stays one line
            raise
        except BaseException:
            _cancel(ray, pending)
            raise
        finally:
            ray.kill(counter)
        if kept and progress:
            print(f"{split}: kept {kept} images in shards completed by an earlier run")
        skips = SkipLog()
        for ref in refs:  # in partition order, whatever order they finished in
            skips.merge(results[ref])
        return skips


def _cancel(ray, refs) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
