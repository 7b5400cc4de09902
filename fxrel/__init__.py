"""fxrel: explain CNN classifiers by rewriting their fx graph into an explicit, compilable relevance graph.

>>> import fxrel
>>> relevance = fxrel.explain(model.eval(), x, target=3, method="epsilon_plus_flat")
"""
from fxrel.errors import CaptureError, FxrelError, InputError, RuleError, UnsupportedOpError
from fxrel.explainer import Explainer, Explanation, explain
from fxrel.rules import agf, contrastive, rap, rsp, srd  # noqa: F401  (registers the rule-set methods)
from fxrel.rules.methods import REGISTRY, Method, make_method

__all__ = ["explain", "Explainer", "Explanation", "Method", "make_method", "methods", "FxrelError", "CaptureError",
           "UnsupportedOpError", "RuleError", "InputError"]
__version__ = "0.1.0"


def methods(detail: bool = False) -> dict[str, str] | dict[str, dict]:
    """Every method by name with a one-line description and its paper; ``detail=True`` adds the default
    parameters and the output convention (signed or not, shape, what the values sum to)."""
    from fxrel.posthoc import POST_HOC

    entries = {**REGISTRY, **POST_HOC}
    if detail:
        return {name: {"description": e.description, "reference": e.reference, "output": e.output,
                       "defaults": dict(e.defaults)} for name, e in sorted(entries.items())}
    return {name: f"{e.description} [{e.reference}]" for name, e in sorted(entries.items())}
