"""The relevance-graph builder: a reverse sweep that records rule templates into an explicit fx graph.

The emitted ``GraphModule`` takes the model's inputs and a ``seed_mask`` (shaped like the start node's output),
recomputes the forward pass, forms each stream's initial relevance from (start output, mask), and then, for every
canonical node from the start node down to the inputs and for every stream, runs that node's rule template on fx
proxies. It returns a dict ``{"output": start output, "<stream>:<stop>": relevance, "value:<stop>": the stop
node's forward value, …}`` for every requested stop. There are no autograd calls in it; it runs eagerly or under
``torch.compile(fullgraph=True)``.

A stream with an ``entry`` node starts there instead: its initial relevance is formed when the sweep reaches the
entry, from (start output, mask, entry output, the other streams' relevance at the entry). *Helper* streams only
feed other streams and are not returned. RSP uses both: helper streams bring gradients down to the last feature
map, where the relative map computed from them becomes the sectional stream's initial relevance.

Fan-out is summation: a node used by several others receives the sum of what each sends back.
Every emitted node records ``fxrel_role`` (``forward``/``seed``/``relevance``/``audit``, and ``recomputed`` for the
forward values :mod:`~fxrel.graphs.rematerialise` recomputes where the backward pass reads them), ``fxrel_forward``
(the forward node it serves), ``fxrel_rule`` and ``fxrel_stream``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx

from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.graphs.analysis import find_node
from fxrel.graphs.rematerialise import rematerialise
from fxrel.graphs.rule_protocol import Rule

Seed = Callable[..., Any]
Finalize = Callable[[Any, Any], Any]


@dataclass
class Stream:
    """One relevance flow of a sweep: a rule per canonical node, its initial relevance and a final transform."""

    name: str
    plan: Mapping[str, Rule]               #: canonical node name → rule
    seed: Seed                              #: (start output, seed mask) → initial relevance at the start node; with
    #: an ``entry``: (start output, seed mask, entry output, {stream: relevance at the entry}) → relevance there
    finalize: Finalize | None = None        #: (relevance, node value) → what is returned at a stop node
    entry: str | None = None                #: node (or module) below the start where this stream's relevance enters
    helper: bool = False                    #: only feeds other streams (ctx.upstream, entry seeds); not returned


@dataclass
class _Context:
    """The :class:`fxrel.graphs.rule_protocol.RuleContext` handed to rule templates."""

    node: fx.Node
    kind: str
    inputs: list[Any]
    output: Any
    weight: Any
    bias: Any
    upstream: dict[str, Any]
    downstream: dict[str, list]
    builder: "_Builder"
    #: (tag, fn) applied to the node's parameters before every :meth:`param` transform (set by :meth:`replace`)
    param_transform: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None

    def replace(self, *, inputs: Sequence[Any] | None = None, output: Any = None, weight: Any = None,
                bias: Any = None, param_transform: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
                ) -> "_Context":
        """A context for a modified node (inputs, output, weight, bias; ``param_transform``: the parameters that
        :meth:`param` derives from); ``forward``, ``vjp`` and ``weight_vjp`` then use what was replaced."""
        changes = {"inputs": None if inputs is None else list(inputs), "output": output, "weight": weight,
                   "bias": bias, "param_transform": param_transform}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def nonnegative(self) -> bool:
        """True when every tensor input is ≥ 0 by construction (e.g. ReLU outputs)."""
        return all(a.meta.get("fxrel_nonnegative", False) for a in ops.tensor_inputs(self.node))

    def forward(self, inputs: Sequence[Any], weight: Any = None, bias: Any = None, per_sample: bool = False) -> Any:
        if per_sample:
            return self._per_sample().forward(self.node, list(inputs), weight)
        return ops.spec_of(self.node).forward(self.node, list(inputs), weight, bias)

    def vjp(self, grad: Any, weight: Any = None, per_sample: bool = False) -> list[Any]:
        if per_sample:
            return self._per_sample().vjp(self.node, grad, self.inputs, weight)
        w = self.weight if weight is None else weight
        return ops.spec_of(self.node).vjp(self.node, grad, self.inputs, w)

    def weight_vjp(self, grad: Any, inputs: Sequence[Any] | None = None) -> Any:
        return self._per_sample().weight_vjp(self.node, grad, list(self.inputs if inputs is None else inputs))

    def _per_sample(self) -> ops.PerSample:
        spec = ops.spec_of(self.node).per_sample
        if spec is None:
            raise RuleError(f"node '{self.node.name}' of kind '{self.kind}' has no per-sample weights "
                            f"(only convolutions do); module '{self.node.meta.get('fxrel_module', '')}'")
        return spec

    def param(self, which: str, tag: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        if self.param_transform is not None:
            outer, transform = self.param_transform
            return self.builder.derived_param(self.node, which, f"{outer}-{tag}", lambda p: fn(transform(p)))
        return self.builder.derived_param(self.node, which, tag, fn)

    def constant(self, value: torch.Tensor | float) -> Any:
        return self.builder.constant(value)


@dataclass
class RelevanceGraph:
    """A built relevance program and what it was built from."""

    module: fx.GraphModule                   #: forward(*inputs, seed_mask) -> dict of tensors
    canonical: fx.GraphModule                #: the canonical forward graph
    streams: list[Stream]                    #: the streams whose relevance is returned
    start: str                               #: canonical node where relevance starts
    stops: list[str]                         #: where relevance is returned (node or module names, as asked)
    output_keys: list[str] = field(default_factory=list)
    helpers: list[Stream] = field(default_factory=list)  #: streams that only feed the others

    @property
    def code(self) -> str:
        """Readable Python of the relevance program."""
        return self.module.code


class _Builder:
    def __init__(self, canonical: fx.GraphModule) -> None:
        self.canonical = canonical
        self.graph = fx.Graph()
        self.tracer = fx.proxy.GraphAppendingTracer(self.graph)
        self.root = torch.nn.Module()
        self.env: dict[fx.Node, fx.Node] = {}
        self.cache: dict[tuple, fx.Node] = {}
        ref = next((getattr(canonical, n.target) for n in canonical.graph.nodes if n.op == "get_attr"), None)
        self.device = ref.device if ref is not None else torch.device("cpu")
        self.dtype = ref.dtype if ref is not None else torch.float32

    def proxy(self, node: fx.Node | None) -> Any:
        return None if node is None else fx.Proxy(node, self.tracer)

    def _attr(self, value: torch.Tensor, hint: str) -> fx.Node:
        name = f"{hint}_{len(self.cache)}"
        self.root.register_buffer(name, value.detach(), persistent=False)
        return self.graph.get_attr(name)

    def derived_param(self, node: fx.Node, which: str, tag: str, fn: Callable) -> Any:
        src = node.args[1] if which == "weight" else node.args[2]
        key = ("param", src.target, tag)
        if key not in self.cache:
            self.cache[key] = self._attr(fn(getattr(self.canonical, src.target)), f"{src.target}_{tag}".replace(
                "+", "pos").replace("-", "neg").replace(".", "_"))
        return self.proxy(self.cache[key])

    def constant(self, value: torch.Tensor | float) -> Any:
        t = torch.as_tensor(value).to(device=self.device, dtype=self.dtype)
        key = ("const", t.shape, tuple(t.flatten().tolist()))
        if key not in self.cache:
            self.cache[key] = self._attr(t, "const")
        return self.proxy(self.cache[key])

    def copy_forward(self) -> list[fx.Node]:
        placeholders = []
        for node in self.canonical.graph.nodes:
            if node.op == "output":
                continue
            if node.op == "get_attr":
                if node.target not in self.root._buffers:
                    self.root.register_buffer(node.target, getattr(self.canonical, node.target), persistent=False)
            new = self.graph.node_copy(node, lambda n: self.env[n])
            new.meta["fxrel_role"] = "forward"
            new.meta["fxrel_forward"] = node.name
            self.env[node] = new
            if node.op == "placeholder":
                placeholders.append(new)
        return placeholders

    def tag_since(self, marker: fx.Node, **meta: Any) -> None:
        """Attach provenance to every node appended after ``marker``."""
        node = marker.next
        while node is not self.graph._root:
            node.meta.update(meta)
            node = node.next

    def last(self) -> fx.Node:
        return self.graph._root.prev


def _audit(received: fx.Proxy, sent: Sequence[Any]) -> fx.Proxy:
    """``[Σ R_out, Σ R_in, Σ|R_out|, Σ|R_in|]`` of one rule application (inputs that get no tensor count as 0)."""
    parts = [r for r in sent if isinstance(r, fx.Proxy)]
    total = sum((r.sum() for r in parts[1:]), parts[0].sum()) if parts else received.sum() * 0
    size = sum((r.abs().sum() for r in parts[1:]), parts[0].abs().sum()) if parts else received.sum() * 0
    return torch.stack([received.sum(), total, received.abs().sum(), size])


def build_relevance_graph(canonical: fx.GraphModule, streams: Sequence[Stream], start: str | None = None,
                          stops: Sequence[str] | None = None,
                          combine: Callable[[dict[str, Any]], Any] | None = None,
                          audit: bool = False) -> RelevanceGraph:
    """Build the explicit relevance program for ``streams`` on a canonical graph.

    ``start``: node (or module) name where relevance starts (default: the model output). ``stops``: node or module
    names whose relevance is returned (default: the model inputs); ``"*"`` returns every node's relevance.
    ``combine``: maps ``{stream name: relevance}`` at each stop to one result, returned as ``"combined:<stop>"``
    in place of the streams' own outputs (contrastive methods subtract a dual stream this way). ``audit``: also
    return, for every node a returned stream's rule runs at, ``"audit:<stream>:<node>"`` = ``[Σ R_out, Σ R_in,
    Σ|R_out|, Σ|R_in|]`` over the whole batch — what the rule received and what it sent to the node's inputs (the
    local conservation audit).
    """
    if not streams:
        raise RuleError("a relevance sweep needs at least one stream")
    b = _Builder(canonical)
    order = [n for n in canonical.graph.nodes if n.op != "output"]
    output_node = next(n for n in canonical.graph.nodes if n.op == "output")
    start_node = output_node.args[0] if start is None else find_node(canonical, start)
    inputs = [n for n in order if n.op == "placeholder"]
    stops = None if stops is None else list(stops)
    if stops is None:
        stop_nodes = inputs
        labels = [n.name for n in inputs]
    elif stops == ["*"]:
        stop_nodes = [n for n in order if n.op != "get_attr"]
        labels = [n.name for n in stop_nodes]
    else:
        stop_nodes = [find_node(canonical, s) for s in stops]
        labels = list(stops)
    label_of: dict[fx.Node, list[str]] = {}
    for node, label in zip(stop_nodes, labels):
        label_of.setdefault(node, []).append(label)

    for s in streams:
        missing = [n.name for n in order if n.op == "call_function" and n.name not in s.plan]
        if missing:
            raise RuleError(f"stream '{s.name}' has no rule for nodes {missing[:5]}")

    b.copy_forward()
    mask = b.graph.placeholder("seed_mask")
    mask.meta["fxrel_role"] = "seed"
    start_value = b.proxy(b.env[start_node])
    pending: dict[tuple[str, fx.Node], list[Any]] = {}
    entries: dict[fx.Node, list[Stream]] = {}
    for s in streams:
        if s.entry is not None:
            entries.setdefault(find_node(canonical, s.entry), []).append(s)
            continue
        marker = b.last()
        pending[(s.name, start_node)] = [s.seed(start_value, b.proxy(mask))]
        b.tag_since(marker, fxrel_role="seed", fxrel_forward=start_node.name, fxrel_stream=s.name)

    outputs: dict[str, Any] = {"output": start_value}
    reached = False
    for node in reversed(order):
        reached = reached or node is start_node
        if not reached or node.op == "get_attr":
            continue
        upstream: dict[str, Any] = {}
        for s in streams:
            parts = pending.pop((s.name, node), [])
            marker = b.last()
            upstream[s.name] = sum(parts[1:], parts[0]) if parts else None
            b.tag_since(marker, fxrel_role="relevance", fxrel_forward=node.name, fxrel_rule="fan-out sum",
                        fxrel_stream=s.name)
        for s in entries.pop(node, []):
            marker = b.last()
            arrived = {name: r for name, r in upstream.items() if r is not None}
            upstream[s.name] = s.seed(start_value, b.proxy(mask), b.proxy(b.env[node]), arrived)
            b.tag_since(marker, fxrel_role="seed", fxrel_forward=node.name, fxrel_stream=s.name)
        downstream: dict[str, list] = {}
        for s in streams:
            relevance = upstream[s.name]
            if relevance is None:
                continue
            if node in label_of and not s.helper:
                value = b.proxy(b.env[node])
                final = relevance if s.finalize is None else s.finalize(relevance, value)
                outputs.update({f"{s.name}:{label}": final for label in label_of[node]})
                outputs.update({f"value:{label}": value for label in label_of[node]})
            if node.op == "placeholder":
                continue
            rule = s.plan[node.name]
            kind = node.meta["fxrel_kind"]
            if not rule.accepts(kind):
                raise RuleError(f"rule {rule!r} cannot handle node '{node.name}' of kind '{kind}' "
                                f"(module '{node.meta.get('fxrel_module', '')}')")
            weight, bias = ops.weight_and_bias(node)
            ctx = _Context(node, kind, [b.proxy(b.env[a]) for a in ops.tensor_inputs(node)],
                           b.proxy(b.env[node]), b.proxy(b.env[weight]) if weight is not None else None,
                           b.proxy(b.env[bias]) if bias is not None else None, upstream, downstream, b)
            marker = b.last()
            sent = rule(ctx, relevance)
            b.tag_since(marker, fxrel_role="relevance", fxrel_forward=node.name, fxrel_rule=repr(rule),
                        fxrel_stream=s.name)
            downstream[s.name] = sent
            if audit and not s.helper and isinstance(relevance, fx.Proxy):
                marker = b.last()
                outputs[f"audit:{s.name}:{node.name}"] = _audit(relevance, sent)
                b.tag_since(marker, fxrel_role="audit", fxrel_forward=node.name, fxrel_stream=s.name)
            for arg, r in zip(ops.tensor_inputs(node), sent):
                pending.setdefault((s.name, arg), []).append(r)

    if entries:
        unreached = [s.entry for group in entries.values() for s in group]
        raise RuleError(f"the entry nodes {unreached} of streams lie above the start node '{start_node.name}'")
    returned = [s for s in streams if not s.helper]
    missing = [f"{s.name}:{label}" for s in returned for label in labels if f"{s.name}:{label}" not in outputs]
    if missing and stops != ["*"]:
        raise RuleError(f"no relevance reaches the stop nodes {missing[:5]} from start node '{start_node.name}'")
    if combine is not None:
        for label in labels:
            parts = {s.name: outputs.pop(f"{s.name}:{label}") for s in returned if f"{s.name}:{label}" in outputs}
            if parts:
                marker = b.last()
                outputs[f"combined:{label}"] = combine(parts)
                b.tag_since(marker, fxrel_role="relevance", fxrel_forward=label, fxrel_rule="combine",
                            fxrel_stream="combined")
    keys = list(outputs)
    b.graph.output({k: (v.node if isinstance(v, fx.Proxy) else v) for k, v in outputs.items()})
    rematerialise(b.graph)
    b.graph.eliminate_dead_code()
    module = fx.GraphModule(b.root, b.graph, "RelevanceGraph")
    return RelevanceGraph(module, canonical, returned, start_node.name, labels, keys,
                          [s for s in streams if s.helper])
