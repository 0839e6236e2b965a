"""Optional packages. Each is in an extra of pyproject.toml (``pip install 'mlc[s3]'``), and
code that needs a missing one stops with one line naming the extra, not a traceback
(tests/test_dependencies.py checks that every extra named here holds the package).

    SummaryWriter = require("torch.utils.tensorboard", "TensorBoard logging", "tensorboard",
                            "tensorboard").SummaryWriter
"""

from __future__ import annotations

import importlib

# URL protocols read through fsspec whose implementation is an optional package:
# protocol -> (package, extra). Other fsspec protocols need the package fsspec names.
PROTOCOL_EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message, one line, says how to install it."""


def missing_message(purpose: str, package: str, extra: str) -> str:
    return f"{purpose} needs the {package} package: pip install 'mlc[{extra}]'"


def require(module: str, purpose: str, package: str, extra: str):
    """``module`` imported, or MissingExtraError("<purpose> needs the <package> package: pip
    install 'mlc[<extra>]'"); the ImportError behind it is its __cause__ (MLC_DEBUG=1 shows
    it)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(missing_message(purpose, package, extra)) from e


def check_protocol(url: str, purpose: str | None = None) -> None:
    """MissingExtraError unless fsspec can open ``url``'s protocol (s3:// needs s3fs, gs://
    gcsfs, ...); ValueError for a protocol fsspec does not know. ``purpose`` begins the
    message (default "reading <protocol>:// shards (<url>)")."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        purpose = purpose or f"reading {protocol}:// shards ({url})"
        if protocol in PROTOCOL_EXTRAS:
            raise MissingExtraError(missing_message(purpose, *PROTOCOL_EXTRAS[protocol])) from e
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MissingExtraError(f"{purpose} needs a package fsspec names: {reason}") from e
    except ValueError as e:  # fsspec: "Protocol not known: ..."
        raise ValueError(f"{url}: {e}") from None
