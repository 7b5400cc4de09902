"""Hypothesis strategies for small random CNN architectures.

The strategy :func:`cnn_architectures` draws a plain-data, frozen :class:`ArchSpec`
(readable when hypothesis prints a shrunk example); :func:`build_model` turns a spec
deterministically into ``(model, x)``: an ``nn.Module`` in eval mode and an example
input of shape ``[batch, C, H, W]``. Every model is traceable by
``torch.fx.symbolic_trace``: all shape-dependent choices are made at draw time.

Example::

    @given(spec=cnn_architectures(bias=False, kinds=("residual",)))
    def test_something(spec: ArchSpec) -> None:
        model, x = spec.build()
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

__all__ = [
    "ARCH_KINDS",
    "RELU_FORMS",
    "ADD_FORMS",
    "POOL_FORMS",
    "HEAD_POOL_FORMS",
    "BRANCH_KINDS",
    "ConvSpec",
    "LinearSpec",
    "ConvBlockSpec",
    "ResidualSpec",
    "DenseSpec",
    "BranchSpec",
    "InceptionSpec",
    "PoolSpec",
    "HeadSpec",
    "ArchSpec",
    "BlockSpec",
    "ConvBlock",
    "ResidualBlock",
    "DenseBlock",
    "InceptionBlock",
    "FunctionalReLU",
    "FunctionalPool",
    "Head",
    "CNN",
    "BLOCK_CLASSES",
    "cnn_architectures",
    "build_model",
]

ARCH_KINDS = ("sequential", "residual", "dense", "inception")
"""Block kinds that :func:`cnn_architectures` can place between stem and head."""

RELU_FORMS = (
    "module",  # nn.ReLU()
    "module_inplace",  # nn.ReLU(inplace=True)
    "functional",  # F.relu(x)
    "functional_inplace",  # F.relu(x, inplace=True)
    "torch",  # torch.relu(x)
    "torch_inplace",  # torch.relu_(x)
)
ADD_FORMS = ("operator", "iadd", "torch_add")  # out + idt, out += idt, torch.add(out, idt)
POOL_FORMS = ("max2", "max3s2p1", "avg2", "functional_max2", "functional_avg2")
HEAD_POOL_FORMS = ("gap_flatten", "gap_mean", "aap2_view", "aap2_flatten")
BRANCH_KINDS = ("1x1", "1x1_3x3", "pool_1x1")

_MIN_CH, _MAX_CH = 2, 12


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ConvSpec:
    """One ``nn.Conv2d``."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    bias: bool = False

    def out_size(self, size: int) -> int:
        """Spatial output size for an input of side ``size``."""
        return (size + 2 * self.padding - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class LinearSpec:
    """One ``nn.Linear``."""

    in_features: int
    out_features: int
    bias: bool = False


@dataclass(frozen=True)
class ConvBlockSpec:
    """Plain ``conv [-> BatchNorm2d] -> ReLU``."""

    conv: ConvSpec
    batchnorm: bool
    relu: str

    kind = "sequential"

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels


@dataclass(frozen=True)
class ResidualSpec:
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; shortcut is conv1x1+BN or identity."""

    conv1: ConvSpec
    conv2: ConvSpec
    projection: ConvSpec | None
    add: str
    inner_relu: str
    out_relu: str

    kind = "residual"

    @property
    def out_channels(self) -> int:
        return self.conv2.out_channels


@dataclass(frozen=True)
class DenseSpec:
    """DenseNet layers ``x = cat([x, conv(relu(bn(x)))], 1)``, one per conv."""

    layers: tuple[ConvSpec, ...]
    relu: str

    kind = "dense"

    @property
    def out_channels(self) -> int:
        return self.layers[-1].in_channels + self.layers[-1].out_channels


@dataclass(frozen=True)
class BranchSpec:
    """One inception branch: optional 3x3/s1/p1 max-pool, then convs each followed by [BN ->] ReLU."""

    kind: str
    convs: tuple[ConvSpec, ...]


@dataclass(frozen=True)
class InceptionSpec:
    """Parallel branches concatenated along channels."""

    branches: tuple[BranchSpec, ...]
    batchnorm: bool
    relu: str

    kind = "inception"

    @property
    def out_channels(self) -> int:
        return sum(b.convs[-1].out_channels for b in self.branches)


@dataclass(frozen=True)
class PoolSpec:
    """Down-sampling pool between blocks (see ``POOL_FORMS``)."""

    form: str

    def out_size(self, size: int) -> int:
        """Spatial output size for an input of side ``size``."""
        return (size + 2 - 3) // 2 + 1 if self.form == "max3s2p1" else size // 2


BlockSpec = ConvBlockSpec | ResidualSpec | DenseSpec | InceptionSpec


@dataclass(frozen=True)
class HeadSpec:
    """Spatial pooling, flatten, optional dropout, then 1-2 linear layers (ReLU between)."""

    pool: str
    dropout: float | None
    linears: tuple[LinearSpec, ...]
    relu: str


@dataclass(frozen=True)
class ArchSpec:
    """A complete CNN: stem conv block, body (blocks and pools), head.

    ``bias_free`` means every additive constant is zero: conv/linear layers have no bias
    and BatchNorm layers get ``running_mean = 0`` and ``bias = 0``, so the network is
    positively homogeneous. ``signed_gamma`` lets BatchNorm weights be negative.
    """

    seed: int
    batch: int
    in_channels: int
    height: int
    width: int
    stem: ConvBlockSpec
    body: tuple[BlockSpec | PoolSpec, ...]
    head: HeadSpec
    bias_free: bool
    signed_gamma: bool

    @property
    def kinds(self) -> tuple[str, ...]:
        """Kinds (from ``ARCH_KINDS``) of the body blocks, in order."""
        return tuple(b.kind for b in self.body if not isinstance(b, PoolSpec))

    @property
    def num_classes(self) -> int:
        return self.head.linears[-1].out_features

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    def without_biases(self) -> ArchSpec:
        """The same architecture with all additive constants removed (``bias_free``)."""
        return dataclasses.replace(_strip_biases(self), bias_free=True)

    def build(self, seed: int | None = None) -> tuple[nn.Module, Tensor]:
        """Shorthand for :func:`build_model`."""
        return build_model(self, seed)


def _strip_biases(obj: Any) -> Any:
    """Recursively set every ``bias`` field of nested spec dataclasses to False."""
    if isinstance(obj, tuple):
        return tuple(_strip_biases(o) for o in obj)
    if dataclasses.is_dataclass(obj):
        changes = {f.name: _strip_biases(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if "bias" in changes:
            changes["bias"] = False
        return dataclasses.replace(obj, **changes)
    return obj


# ----------------------------------------------------------------------- strategy


def _bias(draw: st.DrawFn, bias: bool | None) -> bool:
    return draw(st.booleans()) if bias is None else bias


def _channels(draw: st.DrawFn) -> int:
    return draw(st.integers(_MIN_CH, _MAX_CH))


def _draw_conv_block(
    draw: st.DrawFn, in_ch: int, size: int, bias: bool | None
) -> ConvBlockSpec:
    kernel = draw(st.sampled_from((3, 1)))
    padding = draw(st.sampled_from((1, 0) if size >= 5 else (1,))) if kernel == 3 else 0
    stride = draw(st.sampled_from((1, 2) if size >= 4 else (1,)))
    groups = draw(st.sampled_from([g for g in range(1, 7) if in_ch % g == 0]))
    out_ch = groups * draw(st.integers(-(-_MIN_CH // groups), _MAX_CH // groups))
    conv = ConvSpec(in_ch, out_ch, kernel, stride, padding, groups, _bias(draw, bias))
    return ConvBlockSpec(conv, draw(st.booleans()), draw(st.sampled_from(RELU_FORMS)))


def _draw_residual(draw: st.DrawFn, in_ch: int, size: int, bias: bool | None) -> ResidualSpec:
    out_ch = _channels(draw)
    stride = draw(st.sampled_from((1, 2) if size >= 4 else (1,)))
    conv1 = ConvSpec(in_ch, out_ch, 3, stride, 1, 1, _bias(draw, bias))
    conv2 = ConvSpec(out_ch, out_ch, 3, 1, 1, 1, _bias(draw, bias))
    projection = None
    if stride != 1 or in_ch != out_ch:
        projection = ConvSpec(in_ch, out_ch, 1, stride, 0, 1, _bias(draw, bias))
    return ResidualSpec(
        conv1,
        conv2,
        projection,
        draw(st.sampled_from(ADD_FORMS)),
        draw(st.sampled_from(RELU_FORMS)),
        draw(st.sampled_from(RELU_FORMS)),
    )


def _draw_dense(draw: st.DrawFn, in_ch: int, bias: bool | None) -> DenseSpec:
    growth = draw(st.integers(2, 4))
    kernel = draw(st.sampled_from((3, 1)))
    layers = []
    for _ in range(draw(st.integers(2, 3))):  # >= 2 layers: a BN directly follows a cat
        layers.append(ConvSpec(in_ch, growth, kernel, 1, kernel // 2, 1, _bias(draw, bias)))
        in_ch += growth
    return DenseSpec(tuple(layers), draw(st.sampled_from(RELU_FORMS)))


def _draw_inception(draw: st.DrawFn, in_ch: int, bias: bool | None) -> InceptionSpec:
    kinds = draw(st.lists(st.sampled_from(BRANCH_KINDS), min_size=2, max_size=3, unique=True))
    width = st.integers(2, 6)
    branches = []
    for kind in kinds:
        if kind == "1x1_3x3":
            mid = draw(width)
            convs = (
                ConvSpec(in_ch, mid, 1, bias=_bias(draw, bias)),
                ConvSpec(mid, draw(width), 3, 1, 1, bias=_bias(draw, bias)),
            )
        else:
            convs = (ConvSpec(in_ch, draw(width), 1, bias=_bias(draw, bias)),)
        branches.append(BranchSpec(kind, convs))
    return InceptionSpec(tuple(branches), draw(st.booleans()), draw(st.sampled_from(RELU_FORMS)))


def _block_out_size(block: BlockSpec, size: int) -> int:
    if isinstance(block, ConvBlockSpec):
        return block.conv.out_size(size)
    if isinstance(block, ResidualSpec):
        return block.conv1.out_size(size)
    return size


@st.composite
def _architectures(
    draw: st.DrawFn,
    bias: bool | None,
    kinds: tuple[str, ...],
    min_blocks: int,
    max_blocks: int,
) -> ArchSpec:
    in_ch = draw(st.integers(1, 3))
    height, width = draw(st.integers(8, 24)), draw(st.integers(8, 24))
    size = min(height, width)  # all ops treat H and W alike, so track the smaller side

    stem = _draw_conv_block(draw, in_ch, size, bias)
    channels, size = stem.out_channels, stem.conv.out_size(size)

    body: list[BlockSpec | PoolSpec] = []
    for _ in range(draw(st.integers(min_blocks, max_blocks))):
        kind = draw(st.sampled_from(kinds))
        block: BlockSpec
        if kind == "sequential":
            block = _draw_conv_block(draw, channels, size, bias)
        elif kind == "residual":
            block = _draw_residual(draw, channels, size, bias)
        elif kind == "dense":
            block = _draw_dense(draw, channels, bias)
        else:
            block = _draw_inception(draw, channels, bias)
        body.append(block)
        channels, size = block.out_channels, _block_out_size(block, size)
        if size >= 4 and draw(st.booleans()):
            pool = PoolSpec(draw(st.sampled_from(POOL_FORMS)))
            body.append(pool)
            size = pool.out_size(size)

    pool_form = draw(st.sampled_from(HEAD_POOL_FORMS))
    features = channels * (4 if pool_form.startswith("aap2") else 1)
    dropout = draw(st.none() | st.sampled_from((0.1, 0.5)))
    num_classes = draw(st.integers(3, 10))
    if draw(st.booleans()):
        hidden = draw(st.integers(4, 16))
        linears = (
            LinearSpec(features, hidden, _bias(draw, bias)),
            LinearSpec(hidden, num_classes, _bias(draw, bias)),
        )
    else:
        linears = (LinearSpec(features, num_classes, _bias(draw, bias)),)
    head = HeadSpec(pool_form, dropout, linears, draw(st.sampled_from(RELU_FORMS)))

    return ArchSpec(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, 3)),
        in_channels=in_ch,
        height=height,
        width=width,
        stem=stem,
        body=tuple(body),
        head=head,
        bias_free=bias is False,
        signed_gamma=draw(st.booleans()),
    )


def cnn_architectures(
    *,
    bias: bool | None = None,
    kinds: Sequence[str] = ARCH_KINDS,
    min_blocks: int = 1,
    max_blocks: int = 4,
) -> st.SearchStrategy[ArchSpec]:
    """Strategy for :class:`ArchSpec`: a stem conv, ``min_blocks..max_blocks`` blocks, a head.

    Args:
        bias: None draws a bias flag per conv/linear layer; True/False forces all of them.
            False also zeroes BatchNorm ``running_mean``/``bias`` (``spec.bias_free``),
            so the built network is positively homogeneous.
        kinds: block kinds (subset of ``ARCH_KINDS``) that the body may contain.
        min_blocks, max_blocks: bounds on the number of body blocks (pools not counted).
    """
    kinds = tuple(kinds)
    if not kinds or not set(kinds) <= set(ARCH_KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {ARCH_KINDS}, got {kinds}")
    if not 1 <= min_blocks <= max_blocks:
        raise ValueError(f"need 1 <= min_blocks <= max_blocks, got {min_blocks}, {max_blocks}")
    return _architectures(bias, kinds, min_blocks, max_blocks)


# ------------------------------------------------------------------------ modules


class FunctionalReLU(nn.Module):
    """ReLU through a functional call; fx inlines it, so the graph holds the call itself."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def forward(self, x: Tensor) -> Tensor:
        if self.form == "functional":
            return F.relu(x)
        if self.form == "functional_inplace":
            return F.relu(x, inplace=True)
        if self.form == "torch":
            return torch.relu(x)
        return torch.relu_(x)

    def extra_repr(self) -> str:
        return self.form


class FunctionalPool(nn.Module):
    """2x2/stride-2 pooling through ``F.max_pool2d`` or ``F.avg_pool2d``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2) if self.mode == "max" else F.avg_pool2d(x, 2)

    def extra_repr(self) -> str:
        return self.mode


def _relu(form: str) -> nn.Module:
    if form.startswith("module"):
        return nn.ReLU(inplace=form == "module_inplace")
    return FunctionalReLU(form)


def _pool(form: str) -> nn.Module:
    if form == "max2":
        return nn.MaxPool2d(2)
    if form == "max3s2p1":
        return nn.MaxPool2d(3, 2, 1)
    if form == "avg2":
        return nn.AvgPool2d(2)
    return FunctionalPool("max" if form == "functional_max2" else "avg")


def _conv(spec: ConvSpec) -> nn.Conv2d:
    return nn.Conv2d(
        spec.in_channels,
        spec.out_channels,
        spec.kernel,
        spec.stride,
        spec.padding,
        groups=spec.groups,
        bias=spec.bias,
    )


def _conv_bn_relu(spec: ConvSpec, batchnorm: bool, relu: str) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = [("conv", _conv(spec))]
    if batchnorm:
        layers.append(("bn", nn.BatchNorm2d(spec.out_channels)))
    return layers + [("relu", _relu(relu))]


class ConvBlock(nn.Sequential):
    """``conv [-> bn] -> relu``."""

    def __init__(self, spec: ConvBlockSpec) -> None:
        super().__init__(OrderedDict(_conv_bn_relu(spec.conv, spec.batchnorm, spec.relu)))


class ResidualBlock(nn.Module):
    """ResNet basic block; the add and final ReLU forms come from the spec."""

    def __init__(self, spec: ResidualSpec) -> None:
        super().__init__()
        self.conv1 = _conv(spec.conv1)
        self.bn1 = nn.BatchNorm2d(spec.conv1.out_channels)
        self.relu1 = _relu(spec.inner_relu)
        self.conv2 = _conv(spec.conv2)
        self.bn2 = nn.BatchNorm2d(spec.conv2.out_channels)
        self.downsample = (
            None
            if spec.projection is None
            else nn.Sequential(_conv(spec.projection), nn.BatchNorm2d(spec.projection.out_channels))
        )
        self.relu = _relu(spec.out_relu)
        self.add_form = spec.add

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.add_form == "iadd":
            out += identity
        elif self.add_form == "torch_add":
            out = torch.add(out, identity)
        else:
            out = out + identity
        return self.relu(out)


class DenseBlock(nn.Module):
    """DenseNet block: pre-activation ``bn -> relu -> conv`` layers, outputs concatenated."""

    def __init__(self, spec: DenseSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    norm=nn.BatchNorm2d(conv.in_channels),
                    relu=_relu(spec.relu),
                    conv=_conv(conv),
                )
            )
            for conv in spec.layers
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class InceptionBlock(nn.Module):
    """Parallel branches concatenated along channels."""

    def __init__(self, spec: InceptionSpec) -> None:
        super().__init__()
        branches = []
        for branch in spec.branches:
            layers: list[nn.Module] = []
            if branch.kind == "pool_1x1":
                layers.append(nn.MaxPool2d(3, 1, 1))
            for conv in branch.convs:
                layers += [m for _, m in _conv_bn_relu(conv, spec.batchnorm, spec.relu)]
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class Head(nn.Module):
    """Spatial pooling, flatten, optional dropout and the classifier."""

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        self.pool_form = spec.pool
        self.pool = (
            None
            if spec.pool == "gap_mean"
            else nn.AdaptiveAvgPool2d(2 if spec.pool.startswith("aap2") else 1)
        )
        self.flatten = nn.Flatten() if spec.pool == "aap2_flatten" else None
        self.dropout = None if spec.dropout is None else nn.Dropout(spec.dropout)
        layers: list[nn.Module] = []
        for i, lin in enumerate(spec.linears):
            if i:
                layers.append(_relu(spec.relu))
            layers.append(nn.Linear(lin.in_features, lin.out_features, bias=lin.bias))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is None:
            x = x.mean((2, 3))
        elif self.flatten is not None:
            x = self.flatten(self.pool(x))
        elif self.pool_form == "aap2_view":
            x = self.pool(x)
            x = x.view(x.size(0), -1)
        else:
            x = torch.flatten(self.pool(x), 1)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.classifier(x)


BLOCK_CLASSES: dict[str, type[nn.Module]] = {
    "sequential": ConvBlock,
    "residual": ResidualBlock,
    "dense": DenseBlock,
    "inception": InceptionBlock,
}


def _block(spec: BlockSpec | PoolSpec) -> nn.Module:
    if isinstance(spec, PoolSpec):
        return _pool(spec.form)
    return BLOCK_CLASSES[spec.kind](spec)


class CNN(nn.Module):
    """``head(features(stem(x)))``."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.stem = ConvBlock(spec.stem)
        self.features = nn.Sequential(*(_block(b) for b in spec.body))
        self.head = Head(spec.head)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.stem(x)))


# ------------------------------------------------------------------------ building


@torch.no_grad()
def _init_parameters(model: nn.Module, gen: torch.Generator, spec: ArchSpec) -> None:
    """Kaiming-normal weights, small biases, non-trivial BatchNorm statistics."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
            if m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)
        elif isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
            m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
            if spec.signed_gamma:
                m.weight.mul_(torch.where(torch.rand(n, generator=gen) < 0.3, -1.0, 1.0))
            if spec.bias_free:
                m.running_mean.zero_()
                m.bias.zero_()
            else:
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)


def build_model(spec: ArchSpec, seed: int | None = None) -> tuple[nn.Module, Tensor]:
    """Build ``(model in eval mode, float32 input of spec.input_shape)`` deterministically.

    ``seed`` overrides ``spec.seed``. The global torch RNG state is left untouched.
    """
    gen = torch.Generator().manual_seed(spec.seed if seed is None else seed)
    with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
        model = CNN(spec)
    _init_parameters(model, gen, spec)
    x = torch.randn(spec.input_shape, generator=gen)
    return model.eval(), x
