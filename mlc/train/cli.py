"""`mlc train`: the training job (argument parsing only; the job is mlc.train.loop.train)."""

from __future__ import annotations

import argparse

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


def run(args: argparse.Namespace) -> int:
    import gc

    from mlc.config import load_config
    from mlc.dist import teardown
    from mlc.train.loop import train

    config = load_config(args.config, args.set)
    if config.train.mode == "async":  # parameter servers and workers (docs/async.md)
        from mlc.train.async_ps import launch

        launch(config, resume=args.resume)
        return 0
    finished = False
    try:
        train(config, resume=args.resume)
        gc.collect()  # free DistributedDataParallel (its reducer) while the group is alive
        finished = True
    finally:
        teardown(finished)
    return 0
