"""APOP: activation-pattern-only prediction (Han, Kim, Kwak, ICLR 2024, Table 1, Appendix D, Alg. 1).

Record the on/off pattern of one input — every ReLU's mask ``1[ReLU(z) > 0]`` and every max-pooling's argmax
indices — then predict from another input (zeros, ones, noise) with the pattern frozen: each ReLU becomes
``z ↦ z ⊙ mask`` (the values may be negative) and each max-pooling picks the recorded positions. ``relu=True`` is
the paper's "APOP & relu": the ReLU is applied after the mask as well.

Built as a rewrite of the captured canonical graph (:func:`apop_graph`): the program runs the pattern input's
forward pass and the probe's side by side. The probe equal to the pattern input reproduces the model's output
exactly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxrel.errors import InputError, UnsupportedOpError
from fxrel.explainer import cached_explainer
from fxrel.graphs import ops

aten = torch.ops.aten
PROBES = ("zeros", "ones", "normal")


def apop_graph(canonical: fx.GraphModule, relu: bool = False) -> fx.GraphModule:
    """``forward(pattern, probe) → the probe's output with the pattern's activation pattern frozen``."""
    graph, env, probe_env = fx.Graph(), {}, {}
    probe_input = None
    for node in canonical.graph.nodes:
        if node.op == "output":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "get_attr":
            probe_env[node] = env[node]
        elif node.op == "placeholder":
            if probe_input is not None:
                raise InputError("APOP takes models with a single input")
            probe_input = node
            probe_env[node] = graph.placeholder("probe")
    for node in canonical.graph.nodes:
        if node.op != "call_function":
            continue
        kind = node.meta.get("fxrel_kind")
        args = fx.node.map_arg(node.args, lambda n: probe_env[n])
        if kind == ops.ACTIVATION:
            if node.target is not aten.relu.default:
                raise UnsupportedOpError(f"APOP freezes ReLU patterns; node '{node.name}' is {node.target} (module "
                                         f"'{node.meta.get('fxrel_module', '')}')")
            mask = graph.call_function(aten.gt.Scalar, (env[node], 0))
            value = graph.call_function(aten.mul.Tensor, (args[0], mask))
            if relu:
                value = graph.call_function(aten.relu.default, (value,))
        elif kind == ops.MAXPOOL:
            if node.target is not aten.max_pool2d.default:
                raise UnsupportedOpError(f"APOP freezes max-pooling indices; node '{node.name}' is {node.target} "
                                         f"(module '{node.meta.get('fxrel_module', '')}')")
            pooled = graph.call_function(aten.max_pool2d_with_indices.default, (env[node.args[0]], *node.args[1:]))
            indices = graph.call_function(_item, (pooled, 1))
            value = graph.call_function(_gather_pooled, (args[0], indices))
        else:
            value = graph.call_function(node.target, args, fx.node.map_arg(node.kwargs, lambda n: probe_env[n]))
        probe_env[node] = value
    output = next(n for n in canonical.graph.nodes if n.op == "output")
    graph.output(fx.node.map_arg(output.args[0], lambda n: probe_env[n]))
    return fx.GraphModule(canonical, graph, "APOP")


def _item(pair: Any, index: int) -> Any:
    return pair[index]


def _gather_pooled(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Max-pooling at recorded argmax ``indices`` (flat per channel, as ``max_pool2d_with_indices`` gives them)."""
    return values.flatten(2).gather(2, indices.flatten(2)).view_as(indices).to(values.dtype)


def probe_like(x: torch.Tensor, probe: str, seed: int = 0) -> torch.Tensor:
    """The probe input: ``zeros``, ``ones`` or ``normal`` (N(0, 1), seeded)."""
    if probe == "zeros":
        return torch.zeros_like(x)
    if probe == "ones":
        return torch.ones_like(x)
    if probe == "normal":
        g = torch.Generator(device=x.device).manual_seed(seed)
        return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    raise InputError(f"probe must be one of {PROBES}, got {probe!r}")


def apop_predict(model: nn.Module, x: torch.Tensor, probe: str | torch.Tensor = "zeros", relu: bool = False,
                 seed: int = 0) -> torch.Tensor:
    """The model's output on ``probe`` with the activation pattern of ``x`` frozen (Alg. 1), batched."""
    canonical = cached_explainer(model).canonical_graph(x)
    probe_input = probe if isinstance(probe, torch.Tensor) else probe_like(x, probe, seed)
    if probe_input.shape != x.shape:
        raise InputError(f"the probe has shape {tuple(probe_input.shape)}, the pattern input {tuple(x.shape)}")
    with torch.no_grad():
        return apop_graph(canonical, relu)(x, probe_input.to(x))
