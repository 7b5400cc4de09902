"""Capture: turn an ``nn.Module`` plus an example input into a functional ATen-level ``torch.fx.GraphModule``.

fxrel captures with ``torch.export`` (non-strict) followed by ``run_decompositions``, which functionalises the
graph: in-place ops (``relu_``, ``add_``, ``+=``) become their pure forms, ``dropout`` in eval mode disappears,
``flatten`` becomes ``view`` and every shape-dependent Python branch (timm's TF-"SAME" padding, ``ConvMlp``'s size
check) is resolved for the example's shape; recurrent layers (``nn.LSTM``/``GRU``/``RNN``, Sequencer's 2-D LSTMs) are
unrolled into their cells — linear maps, sigmoid/tanh gates and their products — by torch's own decompositions
(:data:`RECURRENT`). The result uses a small set of ATen ops, which is what canonicalisation
needs. Parameters and buffers become ``get_attr`` nodes of the returned module; each call node keeps
``nn_module_stack`` (module names for rule patterns) and ``stack_trace`` (source lines for errors).

The captured graph is specialised to the example's shape (batch size included); ``fxrel`` builds one explainer per
input shape and caches it.

Tracing runs the user's ``forward`` on fake tensors; the user's model is left as it was (:func:`_untouched`): its
forward hooks are detached while tracing (they would see fake tensors) and every module's attributes are restored
afterwards, and the contents of plain dicts, lists and sets among them (a forward that stores ``self.last = h`` or
caches into ``self.cache[key]`` would otherwise keep a fake tensor). A custom
``torch.autograd.Function`` is refused by name: tracing sees only its forward, so its own backward could not be
honoured and every gradient-based method would silently differ from autograd.
"""
from __future__ import annotations

import contextlib
import copy
import re
import threading
import traceback
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import fx, nn
from torch._decomp import get_decompositions
from torch.nn.modules import module as module_globals

from fxrel.errors import CaptureError, UnsupportedOpError
from fxrel.validation import check_model

_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_hooks_always_called", "_global_forward_pre_hooks",
                 "_global_forward_hooks_with_kwargs")
_TORCH = Path(torch.__file__).parent


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[list[type]]:
    """While tracing: the model's and the global forward hooks detached, the custom autograd Functions this thread
    applies recorded (yielded); afterwards — also on errors — every module's attributes as they were before."""
    saved = [(m, dict(vars(m))) for m in model.modules()]
    # plain containers the forward may fill in place (timm's LeViT/EfficientFormer cache their attention biases in
    # a dict on the first call, which would keep a FakeTensor): their contents, restored in place
    contents = [(value, copy.copy(value)) for _, attributes in saved for value in attributes.values()
                if type(value) in (dict, list, set)]
    global_hooks = {name: getattr(module_globals, name) for name in _GLOBAL_HOOKS if hasattr(module_globals, name)}
    applied: list[type] = []
    original_apply = torch.autograd.Function.__dict__["apply"]
    thread = threading.get_ident()

    def recording_apply(cls, *args, **kwargs):
        if threading.get_ident() == thread:
            applied.append(cls)
        return original_apply.__get__(None, cls)(*args, **kwargs)

    try:
        for m, _ in saved:
            for name in _HOOKS:
                if name in vars(m):
                    vars(m)[name] = OrderedDict()
        for name, hooks in global_hooks.items():
            setattr(module_globals, name, OrderedDict() if isinstance(hooks, OrderedDict) else type(hooks)())
        torch.autograd.Function.apply = classmethod(recording_apply)
        yield applied
    finally:
        torch.autograd.Function.apply = original_apply
        for name, hooks in global_hooks.items():
            setattr(module_globals, name, hooks)
        for container, before in contents:
            container.clear()
            if isinstance(container, list):
                container.extend(before)
            else:
                container.update(before)
        for m, before in saved:
            current = vars(m)
            for key in [k for k in current if k not in before]:
                del current[key]
            for key, value in before.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value


_MISSING = object()


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the exception's traceback outside torch and fxrel: the user's line."""
    here = Path(__file__).parents[1]
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not (Path(f.filename).is_relative_to(_TORCH) or Path(f.filename).is_relative_to(here))]
    return f"; at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else ""


def as_input_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Normalise one tensor or a sequence of tensors to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


#: the ops ``run_decompositions`` expands (torch's decompositions); every other op is kept as export gives it
_aten = torch.ops.aten
RECURRENT = get_decompositions([_aten.lstm.input, _aten.lstm.data, _aten.gru.input, _aten.gru.data,
                                _aten.rnn_tanh.input, _aten.rnn_relu.input])


def _attr_name(qualified: str) -> str:
    return "p_" + re.sub(r"\W", "_", qualified)


def capture(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) on ``example_inputs`` into a functional ATen ``fx.GraphModule``.

    The module owns references to the model's parameters and buffers (``get_attr`` nodes, named ``p_<path>``);
    ``node.meta['fxrel_param']`` on each ``get_attr`` node holds the parameter's qualified name in the model.
    """
    check_model(model)
    inputs = as_input_tuple(example_inputs)
    name = type(model).__name__
    try:
        with torch.no_grad(), _untouched(model) as functions, warnings.catch_warnings():
            # an RNN re-lists its weights when export swaps them for fakes; _untouched restores the list
            warnings.filterwarnings("ignore", r"The tensor attributes .*_flat_weights.* were assigned during export")
            program = torch.export.export(model, inputs).run_decompositions(RECURRENT)
    except Exception as exc:  # export raises many kinds of errors; name the model, the user's line, keep the cause
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()][:3]
        raise CaptureError(f"torch.export could not capture {name}: {type(exc).__name__}: {' '.join(lines)}"
                           f"{_user_frame(exc)}") from exc
    custom = list(dict.fromkeys(f for f in functions if not f.__module__.startswith("torch")))
    if custom:
        shown = ", ".join(f"{f.__qualname__} ({f.__module__})" for f in custom)
        raise UnsupportedOpError(f"{name} applies the custom torch.autograd.Function {shown}: fxrel traces its forward "
                                 "only, so its own backward cannot be honoured and gradients would silently differ "
                                 "from autograd; write it with torch ops (or as a module fxrel can trace)")

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
