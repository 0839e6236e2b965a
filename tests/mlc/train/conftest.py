"""Helpers for the training tests; the dataset they run on, the `mosaics` fixture, is in
tests/conftest.py."""


def tiny_config(dataset, out, *extra):
    """--set overrides for a fast CPU run (32x32 crops of the 56x56 mosaics)."""
    return [
        f"data.dataset={dataset}",
        f"train.out={out}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.shuffle_buffer=100",
        "data.batch_size=16",
        "train.samples=320",
        "train.log_every=160",
        "train.eval_every=100000",
        "train.checkpoint_every=160",
        "optim.name=adamw",
        "optim.lr=0.003",
        "optim.decay_every=0",
        "model.name=xception-tiny",
        "model.width=0.125",
        *extra,
    ]
