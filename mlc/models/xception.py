"""Xception (Chollet 2016) with a multi-label head: the paper's network, and scaled presets.

The layer sequence is the Keras reference's (``keras.applications.Xception``): a batch norm
(eps 1e-3) after every convolution and separable convolution, no bias in them, no activation
between a separable convolution's depthwise and pointwise steps, 1x1 stride-2 residual
convolutions, and TensorFlow "same" max pooling (on an even input the 3x3 stride-2 window is
padded at the bottom/right only, so imported Keras weights give Keras' outputs exactly).

The head is a linear layer whose outputs are logits for independent sigmoids (multi-label),
its bias set to the log-odds of a prior positive rate so that thousands of rare classes do not
start at p = 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mlc.config import ModelConfig

BN_EPS = 1e-3  # Keras' value; the imported statistics assume it
BN_MOMENTUM = 0.01  # PyTorch's convention for Keras' momentum 0.99

# The smallest input side the network computes: the stem's two unpadded 3x3 convolutions take
# 7 -> 3 (stride 2) -> 1; every later layer is padded ("same"). Up to side 38 the last feature
# map is 1x1. Keras' Xception refuses sides under 71 (where its last map reaches 3x3), a
# convention of keras.applications rather than a need of the architecture; the presets here run
# at 64 and below.
MIN_SIDE = 7


@dataclass(frozen=True)
class Preset:
    width: float  # channel multiplier
    middle_blocks: int
    input_size: int  # the input side it is meant for (the network takes any side >= MIN_SIDE)


PRESETS = {
    "xception": Preset(width=1.0, middle_blocks=8, input_size=299),
    "xception-small": Preset(width=0.5, middle_blocks=4, input_size=149),
    "xception-tiny": Preset(width=0.25, middle_blocks=2, input_size=64),
}


def resolve(config: ModelConfig) -> ModelConfig:
    """The config with its preset's width and middle blocks where it leaves them None."""
    if config.name not in PRESETS:
        raise ValueError(f"unknown model {config.name!r}; presets: {', '.join(PRESETS)}")
    preset, blocks = PRESETS[config.name], config.middle_blocks
    return replace(
        config,
        width=preset.width if config.width is None else config.width,
        middle_blocks=preset.middle_blocks if blocks is None else blocks,
    )


def channels(c: int, width: float) -> int:
    """Scaled channel count, a multiple of 8 (the paper's counts at width 1)."""
    return c if width == 1.0 else max(8, int(round(c * width / 8)) * 8)


class SeparableConv(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, no activation or norm between them (the paper's
    finding: an activation there hurts)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


def batch_norm(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class SamePadMaxPool(nn.Module):
    """3x3 stride-2 max pooling with TensorFlow's "same" padding (extra pad at bottom/right).

    "Same" pads an odd side by one on each end and an even side by one at the end only; the
    windows are those of max_pool2d with padding 1 (odd) or 0 (even) and ceil_mode, which lets
    the last window run past the end. The same outputs and gradients as padding with -inf
    first (tests/mlc/models/test_xception.py), without the padded copy, which on channels_last
    activations costs more than the pooling itself.
    """

    def forward(self, x):
        return F.max_pool2d(x, 3, 2, padding=(x.shape[-2] % 2, x.shape[-1] % 2), ceil_mode=True)


class Block(nn.Module):
    """[ReLU -> SepConv -> BN] x reps, then (downsampling blocks) max pool, plus the residual:
    identity, or a 1x1 stride-2 convolution with batch norm."""

    def __init__(
        self,
        cin: int,
        cout: int,
        reps: int,
        downsample: bool,
        relu_first: bool = True,
        grow_first: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for i in range(reps):
            target = cout if grow_first or i == reps - 1 else cin
            if i > 0 or relu_first:
                # Not in place at the start: the block's input also feeds the residual.
                layers.append(nn.ReLU(inplace=i > 0))
            layers += [SeparableConv(c, target), batch_norm(target)]
            c = target
        if downsample:
            layers.append(SamePadMaxPool())
        self.layers = nn.Sequential(*layers)
        self.skip = None
        if downsample or cin != cout:
            stride = 2 if downsample else 1
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), batch_norm(cout))

    def forward(self, x):
        return self.layers(x) + (x if self.skip is None else self.skip(x))


class Xception(nn.Module):
    """The network of a model config (mlc.config.ModelConfig; ``init`` is the job's business)."""

    def __init__(self, config: ModelConfig, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.config = config = resolve(config)
        self.num_classes, self.in_channels = num_classes, in_channels
        w = config.width

        def ch(c):
            return channels(c, w)

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, ch(32), 3, 2, bias=False),
            batch_norm(ch(32)),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch(32), ch(64), 3, bias=False),
            batch_norm(ch(64)),
            nn.ReLU(inplace=True),
        )
        entry = [
            Block(ch(64), ch(128), 2, downsample=True, relu_first=False),
            Block(ch(128), ch(256), 2, downsample=True),
            Block(ch(256), ch(728), 2, downsample=True),
        ]
        middle = [Block(ch(728), ch(728), 3, downsample=False) for _ in range(config.middle_blocks)]
        exit_block = Block(ch(728), ch(1024), 2, downsample=True, grow_first=False)
        self.blocks = nn.Sequential(*entry, *middle, exit_block)
        self.exit = nn.Sequential(
            SeparableConv(ch(1024), ch(1536)),
            batch_norm(ch(1536)),
            nn.ReLU(inplace=True),
            SeparableConv(ch(1536), ch(2048)),
            batch_norm(ch(2048)),
            nn.ReLU(inplace=True),
        )
        self.num_features = ch(2048)
        fc: list[nn.Module] = []
        features = self.num_features
        for units in config.fc_layers:
            fc += [nn.Linear(features, units), nn.ReLU(inplace=True)]
            features = units
        self.fc = nn.Sequential(*fc)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(features, num_classes)
        self._init_weights()
        if config.channels_last:
            self.to(memory_format=torch.channels_last)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.init_head_bias(self.config.head_prior)

    def init_head_bias(self, prior: float | None) -> None:
        """Head bias = log(prior / (1 - prior)): every class starts at p = prior."""
        if prior is None:
            nn.init.zeros_(self.head.bias)
            return
        if not 0 < prior < 1:
            raise ValueError(f"head_prior must be in (0, 1), got {prior}")
        nn.init.constant_(self.head.bias, math.log(prior / (1 - prior)))

    def check_input(self, x: torch.Tensor) -> None:
        """A ValueError naming the expected shape for an input the network cannot take (wrong
        rank, channels, or a side under MIN_SIDE), instead of an error from deep in a conv."""
        if x.ndim == 4 and x.shape[1] == self.in_channels and min(x.shape[2:]) >= MIN_SIDE:
            return
        raise ValueError(
            f"input of shape {tuple(x.shape)}: the model expects [B, {self.in_channels}, H, W] "
            f"with H, W >= {MIN_SIDE}"
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> feature map [B, 2048 * width, H/32, W/32]."""
        self.check_input(x)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.exit(self.blocks(self.stem(x)))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, optional FC layers, dropout, the linear head (logits)."""
        x = self.fc(features.mean((2, 3)))
        return x if pre_logits else self.head(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_head(self, num_classes: int, prior: float | None = None) -> None:
        """A new head for another label set (fine-tuning); the backbone is kept."""
        prior = self.config.head_prior if prior is None else prior
        device = self.head.weight.device
        self.head = nn.Linear(self.head.in_features, num_classes).to(device)
        nn.init.xavier_uniform_(self.head.weight)
        self.num_classes, self.config = num_classes, replace(self.config, head_prior=prior)
        self.init_head_bias(prior)


def create_model(name: str, num_classes: int = 1000, in_channels: int = 3, **overrides) -> Xception:
    """A preset ("xception", "xception-small", "xception-tiny") with ModelConfig overrides."""
    return Xception(ModelConfig(name=name, **overrides), num_classes, in_channels)


__all__ = ["MIN_SIDE", "PRESETS", "Preset", "Xception", "create_model", "resolve"]
