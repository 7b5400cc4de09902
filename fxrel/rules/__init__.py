"""Rule templates (gradient family, the generic propagation rule, the LRP rules, uniform shifting), composites and
methods."""
from fxrel.rules.base import Rule, RuleContext
from fxrel.rules.composite import Composite, RulePlan, first, kind, last, module, node_name, reads_input, where
from fxrel.rules.generic import GenericRule, Group, Term, stabilize
from fxrel.rules.gradient import DeconvNet, Gradient, GuidedBackprop, Pass
from fxrel.rules.lrp import AlphaBeta, Epsilon, Flat, Gamma, Norm, WSquare, ZBox, ZPlus, bounds_from_normalization
from fxrel.rules.shift import Shifted, uniform_shift

__all__ = ["Rule", "RuleContext", "Composite", "RulePlan", "first", "kind", "last", "module", "node_name",
           "reads_input", "where", "GenericRule", "Group", "Term", "stabilize", "DeconvNet", "Gradient",
           "GuidedBackprop", "Pass", "AlphaBeta", "Epsilon", "Flat", "Gamma", "Norm", "WSquare", "ZBox", "ZPlus",
           "bounds_from_normalization", "Shifted", "uniform_shift"]
