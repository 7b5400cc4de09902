"""The rule-template interface (:class:`Rule`, :class:`RuleContext`), defined beside the builder that calls it."""
from fxrel.graphs.rule_protocol import Rule, RuleContext

__all__ = ["Rule", "RuleContext"]
