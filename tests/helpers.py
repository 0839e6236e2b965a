"""Helpers shared by test modules."""

from mlc.cli import main


def mlc_error(capsys, argv: list[str]) -> str:
    """`mlc ARGV` must end with exit 2 and one line on stderr, no traceback; that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err
