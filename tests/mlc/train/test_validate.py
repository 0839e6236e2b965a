"""The training job's validation: its fwMAP@K is the dense metric's on the same logits, bit for
bit, and 2 gloo ranks (eval.MAPAtK synced by torchmetrics) give the single process's figures."""

import dataclasses
import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval.metrics import class_ap_at_k
from mlc.config import Config
from mlc.data import ShardLoader, normalize
from mlc.dist import free_port
from mlc.models.factory import build_model
from mlc.train.loop import dataset_classes
from mlc.train.validate import validate


def setup(dataset) -> tuple[Config, list[str], np.ndarray, torch.nn.Module]:
    config = Config()
    config.data.dataset = str(dataset)
    config.data.image_size = 32
    config.data.num_workers = 0
    config.data.batch_size = 16
    config.model.name = "xception-tiny"
    config.model.width = 0.125
    config.train.eval_k = 20  # < the 300 test images: the top-K cut and its ties matter
    class_ids, reference = dataset_classes(config)
    torch.manual_seed(3)
    model = build_model(config.model, len(class_ids), config.data.channels).eval()
    return config, class_ids, reference, model


def validate_rank(rank: int, world: int, port: int, dataset: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
        config, class_ids, reference, model = setup(dataset)
        result = validate(model, config, class_ids, reference, rank, world, torch.device("cpu"))
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_validation_is_the_exact_metric_in_one_and_two_processes(mosaics, tmp_path):
    config, class_ids, reference, model = setup(mosaics)
    result = validate(model, config, class_ids, reference, 0, 1, torch.device("cpu"))

    settings = dataclasses.replace(config.data, mode="eval")
    scores, labels = [], []
    with torch.no_grad():
        for batch in ShardLoader.from_dataset(mosaics, "test", settings):
            batch = batch.valid_rows()
            scores.append(model(normalize(batch.images)).float())
            labels.append(torch.where(batch.mask.bool(), batch.targets.long(), -1))
    scores, labels = torch.cat(scores), torch.cat(labels)
    dense = class_ap_at_k(scores, labels, k=20, weights=reference)
    assert result["fwmap"] == dense.weighted_map
    assert result["map"] == dense.unweighted_map
    assert result["images"] == len(scores) == 300
    assert result["classes_evaluated"] == int((dense.positives > 0).sum())

    mp.spawn(validate_rank, args=(2, free_port(), str(mosaics), str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) == result
