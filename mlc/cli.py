"""The `mlc` command: one subcommand per job; each lives in its own package's cli module."""

from __future__ import annotations

import argparse
import sys

import eval.cli
from eval.io import InputFileError
from eval.metrics import MetricInputError

# name -> module with HELP, add_arguments(parser) and run(args) -> exit code
SUBCOMMANDS = {"eval": eval.cli}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (InputFileError, MetricInputError) as e:
        print(f"mlc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
