"""fxrel: explain CNN classifiers by rewriting their fx graph into an explicit, compilable relevance graph.

>>> import fxrel
>>> relevance = fxrel.explain(model.eval(), x, target=3, method="epsilon_plus_flat")
"""
from fxrel import cam, ssl, ucag, wrappers  # noqa: F401  (the wrappers register themselves)
from fxrel.catalog import REGISTRY, Method, describe, make_method
from fxrel.errors import CaptureError, FxrelError, InputError, NumericalError, RuleError, UnsupportedOpError
from fxrel.explainer import Explainer, Explanation, explain
from fxrel.version import __version__

__all__ = ["explain", "Explainer", "Explanation", "Method", "make_method", "methods", "REGISTRY", "FxrelError",
           "CaptureError", "UnsupportedOpError", "RuleError", "InputError", "NumericalError", "__version__"]


def methods(detail: bool = False) -> dict[str, str] | dict[str, dict]:
    """Every method by name with a one-line description and its paper; ``detail=True`` adds the default
    parameters, the output convention (signed or not, shape, what the values sum to) and whether it is a sweep
    (one relevance graph: ``fxrel graph``, ``compile=True``, rule plans) or a wrapper around other methods."""
    return describe(detail)
