"""The generic propagation rule, from which every LRP variant is built.

For a node ``z = f(x; W, b)`` that is linear in ``x`` apart from its bias (conv, linear, per-channel affine,
average pooling, sums, concatenation), a rule is a list of *terms* ``m = (x_m, W_m, b_m, s_m)`` grouped into
*groups* ``g`` with a coefficient ``c_g``, an optional mask ``M_g(z)`` on the unmodified output and an optional part
``ρ_g(R)`` of the relevance that the group explains (default all of it):

    Z_g   = Σ_{m∈D_g} s_m · f(x_m; W_m, b_m)                               (modified forward pass)
    R_in  = Σ_g c_g Σ_{m∈g} s_m · x_m ⊙ f*(W_m; M_g ⊙ ρ_g(R_out) / stab(Z_g))   (f* = vector–Jacobian product)

This is the generic rule of Montavon et al. (2019, Eq. 5-6) and AGF's Definition 1 (Gur et al. 2021) with
``stab(z) = z + ε·sign(z)`` (``sign(0) = +1``, zennit's convention). The denominator's terms ``D_g`` are the group's
own unless given (RAP sends a share ``Z_a2/(Z_a1 + Z_a2)`` through the negative contributors only). A term's weights
may also be computed per sample from the relevance it explains (RSP's sectional weights ν, Eq. 3). LRP-0, ε, γ,
αβ, z⁺, z^β, w² and flat (:mod:`fxrel.rules.lrp`), RAP's layer rule (:mod:`fxrel.catalog.rap`) and RSP's sectional
rule (:mod:`fxrel.catalog.sectional`) are choices of terms; the rule itself exists once, here.

Stabilisers and the dtype. ``ε`` is an absolute constant (``1e-6`` in the LRP rules, ``1e-9`` in the contrastive
presets and RSP, ``1e-20`` in excitation backprop), but a denominator is computed in the model's dtype, where a
small ``ε`` may not exist: below ``finfo(dtype).tiny``, the smallest normal number (float16: ``6.1e-5``; float32 and
bfloat16: ``1.2e-38``), ``ε`` is subnormal or rounds to 0. Then ``stab(0) = 0`` and ``0/0`` is NaN, or
``R / stab(z)`` with a subnormal ``stab(z)`` overflows to ``inf`` and ``inf · 0`` is NaN further down. So every
stabiliser is raised to the dtype's smallest normal where it falls below it (:func:`stabilizer_for`)::

    stab(z) = z + ε'·sign(z),    ε' = max(ε, finfo(dtype).tiny)

with ``dtype`` the node's output dtype, read at graph-build time from the canonical node's
``meta["tensor_meta"]`` (:func:`dtype_of`; the relevance graph is built per input dtype). Every stabiliser in use
is ≥ ``1e-20`` ≫ ``1.2e-38``, so float32, float64 and bfloat16 denominators are exactly what they were; only
float16 ones change, where ``ε ≥ 6.1e-5`` (float16 resolves ``z`` only to ``4.9e-4`` relative anyway). The
smallest normal rather than the smallest subnormal (``6e-8``): at a dead unit (``z = 0``, relevance ``R``),
``R/6e-8`` overflows float16 from ``R > 4e-3`` on, ``R/6.1e-5`` only from ``R > 4``. ``ε = 0`` (``sdiv``) stays
zero-safe division in every dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx

from fxrel.graphs import ops
from fxrel.rules.base import Rule, RuleContext

InputMod = Callable[[Any, RuleContext], Any]
ParamMod = Callable[[torch.Tensor], torch.Tensor]
SampleWeights = Callable[[RuleContext, list, Any], Any]


def dtype_of(value: Any) -> torch.dtype | None:
    """The dtype of a tensor, of an fx node or of a proxy of a node that carries ``tensor_meta`` (every canonical
    node and its copy in the relevance graph; nodes recorded by rules carry none); ``None`` when unknown."""
    if isinstance(value, torch.Tensor):
        return value.dtype
    node = value.node if isinstance(value, fx.Proxy) else value
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    dtype = getattr(meta, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def stabilizer_for(epsilon: float, dtype: torch.dtype | None, normal: bool = True) -> float:
    """``ε' = max(ε, finfo(dtype).tiny)`` for ``ε > 0``: a stabiliser is never subnormal or zero in the dtype it is
    added in (see the module docstring). ``ε = 0``, an unknown or non-floating dtype: ``ε`` unchanged. Exact for
    every ``ε ≥ 1.2e-38`` in float32, float64 and bfloat16; raises ``ε < 6.1e-5`` to ``6.1e-5`` in float16.
    ``normal=False`` only keeps ``ε`` from rounding to 0: ``ε' = max(ε, finfo.tiny · finfo.eps)``, the smallest
    subnormal (for guards added to quantities that are themselves tiny, Grad-CAM++'s ``2G² + ΣA·G³``)."""
    if epsilon <= 0 or dtype is None or not dtype.is_floating_point:
        return epsilon
    info = torch.finfo(dtype)
    floor = info.tiny if normal else info.tiny * info.eps
    return epsilon if epsilon >= floor else floor


def stabilize(z: Any, epsilon: float, dtype: torch.dtype | None = None, nonnegative: bool = False) -> Any:
    """``z + ε'·sign(z)`` with ``sign(0) = +1``: moves every denominator away from zero by ``ε' = max(ε,
    finfo(dtype).tiny)`` (:func:`stabilizer_for`; ``dtype`` defaults to ``z``'s where known). ``nonnegative``:
    ``z ≥ 0`` by construction (z⁺, flat, w²), so ``stab(z) = z + ε'`` — the same values in one pass over ``z``."""
    epsilon = stabilizer_for(epsilon, dtype or dtype_of(z))
    if nonnegative:
        return z + epsilon
    # = where(z ≥ 0, z + ε', z − ε') bit for bit, 3× faster eagerly: z + 0.0 turns −0.0 into +0.0 (sign(0) = +1)
    return z + torch.copysign(z.new_full((), epsilon), z + 0.0)


def weighted_sum(pairs: Iterable[tuple[float, Any]]) -> Any:
    """``Σ_k c_k t_k`` written without what Python's ``sum`` would put in the generated code: the addition to 0 and
    the products with 1 (two passes over every tensor of every node); ``c = −1`` subtracts. No terms: ``0.0``."""
    total: Any = None
    for coefficient, tensor in pairs:
        if total is None:
            total = tensor if coefficient == 1 else -tensor if coefficient == -1 else coefficient * tensor
        elif coefficient in (1, -1):
            total = total + tensor if coefficient == 1 else total - tensor
        else:
            total = total + coefficient * tensor
    return 0.0 if total is None else total


def divide(relevance: Any, z: Any, epsilon: float, dtype: torch.dtype | None = None,
           nonnegative: bool = False) -> Any:
    """``relevance / stab(z)`` (:func:`stabilize`, ``ε`` raised to the dtype's smallest normal; ``nonnegative``:
    ``z ≥ 0`` by construction); with ``ε = 0`` a zero denominator sends nothing (``sdiv`` of the LRP spec §6) in
    every dtype."""
    if epsilon > 0:
        return relevance / stabilize(z, epsilon, dtype, nonnegative)
    zero = z == 0
    return torch.where(zero, 0.0, relevance / torch.where(zero, 1.0, z))


def identity(x: Any, ctx: RuleContext) -> Any:
    return x


def positive(x: Any, ctx: RuleContext) -> Any:
    return x if ctx.nonnegative else x.clamp(min=0)   # a ReLU's output is its own positive part


def negative(x: Any, ctx: RuleContext) -> Any:
    return x.clamp(max=0)


def ones(x: Any, ctx: RuleContext) -> Any:
    return torch.ones_like(x)


def absolute(x: Any, ctx: RuleContext) -> Any:
    return x.abs()


def positive_relevance(relevance: Any) -> Any:
    """Group part ``R⁺``: the group explains the positive relevance only."""
    return relevance.clamp(min=0)


def negative_relevance(relevance: Any) -> Any:
    """Group part ``R⁻``: the group explains the negative relevance only."""
    return relevance.clamp(max=0)


@dataclass(frozen=True)
class Term:
    """One modified forward pass: an input modifier, a parameter modifier (``tag`` names it for caching) and a
    sign. ``zero_bias`` drops the bias of this term; parameter-free ops ignore ``param``. ``weights`` replaces the
    parameters by per-sample weights ``(ctx, modified inputs, explained relevance) → [N, *W.shape]`` (no bias)."""

    input: InputMod = identity
    param: ParamMod | None = None
    tag: str = "id"
    zero_bias: bool = False
    sign: float = 1.0
    weights: SampleWeights | None = None
    param_sign: int = 0   #: the sign of ``param``'s outputs, bias included: 1 (≥ 0), −1 (≤ 0), 0 (either)


@dataclass(frozen=True)
class Group:
    """Terms sharing one denominator; ``mask`` (on the unmodified output ``z``) gates which outputs use it,
    ``relevance`` picks the part of ``R_out`` the group explains, ``denominator`` the terms summed into ``Z_g``
    (default: the group's terms)."""

    terms: tuple[Term, ...]
    coefficient: float = 1.0
    mask: Callable[[Any], Any] | None = None
    relevance: Callable[[Any], Any] | None = None
    denominator: tuple[Term, ...] | None = None


#: the sign of an input modifier's outputs (``identity`` keeps the input's own: ≥ 0 after a ReLU)
_INPUT_SIGNS: dict[Callable, int] = {positive: 1, negative: -1, absolute: 1, ones: 1}
#: parameter-free linear kinds that map inputs ≥ 0 to outputs ≥ 0 (canonical sums have no negated operand)
_MONOTONE_KINDS = frozenset({ops.ADD, ops.AVGPOOL, ops.CAT, ops.PAD, ops.SHAPE})


def _term_sign(ctx: RuleContext, term: Term) -> int:
    """The sign of a term's contribution ``s_m · f(x_m; W_m, b_m)`` to a denominator when its construction fixes it:
    1 (≥ 0), −1 (≤ 0), 0 (either)."""
    x_sign = _INPUT_SIGNS.get(term.input, 1 if term.input is identity and ctx.nonnegative else 0)
    if term.weights is not None:
        return 0
    if ctx.weight is None:
        w_sign = 1 if ctx.kind in _MONOTONE_KINDS else 0
    else:
        w_sign = term.param_sign if term.param is not None else 0
        if ctx.bias is not None and not term.zero_bias and x_sign != 1:   # the bias, of W's sign, agrees with Wx
            return 0
    return int(x_sign * w_sign * (1 if term.sign > 0 else -1))


@dataclass(repr=False)
class GenericRule(Rule):
    """The generic propagation rule over groups of modified terms (see the module docstring). ``stabilizer`` is
    ``ε``, applied as ``ε' = max(ε, finfo(dtype).tiny)`` in the dtype of the node (:func:`stabilizer_for`)."""

    groups: tuple[Group, ...] = field(default_factory=lambda: (Group((Term(),)),))
    stabilizer: float = 1e-6
    name: str = "generic"

    kinds = ops.LINEAR_KINDS

    def _params(self, ctx: RuleContext, term: Term) -> tuple[Any, Any]:
        if ctx.weight is None:
            return None, None
        weight = ctx.weight if term.param is None else ctx.param("weight", term.tag, term.param)
        if ctx.bias is None or term.zero_bias:
            return weight, None
        bias = ctx.bias if term.param is None else ctx.param("bias", term.tag, term.param)
        return weight, bias

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        parts: list[list[tuple[float, Any]]] = [[] for _ in ctx.inputs]   # (coefficient, x ⊙ g) per input
        shared: dict[Term, tuple] = {}  # modified passes with fixed weights, computed once per node
        for group in self.groups:
            part = relevance if group.relevance is None else group.relevance(relevance)
            passes = {term: self._pass(ctx, term, part, shared)
                      for term in self._live(ctx, group.terms + (group.denominator or ()))}
            denominator = self._live(ctx, group.denominator or group.terms)
            z = weighted_sum((term.sign, passes[term][2]) for term in denominator)
            nonnegative = all(_term_sign(ctx, term) == 1 for term in denominator)
            scaled = divide(part, z, self.stabilizer, dtype_of(ctx.node), nonnegative)   # ε' = max(ε, finfo.tiny)
            if group.mask is not None:
                scaled = scaled * group.mask(ctx.output).to(scaled.dtype)
            for term in self._live(ctx, group.terms):
                xs, w, _ = passes[term]
                grads = ctx.vjp(scaled, w, per_sample=True) if term.weights is not None else ctx.vjp(scaled, w)
                for i, (x, g) in enumerate(zip(xs, grads)):
                    parts[i].append((group.coefficient * term.sign, x * g))
        return [weighted_sum(p) for p in parts]

    @staticmethod
    def _live(ctx: RuleContext, terms: tuple[Term, ...]) -> tuple[Term, ...]:
        """After a ReLU the x⁻ terms are identically zero: leave them out of the graph (same result, less work)."""
        return tuple(t for t in terms if not (t.input is negative and ctx.nonnegative))

    def _pass(self, ctx: RuleContext, term: Term, part: Any, shared: dict[Term, tuple]) -> tuple:
        """``(modified inputs, weights, f(x_m; W_m, b_m))`` of one term."""
        if term in shared:
            return shared[term]
        xs = [term.input(x, ctx) for x in ctx.inputs]
        if term.weights is not None:  # weights computed from the relevance: one pass per group
            w = term.weights(ctx, xs, part)
            return xs, w, ctx.forward(xs, w, per_sample=True)
        w, b = self._params(ctx, term)
        # the unmodified forward pass: reuse the forward node instead of recomputing it
        shared[term] = (xs, w, ctx.output if term == Term() else ctx.forward(xs, w, b))
        return shared[term]

    def __repr__(self) -> str:
        return self.name


def single(term: Term, stabilizer: float, name: str, coefficient: float = 1.0) -> GenericRule:
    """A generic rule with one group of one term."""
    return GenericRule((Group((term,), coefficient),), stabilizer, name)


def split_signs(pos: ParamMod, neg: ParamMod, tag: str, signs: tuple[int, int] = (0, 0)) -> tuple[Term, Term]:
    """The two terms ``(x⁺, pos(W), pos(b))`` and ``(x⁻, neg(W), bias dropped)`` of a sign-split rule; ``signs``
    are those of ``pos``'s and ``neg``'s outputs where known (:attr:`Term.param_sign`)."""
    return (Term(positive, pos, f"{tag}+", param_sign=signs[0]),
            Term(negative, neg, f"{tag}-", zero_bias=True, param_sign=signs[1]))


def rule_terms(rule: GenericRule) -> Sequence[Term]:
    """All terms of a rule (for inspection)."""
    return [t for g in rule.groups for t in g.terms]
