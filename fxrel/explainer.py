"""The public explainer: capture → canonicalise → plan rules → build the relevance graph → (compile) → run.

An :class:`Explainer` builds one relevance program per input signature ``(shape, dtype, device)`` and caches it
(compiled too, with ``compile=True``), so repeated calls on same-shaped batches do no tracing or compiling.
The built programs hold the model's parameters as constants; an explainer notices when they are replaced, loaded
or changed in place (their version counters) and rebuilds.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.fx.interpreter import Interpreter

from fxrel.catalog.method import Method
from fxrel.catalog.registry import make_method, method_info
from fxrel.errors import InputError, RuleError
from fxrel.graphs.builder import RelevanceGraph, build_relevance_graph
from fxrel.graphs.canonical import canonicalize
from fxrel.graphs.capture import capture, check_eval_mode
from fxrel.rules.base import Rule
from fxrel.rules.composite import Matcher, RulePlan
from fxrel.text import format_table

Target = int | str | Sequence[int] | torch.Tensor | None


def _explicit_targets(target: Target, rows: int, device: torch.device, classes: int | None) -> torch.Tensor:
    idx = torch.as_tensor(target, device=device).long().flatten()
    if idx.numel() == 1:
        idx = idx.expand(rows)
    if idx.numel() != rows:
        raise InputError(f"got {idx.numel()} targets for a batch of {rows}")
    if classes is not None:
        bad = idx[(idx < 0) | (idx >= classes)]
        if bad.numel():
            raise InputError(f"class index {bad[0].item()} out of range: the model has {classes} classes "
                             f"(valid 0…{classes - 1})")
    return idx


def targets_from_scores(scores: torch.Tensor, target: Target) -> torch.Tensor:
    """One class index per row of the scores ``[N, K]``: ``target`` as an int, a list/tensor per row (range-checked),
    ``None``/``"top1"`` (the arg-max) or ``"top-k"`` (the k-th highest class)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise InputError("'top-k' targets need a start node with output [batch, classes]; give a seed")
    if target is None or isinstance(target, str):
        k = 1 if target is None else _parse_topk(target)
        if k > scores.shape[1]:
            raise InputError(f"top-{k} requested but the model has only {scores.shape[1]} classes")
        return scores.topk(k, dim=1).indices[:, k - 1]
    return _explicit_targets(target, len(scores), scores.device, scores.shape[1])


def resolve_targets(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """:func:`targets_from_scores` on ``model(x)`` (one forward pass without gradients)."""
    with torch.no_grad():
        return targets_from_scores(model(x), target)


@dataclass
class Explanation:
    """Result of one explainer call."""

    relevance: dict[str, torch.Tensor]   #: stop node → relevance (batch first)
    output: torch.Tensor                  #: the start node's output (the logits by default)
    targets: torch.Tensor | None          #: the explained class per row (None when a seed was given)
    values: dict[str, torch.Tensor]       #: stop node → its forward value (activations for CAM-style methods)


def _parse_topk(target: str) -> int:
    text = target.lower().replace("-", "")
    if text.startswith("top") and text[3:].isdigit() and int(text[3:]) > 0:
        return int(text[3:])
    raise InputError(f"target '{target}' not understood; use an int, a list of ints, a tensor, or 'top1'/'top-k'")


class Explainer:
    """Explain a model with one method; reusable across calls.

    ``method``: a registered name (see ``fxrel.methods()``) or a :class:`Method`. ``rules``: overrides as
    ``(matcher, rule)`` pairs that take precedence over the method's composite (see ``fxrel.rules.composite``).
    ``start``/``stops``: node or module names where relevance starts / is returned (default: model output / input).
    ``compile``: run the relevance graph through ``torch.compile(fullgraph=True)``.
    """

    def __init__(self, model: nn.Module, method: str | Method = "epsilon_plus_flat", *,
                 rules: Sequence[tuple[Matcher, Rule]] = (), start: str | None = None,
                 stops: Sequence[str] | None = None, compile: bool = False, fold_batchnorm: bool = True,
                 **params: Any) -> None:
        check_eval_mode(model)
        self.model = model
        self.method = method if isinstance(method, Method) else make_method(method, **params)
        if isinstance(method, Method) and params:
            raise InputError(f"parameters {sorted(params)} given with a Method object; set them on the Method")
        self.rules = list(rules)
        self.start, self.stops = start, (list(stops) if stops is not None else None)
        self.compile = compile
        self.fold_batchnorm = fold_batchnorm
        self._stamp: tuple | None = None
        self._canonical: dict[tuple, fx.GraphModule] = {}
        self._graphs: dict[tuple, RelevanceGraph] = {}
        self._runners: dict[tuple, Any] = {}

    def using(self, method: str | Method, **params: Any) -> "Explainer":
        """Another method on the same model, sharing the captured canonical graphs already built (no second
        capture); the rule overrides, start, stops and compile setting are kept."""
        other = Explainer(self.model, method, rules=self.rules, start=self.start, stops=self.stops,
                          compile=self.compile, fold_batchnorm=self.fold_batchnorm, **params)
        self._follow_parameters()
        other._stamp, other._canonical = self._stamp, self._canonical
        return other

    # -- building ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _signature(x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.dtype, x.device

    def canonical_graph(self, x: torch.Tensor) -> fx.GraphModule:
        """The canonical forward graph for inputs shaped like ``x`` (cached)."""
        self._follow_parameters()
        key = self._signature(x)
        if key not in self._canonical:
            self._canonical[key] = canonicalize(capture(self.model, x), (x,), self.fold_batchnorm)
        return self._canonical[key]

    def rule_plan(self, x: torch.Tensor) -> RulePlan:
        """Which rule each canonical node gets, for inputs shaped like ``x``."""
        return next(s for s in self.method.streams(self.canonical_graph(x), self.rules) if not s.helper).plan

    def relevance_graph(self, x: torch.Tensor, stops: Sequence[str] | None = None) -> RelevanceGraph:
        """The relevance program for inputs shaped like ``x`` (cached per signature and stop set)."""
        self._follow_parameters()
        stops = self.stops if stops is None else list(stops)
        if stops is None:
            stops = self.method.default_stops(self.canonical_graph(x))
        key = (*self._signature(x), tuple(stops) if stops is not None else None)
        if key not in self._graphs:
            canonical = self.canonical_graph(x)
            streams = self.method.streams(canonical, self.rules)
            self._graphs[key] = build_relevance_graph(canonical, streams, self.start, stops, self.method.combine)
        return self._graphs[key]

    def _runner(self, x: torch.Tensor, stops: Sequence[str] | None) -> tuple[RelevanceGraph, Any]:
        self._follow_parameters()
        graph = self.relevance_graph(x, stops)
        key = (*self._signature(x), tuple(graph.stops), self.compile)
        if key not in self._runners:
            self._runners[key] = torch.compile(graph.module, fullgraph=True) if self.compile else graph.module
        return graph, self._runners[key]

    def clear(self) -> None:
        """Forget every built graph (rebuilt on the next call)."""
        self._canonical.clear()
        self._graphs.clear()
        self._runners.clear()

    def _parameter_stamp(self) -> tuple:
        """Identity and in-place version counter of every parameter and buffer: changes whenever weights are
        replaced, loaded (``load_state_dict`` copies in place) or re-initialised."""
        return tuple((id(t), t._version) for t in itertools.chain(self.model.parameters(), self.model.buffers()))

    def _follow_parameters(self) -> None:
        """The built programs hold the parameters as graph constants: rebuild them after the weights changed."""
        stamp = self._parameter_stamp()
        if stamp != self._stamp:
            self.clear()
            self._stamp = stamp

    # -- running ----------------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 2:
            raise InputError(f"x must be batched (batch first), got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "infinite"
            raise InputError(f"x contains {bad} values; relevance of a non-finite input is undefined")
        param = next(iter(self.model.parameters()), None)
        if param is not None and param.device != x.device:
            raise InputError(f"x is on {x.device} but the model is on {param.device}; move one of them")

    def resolve_targets(self, x: torch.Tensor, target: Target, graph: RelevanceGraph | None = None
                        ) -> torch.Tensor:
        """One class index per row of ``x``: ``target`` as an int, a list/tensor per row, ``None``/``"top1"`` or
        ``"top-k"`` (the forward pass runs only for the top-k forms). Without ``graph`` nothing is built when the
        start node is the model output (wrappers resolve targets once for many batch shapes); indices are then
        range-checked when the explainer runs."""
        if graph is None and self.start is not None:
            graph = self.relevance_graph(x)
        if target is None or isinstance(target, str):
            with torch.no_grad():
                scores = self.model(x) if graph is None else self._start_output(graph, x)
            return targets_from_scores(scores, target)
        classes = None if graph is None else self._start_shape(graph)[-1]
        return _explicit_targets(target, len(x), x.device, classes)

    @staticmethod
    def _start_shape(graph: RelevanceGraph) -> torch.Size:
        return next(n for n in graph.canonical.graph.nodes if n.name == graph.start).meta["tensor_meta"].shape

    def _seed_mask(self, graph: RelevanceGraph, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-hot mask on the start node's output for ``target``."""
        idx = self.resolve_targets(x, target, graph)
        shape = self._start_shape(graph)
        mask = torch.zeros(shape, dtype=x.dtype, device=x.device)
        mask[torch.arange(shape[0], device=x.device), ..., idx] = 1
        return mask, idx

    def attribute(self, x: torch.Tensor, target: Target = None, *, seed: torch.Tensor | None = None,
                  stops: Sequence[str] | None = None) -> Explanation:
        """Explain a batch. ``target``: one class for all, one per row, ``None``/``"top1"`` (the predicted class)
        or ``"top-k"`` (the k-th highest class). ``seed`` replaces the one-hot target mask: a tensor shaped like the
        start node's output, which the method turns into the initial relevance (gradient methods: ``R = seed``;
        LRP methods: ``R = y ⊙ seed``). ``stops`` overrides the explainer's stop nodes for this call."""
        self._check_input(x)
        graph, run = self._runner(x, stops)
        with torch.no_grad():
            if seed is None:
                mask, idx = self._seed_mask(graph, x, target)
            else:
                mask, idx = seed.to(x), None
            result = run(x, mask)
        # one stream (or a combined result): keyed by stop; several uncombined streams: "stream:stop"
        single = len(graph.streams) == 1 or self.method.combine is not None
        values = {k.split(":", 1)[1]: v for k, v in result.items() if k.startswith("value:")}
        relevance = {(k.split(":", 1)[1] if single else k): v for k, v in result.items()
                     if k != "output" and not k.startswith("value:")}
        return Explanation(relevance, result["output"], idx, values)

    @staticmethod
    def _start_output(graph: RelevanceGraph, x: torch.Tensor) -> torch.Tensor:
        """The start node's output on ``x`` (the canonical forward pass up to the start node)."""
        values: dict[str, torch.Tensor] = {}

        class _Record(Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                values[n.name] = super().run_node(n)
                return values[n.name]

        _Record(graph.canonical).run(x)
        return values[graph.start]

    def __call__(self, x: torch.Tensor, target: Target = None, *, seed: torch.Tensor | None = None
                 ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Relevance for a batch: a tensor shaped like ``x`` (a dict when several stop nodes were asked for)."""
        relevance = self.attribute(x, target, seed=seed).relevance
        return next(iter(relevance.values())) if len(relevance) == 1 else relevance

    def layer_table(self, x: torch.Tensor, target: Target = None) -> str:
        """How much relevance passes each canonical node (Σ over all but the batch axis): the conservation audit."""
        if self.method.default_stops(self.canonical_graph(x)) is not None:
            raise RuleError(f"method '{self.method.name}' returns a map at its layer, not relevance at every node; "
                            "audit its sweep with method 'gradient' instead")
        explanation = self.attribute(x, target, stops=["*"])
        canonical = self.canonical_graph(x)
        rows = [("node", "kind", "module", "relevance sum per image")]
        for node in canonical.graph.nodes:
            r = explanation.relevance.get(node.name)
            if r is None:
                continue
            sums = r.flatten(1).sum(1).tolist()
            rows.append((node.name, node.meta.get("fxrel_kind", ""), node.meta.get("fxrel_module", ""),
                         "  ".join(f"{v:+.6g}" for v in sums)))
        return format_table(rows[0], rows[1:])


def explain(model: nn.Module, x: torch.Tensor, target: Target = None, method: str | Method = "epsilon_plus_flat",
            **kwargs: Any) -> torch.Tensor | dict[str, torch.Tensor]:
    """Explain ``model`` on the batch ``x`` for ``target`` with ``method``, any name in ``fxrel.methods()`` or a
    :class:`Method`. Keyword arguments: the method's parameters and, for sweeps, :class:`Explainer` options; an
    unknown parameter is an error naming the valid ones. Explainers are cached per (model, method, parameters),
    relevance programs per input signature, so repeated calls do not rebuild or recompile."""
    if isinstance(method, str):
        info = method_info(method)
        if not info.is_sweep:  # a wrapper (Integrated Gradients, SmoothGrad, UCAG …) runs the sweeps it wraps
            info.check(kwargs)
            return info.run(model, x, target, **kwargs)
    return cached_explainer(model, method, **kwargs)(x, target)


class WeakModelExplainer(Explainer):
    """An explainer that holds its model weakly, so that caches keyed by the model do not keep it alive."""

    @property  # type: ignore[override]
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise InputError("the model of this cached explainer has been garbage-collected")
        return model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self._model_ref = weakref.ref(model)


def cached_explainer(model: nn.Module, method: str | Method = "gradient", **kwargs: Any) -> Explainer:
    """The :class:`Explainer` for (model, method, parameters), built once and kept while the model lives (what
    :func:`explain` and the helpers that only need a model's canonical graph use); it holds the model weakly."""
    key = (method if isinstance(method, str) else id(method), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = WeakModelExplainer(model, method, **kwargs)
    return per_model[key]


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
