"""Checkpoints: written atomically, found again after a crash, pruned to the last k and the best.

A checkpoint is ``<out>/checkpoints/ckpt-<samples>.pt``, written to a temporary name, fsynced
and renamed, so a crash leaves either the whole file or none (a half-written temporary is
ignored). ``best.pt`` is a copy of the checkpoint with the best validation metric. Loading uses
``weights_only=True``: a checkpoint file cannot run code.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from mlc.io import atomic_writer, load_state, save_state

NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(
    out: str | Path, state: dict, samples: int, keep_last: int, is_best: bool = False
) -> Path:
    folder = checkpoint_dir(out)
    path = folder / f"ckpt-{samples:012d}.pt"
    save_state(state, path)
    if is_best:
        with atomic_writer(folder / "best.pt") as f, path.open("rb") as source:
            shutil.copyfileobj(source, f)
    for old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_valid_checkpoint(out: str | Path, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; damaged ones (e.g. truncated by a full disk) are
    reported and passed over."""
    for path in reversed(list_checkpoints(out)):
        try:
            return path, load_state(path)
        except Exception as e:  # noqa: BLE001 (torch raises many types on damaged files)
            log(f"warning: skipping damaged checkpoint {path}: {type(e).__name__}: {e}")
    return None


def find_resume(out: str | Path, resume: str | None, say=print) -> tuple[Path, dict] | None:
    """The checkpoint ``--resume`` names: "auto" (the newest valid one in ``out``, or None to
    start fresh), a file, or nothing."""
    if resume is None:
        return None
    if resume == "auto":
        found = latest_valid_checkpoint(out, log=say)
        if found is None:
            say(f"--resume auto: no checkpoint in {checkpoint_dir(out)}; starting fresh")
        return found
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return path, load_state(path)
