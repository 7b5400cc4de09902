"""The public explainer: capture → canonicalise → plan rules → build the relevance graph → (compile) → run.

An :class:`Explainer` builds one relevance program per input signature ``(shape, dtype, device)`` and caches it
(compiled too, with ``compile=True``), so repeated calls on same-shaped batches do no tracing or compiling.
The built programs hold the model's parameters as constants; an explainer notices when they are replaced, loaded
or changed in place (their version counters) and rebuilds.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.fx.interpreter import Interpreter

from fxrel.catalog.method import Method
from fxrel.catalog.registry import make_method, method_info
from fxrel.errors import InputError, NumericalError, RuleError
from fxrel.graphs.builder import RelevanceGraph, build_relevance_graph
from fxrel.graphs.canonical import canonicalize
from fxrel.graphs.capture import capture
from fxrel.graphs.profile import ProfileRow, profile_program
from fxrel.rules.base import Rule
from fxrel.rules.composite import Matcher, RulePlan
from fxrel.text import format_table
from fxrel.validation import check_input, check_model, check_seed, node_names, target_indices

Target = int | str | Sequence[int] | torch.Tensor | None

#: the input signatures (shape, dtype, device) whose programs one explainer keeps; the least recently used go first
PROGRAMS_PER_EXPLAINER = 16
#: values sampled from each parameter for the weights' fingerprint (see :meth:`Explainer._parameter_stamp`)
FINGERPRINT_SAMPLES = 8


class LRUCache(OrderedDict):
    """A dict that keeps its ``size`` most recently used entries."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __getitem__(self, key: Any) -> Any:
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock every explainer of ``model`` holds while it reads or captures the model and builds programs:
    capturing swaps the model's parameters for fake tensors for a moment, which no other thread may see. Running
    a built program needs no lock."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def _checked_rules(rules: Any) -> list[tuple[Matcher, Rule]]:
    """Rule overrides as ``(matcher, rule)`` pairs: a callable matcher and a :class:`Rule`."""
    pairs = list(rules)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and callable(pair[0])
                and isinstance(pair[1], Rule)):
            raise InputError(f"rules[{i}] must be a (matcher, Rule) pair, e.g. (kind('conv'), ZPlus()); got "
                             f"{pair!r:.80}")
    return [tuple(p) for p in pairs]


def _non_finite_report(graph: RelevanceGraph, x: torch.Tensor, mask: torch.Tensor) -> str:
    """Where the first non-finite value of a relevance program appears: re-run it node by node."""
    first: list[fx.Node] = []

    class _Watch(Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if not first and isinstance(value, torch.Tensor) and value.is_floating_point() \
                    and not torch.isfinite(value).all():
                first.append(n)
            return value

    with torch.no_grad():
        _Watch(graph.module).run(x, mask)
    if not first:
        return "the relevance is not finite (no single node could be named)"
    n = first[0]
    forward = n.meta.get("fxrel_forward", n.name)
    module = next((c.meta.get("fxrel_module", "") for c in graph.canonical.graph.nodes if c.name == forward), "")
    if n.meta.get("fxrel_role") in (None, "forward", "recomputed"):
        return (f"the model's own forward pass is not finite from node '{forward}' (module '{module}') on: the "
                "input overflows the model (scale it down, or use float64)")
    return (f"the relevance is not finite from relevance-graph node '{n.name}' on: stream "
            f"'{n.meta.get('fxrel_stream', '')}', rule {n.meta.get('fxrel_rule', '?')} at forward node '{forward}' "
            f"(module '{module}', dtype {x.dtype}); a stabiliser may be too small for this dtype")


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
    return target_indices(target, len(scores), scores.device, scores.shape[1])


def resolve_targets(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """:func:`targets_from_scores` on ``model(x)`` (one forward pass without gradients)."""
    with torch.no_grad():
        return targets_from_scores(model(x), target)


@dataclass(frozen=True)
class AuditRow:
    """One rule application of :meth:`Explainer.conservation_audit`."""

    node: str
    kind: str
    module: str
    rule: str
    stream: str
    received: float   #: Σ R at the node's output
    sent: float       #: Σ R sent to its inputs
    size_out: float   #: Σ |R| at the output
    size_in: float    #: Σ |R| sent

    @property
    def leak(self) -> float:
        """``|Σ R_in − Σ R_out|`` relative to the larger of ``Σ|R_out|``, ``Σ|R_in|`` (0 when both are 0)."""
        scale = max(self.size_out, self.size_in)
        return abs(self.sent - self.received) / scale if scale > 0 else 0.0


def audit_table(rows: Sequence[AuditRow]) -> str:
    """The rows of :meth:`Explainer.conservation_audit` as a text table, forward order."""
    body = [(r.node, r.kind, r.module, r.rule, f"{r.received:+.6g}", f"{r.sent:+.6g}", f"{r.leak:.1e}")
            for r in rows]
    return format_table(("node", "kind", "module", "rule", "Σ R out", "Σ R in", "leak"), body)


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
        self.model = check_model(model)
        if not isinstance(method, (str, Method)):
            raise InputError(f"method must be a method name or a fxrel.Method, got {type(method).__name__}")
        self.method = method if isinstance(method, Method) else make_method(method, **params)
        if isinstance(method, Method) and params:
            raise InputError(f"parameters {sorted(params)} given with a Method object; set them on the Method")
        self.rules = _checked_rules(rules)
        starts = node_names(start, "start")
        if starts is not None and len(starts) != 1:
            raise InputError(f"start must be one node or module name, got {starts}")
        self.start, self.stops = (starts[0] if starts else None), node_names(stops, "stops")
        self.compile = compile
        self.fold_batchnorm = fold_batchnorm
        self._stamp: tuple | None = None
        self._canonical: LRUCache = LRUCache(PROGRAMS_PER_EXPLAINER)
        self._graphs: LRUCache = LRUCache(PROGRAMS_PER_EXPLAINER)
        self._runners: LRUCache = LRUCache(PROGRAMS_PER_EXPLAINER)
        self._lock = model_lock(model)

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
        with self._lock:
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
        with self._lock:
            self._follow_parameters()
            stops = self.stops if stops is None else node_names(stops, "stops")
            if stops is None:
                stops = self.method.default_stops(self.canonical_graph(x))
            key = (*self._signature(x), tuple(stops) if stops is not None else None)
            if key not in self._graphs:
                self._graphs[key] = self._built(x, stops)
            return self._graphs[key]

    def _built(self, x: torch.Tensor, stops: Sequence[str] | None, audit: bool = False) -> RelevanceGraph:
        """A new relevance program of this explainer's method, rules, start and ``stops`` (``audit``: with the local
        conservation audit's outputs, :func:`fxrel.graphs.build_relevance_graph`)."""
        canonical = self.canonical_graph(x)
        return build_relevance_graph(canonical, self.method.streams(canonical, self.rules), self.start, stops,
                                     self.method.combine, audit)

    def _runner(self, x: torch.Tensor, stops: Sequence[str] | None) -> tuple[RelevanceGraph, Any]:
        with self._lock:
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
        """What identifies the weights: every parameter's and buffer's identity, storage and in-place version
        counter (replaced, loaded — ``load_state_dict`` copies in place — or re-initialised weights), plus a
        fingerprint of :data:`FINGERPRINT_SAMPLES` values of each, which catches writes through ``.data`` (they
        bypass the version counter). A write through ``.data`` that changes none of the sampled values goes
        unnoticed; call :meth:`clear` after such surgery."""
        tensors = list(itertools.chain(self.model.parameters(), self.model.buffers()))
        with torch.no_grad():
            samples = [t.detach().flatten()[::max(1, t.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
                       for t in tensors if t.numel()]
            fingerprint = torch.cat([s.double() for s in samples]).tolist() if samples else []
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors), tuple(fingerprint)

    def _follow_parameters(self) -> None:
        """The built programs hold the parameters as graph constants: rebuild them after the weights changed."""
        with self._lock:
            stamp = self._parameter_stamp()
            if stamp != self._stamp:
                self.clear()
                self._stamp = stamp

    # -- running ----------------------------------------------------------------------------------------------------
    def check_call(self, x: torch.Tensor) -> None:
        """The checks of every call: the model (an eval-mode ``nn.Module``: the mode may have changed since the
        explainer was built) and the input (see :mod:`fxrel.validation`)."""
        with self._lock:  # not while another thread captures the model (torch.export swaps its parameters)
            check_model(self.model)
            param = next(iter(self.model.parameters()), None)
            check_input(x, None if param is None else param.device)

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
        return target_indices(target, len(x), x.device, classes)

    @staticmethod
    def _start_shape(graph: RelevanceGraph) -> torch.Size:
        return next(n for n in graph.canonical.graph.nodes if n.name == graph.start).meta["tensor_meta"].shape

    def _seed_mask(self, graph: RelevanceGraph, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-hot mask on the start node's output for ``target``."""
        shape = self._start_shape(graph)
        if len(shape) < 2 or shape[0] != len(x):
            raise InputError(f"the start node '{graph.start}' outputs shape {tuple(shape)}; a class target needs "
                             f"scores shaped [batch ({len(x)}), …, classes]: give start= a node that has them, or "
                             "seed= a tensor shaped like the output")
        idx = self.resolve_targets(x, target, graph)
        mask = torch.zeros(shape, dtype=x.dtype, device=x.device)
        mask[torch.arange(shape[0], device=x.device), ..., idx] = 1
        return mask, idx

    def attribute(self, x: torch.Tensor, target: Target = None, *, seed: torch.Tensor | None = None,
                  stops: Sequence[str] | None = None) -> Explanation:
        """Explain a batch. ``target``: one class for all, one per row, ``None``/``"top1"`` (the predicted class)
        or ``"top-k"`` (the k-th highest class). ``seed`` replaces the one-hot target mask: a tensor shaped like the
        start node's output, which the method turns into the initial relevance (gradient methods: ``R = seed``;
        LRP methods: ``R = y ⊙ seed``). ``stops`` overrides the explainer's stop nodes for this call."""
        self.check_call(x)
        graph, run = self._runner(x, stops)
        with torch.no_grad():
            if seed is None:
                mask, idx = self._seed_mask(graph, x, target)
            else:
                mask, idx = check_seed(seed, self._start_shape(graph), x), None
            result = run(x, mask)
        if not all(torch.isfinite(v).all() for v in result.values()):
            raise NumericalError(_non_finite_report(graph, x, mask))
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

    def classes(self, x: torch.Tensor, classes: Sequence[int] | torch.Tensor, chunk: int | None = None
                ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Relevance for several classes of every image, ``[B, K, *x.shape[1:]]``: ``classes`` the same K classes
        for every image (``[K]``) or K per image (``[B, K]``). The B·K (image, class) rows run as one batch of the
        relevance program (``chunk`` rows at a time to bound memory; a short last chunk is padded, so one program
        serves the run), each row equal to a single-target call on its image."""
        self.check_call(x)
        index = torch.as_tensor(classes, device=x.device)
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise InputError(f"classes must be integer class indices, got dtype {index.dtype}")
        if index.dim() == 1:
            index = index.expand(len(x), -1)
        if index.dim() != 2 or index.shape[0] != len(x) or index.shape[1] == 0:
            raise InputError(f"classes must be [K] (the same for every image) or [batch ({len(x)}), K] with K ≥ 1, "
                             f"got shape {tuple(index.shape)}")
        if chunk is not None and chunk < 1:
            raise InputError(f"chunk must be ≥ 1 rows, got {chunk}")
        per_image = index.shape[1]
        rows, targets = x.repeat_interleave(per_image, 0), index.reshape(-1)
        step = min(chunk or len(rows), len(rows))
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(rows), step):
            part_x, part_t = rows[start:start + step], targets[start:start + step]
            short = step - len(part_x)
            if short:   # pad with copies of the last row: the program built for `step` rows serves this chunk too
                part_x = torch.cat([part_x, part_x[-1:].expand(short, *part_x.shape[1:])])
                part_t = torch.cat([part_t, part_t[-1:].expand(short)])
            relevance = self.attribute(part_x, part_t).relevance
            parts.append({k: v[:step - short] for k, v in relevance.items()})
        out = {k: torch.cat([p[k] for p in parts]).unflatten(0, (len(x), per_image)) for k in parts[0]}
        return next(iter(out.values())) if len(out) == 1 else out

    def conservation_audit(self, x: torch.Tensor, target: Target = None) -> list[AuditRow]:
        """What every rule application received and sent on (Σ over the batch, per returned stream), forward
        order: the local conservation audit. A rule conserves where ``leak`` is at rounding level; unlike the sum at
        the input, this stays decidable when relevance inside the network grows far beyond the logit (LRP-0's
        z-rule at residual sums whose operands nearly cancel)."""
        self.check_call(x)
        graph = self._built(x, None, audit=True)
        mask, _ = self._seed_mask(graph, x, target)
        with torch.no_grad():
            result = graph.module(x, mask)
        nodes = {n.name: n for n in graph.canonical.graph.nodes}
        rows = []
        for key, value in result.items():
            if not key.startswith("audit:"):
                continue
            _, stream, name = key.split(":", 2)
            node = nodes[name]
            plan = next(s.plan for s in graph.streams if s.name == stream)
            received, sent, size_out, size_in = value.tolist()
            rows.append(AuditRow(name, node.meta.get("fxrel_kind", ""), node.meta.get("fxrel_module", ""),
                                 repr(plan[name]), stream, received, sent, size_out, size_in))
        order = {n: i for i, n in enumerate(nodes)}
        return sorted(rows, key=lambda r: (order[r.node], r.stream))

    def layer_table(self, x: torch.Tensor, target: Target = None) -> str:
        """How much relevance passes each canonical node (Σ over all but the batch axis); what each rule sent on is
        :meth:`conservation_audit`."""
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

    def profile(self, x: torch.Tensor, target: Target = None, repeats: int = 3, by_op: bool = False
                ) -> list[ProfileRow]:
        """Where the eager relevance program's time goes on ``x``, rule by rule (and op by op with ``by_op``;
        :mod:`fxrel.graphs.profile`)."""
        self.check_call(x)
        graph = self.relevance_graph(x)
        mask, _ = self._seed_mask(graph, x, target)
        return profile_program(graph, (x,), mask, repeats, by_op)


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
    check_model(model)
    with model_lock(model):
        per_model = _CACHE.setdefault(model, {})
        if key not in per_model:
            per_model[key] = WeakModelExplainer(model, method, **kwargs)
        return per_model[key]


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
