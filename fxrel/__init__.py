"""fxrel: explain CNN classifiers by rewriting their fx graph into an explicit, compilable relevance graph.

>>> import fxrel
>>> relevance = fxrel.explain(model.eval(), x, target=3, method="epsilon_plus_flat")
"""
from fxrel.errors import CaptureError, FxrelError, InputError, RuleError, UnsupportedOpError
from fxrel.explainer import Explainer, Explanation, explain
from fxrel.rules.methods import REGISTRY, Method, make_method
from fxrel.rules import contrastive  # noqa: F401  (registers the contrastive methods)

__all__ = ["explain", "Explainer", "Explanation", "Method", "make_method", "methods", "FxrelError", "CaptureError",
           "UnsupportedOpError", "RuleError", "InputError"]
__version__ = "0.1.0"


def methods() -> dict[str, str]:
    """Registered method names with a one-line description and reference."""
    return {name: f"{info.description} [{info.reference}]" for name, info in sorted(REGISTRY.items())}
