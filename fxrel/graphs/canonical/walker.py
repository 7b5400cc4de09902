"""The walk: one pass over a captured graph that hands every node to its registered handler.

:class:`_Canonicalizer` holds the canonical graph being built and the helpers handlers call (``value``, ``const``,
``param``, ``emit``, ``unsupported``); handlers receive it as their first argument, so this module imports no
handler module.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxrel.errors import UnsupportedOpError
from fxrel.graphs import ops
from fxrel.graphs.canonical.pending import _Logits, _Pending
from fxrel.graphs.canonical.registry import HANDLERS, module_path, source_line
from fxrel.graphs.ops import aten


class _Canonicalizer:
    def __init__(self, captured: fx.GraphModule) -> None:
        self.src = captured
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[fx.Node, Any] = {}
        self.current: fx.Node | None = None
        self.n_params = 0
        self.consts: dict[fx.Node, Any] = {}

    # -- helpers used by handlers ---------------------------------------------------------------------------------
    def const(self, node: Any) -> torch.Tensor | None:
        """The concrete tensor behind a parameter/buffer argument or a folded constant (``None`` stays ``None``)."""
        if node is None:
            return None
        if not self.is_const(node):
            raise self.unsupported(f"expected a parameter, got a computed value {node}")
        return self.consts[node]

    def is_const(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.consts

    def fold(self, node: fx.Node) -> bool:
        """Evaluate ``node`` now if it computes from parameters and constants only (NFNet's weight standardisation,
        a layer scale's reshape); record the result as a constant and return True."""
        inputs = node.all_input_nodes
        if not all(self.is_const(a) for a in inputs) or not _is_tensors(node.meta.get("val")):
            return False
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: self.consts[a])
        with torch.no_grad():
            self.consts[node] = node.target(*args, **kwargs)
        return True

    def folded(self, node: fx.Node, value: torch.Tensor) -> None:
        """Record ``value`` as ``node``'s constant: a handler's result that depends on parameters alone although an
        argument is computed (``constant.type_as(x)`` reads only ``x``'s dtype)."""
        self.consts[node] = value

    def param(self, value: torch.Tensor | None, name: str) -> fx.Node | None:
        """Register ``value`` as an attribute of the canonical module and return its ``get_attr`` node."""
        if value is None:
            return None
        attr = f"{name}_{self.n_params}"
        self.n_params += 1
        self.root.register_buffer(attr, value.detach(), persistent=False)
        node = self.graph.get_attr(attr)
        node.meta["fxrel_kind"] = ops.PARAM
        return node

    def value(self, node: Any) -> Any:
        deferred = self.env.get(node) if isinstance(node, fx.Node) else None
        if isinstance(deferred, _Pending) and deferred.squared and not deferred.dims:   # x², not a statistic's
            self.env[node] = deferred = self.emit(aten.pow.Tensor_Scalar, (self.value(deferred.x), 2))
        if isinstance(deferred, _Pending):
            raise self.unsupported(f"'{node.name}' is part of a normalising statistic that does not end in rsqrt")
        if isinstance(deferred, _Logits):   # used other than on the way to a softmax: the product itself
            self.env[node] = self.materialised(deferred)
        if self.is_const(node):
            raise self.unsupported(f"the constant '{node.name}' (a parameter, buffer or a value computed from them) "
                                   "is used where a computed feature map is expected")
        return self.env[node] if isinstance(node, fx.Node) else node

    def logits(self, node: Any) -> _Logits | None:
        """The attention logits ``node`` stands for, if it is one."""
        value = self.env.get(node) if isinstance(node, fx.Node) else None
        return value if isinstance(value, _Logits) else None

    def pending(self, node: Any) -> _Pending | None:
        """The half-recognised statistic ``node`` stands for, if it is one."""
        value = self.env.get(node) if isinstance(node, fx.Node) else None
        return value if isinstance(value, _Pending) else None

    def materialised(self, logits: _Logits) -> fx.Node:
        """Attention logits that do not go straight into a softmax (CaiT's talking heads mix them first): the
        bilinear product ``q @ kᵀ``, its scale, reshape and bias as canonical nodes."""
        dtype = self.current.meta["val"].dtype if "val" in self.current.meta else None
        out = self.emit(ops.bilinear, (logits.q, logits.kt))
        if not (isinstance(logits.scale, float) and logits.scale == 1.0):
            scale = torch.as_tensor(logits.scale, dtype=dtype)
            out = self.emit(ops.channel_affine, (out, self.param(scale, "scale"), None))
        if logits.shape != logits.base:
            out = self.emit(aten.reshape.default, (out, list(logits.shape)))
        if logits.bias is not None:
            one = torch.ones((), dtype=logits.bias.dtype)
            out = self.emit(ops.channel_affine, (out, self.param(one, "scale"), self.param(logits.bias, "shift")))
        return out

    def emit(self, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """Emit one canonical call node carrying the current source node's provenance."""
        node = self.graph.call_function(target, args, kwargs or {})
        src = self.current
        node.meta.update(fxrel_kind=ops.OP_SPECS[target].kind, fxrel_module=module_path(src),
                         fxrel_source=source_line(src), fxrel_origin=str(src.target),
                         nn_module_stack=src.meta.get("nn_module_stack"))
        return node

    def unsupported(self, why: str) -> UnsupportedOpError:
        n = self.current
        return UnsupportedOpError(
            f"node '{n.name}' (target {n.target}, module '{module_path(n)}') is not in fxrel's canonical op set: "
            f"{why}\n  source: {source_line(n)}")

    # -- the walk -------------------------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.src.graph.nodes:
            self.current = node
            if node.op == "placeholder":
                new = self.graph.placeholder(node.target)
                new.meta["fxrel_kind"] = ops.INPUT
                self.env[node] = new
            elif node.op == "get_attr":
                self.consts[node] = getattr(self.src, node.target)  # resolved by handlers through const()
            elif node.op == "output":
                out = self.graph.output(self.value(node.args[0]))
                out.meta["fxrel_kind"] = ops.OUTPUT
            elif node.op == "call_function":
                if self.fold(node):
                    continue
                handler = HANDLERS.get(node.target)
                if handler is None:
                    raise self.unsupported("no canonicalisation rule for this op")
                self.env[node] = handler(self, node)
            else:
                raise self.unsupported(f"unexpected fx op '{node.op}'")
        gm = fx.GraphModule(self.root, self.graph, self.src.__class__.__name__)
        return gm


def _is_tensors(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_tensors(v) for v in value)
    return isinstance(value, torch.Tensor)
