"""Inference speed-ups that keep the outputs: batch norm folded into the convolution before it."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mlc.models.xception import SeparableConv, Xception


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


@torch.no_grad()
def fold_batch_norm(model: Xception) -> Xception:
    """An eval-mode copy in which every (convolution or separable convolution, batch norm) pair
    is one convolution with a bias (for a separable convolution, its pointwise step). Same
    outputs up to float rounding, one pass over memory fewer per layer."""
    model = copy.deepcopy(model).eval()
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(sequence) - 1):
            first, second = sequence[i], sequence[i + 1]
            if isinstance(second, nn.BatchNorm2d) and isinstance(first, (nn.Conv2d, SeparableConv)):
                _fold(first if isinstance(first, nn.Conv2d) else first.pointwise, second)
                sequence[i + 1] = nn.Identity()
    if model.config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model
