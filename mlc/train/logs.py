"""What the operator sees after the fact: a JSONL metrics log, and TensorBoard scalars
(train.tensorboard: auto, true or false; the tensorboard package is the tensorboard extra)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlc.extras import MissingExtraError, require
from mlc.plots import line_chart, write_png


def summary_writer_class(setting: bool | str, say=print):
    """TensorBoard's SummaryWriter, or None, for the ``train.tensorboard`` setting: True needs
    it (MissingExtraError, one line, without the tensorboard package); "auto" uses it when the
    package is installed and otherwise says once, through ``say``, that it is off and why;
    False: None, silently. Called at the start of a job, on every process."""
    if setting is False:
        return None
    try:
        module = require(
            "torch.utils.tensorboard", "TensorBoard logging", "tensorboard", "tensorboard"
        )
    except MissingExtraError as e:
        if setting is True:
            raise MissingExtraError(f"train.tensorboard=true: {e}") from e.__cause__
        say(
            f"note: TensorBoard logging is off for this run. {e} (train.tensorboard=false: off "
            "without this note)"
        )
        return None
    return module.SummaryWriter


class MetricsLog:
    """Appends one JSON object per record to <out>/metrics.jsonl (kind: train, val, summary);
    mirrors numeric fields to TensorBoard under <out>/tensorboard when given ``writer``, the
    SummaryWriter class (summary_writer_class)."""

    def __init__(self, out: str | Path, enabled: bool = True, writer=None):
        self.enabled = enabled
        self.file = None
        self.board = None
        if not enabled:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(out) / "metrics.jsonl", "a")  # noqa: SIM115 (held for the run)
        if writer is not None:
            self.board = writer(str(Path(out) / "tensorboard"))

    def write(self, record: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, "time": time.time(), **record}) + "\n")
        self.file.flush()
        if self.board is not None and "samples" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "samples":
                    self.board.add_scalar(f"{kind}/{key}", value, record["samples"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def write_curves(out: str | Path) -> Path:
    """<out>/curves.png: training loss and validation fwMAP@K against samples, from
    metrics.jsonl (so a resumed run's plot covers the whole run)."""
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train = {r["samples"]: r["loss"] for r in records if r["kind"] == "train"}
    val = {r["samples"]: r["fwmap"] for r in records if r["kind"] == "val"}
    series = {"training loss": (list(train), list(train.values()))}
    if val:
        series["validation fwMAP@K"] = (list(val), list(val.values()))
    path = Path(out) / "curves.png"
    write_png(
        path, line_chart(series, f"{Path(out).name}: loss and validation fwMAP", "samples", "")
    )
    return path


def format_duration(seconds: float) -> str:
    """h:mm:ss"""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_metric(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
