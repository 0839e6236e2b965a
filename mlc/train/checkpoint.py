"""Checkpoints: written atomically, found again after a crash, pruned to the last k and the best.

A checkpoint is ``<out>/checkpoints/ckpt-<samples>.pt``, written to a temporary name, fsynced
and renamed, so a crash leaves either the whole file or none (a half-written temporary is
ignored). ``best.pt`` is a copy of the checkpoint with the best validation metric. Loading uses
``weights_only=True``: a checkpoint file cannot run code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(
    out: str | Path, state: dict, samples: int, keep_last: int, is_best: bool = False
) -> Path:
    folder = checkpoint_dir(out)
    path = folder / f"ckpt-{samples:012d}.pt"
    atomic_save(state, path)
    if is_best:
        tmp = folder / f".best.pt.tmp-{os.getpid()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, folder / "best.pt")
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


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_valid_checkpoint(out: str | Path, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; damaged ones (e.g. truncated by a full disk) are
    reported and passed over."""
    for path in reversed(list_checkpoints(out)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 (torch raises many types on damaged files)
            log(f"warning: skipping damaged checkpoint {path}: {type(e).__name__}: {e}")
    return None
