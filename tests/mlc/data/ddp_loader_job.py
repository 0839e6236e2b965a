"""A 2-process torch.distributed job over ShardLoader, run by tests/mlc/data/test_loader.py:

    python -m torch.distributed.run --nproc_per_node=2 --master_port=PORT \
        tests/mlc/data/ddp_loader_job.py DATASET [RESULT.json]

Each rank (gloo, CPU) takes its rank and world size from torch.distributed, iterates two train
epochs (batches_per_epoch() of each) with an all_reduce per batch, as DDP's gradient sync would,
then one eval pass with an all_reduce per batch and an all_gather_object of the valid keys. A
rank with fewer batches than the other would leave it waiting in a collective: the process group
timeout turns that into an error. Rank 0 checks the eval keys against the manifest and writes
RESULT.json (default: DATASET/../ddp_result.json).
"""

from __future__ import annotations

import datetime
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mlc.data import LoaderConfig, ShardLoader, normalize  # noqa: E402
from mlc.format import manifest_name  # noqa: E402

SPLIT = "train"


def main() -> None:
    dataset = Path(sys.argv[1])
    result = Path(sys.argv[2]) if len(sys.argv) > 2 else dataset.parent / "ddp_result.json"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank, world = dist.get_rank(), dist.get_world_size()

    config = LoaderConfig(batch_size=4, image_size=32, mode="train", num_workers=2, seed=1)
    train = ShardLoader.from_dataset(dataset, SPLIT, config)
    assert (train.rank, train.world_size) == (rank, world)
    expected = train.batches_per_epoch(0) + train.batches_per_epoch(1)
    train_batches = 0
    for batch in itertools.islice(train, expected):
        assert bool(batch.valid.all())
        loss = torch.tensor([normalize(batch.images).mean().item()])
        dist.all_reduce(loss)  # the gradient all-reduce of a DDP step
        train_batches += 1
    del train

    config = LoaderConfig(batch_size=5, image_size=32, mode="eval", num_workers=2)
    keys: list[str] = []
    eval_batches, valid_total = 0, 0
    for batch in ShardLoader.from_dataset(dataset, SPLIT, config):
        valid = torch.tensor([float(batch.valid.sum())])
        dist.all_reduce(valid)  # a per-batch metric merge
        valid_total += int(valid.item())
        eval_batches += 1
        keys += [k for k, v in zip(batch.keys, batch.valid.tolist(), strict=True) if v]
    all_keys: list = [None] * world
    dist.all_gather_object(all_keys, keys)
    counts: list = [None] * world
    dist.all_gather_object(counts, (train_batches, eval_batches))

    if rank == 0:
        manifest = pq.read_table(dataset / manifest_name(SPLIT), columns=["key"])
        expected_keys = set(manifest["key"].to_pylist())
        seen = Counter(k for part in all_keys for k in part)
        report = {
            "world_size": world,
            "expected_train_batches": expected,
            "train_batches": [c[0] for c in counts],
            "eval_batches": [c[1] for c in counts],
            "eval_keys": sum(seen.values()),
            "eval_valid_all_reduced": valid_total,
            "eval_keys_once": set(seen) == expected_keys and set(seen.values()) == {1},
        }
        result.write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
