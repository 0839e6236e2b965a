"""`mlc train`: the training job (argument parsing only; the job is mlc.train.loop.train)."""

from __future__ import annotations

import argparse
import os

HELP = "train Xception on shards (one process, DDP under torchrun, or async parameter servers)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults without it")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.samples=200000 (repeatable)",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="auto: the newest valid checkpoint in train.out; or a checkpoint file",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="train.out holds an earlier run: delete its checkpoints, metrics and curves and "
        "start over (without --resume or --restart such a folder is refused)",
    )


def run(args: argparse.Namespace) -> int:
    import gc

    from mlc.config import load_config
    from mlc.dist import teardown
    from mlc.train.checkpoint import prepare_run_folder
    from mlc.train.loop import train

    config = load_config(args.config, args.set)
    if config.train.mode == "async":  # refuse an unsupported torch before touching train.out
        from mlc.train.async_ps import check_torch

        check_torch()
    # One process per job checks (and with --restart deletes): rank 0, or the async mode's
    # node 0 (the other machines' launchers share the folder).
    first = os.environ.get("RANK", "0") == "0" and config.ps.node_rank == 0
    if first or not (args.restart or config.train.mode == "async"):
        prepare_run_folder(config.train.out, args.resume, args.restart)
    if config.train.mode == "async":  # parameter servers and workers (docs/async.md)
        from mlc.train.async_ps import launch

        launch(config, resume=args.resume)
        return 0
    finished = False
    try:
        summary = train(config, resume=args.resume)
        gc.collect()  # free DistributedDataParallel (its reducer) while the group is alive
        finished = True
    finally:
        teardown(finished)
    # Stopped by a signal after its checkpoint: not a success, so that a scheduler restarts
    # the job (and --resume auto continues it).
    return {"SIGTERM": 143, "SIGINT": 130}.get(summary["stopped_by"], 0)
