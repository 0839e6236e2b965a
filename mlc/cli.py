"""The `mlc` command: one subcommand per job; each lives in its own package's cli module.

This module imports only the standard library at the top: the subcommands (and torch) are
imported inside ``main``, after a SIGTERM handler is in place, so a scheduler's stop in the
first seconds ends with a message (and exit 143) like any other. A job that checkpoints on a
signal (`mlc train`) installs its own handlers for its run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# name -> module with HELP, add_arguments(parser) and run(args) -> exit code
SUBCOMMANDS = {
    "shard": "data_tools.cli",
    "train": "mlc.train.cli",
    "eval": "eval.cli",
    "demo": "mlc.demo",
    "predict": "mlc.predict_cli",
    "export": "mlc.export",
}


class Stopped(BaseException):
    """SIGTERM arrived before a job installed its own handler (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stopped(signum, _frame):
    raise Stopped(signum)


def _default_in_child() -> None:
    """A process forked while ``_stopped`` is the handler (a shard writer's pool worker) dies
    on SIGTERM at once, as before: a Python handler only runs between bytecodes, so a worker
    blocked in a lock would never run it and a pool's terminate() would wait forever."""
    if signal.getsignal(signal.SIGTERM) is _stopped:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_in_child)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input, files or folders: one line naming the file and the fix,
    not a traceback (MLC_DEBUG=1 shows it). InputFileError, ConfigError and MetricInputError
    are ValueErrors; MissingExtraError names the extra that installs a missing package."""
    from data_tools.writer import ShardError
    from mlc.extras import MissingExtraError
    from mlc.train.loop import TrainingError

    return (ValueError, OSError, ShardError, TrainingError, MissingExtraError)


def build_parser() -> argparse.ArgumentParser:
    from mlc.config import HelpFormatter

    parser = argparse.ArgumentParser(prog="mlc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mlc {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(
            sub.add_parser(
                name,
                help=module.HELP,
                description=module.HELP,
                epilog=getattr(module, "EPILOG", None),
                formatter_class=HelpFormatter,
            )
        )
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("mlc")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _stopped)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"mlc {argv[0]}" if argv and argv[0] in SUBCOMMANDS else "mlc"
    try:
        from mlc.runtime import keep_freed_memory

        args = build_parser().parse_args(argv)
        args.argv = argv  # to rerun the command in more processes
        keep_freed_memory()  # see mlc/runtime.py
        return importlib.import_module(SUBCOMMANDS[args.command]).run(args)
    except Stopped as e:
        print(f"{command}: stopped by {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{command}: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader went away (`mlc eval ... | head -1`): a normal end. Output still buffered
        # for the closed pipe goes nowhere instead of raising again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:
        if os.environ.get("MLC_DEBUG") or not isinstance(e, user_errors()):
            raise
        world = int(os.environ.get("WORLD_SIZE", 1))
        rank = f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
        print(f"{rank}{command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
