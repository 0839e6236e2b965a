"""`mlc train`: the training job (argument parsing only; the job is mlc.train.loop.train)."""

from __future__ import annotations

import argparse
import os

HELP = "train Xception on shards (one process, DDP under torchrun, or async parameter servers)"
EPILOG = """\
config sections (keys and defaults: mlc train --print-config; docs/training.md):
  data    the dataset folder, its splits and the loader: batch_size (per process),
          image_size, crops, num_workers, seed, ...
  model   the Xception preset and its overrides, pretrained weights (init)
  optim   optimizer, learning rate, its schedule in samples, weight decay
  train   samples, precision, EMA, output folder (out), log/eval/checkpoint intervals
  ps      the asynchronous mode (train.mode=async; docs/async.md)
exit codes: 0 done; 2 bad input; 143 / 130 stopped by SIGTERM / SIGINT after a checkpoint
(resume with --resume auto)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="NAME|PATH",
        help="a YAML file, or the name of a shipped config (--list-configs); without it the "
        "built-in defaults",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.samples=200000 (repeatable)",
    )
    p.add_argument(
        "--out",
        "--output",
        metavar="DIR",
        help="the run folder: the same as --set train.out=DIR",
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
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file + --set) as YAML and exit",
    )
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")


def run(args: argparse.Namespace) -> int:
    import gc

    from mlc.config import load_config, shipped_configs, to_yaml
    from mlc.dist import teardown
    from mlc.storage import require_local
    from mlc.train.checkpoint import prepare_run_folder
    from mlc.train.loop import train

    if args.list_configs:
        for name, path in shipped_configs().items():
            print(f"{name:16} {path}")
        return 0
    overrides = [*args.set, *([f"train.out={args.out}"] if args.out else [])]
    config = load_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    require_local(config.train.out, "train.out")  # before anything is written
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
