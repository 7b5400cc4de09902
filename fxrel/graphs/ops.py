"""The closed canonical op set: what each kind computes, and its exact vector–Jacobian product.

Every canonical call node has ``node.meta['fxrel_kind']``, one of :data:`KINDS`. For each canonical target this
module gives an :class:`OpSpec` with

* ``inputs(node)``: the node's tensor-valued inputs (the values relevance flows back to);
* ``forward(node, inputs, weight, bias)``: the op applied to (possibly modified) inputs and parameters;
* ``vjp(node, grad, inputs, weight)``: ``(∂f/∂inputs)ᵀ grad`` for each input, written with explicit ops
  (transposed convolution, ``max_pool2d_with_indices_backward`` …), never with autograd;
* for convolutions, ``per_sample``: the same op with one weight tensor per sample (:class:`PerSample`) and the
  per-sample weight VJP ``(∂f/∂W)ᵀ grad`` — what rules whose weights depend on the relevance need (RSP's ν, Eq. 3).

The VJPs keep the batch axis free where the op does (reshapes, spatial means), so a stream may carry several
cotangents per sample folded into the batch axis (:class:`fxrel.rules.batched.Repeated`).

All functions work on real tensors and on ``torch.fx.Proxy`` objects alike, which is how rule templates are
recorded into relevance graphs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx

from fxrel.errors import UnsupportedOpError

aten = torch.ops.aten

# --- kinds -----------------------------------------------------------------------------------------------------
(INPUT, PARAM, CONV, LINEAR, AFFINE, ACTIVATION, MAXPOOL, AVGPOOL, ADD, CAT, SHAPE, PAD, GATE, CENTER, STAT, ATTEND,
 BILINEAR, OUTPUT) = ("input", "param", "conv", "linear", "affine", "activation", "maxpool", "avgpool", "add", "cat",
                      "shape", "pad", "gate", "center", "stat", "attend", "bilinear", "output")
#: Kinds of canonical call nodes, with what they are.
KINDS: dict[str, str] = {
    CONV: "convolution of any stride/padding/dilation/groups (weights w, optional bias b)",
    LINEAR: "fully connected layer x·wᵀ + b",
    AFFINE: "per-channel affine x·scale + shift (an unfolded BatchNorm)",
    ACTIVATION: "elementwise activation (relu, relu6/hardtanh, leaky_relu, elu, sigmoid, tanh, silu, gelu, hardswish, "
                "hardsigmoid, mish, x²)",
    MAXPOOL: "max pooling, a maximum over dims (amax)",
    AVGPOOL: "average / adaptive average pooling, means, bilinear upsampling (convex combinations), bicubic "
             "resampling (a linear map with some negative taps: CrossViT resizes its input), F.fold's sums of "
             "overlapping patches (VOLO's outlook attention)",
    ADD: "elementwise sum of two tensors (residual connections)",
    CAT: "concatenation along one dimension",
    SHAPE: "shape-only op (view, reshape, permute, transpose, squeeze/unsqueeze, clone, slice/split/chunk with any "
           "step, roll, flip)",
    PAD: "copying resampling: zero padding (−∞ before a max-pool), 2-D reflect/replicate padding, nearest "
         "upsampling, constant tokens beside a transformer's patch tokens, F.unfold's patches (im2col), "
         "repeat_interleave, expand, Tensor.unfold's sliding windows, index_select with constant indices (every "
         "output is a copy of one input, or a constant)",
    GATE: "a value times a gate broadcast over some of its dims, value ⊙ gate (squeeze-excitation, 1/σ of a "
          "normalisation, attention weights), or times an activated branch of its own shape (a gated linear unit: "
          "SwiGLU, GEGLU)",
    CENTER: "centering x − mean(x) over a group of dims (the mean subtraction of Layer/GroupNorm)",
    STAT: "a statistic that only ever feeds a gate: 1/σ = (mean(x²) + ε)^(−1/2) of a normalisation, 1/max(‖x‖, ε) "
          "of F.normalize, 1/Σx of a tensor divided by its own sum, 1/b of any other computed divisor, ConvNeXt-V2's "
          "response scale ‖x‖/(mean ‖x‖ + ε), softmax attention weights; rules treat it as a constant (no relevance "
          "flows into it), gradients pass exactly",
    BILINEAR: "a product of two computed tensors: matrices a @ b (attention logits q @ kᵀ that do not go straight "
              "into a softmax: talking heads) or elementwise a ⊙ b, broadcast (gMLP, FocalNet)",
    ATTEND: "attention: values mixed by attention weights, weights @ values (the weights a stat: relevance rules "
            "keep them constant, the AH-rule)",
}
#: Kinds that are linear in their tensor inputs, apart from a bias: the generic propagation rule applies to them.
LINEAR_KINDS = frozenset({CONV, LINEAR, AFFINE, AVGPOOL, ADD, CAT, PAD, SHAPE, CENTER})
#: Kinds with parameters (weight, bias).
PARAM_KINDS = frozenset({CONV, LINEAR, AFFINE})
#: parameter-free sums (residual sums, average pooling, centring): rules split their relevance among the operands
SUM_KINDS = (ADD, AVGPOOL, CENTER)


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """Per-channel affine map ``x·scale + shift``; ``scale``/``shift`` are shaped to broadcast over dim 1."""
    return x * scale if shift is None else x * scale + shift


# --- op specs --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PerSample:
    """An op with one weight tensor per sample, ``weights = [N, *W.shape]`` (no bias). For convolutions these are
    batched matrix products with the im2col patches: ``f(x_n; W_n) = W_n · cols(x_n)``, its VJP ``col2im(W_nᵀ g_n)``,
    and the weight VJP ``g_n · cols(x_n)ᵀ`` (which does not involve ``W``)."""

    forward: Callable[..., Any]        #: (node, inputs, weights) → f(x_n; W_n) for every sample n
    vjp: Callable[..., list[Any]]      #: (node, grad, inputs, weights) → [(∂f(x_n; W_n)/∂x_n)ᵀ grad_n]
    weight_vjp: Callable[..., Any]     #: (node, grad, inputs) → (∂f(x_n; W)/∂W)ᵀ grad_n, shaped [N, *W.shape]


@dataclass(frozen=True)
class OpSpec:
    """How one canonical target computes, and its vector–Jacobian product."""

    kind: str
    inputs: Callable[[fx.Node], list[fx.Node]]
    forward: Callable[..., Any]
    vjp: Callable[..., list[Any]]
    per_sample: PerSample | None = None


_SCHEMA_DEFAULT = object()


def argument(node: fx.Node, name: str, default: Any = _SCHEMA_DEFAULT) -> Any:
    """The value of an ATen call's argument ``name`` — positional or keyword — else ``default``, else the default
    of the op's schema (what ``torch.fx.operator_schemas.normalize_function`` resolves, for one argument)."""
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name == name:
            if i < len(node.args) and not arg.kwarg_only:
                return node.args[i]
            if name in node.kwargs:
                return node.kwargs[name]
            if default is not _SCHEMA_DEFAULT:
                return default
            if arg.has_default_value():
                return arg.default_value
            raise KeyError(f"{node.target} call '{node.name}' gives no argument {name!r}")
    raise KeyError(f"{node.target} has no argument {name!r}")


def _first(node: fx.Node) -> list[fx.Node]:
    return [node.args[0]]


def _shape(node: fx.Node) -> torch.Size:
    return node.meta["tensor_meta"].shape


def _in_shape(node: fx.Node, i: int = 0) -> torch.Size:
    return _shape(node.args[i]) if isinstance(node.args[i], fx.Node) else _shape(node.args[0][i])


@dataclass(frozen=True)
class ConvGeometry:
    """A canonical convolution's geometry: ``aten.convolution``'s arguments and the kernel size."""

    kernel: tuple[int, ...]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    transposed: bool
    output_padding: list[int]
    groups: int
    in_size: tuple[int, ...]     #: spatial size of the input
    out_size: tuple[int, ...]    #: spatial size of the output

    @property
    def pointwise(self) -> bool:
        """A 1×1 (pointwise) convolution."""
        return all(k == 1 for k in self.kernel)

    def transpose_padding(self) -> list[int]:
        """The output padding with which the transposed convolution maps the output size back to the input size
        (the VJP of a strided convolution)."""
        return [i - ((o - 1) * s - 2 * p + d * (k - 1) + 1) for i, o, s, p, d, k in
                zip(self.in_size, self.out_size, self.stride, self.padding, self.dilation, self.kernel)]


def conv_geometry(node: fx.Node) -> ConvGeometry:
    """The typed view of a canonical convolution node."""
    _, weight, _, stride, padding, dilation, transposed, output_padding, groups = node.args
    return ConvGeometry(tuple(_shape(weight)[2:]), list(stride), list(padding), list(dilation), bool(transposed),
                        list(output_padding), int(groups), tuple(_in_shape(node)[2:]), tuple(_shape(node)[2:]))


def _conv_forward(node, inputs, weight, bias):
    g = conv_geometry(node)
    return aten.convolution.default(inputs[0], weight, bias, g.stride, g.padding, g.dilation, g.transposed,
                                    g.output_padding, g.groups)


def _weight_shape(node: fx.Node) -> torch.Size:
    return node.args[1].meta["tensor_meta"].shape


def _conv_vjp(node, grad, inputs, weight):
    g = conv_geometry(node)
    return [aten.convolution.default(grad, weight, None, g.stride, g.padding, g.dilation, True,
                                     g.transpose_padding(), g.groups)]


def _geometry(node: fx.Node) -> tuple[list[int], list[int], list[int], list[int], int]:
    """(kernel, dilation, padding, stride, groups) of a 2-D convolution (per-sample weights need im2col)."""
    g = conv_geometry(node)
    if len(g.kernel) != 2:
        raise UnsupportedOpError(f"per-sample weights are implemented for 2-D convolutions; node '{node.name}' is a "
                                 f"{len(g.kernel)}-D convolution (module '{node.meta.get('fxrel_module', '')}')")
    return list(g.kernel), g.dilation, g.padding, g.stride, g.groups


def _grouped(node: fx.Node, t, channels: int):
    """``[N, channels, …] → [N, groups, channels/groups, rest]`` (``N`` as the tensor has it: streams may carry
    several rows per sample)."""
    groups = conv_geometry(node).groups
    return t.unflatten(1, (groups, channels // groups)).flatten(3)


def _patches(node: fx.Node, x):
    """im2col of the input, by group: ``[N, groups, C/groups·kh·kw, L]`` (``L`` output positions)."""
    k, dilation, padding, stride, _ = _geometry(node)
    return _grouped(node, aten.im2col.default(x, k, dilation, padding, stride), _in_shape(node)[1] * k[0] * k[1])


def _conv_per_sample_forward(node, inputs, weights):
    out_channels = _weight_shape(node)[0]
    out = aten.matmul.default(_grouped(node, weights, out_channels), _patches(node, inputs[0]))
    return out.reshape(-1, *_shape(node)[1:])


def _conv_per_sample_vjp(node, grad, inputs, weights):
    k, dilation, padding, stride, _ = _geometry(node)
    out_channels = _weight_shape(node)[0]
    cols = aten.matmul.default(_grouped(node, weights, out_channels).transpose(-1, -2),
                               _grouped(node, grad, out_channels))
    c, positions = _in_shape(node)[1], math.prod(_shape(node)[2:])
    return [aten.col2im.default(cols.reshape(-1, c * k[0] * k[1], positions), list(_in_shape(node)[2:]), k, dilation,
                                padding, stride)]


def _conv_weight_vjp(node, grad, inputs):
    out_channels = _weight_shape(node)[0]
    nu = aten.matmul.default(_grouped(node, grad, out_channels), _patches(node, inputs[0]).transpose(-1, -2))
    return nu.reshape(-1, *_weight_shape(node))


def _linear_forward(node, inputs, weight, bias):
    return aten.linear.default(inputs[0], weight, bias)


def _linear_vjp(node, grad, inputs, weight):
    return [aten.matmul.default(grad, weight)]


def _affine_forward(node, inputs, weight, bias):
    return channel_affine(inputs[0], weight, bias)


def _affine_vjp(node, grad, inputs, weight):
    return [grad * weight]


def _maxpool_forward(node, inputs, weight=None, bias=None):
    return aten.max_pool2d.default(inputs[0], *node.args[1:])


def _maxpool_vjp(node, grad, inputs, weight=None):
    k, s, p, d, ceil = _pool_args(node)
    _, indices = aten.max_pool2d_with_indices.default(inputs[0], k, s, p, d, ceil)
    return [aten.max_pool2d_with_indices_backward.default(grad, inputs[0], k, s, p, d, ceil, indices)]


def _pool_args(node: fx.Node) -> tuple:
    """(kernel, stride, padding, dilation, ceil_mode) of a max_pool2d node, defaults filled in."""
    k = list(argument(node, "kernel_size"))
    s = list(argument(node, "stride", None) or k)
    p = list(argument(node, "padding", None) or [0, 0])
    d = list(argument(node, "dilation", None) or [1, 1])
    return k, s, p, d, bool(argument(node, "ceil_mode", False))


def _avgpool_forward(node, inputs, weight=None, bias=None):
    return node.target(inputs[0], *node.args[1:], **node.kwargs)


def _avgpool_vjp(node, grad, inputs, weight=None):
    x = inputs[0]
    if node.target is aten.adaptive_avg_pool2d.default:
        return [aten._adaptive_avg_pool2d_backward.default(grad, x)]
    if node.target is aten.avg_pool2d.default:
        defaults = dict(stride=[], padding=[0, 0], ceil_mode=False, count_include_pad=True, divisor_override=None)
        a = {name: argument(node, name, defaults.get(name)) for name in ("kernel_size", *defaults)}
        stride = a["stride"] or a["kernel_size"]
        return [aten.avg_pool2d_backward.default(grad, x, a["kernel_size"], stride, a["padding"], a["ceil_mode"],
                                                 a["count_include_pad"], a["divisor_override"])]
    # aten.mean.dim(x, dims, keepdim)
    shape = _in_shape(node)
    dims = {d % len(shape) for d in node.args[1]}
    count = math.prod(shape[d] for d in dims)
    g = _unreduced(grad, node, dims, argument(node, "keepdim", False))
    # the reduced dims expanded back; the others keep the cotangent's size (the batch axis, wherever it is, may hold
    # several rows per sample)
    return [g.expand(*[shape[d] if d in dims else -1 for d in range(len(shape))]) / count]


def _unreduced(grad, node: fx.Node, dims: Sequence[int], keepdim: bool):
    """The cotangent of a reduction over ``dims`` with those dims back as size 1 (as ``keepdim=True`` leaves them)."""
    if not keepdim:
        for d in sorted(d % len(_in_shape(node)) for d in dims):
            grad = grad.unsqueeze(d)
    return grad


def _add_inputs(node: fx.Node) -> list[fx.Node]:
    return [node.args[0], node.args[1]]


def _add_forward(node, inputs, weight=None, bias=None):
    return inputs[0] + inputs[1]


def channel_gate(value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``value ⊙ gate`` with the gate broadcast over the dims where it has size 1 (squeeze-excitation)."""
    return value * gate


def gated_unit(value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``value ⊙ act(x W_g)`` of a gated linear unit, both of one shape (SwiGLU, GEGLU): a gate for CP-LRP and the
    gradient, a product of two computed tensors for AttnLRP's uniform rule (its own target, so rules can tell)."""
    return value * gate


def _gate_forward(node, inputs, weight=None, bias=None):
    return inputs[0] * inputs[1]


def _gate_vjp(node, grad, inputs, weight=None):
    value, gate = _in_shape(node, 0), _in_shape(node, 1)
    dims = [d for d in range(1, len(value)) if gate[d] == 1 and value[d] != 1]
    to_gate = grad * inputs[0]
    return [grad * inputs[1], to_gate.sum(dims, keepdim=True) if dims else to_gate]  # sum([]) would reduce all


def center(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``x − mean(x)`` over ``dims`` (LayerNorm/GroupNorm's mean subtraction; a symmetric linear map)."""
    return x - x.mean(dims, keepdim=True)


def _center_forward(node, inputs, weight=None, bias=None):
    return center(inputs[0], node.args[1])


def _center_vjp(node, grad, inputs, weight=None):
    return [center(grad, node.args[1])]   # the centering matrix is symmetric


def inv_std(x: torch.Tensor, dims: list[int], eps: float, correction: int | None = None) -> torch.Tensor:
    """``(m + ε)^(−1/2)`` over ``dims`` (kept as size 1) with ``m = mean(x²)`` (RMSNorm; 1/σ of an already centred
    ``x``), or with ``correction`` given, ``m`` = the variance ``Σ(x − x̄)²/(n − correction)``."""
    m = (x * x).mean(dims, keepdim=True) if correction is None else x.var(dims, correction=correction, keepdim=True)
    return torch.rsqrt(m + eps)


def _inv_std_forward(node, inputs, weight=None, bias=None):
    return inv_std(inputs[0], *node.args[1:])


def _inv_std_vjp(node, grad, inputs, weight=None):
    """``∂r/∂x_i = −r³ x_i / n``, or ``−r³ (x_i − x̄)/(n − correction)`` for a variance."""
    x, dims = inputs[0], node.args[1]
    correction = node.args[3] if len(node.args) > 3 else None
    shape = _in_shape(node)
    count = math.prod(shape[d] for d in dims)
    r = inv_std(x, *node.args[1:])
    if correction is not None:
        x, count = center(x, dims), count - correction
    return [grad * r * r * r * x / -count]


def inv_norm(x: torch.Tensor, dims: list[int], floor: float) -> torch.Tensor:
    """``1 / max(‖x‖₂, floor)`` over ``dims`` (kept as size 1): the divisor of ``F.normalize`` (XCiT's and
    EdgeNeXt's cross-covariance attention normalise q and k)."""
    return 1 / torch.linalg.vector_norm(x, 2, dims, keepdim=True).clamp_min(floor)


def _inv_norm_forward(node, inputs, weight=None, bias=None):
    return inv_norm(inputs[0], *node.args[1:])


def _inv_norm_vjp(node, grad, inputs, weight=None):
    """``−x / ‖x‖³ · g`` where ``‖x‖ > floor``, 0 where the floor holds (as autograd's ``clamp_min``)."""
    x, dims, floor = inputs[0], node.args[1], node.args[2]
    norm = torch.linalg.vector_norm(x, 2, dims, keepdim=True)
    live = (norm > floor).to(x.dtype)
    safe = norm.clamp_min(floor)
    return [-(x / (safe * safe * safe)) * (grad * live)]


def inv_sum(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``1 / Σ x`` over ``dims`` (kept as size 1): the divisor of a tensor normalised by its own sum (ConViT
    renormalises its mixture of content and position attention, ``a / Σ_keys a``)."""
    return 1 / x.sum(dims, keepdim=True)


def _inv_sum_forward(node, inputs, weight=None, bias=None):
    return inv_sum(inputs[0], node.args[1])


def _inv_sum_vjp(node, grad, inputs, weight=None):
    """``−g / (Σx)²``, the same for every summed entry."""
    total = inputs[0].sum(node.args[1], keepdim=True)
    return [(-grad / (total * total)).expand_as(inputs[0])]


def inverse(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` of a computed divisor that is not a normaliser's own pattern (EfficientViT's linear attention divides
    ``q·Σ_n k_nᵀ v_n`` by ``q·Σ_n k_nᵀ + ε``): for the rules a constant gate, as LayerNorm's σ is."""
    return 1 / x


def _inverse_forward(node, inputs, weight=None, bias=None):
    return inverse(inputs[0])


def _inverse_vjp(node, grad, inputs, weight=None):
    """``−g / x²``."""
    return [-grad / (inputs[0] * inputs[0])]


def response_scale(x: torch.Tensor, dims: list[int], channel_dims: list[int], eps: float) -> torch.Tensor:
    """ConvNeXt-V2's global response normalisation scale ``n = g / (mean_c g + ε)``, ``g = ‖x‖₂`` over ``dims``."""
    g = torch.linalg.vector_norm(x, 2, dims, keepdim=True)
    return g / (g.mean(channel_dims, keepdim=True) + eps)


def _response_scale_forward(node, inputs, weight=None, bias=None):
    return response_scale(inputs[0], *node.args[1:])


def _response_scale_vjp(node, grad, inputs, weight=None):
    """``(x/g) ⊙ (u − mean_c(u ⊙ n)) / (mean_c g + ε)`` for the incoming ``u``; ``x/g`` is 0 where ``g = 0``."""
    x, dims, channel_dims, eps = inputs[0], *node.args[1:]
    g = torch.linalg.vector_norm(x, 2, dims, keepdim=True)
    denominator = g.mean(channel_dims, keepdim=True) + eps
    n = g / denominator
    direction = torch.where(g == 0, 0.0, x / torch.where(g == 0, 1.0, g))
    return [direction * (grad - (grad * n).mean(channel_dims, keepdim=True)) / denominator]


def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """``softmax(q kᵀ · scale + bias)`` over the keys (scaled dot-product attention's weights; ``bias``: a constant
    attention bias or additive mask, −∞ where masked)."""
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.softmax(logits if bias is None else logits + bias, -1)


def _attention_weights_forward(node, inputs, weight=None, bias=None):
    return attention_weights(inputs[0], inputs[1], node.args[2], weight)   # the attention bias is the weight


def unbroadcast(t, node: fx.Node, i: int):
    """``t`` summed over the non-batch dims along which input ``i`` of ``node`` was broadcast (multi-query
    attention shares one key/value head among all query heads)."""
    shape = _in_shape(node, i)
    dims = [d for d in range(1, len(shape)) if shape[d] == 1]
    return t.sum(dims, keepdim=True) if dims else t


def _attention_weights_vjp(node, grad, inputs, weight=None):
    q, k = inputs
    a = attention_weights(q, k, node.args[2], weight)
    logits_grad = a * (grad - (grad * a).sum(-1, keepdim=True)) * node.args[2]
    return [unbroadcast(torch.matmul(logits_grad, k), node, 0),
            unbroadcast(torch.matmul(logits_grad.transpose(-2, -1), q), node, 1)]


def attend(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights @ values``: each query's output, the weighted mean of the values."""
    return torch.matmul(weights, values)


def _attend_forward(node, inputs, weight=None, bias=None):
    return attend(inputs[0], inputs[1])


def _matmul_cotangents(grad, a, b) -> tuple:
    """``(∂(a b)/∂a)ᵀ g = g bᵀ`` and ``(∂(a b)/∂b)ᵀ g = aᵀ g`` of a batched matrix product."""
    return torch.matmul(grad, b.transpose(-2, -1)), torch.matmul(a.transpose(-2, -1), grad)


def _attend_vjp(node, grad, inputs, weight=None):
    values, weights = inputs   # z = weights @ values
    to_weights, to_values = _matmul_cotangents(grad, weights, values)
    return [unbroadcast(to_values, node, 0), unbroadcast(to_weights, node, 1)]


def bilinear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of two computed tensors (batched matrices)."""
    return torch.matmul(a, b)


def _bilinear_product_forward(node, inputs, weight=None, bias=None):
    return bilinear(inputs[0], inputs[1])


def _bilinear_product_vjp(node, grad, inputs, weight=None):
    return [unbroadcast(g, node, i) for i, g in enumerate(_matmul_cotangents(grad, *inputs))]


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a ⊙ b`` of two computed tensors, broadcast (gMLP's spatial gating, FocalNet's modulation)."""
    return a * b


def _product_forward(node, inputs, weight=None, bias=None):
    return product(inputs[0], inputs[1])


def _product_vjp(node, grad, inputs, weight=None):
    return [_to_operand(grad * inputs[1], node, 0), _to_operand(grad * inputs[0], node, 1)]


def _amax_forward(node, inputs, weight=None, bias=None):
    return aten.amax.default(inputs[0], *node.args[1:])


def _amax_vjp(node, grad, inputs, weight=None):
    """To the maxima, shared evenly among ties (autograd's convention)."""
    x, dims = inputs[0], node.args[1]
    winners = (x == aten.amax.default(x, dims, True)).to(x.dtype)
    g = _unreduced(grad, node, dims, node.args[2] if len(node.args) > 2 else False)
    return [winners * g / winners.sum(dims, keepdim=True)]


def _softmax_forward(node, inputs, weight=None, bias=None):
    return aten.softmax.int(inputs[0], node.args[1])


def _softmax_vjp(node, grad, inputs, weight=None):
    s = aten.softmax.int(inputs[0], node.args[1])
    return [s * (grad - (grad * s).sum(node.args[1], keepdim=True))]


def _sum_to(grad, shape: torch.Size):
    """Reduce a broadcast gradient back to ``shape``."""
    return aten.sum_to_size.default(grad, list(shape))


def _to_operand(grad, node: fx.Node, i: int):
    """A cotangent of an elementwise op's output, summed to the shape of its operand ``i`` (broadcast)."""
    return grad if _in_shape(node, i) == _shape(node) else _sum_to(grad, _in_shape(node, i))


def _add_vjp(node, grad, inputs, weight=None):
    return [_to_operand(grad, node, i) for i in range(2)]


def _expanded_dims(node: fx.Node) -> list[int]:
    """The dims an ``expand`` broadcasts (size 1 → n), never the batch axis (whose cotangent may hold several rows
    per sample)."""
    batch = node.meta.get("fxrel_batch_axis")
    before, after = _in_shape(node), _shape(node)
    return [d for d in range(len(after)) if before[d] == 1 and after[d] != 1 and (batch is None or d != batch.axis)]


def _expand_forward(node, inputs, weight=None, bias=None):
    dims = _expanded_dims(node)
    return inputs[0].expand([n if d in dims else -1 for d, n in enumerate(node.args[1])])


def _expand_vjp(node, grad, inputs, weight=None):
    dims = _expanded_dims(node)
    return [grad.sum(dims, keepdim=True) if dims else grad]


def _cat_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.args[0])


def _cat_dim(node: fx.Node) -> int:
    dim = argument(node, "dim", 0)
    return dim % len(_shape(node))


def _cat_forward(node, inputs, weight=None, bias=None):
    return aten.cat.default(list(inputs), _cat_dim(node))


def _cat_vjp(node, grad, inputs, weight=None):
    dim = _cat_dim(node)
    bounds = [0]
    for a in node.args[0]:
        bounds.append(bounds[-1] + _shape(a)[dim])
    return [aten.slice.Tensor(grad, dim, lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def _shape_forward(node, inputs, weight=None, bias=None):
    return node.target(inputs[0], *node.args[1:], **node.kwargs)


def _shape_vjp(node, grad, inputs, weight=None):
    if node.target is aten.permute.default:
        order = [d % len(_shape(node)) for d in node.args[1]]
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return [aten.permute.default(grad, inverse)]
    if node.target is aten.transpose.int:
        return [aten.transpose.int(grad, node.args[1], node.args[2])]
    if node.target is aten.slice.Tensor:  # canonical slices: not along the batch axis; zeros elsewhere
        dim, start, end = node.args[1:4]
        step = node.args[4] if len(node.args) > 4 else 1
        rank = len(_shape(node))
        if step > 1:   # interleave step − 1 zeros after every entry: [.., L, ..] → [.., L·step, ..]
            spread = aten.unsqueeze.default(grad, dim + 1)
            spread = aten.constant_pad_nd.default(spread, [0, 0] * (rank - 1 - dim) + [0, step - 1], 0.0)
            grad = aten.flatten.using_ints(spread, dim, dim + 1)
            end = start + _shape(node)[dim] * step
        pads = [0, 0] * (rank - 1 - dim) + [start, _in_shape(node)[dim] - end]   # negative: crops
        return [aten.constant_pad_nd.default(grad, pads, 0.0)]
    if node.target is aten.roll.default:
        return [aten.roll.default(grad, [-s for s in node.args[1]], node.args[2])]
    if node.target is aten.flip.default:
        return [aten.flip.default(grad, node.args[1])]
    shape = list(_in_shape(node))
    if shape and _shape(node) and shape[0] == _shape(node)[0]:  # the reshape keeps the batch axis: so does its VJP
        shape[0] = -1
    return [aten.reshape.default(grad, shape)]


def _pad_forward(node, inputs, weight=None, bias=None):
    return aten.constant_pad_nd.default(inputs[0], node.args[1], node.args[2])


def _mode_pad_forward(node, inputs, weight=None, bias=None):
    return aten.pad.default(inputs[0], node.args[1], node.args[2])


def _mode_pad_vjp(node, grad, inputs, weight=None):
    backward = {"reflect": aten.reflection_pad2d_backward.default,
                "replicate": aten.replication_pad2d_backward.default}[node.args[2]]
    return [backward(grad, inputs[0], node.args[1])]


def _cotangent_in_shape(node: fx.Node, grad) -> list[int]:
    """The input's shape with the batch size of the cotangent ``grad`` (its batch axis may hold several relevance
    rows per sample): the ``input_size`` that ATen's backward ops take."""
    return [grad.size(0), *_in_shape(node)[1:]]


def _upsample_forward(node, inputs, weight=None, bias=None):
    return aten.upsample_nearest2d.vec(inputs[0], *node.args[1:])


def _upsample_vjp(node, grad, inputs, weight=None):
    scales = node.args[2] if len(node.args) > 2 and node.args[2] is not None else (None, None)
    return [aten.upsample_nearest2d_backward.default(grad, list(_shape(node)[2:]), _cotangent_in_shape(node, grad),
                                                     *scales)]


def _interpolate_forward(node, inputs, weight=None, bias=None):
    return node.target(inputs[0], *node.args[1:])


def _interpolate_vjp(node, grad, inputs, weight=None):
    """Bilinear or bicubic resampling: its ATen backward (a linear map's transpose)."""
    _, align_corners, scales = node.args[1:4]
    input_size = _cotangent_in_shape(node, grad)
    backward = {aten.upsample_bilinear2d.vec: aten.upsample_bilinear2d_backward.default,
                aten.upsample_bicubic2d.vec: aten.upsample_bicubic2d_backward.default}[node.target]
    return [backward(grad, list(_shape(node)[2:]), input_size, align_corners, *(scales or (None, None)))]


def _unfold_forward(node, inputs, weight=None, bias=None):
    return aten.im2col.default(inputs[0], *node.args[1:])


def _unfold_vjp(node, grad, inputs, weight=None):
    """``F.unfold``'s transpose, ``F.fold`` (every patch entry back to its pixel, overlaps summed)."""
    kernel, dilation, padding, stride = node.args[1:5]
    return [aten.col2im.default(grad, list(_in_shape(node)[2:]), kernel, dilation, padding, stride)]


def _take_forward(node, inputs, weight=None, bias=None):
    """The indices arrive as ``weight`` (:func:`weight_and_bias`)."""
    return aten.index_select.default(inputs[0], node.args[1], weight)


def _take_vjp(node, grad, inputs, weight=None):
    """Each output a copy of the input entry it names: the cotangents summed back onto those entries."""
    return [aten.index_select_backward.default(grad, _cotangent_in_shape(node, grad), node.args[1], weight)]


def _fold_forward(node, inputs, weight=None, bias=None):
    return aten.col2im.default(inputs[0], *node.args[1:])


def _fold_vjp(node, grad, inputs, weight=None):
    """``F.fold``'s transpose, ``F.unfold`` (each patch entry reads its pixel)."""
    _, kernel, dilation, padding, stride = node.args[1:6]
    return [aten.im2col.default(grad, kernel, dilation, padding, stride)]


def _repeat_interleave_forward(node, inputs, weight=None, bias=None):
    return aten.repeat_interleave.self_int(inputs[0], *node.args[1:])


def _repeat_interleave_vjp(node, grad, inputs, weight=None):
    """Each entry repeated ``r`` times along ``dim``: the cotangent's ``r`` copies summed."""
    repeats, dim = node.args[1], node.args[2] % len(_shape(node))
    shape = list(_in_shape(node))
    return [grad.unflatten(dim, (shape[dim], repeats)).sum(dim + 1)]


def _sliding_windows_forward(node, inputs, weight=None, bias=None):
    return aten.unfold.default(inputs[0], *node.args[1:])


def _sliding_windows_vjp(node, grad, inputs, weight=None):
    """Each window a copy of ``size`` entries along ``dim``: the copies' cotangents summed back (overlaps add)."""
    dim, size, step = node.args[1:]
    return [aten.unfold_backward.default(grad, _cotangent_in_shape(node, grad), dim, size, step)]


def with_tokens(x: torch.Tensor, before: torch.Tensor | None, after: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``cat([before, x, after], dim)`` with constant tokens ``before``/``after``: a transformer's class,
    distillation and register tokens entering beside the patch tokens. Tokens of batch size 1 (``dim ≠ 0``) are
    expanded to ``x``'s. Copying, like padding: each output is an entry of ``x`` or a constant, so the relevance that
    reaches a constant is absorbed there, as a bias's is."""
    before = [] if before is None else [_batched_token(before, before.shape, x, dim)]
    after = [] if after is None else [_batched_token(after, after.shape, x, dim)]
    return torch.cat([*before, x, *after], dim)


def _batched_token(token, shape: Sequence[int], x, dim: int):
    """``token`` (shaped ``shape``) expanded to ``x``'s batch when it has batch size 1 and is not concatenated along
    the batch axis."""
    return token.expand(x.shape[0], *shape[1:]) if shape[0] == 1 and dim != 0 else token


def _with_tokens_forward(node, inputs, weight=None, bias=None):
    """The tokens arrive as ``weight`` (before) and ``bias`` (after) (:func:`weight_and_bias`); their shapes are read
    from the node's arguments (a proxy has no concrete shape)."""
    x, dim = inputs[0], node.args[3]
    before = [] if weight is None else [_batched_token(weight, _shape(node.args[1]), x, dim)]
    after = [] if bias is None else [_batched_token(bias, _shape(node.args[2]), x, dim)]
    return aten.cat.default([*before, x, *after], dim)


def _with_tokens_vjp(node, grad, inputs, weight=None):
    before, _, dim = node.args[1:]
    start = _shape(before)[dim] if before is not None else 0
    return [aten.slice.Tensor(grad, dim, start, start + _in_shape(node)[dim])]


def _pad_vjp(node, grad, inputs, weight=None):
    pads = list(node.args[1])
    return [aten.constant_pad_nd.default(grad, [-p for p in pads], 0.0)]


def _activation_forward(node, inputs, weight=None, bias=None):
    return node.target(inputs[0], *node.args[1:], **node.kwargs)


def _gelu_derivative(x, approximate: str):
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        inner = c * (x + 0.044715 * x * x * x)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


#: autograd's hardsigmoid backward multiplies by 1/6 rounded to float32, in every dtype
_SIXTH = float(torch.tensor(1 / 6, dtype=torch.float32))


def activation_derivative(node: fx.Node, x):
    """``f'(x)`` of an activation node, elementwise, matching autograd's convention at kinks."""
    t = node.target
    if t is aten.relu.default:
        return (x > 0).to(x.dtype)
    if t is aten.hardtanh.default:
        lo = argument(node, "min_val", -1.0)
        hi = argument(node, "max_val", 1.0)
        return ((x > lo) & (x < hi)).to(x.dtype)
    if t is aten.leaky_relu.default:
        slope = argument(node, "negative_slope", 0.01)
        return (x > 0).to(x.dtype) * (1 - slope) + slope   # in x's dtype (a float32 slope would round)
    if t is aten.elu.default:
        alpha, scale, input_scale = (list(node.args[1:]) + [1.0, 1.0, 1.0])[:3]
        return torch.where(x > 0, scale, alpha * scale * input_scale * torch.exp(x * input_scale)).to(x.dtype)
    if t is aten.sigmoid.default:
        s = torch.sigmoid(x)
        return s * (1 - s)
    if t is aten.tanh.default:
        th = torch.tanh(x)
        return 1 - th * th
    if t is aten.silu.default:
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if t is aten.gelu.default:
        return _gelu_derivative(x, node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none"))
    if t is aten.hardsigmoid.default:
        return ((x > -3) & (x < 3)).to(x.dtype) * _SIXTH
    if t is aten.hardswish.default:  # autograd: 0 up to −3 (inclusive), x/3 + ½ below 3, 1 from 3 on
        return torch.where(x <= -3, 0.0, torch.where(x < 3, x / 3 + 0.5, 1.0)).to(x.dtype)
    if t is aten.pow.Tensor_Scalar:   # x² (StarReLU's square of a ReLU)
        return 2 * x
    if t is aten.mish.default:
        softplus = torch.nn.functional.softplus(x)
        th = torch.tanh(softplus)
        return th + x * (1 - th * th) * torch.sigmoid(x)
    raise KeyError(t)


def _activation_vjp(node, grad, inputs, weight=None):
    return [grad * activation_derivative(node, inputs[0])]


ACTIVATIONS = (aten.relu.default, aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default,
               aten.sigmoid.default, aten.tanh.default, aten.silu.default, aten.gelu.default, aten.hardswish.default,
               aten.hardsigmoid.default, aten.mish.default)
SHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
             aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
             aten.squeeze.default, aten.clone.default, aten.alias.default, aten.flatten.using_ints)

OP_SPECS: dict[Any, OpSpec] = {
    aten.convolution.default: OpSpec(CONV, _first, _conv_forward, _conv_vjp,
                                     PerSample(_conv_per_sample_forward, _conv_per_sample_vjp, _conv_weight_vjp)),
    aten.linear.default: OpSpec(LINEAR, _first, _linear_forward, _linear_vjp),
    channel_affine: OpSpec(AFFINE, _first, _affine_forward, _affine_vjp),
    aten.max_pool2d.default: OpSpec(MAXPOOL, _first, _maxpool_forward, _maxpool_vjp),
    aten.avg_pool2d.default: OpSpec(AVGPOOL, _first, _avgpool_forward, _avgpool_vjp),
    aten.adaptive_avg_pool2d.default: OpSpec(AVGPOOL, _first, _avgpool_forward, _avgpool_vjp),
    aten.mean.dim: OpSpec(AVGPOOL, _first, _avgpool_forward, _avgpool_vjp),
    aten.add.Tensor: OpSpec(ADD, _add_inputs, _add_forward, _add_vjp),
    channel_gate: OpSpec(GATE, _add_inputs, _gate_forward, _gate_vjp),
    gated_unit: OpSpec(GATE, _add_inputs, _gate_forward, _gate_vjp),
    aten.cat.default: OpSpec(CAT, _cat_inputs, _cat_forward, _cat_vjp),
    aten.constant_pad_nd.default: OpSpec(PAD, _first, _pad_forward, _pad_vjp),
    aten.pad.default: OpSpec(PAD, _first, _mode_pad_forward, _mode_pad_vjp),
    aten.upsample_nearest2d.vec: OpSpec(PAD, _first, _upsample_forward, _upsample_vjp),
    with_tokens: OpSpec(PAD, _first, _with_tokens_forward, _with_tokens_vjp),
    aten.im2col.default: OpSpec(PAD, _first, _unfold_forward, _unfold_vjp),
    aten.col2im.default: OpSpec(AVGPOOL, _first, _fold_forward, _fold_vjp),
    aten.index_select.default: OpSpec(PAD, _first, _take_forward, _take_vjp),
    aten.repeat_interleave.self_int: OpSpec(PAD, _first, _repeat_interleave_forward, _repeat_interleave_vjp),
    aten.expand.default: OpSpec(PAD, _first, _expand_forward, _expand_vjp),
    aten.unfold.default: OpSpec(PAD, _first, _sliding_windows_forward, _sliding_windows_vjp),
    aten.upsample_bilinear2d.vec: OpSpec(AVGPOOL, _first, _interpolate_forward, _interpolate_vjp),
    aten.upsample_bicubic2d.vec: OpSpec(AVGPOOL, _first, _interpolate_forward, _interpolate_vjp),
    center: OpSpec(CENTER, _first, _center_forward, _center_vjp),
    inv_std: OpSpec(STAT, _first, _inv_std_forward, _inv_std_vjp),
    response_scale: OpSpec(STAT, _first, _response_scale_forward, _response_scale_vjp),
    inv_norm: OpSpec(STAT, _first, _inv_norm_forward, _inv_norm_vjp),
    inv_sum: OpSpec(STAT, _first, _inv_sum_forward, _inv_sum_vjp),
    inverse: OpSpec(STAT, _first, _inverse_forward, _inverse_vjp),
    aten.softmax.int: OpSpec(STAT, _first, _softmax_forward, _softmax_vjp),
    attention_weights: OpSpec(STAT, _add_inputs, _attention_weights_forward, _attention_weights_vjp),
    attend: OpSpec(ATTEND, _add_inputs, _attend_forward, _attend_vjp),
    **{t: OpSpec(ACTIVATION, _first, _activation_forward, _activation_vjp) for t in ACTIVATIONS},
    **{t: OpSpec(SHAPE, _first, _shape_forward, _shape_vjp) for t in SHAPE_OPS},
    aten.slice.Tensor: OpSpec(SHAPE, _first, _shape_forward, _shape_vjp),
    aten.roll.default: OpSpec(SHAPE, _first, _shape_forward, _shape_vjp),
    aten.flip.default: OpSpec(SHAPE, _first, _shape_forward, _shape_vjp),
    bilinear: OpSpec(BILINEAR, _add_inputs, _bilinear_product_forward, _bilinear_product_vjp),
    product: OpSpec(BILINEAR, _add_inputs, _product_forward, _product_vjp),
    aten.amax.default: OpSpec(MAXPOOL, _first, _amax_forward, _amax_vjp),
    aten.pow.Tensor_Scalar: OpSpec(ACTIVATION, _first, _activation_forward, _activation_vjp),
}


def spec_of(node: fx.Node) -> OpSpec:
    """The :class:`OpSpec` of a canonical call node."""
    return OP_SPECS[node.target]


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued inputs of a canonical node (what relevance is sent back to)."""
    return spec_of(node).inputs(node)


def weight_and_bias(node: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """The ``get_attr`` nodes holding a parametrised node's weight and bias (``None`` where absent); for
    ``with_tokens``, its tokens before and after; for ``attention_weights``, its attention bias (as the weight); for
    ``index_select``, its indices (as the weight)."""
    if node.target is with_tokens:   # its constant tokens (before, after)
        return node.args[1], node.args[2]
    if node.target is aten.index_select.default:   # its constant indices, as the weight
        return node.args[2], None
    if node.target is attention_weights:   # its attention bias, as the weight
        return (node.args[3] if len(node.args) > 3 else None), None
    kind = node.meta.get("fxrel_kind")
    if kind not in PARAM_KINDS:
        return None, None
    return node.args[1], node.args[2]


def is_spatial_mean(dims: Sequence[int], rank: int) -> bool:
    """True when ``dims`` reduce only spatial axes (not batch or channel)."""
    return all(d % rank >= 2 for d in dims)
