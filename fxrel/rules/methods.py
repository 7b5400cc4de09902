"""Method rule sets: a method is a composite (rule per node), an initial relevance and an output transform.

The registry maps names to factories ``(**params) -> Method``; ``fxrel.methods()`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from fxrel.errors import RuleError
from fxrel.graphs import ops
from fxrel.graphs.builder import Seed, Stream
from fxrel.rules.base import Rule
from fxrel.rules.composite import Composite, Matcher, first, kind
from fxrel.rules.gradient import DeconvNet, Gradient, GuidedBackprop, Pass
from fxrel.rules.lrp import AlphaBeta, Epsilon, Flat, Gamma, Norm, WSquare, ZBox, ZPlus


def seed_gradient(output: Any, mask: Any) -> Any:
    """Gradient methods start from the mask itself: ``R = e_t`` (∂y_t/∂y)."""
    return mask


def seed_logit(output: Any, mask: Any) -> Any:
    """LRP starts from the target score: ``R = y_t · e_t`` (LRP spec §1)."""
    return output * mask


def times_input(relevance: Any, value: Any) -> Any:
    """Gradient × input at the stop nodes."""
    return relevance * value


@dataclass
class StreamSpec:
    """A further relevance stream of a method, run in the same sweep as its main stream (contrastive duals …).
    A ``helper`` stream is not returned; it only feeds the others (AGF's gradient stream)."""

    name: str
    composite: Composite
    seed: Seed
    finalize: Callable[[Any, Any], Any] | None = None
    helper: bool = False


@dataclass
class Method:
    """A named rule set: composite + initial relevance (+ transform at the stop nodes). Custom methods are built
    the same way: ``Method("mine", Composite([(kind("conv"), ZPlus()), …]), seed_logit)``.

    ``extra`` streams run in the same sweep (one relevance graph, batched); ``combine`` then maps the streams'
    relevance at each stop node, ``{stream name: R}``, to the method's result (recorded into the graph too).
    Helper streams come first in the sweep, so that at every node the main stream's rule finds what they sent to
    the node's inputs in ``ctx.downstream``; rule overrides apply to the returned streams only."""

    name: str
    composite: Composite
    seed: Seed
    finalize: Callable[[Any, Any], Any] | None = None
    extra: tuple[StreamSpec, ...] = ()
    combine: Callable[[dict[str, Any]], Any] | None = None

    def streams(self, graph, overrides: Sequence[tuple[Matcher, Rule]] = ()) -> list[Stream]:
        specs = [StreamSpec(self.name, self.composite, self.seed, self.finalize), *self.extra]
        specs.sort(key=lambda s: not s.helper)
        return [Stream(s.name, (s.composite.with_rules(overrides) if overrides and not s.helper else s.composite
                                ).plan(graph), s.seed, s.finalize, helper=s.helper) for s in specs]


#: The default z^β bounds of every box rule: each image's own min and max (as RAP's code takes them), so the rule
#: fits whatever domain the inputs are in; ImageNet's normalised extremes only when asked
#: (``low=fxrel.rules.lrp.IMAGENET_LOW, high=IMAGENET_HIGH``).
IMAGE_BOUND = "image"

#: Output conventions, referenced by the registry entries.
SIGNED = "signed, shaped like the input (sum over channels for a heatmap)"
CONSERVING = "signed, shaped like the input; Σ R = target logit where every rule conserves (no biases/leaks)"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    factory: Callable[..., Method]
    description: str
    reference: str
    output: str
    defaults: dict = field(default_factory=dict)


REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, description: str, reference: str, output: str = SIGNED, **defaults: Any):
    """Register a method factory under ``name`` with its default parameters and output convention."""
    def deco(factory: Callable[..., Method]) -> Callable[..., Method]:
        REGISTRY[name] = MethodInfo(name, factory, description, reference, output, defaults)
        return factory
    return deco


def make_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method with parameters (unknown parameters are an error naming them)."""
    if name not in REGISTRY:
        from fxrel.posthoc import POST_HOC

        if name in POST_HOC:
            raise RuleError(f"'{name}' is not a relevance rule set but a post-hoc method (a CAM or a wrapper): call "
                            f"fxrel.explain(model, x, target, method='{name}') instead of building an Explainer")
        raise RuleError(f"unknown method '{name}'; rule sets: {', '.join(sorted(REGISTRY))}; post-hoc: "
                        f"{', '.join(sorted(POST_HOC))}")
    info = REGISTRY[name]
    unknown = set(params) - set(info.defaults)
    if unknown:
        takes = f"it takes {', '.join(sorted(info.defaults))}" if info.defaults else "it takes no parameters"
        raise RuleError(f"method '{name}' has no parameter(s) {', '.join(sorted(unknown))}; {takes}")
    return info.factory(**{**info.defaults, **params})


# --- building blocks of rule sets ------------------------------------------------------------------------------
_GRAD = Gradient()


def _lrp(name: str, layer: Rule, *, linear: Rule | None = None, first_rule: Rule | None = None,
         first_kinds: tuple[str, ...] = (ops.CONV, ops.LINEAR), affine: Rule | None = None,
         stabilizer: float = 1e-6) -> Method:
    """An LRP rule set: ``layer`` for convs (and linear layers unless ``linear`` is given), Pass for activations,
    the z-rule (Norm) for sums and average pooling, the structural defaults (``fxrel.rules.composite.STRUCTURAL``)
    for routing nodes and gates; BatchNorm left unfolded gets ``affine`` (default Pass, as zennit)."""
    pairs: list[tuple[Matcher, Rule]] = []
    if first_rule is not None:
        pairs.append((first(*first_kinds), first_rule))
    pairs += [(kind(ops.CONV), layer), (kind(ops.LINEAR), linear or layer),
              (kind(ops.ACTIVATION), Pass()), (kind(ops.AFFINE), affine or Pass()),
              (kind(*ops.SUM_KINDS), Norm(stabilizer))]
    return Method(name, Composite(pairs, name), seed_logit)


def _gradient_method(name: str, activation: Rule, finalize=None) -> Method:
    pairs = [(kind(ops.ACTIVATION), activation), (lambda n, i: True, _GRAD)]
    return Method(name, Composite(pairs, name), seed_gradient, finalize)


# --- the registry ----------------------------------------------------------------------------------------------
@register("gradient", "exact gradient ∂y_t/∂x (vector–Jacobian products)", "Simonyan et al. 2014")
def _gradient() -> Method:
    return _gradient_method("gradient", _GRAD)


@register("gradient_x_input", "gradient × input", "Shrikumar et al. 2016")
def _gradient_x_input() -> Method:
    return _gradient_method("gradient_x_input", _GRAD, times_input)


@register("guided_backprop", "guided backpropagation (ReLU passes positive gradients at active units)",
          "Springenberg et al. 2015")
def _guided() -> Method:
    return _gradient_method("guided_backprop", GuidedBackprop())


@register("deconvnet", "DeconvNet (ReLU passes positive gradients, ignoring the forward mask)", "Zeiler & Fergus 2014")
def _deconvnet() -> Method:
    return _gradient_method("deconvnet", DeconvNet())


@register("lrp_0", "LRP-0: z-rule with biases in every linear node (= gradient × input on ReLU nets)",
          "Bach et al. 2015", output=CONSERVING, stabilizer=0.0)
def _lrp0(stabilizer: float) -> Method:
    rule = Epsilon(stabilizer)
    return _lrp("lrp_0", rule, affine=rule, stabilizer=stabilizer)


@register("lrp_epsilon", "LRP-ε in every conv/linear/affine node (ε also stabilises sums and pooling)",
          "Bach et al. 2015; Montavon et al. 2019", output=CONSERVING, epsilon=1e-6)
def _lrp_eps(epsilon: float) -> Method:
    rule = Epsilon(epsilon)
    return _lrp("lrp_epsilon", rule, affine=rule, stabilizer=epsilon)


@register("lrp_gamma", "LRP-γ in every conv/linear layer", "Montavon et al. 2019", output=CONSERVING, gamma=0.25,
          stabilizer=1e-6)
def _lrp_gamma(gamma: float, stabilizer: float) -> Method:
    return _lrp("lrp_gamma", Gamma(gamma, stabilizer), stabilizer=stabilizer)


@register("lrp_zplus", "LRP-z⁺ (α1β0) in every conv/linear layer", "Montavon et al. 2017", output=CONSERVING,
          stabilizer=1e-6)
def _lrp_zplus(stabilizer: float) -> Method:
    return _lrp("lrp_zplus", ZPlus(stabilizer), stabilizer=stabilizer)


@register("lrp_alpha_beta", "LRP-αβ in every conv/linear layer", "Bach et al. 2015", output=CONSERVING,
          alpha=2.0, beta=1.0,
          stabilizer=1e-6)
def _lrp_ab(alpha: float, beta: float, stabilizer: float) -> Method:
    return _lrp("lrp_alpha_beta", AlphaBeta(alpha, beta, stabilizer), stabilizer=stabilizer)


@register("lrp_flat", "flat rule in every conv/linear layer (uniform over receptive fields)",
          "Lapuschkin et al. 2019", output=CONSERVING, stabilizer=1e-6)
def _lrp_flat(stabilizer: float) -> Method:
    return _lrp("lrp_flat", Flat(stabilizer), stabilizer=stabilizer)


@register("lrp_wsquare", "w² rule in every conv/linear layer", "Montavon et al. 2017", output=CONSERVING,
          stabilizer=1e-6)
def _lrp_w2(stabilizer: float) -> Method:
    return _lrp("lrp_wsquare", WSquare(stabilizer), stabilizer=stabilizer)


@register("lrp_zbox", "z^β (box) at the first layer, z⁺ elsewhere", "Montavon et al. 2017", output=CONSERVING,
          low=IMAGE_BOUND, high=IMAGE_BOUND, stabilizer=1e-6)
def _lrp_zbox(low, high, stabilizer: float) -> Method:
    return _lrp("lrp_zbox", ZPlus(stabilizer), first_rule=ZBox(low, high, stabilizer), first_kinds=(ops.CONV,),
                stabilizer=stabilizer)


@register("epsilon_plus_flat", "zennit EpsilonPlusFlat: flat first layer, z⁺ convs, ε linear layers",
          "zennit; Kohlbrenner et al. 2020", output=CONSERVING, epsilon=1e-6, stabilizer=1e-6)
def _epf(epsilon: float, stabilizer: float) -> Method:
    return _lrp("epsilon_plus_flat", ZPlus(stabilizer), linear=Epsilon(epsilon), first_rule=Flat(stabilizer),
                stabilizer=stabilizer)


@register("epsilon_gamma_box", "zennit EpsilonGammaBox: z^β first conv, γ convs, ε linear layers",
          "zennit; Montavon et al. 2019", output=CONSERVING,
          low=IMAGE_BOUND, high=IMAGE_BOUND, epsilon=1e-6, gamma=0.25,
          stabilizer=1e-6)
def _egb(low, high, epsilon: float, gamma: float, stabilizer: float) -> Method:
    return _lrp("epsilon_gamma_box", Gamma(gamma, stabilizer), linear=Epsilon(epsilon),
                first_rule=ZBox(low, high, stabilizer), first_kinds=(ops.CONV,), stabilizer=stabilizer)


@register("epsilon_alpha2_beta1_flat", "zennit EpsilonAlpha2Beta1Flat: flat first layer, α2β1 convs, ε linear",
          "zennit; Bach et al. 2015", output=CONSERVING, epsilon=1e-6, stabilizer=1e-6)
def _eabf(epsilon: float, stabilizer: float) -> Method:
    return _lrp("epsilon_alpha2_beta1_flat", AlphaBeta(2.0, 1.0, stabilizer), linear=Epsilon(epsilon),
                first_rule=Flat(stabilizer), stabilizer=stabilizer)
