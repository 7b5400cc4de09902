"""The handler table: which function canonicalises which ATen target, and where a node came from.

Handler modules register with :func:`handles`; a target registered twice is an error (as in torch's
``register_decomposition``), so one target has exactly one handler. :func:`source_line` and :func:`module_path`
give a node's provenance for canonical nodes and error messages.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx

#: ``(canonicalizer, node) → value``; the canonicalizer is :class:`fxrel.graphs.canonical.walker._Canonicalizer`
Handler = Callable[[Any, fx.Node], Any]
HANDLERS: dict[Any, Handler] = {}


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def handles(*targets: Any) -> Callable[[Handler], Handler]:
    """Register a canonicalisation handler for ATen targets.

    Raises ``ValueError`` naming the target and both handlers when a target already has one (nothing of that
    registration is recorded then)."""
    def register(fn: Handler) -> Handler:
        seen: dict[Any, Handler] = {}
        for t in targets:
            previous = HANDLERS.get(t, seen.get(t))
            if previous is not None:
                raise ValueError(f"duplicate canonicalisation handler for {t}: already handled by "
                                 f"{_qualname(previous)}, cannot also register {_qualname(fn)}")
            seen[t] = fn
        HANDLERS.update(seen)
        return fn
    return register


def source_line(node: fx.Node) -> str:
    """The innermost user-code frame of a node's stack trace, as ``file:line: code`` (or ``<unknown>``)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    frames = [(lines[i], lines[i + 1] if i + 1 < len(lines) else "") for i, ln in enumerate(lines)
              if ln.startswith("File ")]
    if not frames:
        return "<unknown>"
    where, code = frames[-1]
    return f"{where.removeprefix('File ')}: {code}"


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost ``nn.Module`` that produced a node ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path
