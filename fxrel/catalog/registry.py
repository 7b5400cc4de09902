"""The method registry: every method fxrel offers, sweep or wrapper, is one :class:`MethodInfo` under its name.

A *sweep* is a rule set (:class:`~fxrel.catalog.method.Method`) run as one relevance graph; its entry holds the
factory ``(**parameters) → Method``. A *wrapper* runs other methods (Integrated Gradients, SmoothGrad, UCAG, AGF of a
self-supervised network); its entry holds ``(model, x, target, **parameters) → result``. Either way the defaults are
read from the function's signature — one place for each default — and an unknown or misspelt parameter is an error
listing the valid ones. A name registered twice is an error (like torch's ``register_decomposition``).

``fxrel.explain``, :class:`fxrel.Explainer`, the CLI and ``fxrel eval`` dispatch through :func:`method_info`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from fxrel.catalog.method import SIGNED, Method
from fxrel.errors import RuleError
from fxrel.validation import check_parameters


@dataclass(frozen=True)
class MethodInfo:
    """One registered method: what it is, where it comes from, what it returns and its default parameters."""

    name: str
    description: str
    reference: str
    output: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    build: Callable[..., Method] | None = None    #: a sweep: parameters → Method
    run: Callable[..., Any] | None = None          #: a wrapper: (model, x, target, **parameters) → result

    @property
    def is_sweep(self) -> bool:
        """Whether the method is one relevance sweep (an Explainer, ``fxrel graph``, ``compile=True``, rule plans)."""
        return self.build is not None

    def check(self, params: Mapping[str, Any]) -> None:
        """Reject parameters the method does not take, naming them and the valid ones."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            takes = f"it takes {', '.join(sorted(self.defaults))}" if self.defaults else "it takes no parameters"
            raise RuleError(f"method '{self.name}' has no parameter(s) {', '.join(unknown)}; {takes}")
        check_parameters(self.name, dict(params))


REGISTRY: dict[str, MethodInfo] = {}


def signature_defaults(fn: Callable[..., Any], skip: int = 0) -> dict[str, Any]:
    """The parameters of ``fn`` with their defaults, after its first ``skip`` positional ones (``**kwargs`` left out);
    a parameter without a default is an error (every registered parameter must have one)."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD][skip:]
    missing = [p.name for p in params if p.default is p.empty]
    if missing:
        raise RuleError(f"{fn.__qualname__}: parameters {missing} need defaults to be registered")
    return {p.name: p.default for p in params}


def _add(info: MethodInfo) -> None:
    if info.name in REGISTRY:
        raise RuleError(f"method '{info.name}' is registered twice")
    REGISTRY[info.name] = info


def register(name: str, description: str, reference: str, output: str = SIGNED):
    """Register a sweep: the decorated factory ``(**parameters) → Method``, its defaults read from its signature."""
    def deco(factory: Callable[..., Method]) -> Callable[..., Method]:
        _add(MethodInfo(name, description, reference, output, signature_defaults(factory), build=factory))
        return factory
    return deco


def register_wrapper(name: str, run: Callable[..., Any], description: str, reference: str, output: str,
                     defaults: Mapping[str, Any]) -> None:
    """Register a wrapper: ``run(model, x, target, **parameters)`` with the parameters it takes and their defaults
    (read from the wrapped function's signature by the caller, :func:`signature_defaults`)."""
    _add(MethodInfo(name, description, reference, output, dict(defaults), run=run))


def method_info(name: str) -> MethodInfo:
    """The registry entry of ``name``; an unknown name is an error listing the registered ones."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise RuleError(f"unknown method {name!r}; methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def make_method(name: str, **params: Any) -> Method:
    """Instantiate a registered sweep with parameters (unknown parameters are an error naming the valid ones)."""
    info = method_info(name)
    if not info.is_sweep:
        raise RuleError(f"'{name}' is not a relevance rule set but a post-hoc method wrapping other methods: call "
                        f"fxrel.explain(model, x, target, method='{name}') instead of building an Explainer")
    info.check(params)
    return info.build(**{**info.defaults, **params})


def describe(detail: bool = False) -> dict[str, str] | dict[str, dict]:
    """Every method by name with a one-line description and its paper; ``detail=True`` adds the default
    parameters, the output convention and whether it is a sweep."""
    if detail:
        return {name: {"description": e.description, "reference": e.reference, "output": e.output,
                       "defaults": dict(e.defaults), "sweep": e.is_sweep} for name, e in sorted(REGISTRY.items())}
    return {name: f"{e.description} [{e.reference}]" for name, e in sorted(REGISTRY.items())}
