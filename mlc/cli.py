"""The `mlc` command: one subcommand per job; each lives in its own package's cli module."""

from __future__ import annotations

import argparse
import os
import sys

import data_tools.cli
import eval.cli
import mlc.demo
import mlc.train.cli
from data_tools.writer import ShardError
from mlc.runtime import keep_freed_memory
from mlc.train.loop import TrainingError

# name -> module with HELP, add_arguments(parser) and run(args) -> exit code
SUBCOMMANDS = {
    "shard": data_tools.cli,
    "train": mlc.train.cli,
    "eval": eval.cli,
    "demo": mlc.demo,
}

# Errors about the user's input, files or folders: one line naming the file and the fix, not a
# traceback (MLC_DEBUG=1 shows it). InputFileError and MetricInputError are ValueErrors.
USER_ERRORS = (ValueError, OSError, ShardError, TrainingError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to rerun it in more processes
    keep_freed_memory()  # see mlc/runtime.py: no page faults on every training step
    try:
        return SUBCOMMANDS[args.command].run(args)
    except USER_ERRORS as e:
        if os.environ.get("MLC_DEBUG"):
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"{rank}mlc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
