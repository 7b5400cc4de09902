"""Rule templates (gradient family, the generic propagation rule and the LRP rules), composites and methods."""
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.composite import Composite, RulePlan, first, kind, last, module, node_name, where
from fxrel.rules.generic import GenericRule, Group, Term, stabilize
from fxrel.rules.gradient import DeconvNet, Gradient, GuidedBackprop, Pass
from fxrel.rules.lrp import AlphaBeta, Epsilon, Flat, Gamma, Norm, WSquare, ZBox, ZPlus, bounds_from_normalization

__all__ = ["Rule", "RuleContext", "Composite", "RulePlan", "first", "kind", "last", "module", "node_name", "where",
           "GenericRule", "Group", "Term", "stabilize", "DeconvNet", "Gradient", "GuidedBackprop", "Pass",
           "AlphaBeta", "Epsilon", "Flat", "Gamma", "Norm", "WSquare", "ZBox", "ZPlus", "bounds_from_normalization"]
