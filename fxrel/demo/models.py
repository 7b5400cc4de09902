"""Four small multi-label CNNs for the demo scenes, one per architecture family fxrel handles: plain VGG stacks,
ResNet skips (``+``), DenseNet concatenation and Inception branches (``torch.cat``).

Each takes images [B, 3, H, W] in [0, 1] (no normalisation), works at any H, W ≥ 32 (global average pooling
before the classifier) and returns 10 logits, one per digit class (multi-label, trained with BCE-with-logits).
Every model is ``features`` (an ``nn.Sequential`` whose last map is 8×8 at 64 px, for CAMs) followed by ``head``
(global average pooling, flatten, linear). Only Conv2d, BatchNorm2d, ReLU, max/avg pooling, adaptive average
pooling, flatten, Linear, ``+`` and ``torch.cat`` are used.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fxrel.demo.registry import ShippedModels
from fxrel.demo.scenes import NUM_CLASSES

__all__ = ["DEMO_MODELS", "DemoVGG", "DemoResNet", "DemoDenseNet", "DemoInception", "build_model", "demo_model",
           "weights_path"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    """Conv (no bias) → BatchNorm → ReLU, 'same' padding."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Head(nn.Module):
    """Global average pooling, flatten, linear classifier."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class _Classifier(nn.Module):
    """``features`` (ends in the last spatial map, 8×8 at 64 px) followed by the :class:`_Head`."""

    def __init__(self, layers: list[nn.Module], channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.head = _Head(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DemoVGG(_Classifier):
    """Stem conv at full resolution, then three stages of two conv-BN-ReLU each, each after a 2×2 max-pool."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        layers: list[nn.Module] = [conv_bn_relu(3, widths[0])]
        cin = widths[0]
        for width in widths:
            layers += [nn.MaxPool2d(2), conv_bn_relu(cin, width), conv_bn_relu(width, width)]
            cin = width
        super().__init__(layers, cin)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN (ReLU between), plus the identity or a strided 1×1 conv-BN shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class DemoResNet(_Classifier):
    """Stem conv + max-pool, three stages of BasicBlocks (the 2nd and 3rd start with stride 2)."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), blocks: tuple[int, int, int] = (1, 1, 1)) -> None:
        layers: list[nn.Module] = [conv_bn_relu(3, widths[0]), nn.MaxPool2d(2)]
        cin = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for b in range(count):
                layers.append(BasicBlock(cin, width, stride=2 if stage > 0 and b == 0 else 1))
                cin = width
        super().__init__(layers, cin)


class DenseLayer(nn.Module):
    """BN → ReLU → 3×3 conv producing ``growth`` channels, concatenated to its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


def _transition(cin: int, cout: int) -> nn.Sequential:
    """BN → ReLU → 1×1 conv → 2×2 average pool."""
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2))


class DemoDenseNet(_Classifier):
    """Stem conv + max-pool, three dense blocks with halving transitions between them, final BN-ReLU."""

    def __init__(self, stem: int = 24, growth: int = 16, layers: tuple[int, int, int] = (3, 6, 6)) -> None:
        modules: list[nn.Module] = [conv_bn_relu(3, stem), nn.MaxPool2d(2)]
        cin = stem
        for block, count in enumerate(layers):
            if block > 0:
                modules.append(_transition(cin, cin // 2))
                cin //= 2
            for _ in range(count):
                modules.append(DenseLayer(cin, growth))
                cin += growth
        modules += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        super().__init__(modules, cin)


class InceptionModule(nn.Module):
    """Four concatenated branches: 1×1; 1×1 → 3×3; 1×1 → 3×3 → 3×3; 3×3 max-pool (stride 1) → 1×1."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(cin, c1, 1)
        self.branch3 = nn.Sequential(conv_bn_relu(cin, c3r, 1), conv_bn_relu(c3r, c3))
        self.branch5 = nn.Sequential(conv_bn_relu(cin, c5r, 1), conv_bn_relu(c5r, c5), conv_bn_relu(c5, c5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(cin, cp, 1))
        self.channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class DemoInception(_Classifier):
    """Stem conv + max-pool, then one inception module per resolution (32, 16, 8 px at 64 px input) with 2×2
    max-pools between them."""

    # (c1, c3 reduce, c3, c5 reduce, c5, pool projection) per module
    CONFIG = ((16, 16, 32, 8, 16, 16), (32, 32, 64, 16, 32, 32), (64, 48, 96, 24, 48, 48))

    def __init__(self, stem: int = 32) -> None:
        modules: list[nn.Module] = [conv_bn_relu(3, stem), nn.MaxPool2d(2)]
        cin = stem
        for i, config in enumerate(self.CONFIG):
            if i > 0:
                modules.append(nn.MaxPool2d(2))
            module = InceptionModule(cin, *config)
            modules.append(module)
            cin = module.channels
        super().__init__(modules, cin)


DEMO = ShippedModels("demo", {"demo-vgg": DemoVGG, "demo-resnet": DemoResNet, "demo-densenet": DemoDenseNet,
                               "demo-inception": DemoInception}, WEIGHTS_DIR)
DEMO_MODELS: tuple[str, ...] = DEMO.names
build_model = DEMO.build            #: a freshly initialised (untrained) demo model
weights_path = DEMO.weights_path    #: ``demo-resnet`` → ``<directory>/demo_resnet.pt``
demo_model = DEMO.load              #: the trained demo model in eval mode on a device
