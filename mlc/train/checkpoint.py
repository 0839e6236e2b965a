"""Checkpoints: written atomically, found again after a crash, pruned to the last k and the best.

A checkpoint is ``<out>/checkpoints/ckpt-<samples>.pt``, written to a temporary name, fsynced
and renamed, so a crash leaves either the whole file or none (a half-written temporary is
ignored). ``best.pt`` is a copy of the checkpoint with the best validation metric. Loading uses
``weights_only=True``: a checkpoint file cannot run code.
"""

from __future__ import annotations

import pickle
import re
import shutil
import zipfile
from pathlib import Path

from mlc.io import atomic_write_text, atomic_writer, load_state, save_state, temp_name

NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(
    out: str | Path, state: dict, samples: int, keep_last: int, is_best: bool = False
) -> Path:
    folder = checkpoint_dir(out)
    path = folder / f"ckpt-{samples:012d}.pt"
    remove_stale_temporaries(folder)
    save_state(state, path)
    if is_best:
        with atomic_writer(folder / "best.pt") as f, path.open("rb") as source:
            shutil.copyfileobj(source, f)
    for old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the half-written temporaries of killed writers (``.<name>.tmp-<pid>`` of another
    process): they never became checkpoints, and only this run writes the folder."""
    mine = temp_name(folder / "x").name.rsplit("-", 1)[1]
    for stale in folder.glob(".*.tmp-*") if folder.is_dir() else []:
        if stale.name.rsplit("-", 1)[1] != mine:
            stale.unlink(missing_ok=True)


# What a run leaves in train.out (the async mode's processes-node*.json under async/ is
# rewritten by every start and written by every machine, so it is not a sign of a run).
RUN_FILES = ("checkpoints", "metrics.jsonl", "curves.png", "tensorboard")


def prepare_run_folder(out: str | Path, resume: str | None, restart: bool) -> None:
    """Refuse to mix two runs in one folder: a folder holding an earlier run's files needs
    ``--resume`` (continue it) or ``--restart`` (delete those files and start over)."""
    out = Path(out)
    found = sorted(name for name in RUN_FILES if (out / name).exists())
    if not found or resume is not None:
        return
    if not restart:
        raise FileExistsError(
            f"{out} holds an earlier run ({', '.join(found)}): continue it with --resume auto, "
            "start over with --restart (deletes those files), or set train.out to a new folder"
        )
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_run_config(out: str | Path, config, resolved: dict | None = None) -> Path:
    """<out>/config.yaml: the run's resolved config (file, --set and defaults), which
    `mlc train --config <out>/config.yaml` reads back. ``resolved`` (e.g. the device and
    precision that ``auto`` chose on this machine) goes into a comment at the top: the keys
    keep their values, so the file means the same on another machine."""
    from mlc.config import to_yaml

    header = "".join(f"# {key}: {value}\n" for key, value in (resolved or {}).items())
    if header:
        header = "# resolved on this machine:\n" + header
    path = Path(out) / "config.yaml"
    atomic_write_text(path, header + to_yaml(config))
    return path


class CheckpointError(ValueError):
    """A file that cannot be resumed from; the message names it and what differs."""


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint's state, or CheckpointError saying why the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):  # what torch.save writes
        raise CheckpointError(f"{path}: not a readable checkpoint (not a complete torch file)")
    try:
        state = load_state(path)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: (GLOBAL )?(\S+)", str(e))
        what = f" ({found.group(2)})" if found else ""
        raise CheckpointError(
            f"{path}: holds Python objects{what} that only running code could load; "
            "checkpoints load with weights_only=True"
        ) from None
    except Exception as e:  # noqa: BLE001 (torch raises many types on damaged files)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not an `mlc train` checkpoint (no {', '.join(missing)})")
    return state


CHECKPOINT_KEYS = ("model", "config", "class_ids", "samples", "step")


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
            return path, read_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: skipping damaged checkpoint {e}")
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
    return Path(resume), read_checkpoint(resume)
