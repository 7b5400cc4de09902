"""Composites: which rule each canonical node gets.

A :class:`Composite` is an ordered list of ``(matcher, rule)`` pairs; the first pair whose matcher accepts a node
and whose rule can handle the node's kind decides its rule (like zennit's layer-map composites). A pattern that
selects whole modules (:func:`module`, :func:`where`, :func:`node_name`) applies its rule to the nodes of those modules
that the rule can handle (a conv rule skips the module's ReLU); a rule given for an explicit kind it cannot handle
(``kind("maxpool")`` with ``ZPlus``) is an error. Matchers select nodes by kind (:func:`kind`), by the name of
the module they came from (:func:`module`, glob patterns), by an arbitrary predicate (:func:`where`), by being
the first/last parametrised layer (:func:`first`, :func:`last`), by following the last one
(:func:`after_last`), or by reading a model input (:func:`reads_input`).
``composite.plan(graph)`` returns the :class:`RulePlan`, the node → rule table that a relevance graph is built from.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from torch import fx

from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.rules.attention import AttentionWeightsTaylor, SoftmaxTaylor, UniformProduct
from fxrel.rules.base import Rule
from fxrel.rules.gradient import AttentionAsWeights, GateAsWeight, Gradient
from fxrel.text import format_table

Matcher = Callable[[fx.Node, "MatchInfo"], bool]


@dataclass(frozen=True)
class MatchInfo:
    """Graph-level facts that matchers may need (computed once per plan)."""

    first_layer: str | None
    last_layer: str | None


def _strict(matcher: Matcher) -> Matcher:
    """Mark a matcher whose pairs must fit every node they match (a mismatching rule is an error)."""
    matcher.strict = True  # type: ignore[attr-defined]
    return matcher


def kind(*kinds: str) -> Matcher:
    """Match nodes of the given canonical kinds (``"conv"``, ``"linear"``, …; see ``fxrel.graphs.ops.KINDS``)."""
    unknown = set(kinds) - set(ops.KINDS)
    if unknown:
        raise RuleError(f"unknown node kinds {sorted(unknown)}; known kinds: {sorted(ops.KINDS)}")
    wanted = frozenset(kinds)
    return _strict(lambda node, info: node.meta.get("fxrel_kind") in wanted)


def module(*patterns: str) -> Matcher:
    """Match nodes produced by modules whose qualified name matches a glob pattern (e.g. ``"features.0"``,
    ``"layer4.*"``)."""
    return lambda node, info: any(fnmatch.fnmatchcase(node.meta.get("fxrel_module", ""), p) for p in patterns)


def node_name(*patterns: str) -> Matcher:
    """Match canonical nodes by (glob) node name."""
    return lambda node, info: any(fnmatch.fnmatchcase(node.name, p) for p in patterns)


def where(predicate: Callable[[fx.Node], bool]) -> Matcher:
    """Match nodes for which ``predicate(node)`` is true."""
    return lambda node, info: bool(predicate(node))


def first(*kinds: str) -> Matcher:
    """Match the first conv/linear node from the input side (restricted to ``kinds`` if given)."""
    restrict = kind(*kinds) if kinds else (lambda node, info: True)
    return _strict(lambda node, info: node.name == info.first_layer and restrict(node, info))


def reads_input(*kinds: str) -> Matcher:
    """Match the nodes (of ``kinds``, if given) that read a model input directly or through shape/padding nodes —
    the input layers that input rules (z^β) are for, however many there are."""
    restrict = kind(*kinds) if kinds else (lambda node, info: True)

    def source(node: fx.Node) -> fx.Node:
        while node.meta.get("fxrel_kind") in (ops.SHAPE, ops.PAD):
            node = node.args[0]
        return node

    return _strict(lambda node, info: (restrict(node, info) and bool(ops.tensor_inputs(node))
                                       and source(ops.tensor_inputs(node)[0]).op == "placeholder"))


def last(*kinds: str) -> Matcher:
    """Match the last conv/linear node before the output (restricted to ``kinds`` if given)."""
    restrict = kind(*kinds) if kinds else (lambda node, info: True)
    return _strict(lambda node, info: node.name == info.last_layer and restrict(node, info))


def after_last() -> Matcher:
    """Match the nodes after the last conv/linear node (the head's pooling/reshaping up to the output), where
    methods that start below the output keep the exact gradient."""
    def matcher(node: fx.Node, info: MatchInfo) -> bool:
        previous = node.prev
        while previous.op != "root":
            if previous.name == info.last_layer:
                return True
            previous = previous.prev
        return False
    return matcher


class RulePlan(dict):
    """Canonical node name → rule, with a readable table (``str(plan)``)."""

    def __init__(self, graph: fx.GraphModule, rules: Mapping[str, Rule]) -> None:
        super().__init__(rules)
        self.graph = graph

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(node, kind, module, rule) for every planned node, in forward order."""
        return [(n.name, n.meta.get("fxrel_kind", ""), n.meta.get("fxrel_module", ""), repr(self[n.name]))
                for n in self.graph.graph.nodes if n.name in self]

    def __str__(self) -> str:
        return format_table(("node", "kind", "module", "rule"), self.rows())


#: The structural defaults every composite ends with (written once, here): nodes that only route values —
#: max-pooling (winner-take-all), concatenation (slicing), shape ops, padding — and statistics (1/σ, softmax weights,
#: which only gate) take the exact VJP; a gate ``x ⊙ g`` passes relevance through its gated input with ``g`` as a
#: constant weight; attention ``A·V`` passes it through ``V`` with ``A`` as constants (the AH-rule); another product
#: of two computed tensors splits it uniformly (AttnLRP's uniform ε-rule). A composite's own
#: pairs come first, so a method overrides only where it differs.
STRUCTURAL: tuple[tuple[Matcher, Rule], ...] = (
    (kind(ops.MAXPOOL, ops.CAT, ops.SHAPE, ops.PAD, ops.STAT), Gradient()),
    (kind(ops.GATE), GateAsWeight()),
    (kind(ops.ATTEND), AttentionAsWeights()),
    (kind(ops.BILINEAR), UniformProduct()),
)

#: the treatments of attention a rule set's ``attention`` parameter names: ``"cp"`` (CP-LRP / the AH-rule: attention
#: weights constant, the structural default) and ``"attnlrp"`` (AttnLRP: :mod:`fxrel.rules.attention`)
ATTENTION_RULES = ("cp", "attnlrp")


def targets(*fns) -> Matcher:
    """Match canonical nodes by their target (``fxrel.graphs.ops.attention_weights``, ``aten.softmax.int`` …)."""
    wanted = frozenset(fns)
    return lambda node, info: node.target in wanted


def attention_pairs(attention: str, epsilon: float = 1e-6) -> list[tuple[Matcher, Rule]]:
    """The pairs that give a rule set its treatment of attention. Both treatments: the uniform rule, with the rule
    set's ``ε``, at products of two computed tensors (``bilinear``: LRP-0 at ε = 0 conserves through them exactly;
    the structural default's ε = 1e-6 leaked 2e-6 of an iFormer block's relevance). ``"cp"`` adds nothing else
    (attention weights constant); ``"attnlrp"`` adds the uniform rule at attention products and gated linear units
    (the activation of a unit's gate branch then passes relevance unchanged: AttnLRP's identity rule), and the
    softmax Taylor rule at attention weights and softmaxes. ``RuleError`` names the valid values."""
    uniform = UniformProduct(epsilon)
    if attention == "cp":
        return [(kind(ops.BILINEAR), uniform)]
    if attention != "attnlrp":
        raise RuleError(f"attention must be one of {list(ATTENTION_RULES)}, got {attention!r}")
    return [(kind(ops.ATTEND, ops.BILINEAR), uniform), (targets(ops.gated_unit), uniform),
            (targets(ops.attention_weights), AttentionWeightsTaylor()),
            (targets(ops.aten.softmax.int), SoftmaxTaylor())]


class Composite:
    """An ordered list of ``(matcher, rule)`` pairs; the first match wins. After the pairs come the
    :data:`STRUCTURAL` defaults, then ``default`` (the rule of every node nothing else matched; none: an error)."""

    def __init__(self, mapping: Iterable[tuple[Matcher, Rule]], name: str = "custom", *,
                 default: Rule | None = None) -> None:
        self.mapping = list(mapping)
        self.name = name
        self.default = default

    def with_rules(self, overrides: Sequence[tuple[Matcher, Rule]]) -> "Composite":
        """A copy whose ``overrides`` take precedence over this composite's own pairs."""
        return Composite(list(overrides) + self.mapping, self.name, default=self.default)

    def plan(self, graph: fx.GraphModule) -> RulePlan:
        layers = [n.name for n in graph.graph.nodes if n.meta.get("fxrel_kind") in (ops.CONV, ops.LINEAR)]
        info = MatchInfo(layers[0] if layers else None, layers[-1] if layers else None)
        rules: dict[str, Rule] = {}
        for node in graph.graph.nodes:
            if node.op != "call_function":
                continue
            rules[node.name] = self._rule_for(node, info)
        return RulePlan(graph, rules)

    def _rule_for(self, node: fx.Node, info: MatchInfo) -> Rule:
        node_kind = node.meta.get("fxrel_kind", "")
        for matcher, rule in (*self.mapping, *STRUCTURAL):
            if not matcher(node, info):
                continue
            if rule.accepts(node_kind):
                return rule
            if getattr(matcher, "strict", False):
                raise RuleError(f"rule {rule!r} was assigned to node '{node.name}' of kind '{node_kind}', "
                                "which it cannot handle")
        if self.default is not None and self.default.accepts(node_kind):
            return self.default
        raise RuleError(f"composite '{self.name}' has no rule for node '{node.name}' of kind '{node_kind}' "
                        f"(module '{node.meta.get('fxrel_module', '')}')")

    def __repr__(self) -> str:
        return f"Composite({self.name!r}, {len(self.mapping)} pairs)"
