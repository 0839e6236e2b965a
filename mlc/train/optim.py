"""The optimisation recipe: the loss, the optimizers of the paper's recipes, the lr schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlc.config import Config


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sigmoid binary cross-entropy averaged over the known labels only (mask == 1)."""
    mask = mask.float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def learning_rate(config: Config, samples: int, world_batch: int) -> float:
    """Staircase exponential decay in samples, linear warm-up, explicit batch scaling."""
    o = config.optim
    lr = o.lr * (world_batch / o.lr_batch_size if o.lr_batch_size else 1.0)
    lr *= o.decay_rate ** (samples // o.decay_every) if o.decay_every else 1.0
    if o.warmup and samples < o.warmup:
        lr *= (samples + world_batch) / o.warmup
    return lr


def make_optimizer(config: Config, params) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "rmsprop":  # the paper's JFT recipe (TF-style epsilon and decay)
        return torch.optim.RMSprop(
            params,
            lr=o.lr,
            alpha=o.rmsprop_alpha,
            eps=o.rmsprop_eps,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
        )
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
