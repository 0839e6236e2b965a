"""The `mlc` command's conventions: every option documented, one output flag, --version."""

import argparse

import pytest

from mlc.cli import SUBCOMMANDS, build_parser, main


def parsers(parser: argparse.ArgumentParser, name: str = "mlc"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from parsers(child, f"{name} {sub}")


def test_every_option_of_every_command_has_help():
    undocumented = [
        f"{name} {action.option_strings[0]}"
        for name, parser in parsers(build_parser())
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert undocumented == []


def test_commands_that_write_a_folder_take_out_and_output():
    by_name = dict(parsers(build_parser()))
    for name in ["mlc shard table", "mlc shard merge", "mlc eval", "mlc demo", "mlc train"]:
        flags = {flag for a in by_name[name]._actions for flag in a.option_strings}
        assert {"--out", "--output"} <= flags, name
    assert set(SUBCOMMANDS) <= {name.split()[1] for name in by_name if name.count(" ") == 1}


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("mlc 0.")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "images per forward (default: 256)" in text
    assert "report folder (default: runs/eval)" in text


def test_a_process_forked_during_startup_dies_on_sigterm_as_usual():
    """Pool workers forked while mlc's early SIGTERM handler is set must not inherit it: a
    Python handler never runs in a worker blocked in a lock, so terminate() would hang."""
    import os
    import signal

    from mlc.cli import _stopped

    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        pid = os.fork()
        if pid == 0:  # the child: its SIGTERM disposition is the default again
            os._exit(0 if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.waitstatus_to_exitcode(status) == 0


def test_no_option_states_its_default_twice():
    from mlc.config import HelpFormatter

    twice = []
    for name, parser in parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and action.help and action.default not in (None, False):
                shown = HelpFormatter("mlc")._get_help_string(action)
                if shown.endswith("(default: %(default)s)") and f"({action.default})" in shown:
                    twice.append(f"{name} {action.option_strings[0]}")
    assert twice == []
