"""Rule templates: the interface between the relevance-graph builder and the rules (``fxrel.rules`` builds on it).

A rule template is ordinary torch code. The builder calls it once per (canonical node, stream) with a
:class:`RuleContext` and the relevance arriving at the node's output; the template returns the relevance for each
of the node's tensor inputs. Because the context hands out ``torch.fx.Proxy`` objects, every torch call the
template makes is recorded as a node of the relevance graph.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import fx


class RuleContext(Protocol):
    """What a rule template may use at one canonical node (all tensors are fx proxies)."""

    node: fx.Node                 #: the canonical forward node
    kind: str                     #: its kind (see ``fxrel.graphs.ops.KINDS``)
    inputs: list[Any]             #: its tensor inputs
    output: Any                   #: its output
    weight: Any                   #: its weight (None for parameter-free kinds)
    bias: Any                     #: its bias (None where absent)
    upstream: dict[str, Any]      #: every stream's relevance at this node's output (None where a stream has none)
    downstream: dict[str, list]   #: relevance already sent to the inputs by the streams processed before this one
    nonnegative: bool             #: every tensor input is ≥ 0 by construction (ReLU outputs …)

    def forward(self, inputs: Sequence[Any], weight: Any = None, bias: Any = None, per_sample: bool = False) -> Any:
        """The node's op applied to modified inputs / parameters; ``per_sample``: ``weight`` holds one weight tensor
        per sample, ``[N, *W.shape]`` (convolutions only; no bias)."""

    def vjp(self, grad: Any, weight: Any = None, per_sample: bool = False) -> list[Any]:
        """``(∂f/∂inputs)ᵀ grad`` for each input; ``weight`` replaces the node's weight (modified-gradient rules),
        per sample with ``per_sample``."""

    def weight_vjp(self, grad: Any, inputs: Sequence[Any] | None = None) -> Any:
        """``(∂f/∂W)ᵀ grad`` per sample, ``[N, *W.shape]``, at the node's inputs or at ``inputs`` (convolutions)."""

    def param(self, which: str, tag: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """``fn`` applied once, at build time, to the node's ``weight``/``bias``; the result as a graph constant."""

    def constant(self, value: torch.Tensor | float) -> Any:
        """A tensor constant of the relevance graph (moved to the model's device and dtype)."""

    def replace(self, *, inputs: Sequence[Any] | None = None, output: Any = None, weight: Any = None,
                bias: Any = None, param_transform: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
                ) -> "RuleContext":
        """The context of a modified node: given inputs, output, weight or bias (``forward``/``vjp``/``weight_vjp``
        use them), and ``param_transform = (tag, fn)``: ``param`` derives from ``fn(parameter)``. Rules that wrap
        rules (``Repeated``, ``Negated``) hand the inner rule such a context."""


class Rule:
    """Base class of rule templates. Subclasses implement :meth:`__call__` and may restrict ``kinds``."""

    #: canonical kinds this rule can be applied to (``None``: any)
    kinds: frozenset[str] | None = None

    def __call__(self, ctx: RuleContext, relevance: Any) -> list[Any]:
        raise NotImplementedError

    def accepts(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
