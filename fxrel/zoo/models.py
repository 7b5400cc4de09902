"""The evaluation zoo: six small multi-label classifiers for the digit scenes, trained with a *plain* recipe
(whole scenes only: no zoomed crops, no colour permutation, no method in mind), so that no explanation method
was tuned for them.

Each takes images [B, 3, 64, 64] in [0, 1] (no normalisation) and returns 10 logits, one per digit class.
Unlike the demo models they are not all size-agnostic: ``zoo-vgg`` ends in a fixed-size flatten → linear head
(64 px only, as torchvision's VGG without its adaptive pool would be).

- ``zoo-vgg``: BatchNorm-free VGG (conv + bias + ReLU, four max-pools), flatten → linear → ReLU → linear.
- ``zoo-resnet``: BasicBlock ResNet, two blocks per stage (torchvision's wiring).
- ``zoo-bottleneck``: Bottleneck ResNet (1×1 reduce → 3×3 → 1×1 expand ×4, projection shortcuts).
- ``zoo-densenet``: DenseNet-BC, pre-activation BatchNorm, 1×1 bottleneck in every dense layer.
- ``zoo-inception``: Inception-v3-style modules (factorised 1×7/7×1-like 1×3/3×1 branch, average-pool branch) and a
  grid-reduction module (strided branches concatenated with a max-pool).
- ``zoo-timm``: timm's own ``ResNet`` class built small: deep "tiered" stem, ResNet-D average-pool shortcuts,
  squeeze-excitation gates in every block, a dilated last stage.
- ``zoo-vit``: timm's ``VisionTransformer`` built small (a convolutional stem to an 8 × 8 token grid, class token,
  4 blocks of width 96): the transformer on which CP-LRP and AttnLRP are compared (``docs/transformers.md``).
"""
from __future__ import annotations

from pathlib import Path

import timm.models.resnet
import timm.models.vision_transformer
import torch
from torch import nn

from fxrel.demo.models import BasicBlock, conv_bn_relu
from fxrel.demo.registry import ShippedModels
from fxrel.demo.scenes import NUM_CLASSES

__all__ = ["ZOO_MODELS", "CNN_ZOO", "INPUT_SIZE", "build_zoo_model", "zoo_model", "zoo_weights_path", "ZooVGG",
           "ZooResNet", "ZooBottleneckResNet", "ZooDenseNet", "ZooInception", "ConvStem", "build_vit"]

INPUT_SIZE = 64  #: the side the zoo is trained at (and the only one ``zoo-vgg`` accepts)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class _GapClassifier(nn.Module):
    """``features`` then global average pooling, flatten and a linear layer."""

    def __init__(self, layers: list[nn.Module], channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ZooVGG(nn.Module):
    """BatchNorm-free VGG: inputs centred (x − 0.5), conv(3×3, bias) + ReLU stages of widths 16, 16 | 32, 32 |
    64, 64 | 128, each closed by a 2×2 max-pool (64 px → 4×4), then the fixed-size classifier flatten →
    Linear(2048, 128) → ReLU → Linear(128, 10)."""

    WIDTHS = ((16, 16), (32, 32), (64, 64), (128,))

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for stage in self.WIDTHS:
            for width in stage:
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = INPUT_SIZE // 2 ** len(self.WIDTHS)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, NUM_CLASSES))
        for module in self.features:  # He initialisation of the convs: without it the BN-free stack does not train
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs in [0, 1], centred at 0 before the first conv (as a normalisation would; it shortens the loss
        plateau of a BatchNorm-free stack several-fold)."""
        return self.classifier(self.features(x - 0.5))


class ZooResNet(_GapClassifier):
    """Stem conv-BN-ReLU + max-pool, three stages of two BasicBlocks (widths 32, 64, 128; stride 2 from stage 2)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 2) -> None:
        layers: list[nn.Module] = [conv_bn_relu(3, widths[0]), nn.MaxPool2d(2)]
        cin = widths[0]
        for stage, width in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, width, stride=2 if stage > 0 and b == 0 else 1))
                cin = width
        super().__init__(layers, cin)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (stride) → 1×1 expand (×4), each with BatchNorm, ReLU after the first two and after the sum
    with the identity or a strided 1×1 projection."""

    EXPANSION = 4

    def __init__(self, cin: int, mid: int, stride: int = 1) -> None:
        super().__init__()
        cout = mid * self.EXPANSION
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class ZooBottleneckResNet(_GapClassifier):
    """Stem conv-BN-ReLU + max-pool, three stages of two Bottlenecks (mid widths 16, 32, 64 → 64, 128, 256 out)."""

    def __init__(self, mids: tuple[int, ...] = (16, 32, 64), blocks: int = 2) -> None:
        layers: list[nn.Module] = [conv_bn_relu(3, 32), nn.MaxPool2d(2)]
        cin = 32
        for stage, mid in enumerate(mids):
            for b in range(blocks):
                layers.append(Bottleneck(cin, mid, stride=2 if stage > 0 and b == 0 else 1))
                cin = mid * Bottleneck.EXPANSION
        super().__init__(layers, cin)


class DenseBottleneckLayer(nn.Module):
    """DenseNet-BC layer: BN → ReLU → 1×1 conv (4·growth) → BN → ReLU → 3×3 conv (growth), concatenated to its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(self.relu(self.norm2(out)))], 1)


class ZooDenseNet(_GapClassifier):
    """Stem conv-BN-ReLU + max-pool, dense blocks of 4, 6, 6 bottleneck layers (growth 16) with halving transitions
    (BN → ReLU → 1×1 conv → 2×2 average pool), final BN-ReLU (torchvision's DenseNet-BC wiring)."""

    def __init__(self, stem: int = 32, growth: int = 16, layers: tuple[int, ...] = (4, 6, 6)) -> None:
        modules: list[nn.Module] = [conv_bn_relu(3, stem), nn.MaxPool2d(2)]
        cin = stem
        for block, count in enumerate(layers):
            if block > 0:
                modules.append(nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                             nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2)))
                cin //= 2
            for _ in range(count):
                modules.append(DenseBottleneckLayer(cin, growth))
                cin += growth
        modules += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        super().__init__(modules, cin)


class InceptionA(nn.Module):
    """Inception-v3 module A: 1×1; 1×1 → 3×3; 1×1 → 1×3 → 3×1 → 1×3 → 3×1 (factorised 5×5); 3×3 average pool → 1×1."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(cin, width, 1)
        self.branch3 = nn.Sequential(conv_bn_relu(cin, width, 1), conv_bn_relu(width, width))
        self.branch_factorised = nn.Sequential(conv_bn_relu(cin, width // 2, 1),
                                               _conv_bn_relu_rect(width // 2, width, 1, 3),
                                               _conv_bn_relu_rect(width, width, 3, 1))
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                         conv_bn_relu(cin, width // 2, 1))
        self.channels = 3 * width + width // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch_factorised(x), self.branch_pool(x)], 1)


class ReductionB(nn.Module):
    """Inception-v3 grid reduction: a strided 3×3 branch, a 1×1 → 3×3 → strided 3×3 branch and a strided 3×3
    max-pool, concatenated (halves the resolution)."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.branch3 = nn.Sequential(nn.Conv2d(cin, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.branch_double = nn.Sequential(conv_bn_relu(cin, width // 2, 1), conv_bn_relu(width // 2, width // 2),
                                           nn.Conv2d(width // 2, width // 2, 3, 2, 1, bias=False),
                                           nn.BatchNorm2d(width // 2), nn.ReLU())
        self.branch_pool = nn.MaxPool2d(3, 2, 1)
        self.channels = width + width // 2 + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3(x), self.branch_double(x), self.branch_pool(x)], 1)


def _conv_bn_relu_rect(cin: int, cout: int, kh: int, kw: int) -> nn.Sequential:
    """A kh×kw conv (no bias, 'same' padding) → BatchNorm → ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, (kh, kw), padding=(kh // 2, kw // 2), bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ZooInception(_GapClassifier):
    """Stem conv-BN-ReLU + max-pool (32 px), module A, grid reduction (16 px), module A, grid reduction (8 px),
    module A."""

    def __init__(self, stem: int = 32, widths: tuple[int, int, int] = (24, 40, 64)) -> None:
        modules: list[nn.Module] = [conv_bn_relu(3, stem), nn.MaxPool2d(2)]
        cin = stem
        for i, width in enumerate(widths):
            if i > 0:
                reduction = ReductionB(cin, width)
                modules.append(reduction)
                cin = reduction.channels
            module = InceptionA(cin, width)
            modules.append(module)
            cin = module.channels
        super().__init__(modules, cin)


def build_timm_resnet() -> nn.Module:
    """timm's ``ResNet`` class, small: BasicBlocks (1, 1, 1, 1) of widths 16, 32, 64, 128, deep tiered stem of width
    16 (three 3×3 convs, stride 2), ResNet-D shortcuts (average pool → 1×1 conv), an SE gate in every block, output
    stride 16 (the last stage dilated, timm's ``output_stride``) and the stem's max-pool removed, the usual small-image
    adaptation; 64 px → an 8×8 last map, as the other zoo models."""
    model = timm.models.resnet.ResNet(block=timm.models.resnet.BasicBlock, layers=(1, 1, 1, 1),
                                      channels=(16, 32, 64, 128), num_classes=NUM_CLASSES, stem_width=16,
                                      stem_type="deep_tiered", avg_down=True, output_stride=16,
                                      block_args={"attn_layer": "se"})
    model.maxpool = nn.Identity()
    return model


class ConvStem(nn.Module):
    """A convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see better"): three
    stride-2 3×3 conv–BN–ReLU layers of widths 24, 48, 96 and a 1×1 projection to the embedding, 64 px → an 8 × 8
    token grid, then flattened to tokens. With timm's 8×8-patch linear embedding instead, the ViT below stays at
    the label prior: test F1 0.00 after the full plain-recipe run (2000 steps, lr 1e-3), and BCE 0.496–0.498 (the
    prior's 0.50) after 500–600-step trials at lr 3e-4 and 1e-4 or with a mean-pooled head; with this stem the BCE
    is 0.41 after 600 steps."""

    def __init__(self, img_size: int = INPUT_SIZE, patch_size: int = 8, in_chans: int = 3, embed_dim: int = 96,
                 **_: object) -> None:
        super().__init__()
        side = img_size // 8
        self.img_size, self.patch_size, self.grid_size = (img_size, img_size), (8, 8), (side, side)
        self.num_patches, self.dynamic_img_pad = side * side, False
        layers: list[nn.Module] = []
        cin = in_chans
        for width in (24, 48, 96):
            layers += [nn.Conv2d(cin, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        layers.append(nn.Conv2d(cin, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def feat_ratio(self, as_scalar: bool = True) -> int:
        return 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def build_vit() -> nn.Module:
    """timm's ``VisionTransformer`` built small for the scenes: a convolutional stem (:class:`ConvStem`, 64 px → an
    8 × 8 token grid), a class token, learned position embeddings, 4 pre-norm blocks of width 96 with 4 heads and MLP
    ratio 2, GELU, the class token's features into the linear head (timm's ``global_pool="token"``)."""
    return timm.models.vision_transformer.VisionTransformer(
        img_size=INPUT_SIZE, patch_size=8, num_classes=NUM_CLASSES, embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0,
        global_pool="token", embed_layer=ConvStem)


ZOO = ShippedModels("zoo", {"zoo-vgg": ZooVGG, "zoo-resnet": ZooResNet, "zoo-bottleneck": ZooBottleneckResNet,
                             "zoo-densenet": ZooDenseNet, "zoo-inception": ZooInception,
                             "zoo-timm": build_timm_resnet, "zoo-vit": build_vit}, WEIGHTS_DIR)
ZOO_MODELS: tuple[str, ...] = ZOO.names
#: the CNNs, on which the seed methods (papers about CNNs) are held to the fidelity bar (``fxrel fidelity``)
CNN_ZOO: tuple[str, ...] = tuple(name for name in ZOO_MODELS if name != "zoo-vit")
build_zoo_model = ZOO.build            #: a freshly initialised (untrained) zoo model
zoo_weights_path = ZOO.weights_path    #: ``zoo-resnet`` → ``<directory>/zoo_resnet.pt``
zoo_model = ZOO.load                   #: the trained zoo model in eval mode on a device
