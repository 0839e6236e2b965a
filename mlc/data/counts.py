"""What loaders read against what the split's stats promise: counts added up over ranks, a line
that says them, and the check of the tolerated fraction of lost samples.

``ShardLoader.counts()`` is one rank's share: ``expected`` (the samples of the split its slots
were to read in the passes begun), ``lost`` and ``lost_by_shard`` (samples that reached no
batch: unreadable, damaged or short shards, corrupt or incomplete samples), ``repeated``
(samples handed out a second time in their epoch, to fill a train slot's batches) and
``problems`` (events by reason). A job gathers every rank's and adds them up (``merge``).
"""

from __future__ import annotations

from collections import Counter


class DataLossError(ValueError):
    """More of a split was lost than the job tolerates; the message names the shards."""


def empty() -> dict:
    return {"expected": 0, "lost": 0, "lost_by_shard": {}, "repeated": 0, "problems": {}}


def merge(parts: list[dict]) -> dict:
    """Several ranks' counts added up."""
    total = empty()
    by_shard, problems = Counter(), Counter()
    for part in parts:
        for key in ("expected", "lost", "repeated"):
            total[key] += part[key]
        by_shard.update(part["lost_by_shard"])
        problems.update(part["problems"])
    total["lost_by_shard"] = dict(sorted(by_shard.items()))
    total["problems"] = dict(sorted(problems.items()))
    return total


def lost_fraction(counts: dict) -> float:
    return counts["lost"] / max(counts["expected"], 1)


def describe(counts: dict, shards: int = 3) -> str:
    """'no samples lost', or '250 of 3150 samples lost (7.94%: a.tar 250; unreadable shard: 1)':
    the shards that lost most (at most ``shards`` of them) and the problems by reason."""
    if not counts["lost"] and not counts["problems"]:
        return "no samples lost"
    worst = sorted(counts["lost_by_shard"].items(), key=lambda item: -item[1])
    where = [f"{url} {n}" for url, n in worst[:shards]]
    if len(worst) > shards:
        where.append(f"{len(worst) - shards} more shard(s)")
    parts = [", ".join(where)] if where else []
    parts += [f"{reason}: {n}" for reason, n in counts["problems"].items()]
    details = "; ".join(parts)
    return (
        f"{counts['lost']} of {counts['expected']} samples lost "
        f"({100 * lost_fraction(counts):.2f}%: {details})"
    )


def check(counts: dict, max_fraction: float, what: str, setting: str) -> None:
    """DataLossError when more than ``max_fraction`` of the expected samples were lost; the
    message says what was lost and which ``setting`` tolerates it."""
    if counts["lost"] and lost_fraction(counts) > max_fraction:
        raise DataLossError(
            f"{what}: {describe(counts)}, more than the tolerated {max_fraction:g}; repair or "
            f"replace the shards, or allow the loss with {setting}"
        )
