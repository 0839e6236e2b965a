"""``--select densest:N``: the N most densely annotated images of a catalog that can be written.

The candidates are ranked by their known labels (catalog.densest_order) and checked in that
order, each as the writer will store it (writer.prepare_row, with the run's options), until N
pass: a missing or broken image is skipped with its reason, like any image the writer skips, and
the next densest takes its place. When the candidates run out first, fewer than N are selected
and the report says how many fewer.

The check runs in rounds, over ``workers`` processes: the first N candidates, then as many more
as failed, and so on, so it reads no candidate past the last one needed. An image's outcome
depends on the image alone, so the selection is the same whatever the number of workers. The
outcomes are kept in ``_parts/<split>/selection.json``: a re-run after a crash, or another
partition, uses them instead of reading the images again. The selected images are read a second
time when their shards are written; the plan must be fixed before that, so that the shards are
the same whatever the parallelism.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_tools.catalog import (
    EXAMPLES_PER_REASON,
    Catalog,
    Skip,
    SkipLog,
    densest_order,
    not_selected,
)
from data_tools.writer import ShardError, ShardOptions, parts_name, prepare_row, skip_example
from mlc.storage import Folder

SELECTION_FILE = "selection.json"


def _check(loader, options: ShardOptions, row: dict) -> list[str] | None:
    """None if the row's image can be written, else [reason, example]."""
    try:
        prepare_row(loader, row, options)
    except Skip as skip:
        return [skip.reason, skip_example(row, skip)]
    return None


def _fingerprint(n: int, options: ShardOptions, loader, rows: list[dict]) -> str:
    """What the outcomes of ``rows`` (the candidates checked, in rank order) depend on."""
    content = [n, asdict(options), repr(loader), rows]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _saved_outcomes(out: Folder, path: str, catalog: Catalog, order, n: int, options: ShardOptions):
    """The outcomes a previous run of this selection saved, or None (none, or damaged)."""
    if not out.is_file(path):
        return None
    try:
        saved = json.loads(out.read_bytes(path))
        outcomes = saved["outcomes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged: check again
    if len(outcomes) > len(order):
        fingerprint = None
    else:
        rows = catalog.table.take(pa.array(order[: len(outcomes)])).to_pylist()
        fingerprint = _fingerprint(n, options, catalog.loader, rows)
    if saved.get("fingerprint") != fingerprint:
        raise ShardError(
            f"{out.join(path)} holds a selection made from other inputs or options than this "
            "run's. Use a new output folder, or delete the old one."
        )
    return outcomes


def _check_in_rank_order(
    catalog: Catalog,
    order: np.ndarray,
    n: int,
    options: ShardOptions,
    workers: int,
    progress: bool,
    desc: str,
) -> list:
    """The outcome of each candidate in rank order, up to the n-th that passes (or all)."""
    check = partial(_check, catalog.loader, options)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    outcomes: list = []
    passed = 0
    try:
        with tqdm(total=n, unit="img", desc=desc, disable=not progress) as bar:
            while passed < n and len(outcomes) < len(order):
                batch = order[len(outcomes) : len(outcomes) + n - passed]
                rows = catalog.table.take(pa.array(batch)).to_pylist()
                results = pool.map(check, rows) if pool is not None else list(map(check, rows))
                outcomes += results
                ok = sum(result is None for result in results)
                passed += ok
                bar.update(ok)
    finally:
        if pool is not None:
            pool.terminate()
    return outcomes


def select_densest(
    catalog: Catalog,
    n: int,
    options: ShardOptions,
    out: str | Path,
    split: str,
    workers: int = 1,
    progress: bool = True,
    recheck: bool = False,
) -> Catalog:
    """Keep the n densest candidates whose images can be written (see the module docstring).

    The broken ones checked on the way are image skips with the writer's reasons and examples;
    the candidates ranked below the selection are skipped as "not selected (densest:n)".
    ``recheck``: check again the candidates a saved selection found broken (--strict: the
    images may have been fixed since).
    """
    select = f"densest:{n}"
    catalog = replace(catalog, options={**catalog.options, "select": select})
    order = densest_order(catalog, options.seed)
    if n >= len(order):
        return catalog  # every candidate: the writer skips the broken ones, the report counts
    out = Folder(out)
    out.require_writable()
    path = parts_name(split, SELECTION_FILE)
    outcomes = _saved_outcomes(out, path, catalog, order, n, options)
    if outcomes is None or (recheck and any(outcomes)):
        outcomes = _check_in_rank_order(
            catalog, order, n, options, workers, progress, f"{split} {select}"
        )
        rows = catalog.table.take(pa.array(order[: len(outcomes)])).to_pylist()
        fingerprint = _fingerprint(n, options, catalog.loader, rows)
        document = {"select": select, "fingerprint": fingerprint, "outcomes": outcomes}
        out.write_text(path, json.dumps(document) + "\n")

    skips = SkipLog()
    skips.merge(catalog.image_skips)
    for outcome in outcomes:
        if outcome is not None:
            skips.add(*outcome)
    checked = len(outcomes)
    chosen = np.sort([order[i] for i in range(checked) if outcomes[i] is None]).astype(np.int64)
    rest = order[checked:]
    ids = catalog.table["id"]
    skips.add_all(
        not_selected(select),
        [ids[int(i)].as_py() for i in rest[:EXAMPLES_PER_REASON]],
        len(rest),
    )
    return replace(catalog, table=catalog.table.take(pa.array(chosen)), image_skips=skips)
