"""Capture: turn an ``nn.Module`` plus an example input into a functional ATen-level ``torch.fx.GraphModule``.

fxrel captures with ``torch.export`` (non-strict) followed by ``run_decompositions({})``, which functionalises the
graph: in-place ops (``relu_``, ``add_``, ``+=``) become their pure forms, ``dropout`` in eval mode disappears,
``flatten`` becomes ``view`` and every shape-dependent Python branch (timm's TF-"SAME" padding, ``ConvMlp``'s size
check) is resolved for the example's shape. The result uses a small set of ATen ops, which is what canonicalisation
needs. Parameters and buffers become ``get_attr`` nodes of the returned module; each call node keeps
``nn_module_stack`` (module names for rule patterns) and ``stack_trace`` (source lines for errors).

The captured graph is specialised to the example's shape (batch size included); ``fxrel`` builds one explainer per
input shape and caches it.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import fx, nn

from fxrel.errors import CaptureError


def as_input_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Normalise one tensor or a sequence of tensors to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def check_eval_mode(model: nn.Module) -> None:
    """Raise ``CaptureError`` naming the modules that are in training mode."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        raise CaptureError(
            f"model is in training mode ({shown}); call model.eval() first: BatchNorm and dropout must use their "
            "inference behaviour for an explanation to be well defined"
        )


def _attr_name(qualified: str) -> str:
    return "p_" + re.sub(r"\W", "_", qualified)


def capture(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) on ``example_inputs`` into a functional ATen ``fx.GraphModule``.

    The module owns references to the model's parameters and buffers (``get_attr`` nodes, named ``p_<path>``);
    ``node.meta['fxrel_param']`` on each ``get_attr`` node holds the parameter's qualified name in the model.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    check_eval_mode(model)
    inputs = as_input_tuple(example_inputs)
    name = type(model).__name__
    try:
        with torch.no_grad():
            program = torch.export.export(model, inputs).run_decompositions({})
    except Exception as exc:  # export raises many kinds of errors; name the model and keep the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CaptureError(f"torch.export could not capture {name}: {type(exc).__name__}: {first}") from exc

    signature = program.graph_signature
    lifted = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
              **signature.inputs_to_lifted_tensor_constants}
    state = {**program.state_dict, **program.constants}
    user_outputs = [spec.arg.name for spec in signature.output_specs
                    if spec.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    if len(user_outputs) != 1:
        raise CaptureError(f"{name} returns {len(user_outputs)} outputs; fxrel explains models that return one "
                           "tensor of class scores")

    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name in lifted:
                qualified = lifted[node.name]
                attr = _attr_name(qualified)
                value = state[qualified]
                root.register_buffer(attr, value.detach(), persistent=False)
                new = graph.get_attr(attr)
                new.meta["fxrel_param"] = qualified
            else:
                new = graph.placeholder(node.name)
            new.meta["val"] = node.meta.get("val")
            env[node] = new
        elif node.op == "output":
            out = next(a for a in node.args[0] if a.name == user_outputs[0])
            graph.output(env[out])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(root, graph, name)
