"""The gradient and LRP rule sets (Simonyan 2014; Springenberg 2015; Zeiler & Fergus 2014; Bach 2015; Montavon
2017/2019; zennit's composites): one generic propagation rule per layer kind, the z-rule in sums, and the structural
defaults (``fxrel.rules.composite.STRUCTURAL``) everywhere else.

Attention: every rule set takes ``attention="attnlrp"`` (default) or ``"cp"``. The default is AttnLRP's softmax and
uniform rules (:mod:`fxrel.rules.attention`) because it draws the better maps on the trained zoo ViT (``zoo-vit``,
40 scenes, 83 pairs): EpsilonPlusFlat pointing game 0.940 → 0.964, energy pointing game 0.752 → 0.782,
discrimination 0.835 → 0.877, insertion 0.914 → 0.927; LRP-ε 0.843 → 0.880, 0.430 → 0.514, 0.575 → 0.643,
0.909 → 0.933, deletion 0.270 → 0.231 (``docs/fidelity.md``). ``"cp"`` (CP-LRP, attention weights constant) is
the one that conserves: LRP-0 with it sums to the logit on a constant-free transformer, which the coverage check
uses; AttnLRP's Taylor rule at the softmax keeps no such sum. A CNN without attention is explained alike by both."""
from __future__ import annotations

from fxrel.catalog.method import CONSERVING, IMAGE_BOUND, Method, seed_gradient, seed_logit, times_input
from fxrel.catalog.registry import register
from fxrel.graphs import ops
from fxrel.rules.base import Rule
from fxrel.rules.composite import Composite, Matcher, attention_pairs, first, kind
from fxrel.rules.gradient import DeconvNet, Gradient, GuidedBackprop, Pass
from fxrel.rules.lrp import AlphaBeta, Epsilon, Flat, Gamma, Norm, WSquare, ZBox, ZPlus

# --- building blocks of rule sets ------------------------------------------------------------------------------
_GRAD = Gradient()


def _lrp(name: str, layer: Rule, *, linear: Rule | None = None, first_rule: Rule | None = None,
         first_kinds: tuple[str, ...] = (ops.CONV, ops.LINEAR), affine: Rule | None = None,
         stabilizer: float = 1e-6, attention: str = "cp") -> Method:
    """An LRP rule set: ``layer`` for convs (and linear layers unless ``linear`` is given), Pass for activations,
    the z-rule (Norm) for sums and average pooling, the structural defaults (``fxrel.rules.composite.STRUCTURAL``)
    for routing nodes and gates; BatchNorm left unfolded gets ``affine`` (default Pass, as zennit). ``attention``:
    ``"cp"`` keeps attention weights constant (CP-LRP), ``"attnlrp"`` explains them (AttnLRP's softmax and uniform
    rules, :func:`fxrel.rules.composite.attention_pairs`)."""
    pairs: list[tuple[Matcher, Rule]] = list(attention_pairs(attention, stabilizer))
    if first_rule is not None:
        pairs.append((first(*first_kinds), first_rule))
    pairs += [(kind(ops.CONV), layer), (kind(ops.LINEAR), linear or layer),
              (kind(ops.ACTIVATION), Pass()), (kind(ops.AFFINE), affine or Pass()),
              (kind(*ops.SUM_KINDS), Norm(stabilizer))]
    return Method(name, Composite(pairs, name), seed_logit)


def gradient_composite(activation: Rule = _GRAD, name: str = "gradient") -> Composite:
    """The exact VJP at every node (``activation`` at activations: guided backprop, DeconvNet): gates and
    attention stay exact gradients, as the catch-all comes before the structural defaults."""
    return Composite([(kind(ops.ACTIVATION), activation), (lambda n, i: True, _GRAD)], name)


def _gradient_method(name: str, activation: Rule, finalize=None) -> Method:
    return Method(name, gradient_composite(activation, name), seed_gradient, finalize)


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
          "Bach et al. 2015", output=CONSERVING)
def _lrp0(stabilizer: float = 0.0, attention: str = "attnlrp") -> Method:
    rule = Epsilon(stabilizer)
    return _lrp("lrp_0", rule, affine=rule, stabilizer=stabilizer, attention=attention)


@register("lrp_epsilon", "LRP-ε in every conv/linear/affine node (ε also stabilises sums and pooling)",
          "Bach et al. 2015; Montavon et al. 2019", output=CONSERVING)
def _lrp_eps(epsilon: float = 1e-6, attention: str = "attnlrp") -> Method:
    rule = Epsilon(epsilon)
    return _lrp("lrp_epsilon", rule, affine=rule, stabilizer=epsilon, attention=attention)


@register("lrp_gamma", "LRP-γ in every conv/linear layer", "Montavon et al. 2019", output=CONSERVING)
def _lrp_gamma(gamma: float = 0.25, stabilizer: float = 1e-6, attention: str = "attnlrp") -> Method:
    return _lrp("lrp_gamma", Gamma(gamma, stabilizer), stabilizer=stabilizer, attention=attention)


@register("lrp_zplus", "LRP-z⁺ (α1β0) in every conv/linear layer", "Montavon et al. 2017", output=CONSERVING)
def _lrp_zplus(stabilizer: float = 1e-6, attention: str = "attnlrp") -> Method:
    return _lrp("lrp_zplus", ZPlus(stabilizer), stabilizer=stabilizer, attention=attention)


@register("lrp_alpha_beta", "LRP-αβ in every conv/linear layer", "Bach et al. 2015", output=CONSERVING)
def _lrp_ab(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, attention: str = "attnlrp") -> Method:
    return _lrp("lrp_alpha_beta", AlphaBeta(alpha, beta, stabilizer), stabilizer=stabilizer, attention=attention)


@register("lrp_flat", "flat rule in every conv/linear layer (uniform over receptive fields)",
          "Lapuschkin et al. 2019", output=CONSERVING)
def _lrp_flat(stabilizer: float = 1e-6, attention: str = "attnlrp") -> Method:
    return _lrp("lrp_flat", Flat(stabilizer), stabilizer=stabilizer, attention=attention)


@register("lrp_wsquare", "w² rule in every conv/linear layer", "Montavon et al. 2017", output=CONSERVING)
def _lrp_w2(stabilizer: float = 1e-6, attention: str = "attnlrp") -> Method:
    return _lrp("lrp_wsquare", WSquare(stabilizer), stabilizer=stabilizer, attention=attention)


@register("lrp_zbox", "z^β (box) at the first layer, z⁺ elsewhere", "Montavon et al. 2017", output=CONSERVING)
def _lrp_zbox(low=IMAGE_BOUND, high=IMAGE_BOUND, stabilizer: float = 1e-6, attention: str = "attnlrp") -> Method:
    return _lrp("lrp_zbox", ZPlus(stabilizer), first_rule=ZBox(low, high, stabilizer), first_kinds=(ops.CONV,),
                stabilizer=stabilizer, attention=attention)


@register("epsilon_plus_flat", "zennit EpsilonPlusFlat: flat first layer, z⁺ convs, ε linear layers",
          "zennit; Kohlbrenner et al. 2020", output=CONSERVING)
def _epf(epsilon: float = 1e-6, stabilizer: float = 1e-6, attention: str = "attnlrp") -> Method:
    return _lrp("epsilon_plus_flat", ZPlus(stabilizer), linear=Epsilon(epsilon), first_rule=Flat(stabilizer),
                stabilizer=stabilizer, attention=attention)


@register("epsilon_gamma_box", "zennit EpsilonGammaBox: z^β first conv, γ convs, ε linear layers",
          "zennit; Montavon et al. 2019", output=CONSERVING)
def _egb(low=IMAGE_BOUND, high=IMAGE_BOUND, epsilon: float = 1e-6, gamma: float = 0.25,
         stabilizer: float = 1e-6, attention: str = "attnlrp") -> Method:
    return _lrp("epsilon_gamma_box", Gamma(gamma, stabilizer), linear=Epsilon(epsilon),
                first_rule=ZBox(low, high, stabilizer), first_kinds=(ops.CONV,), stabilizer=stabilizer,
                attention=attention)


@register("epsilon_alpha2_beta1_flat", "zennit EpsilonAlpha2Beta1Flat: flat first layer, α2β1 convs, ε linear",
          "zennit; Bach et al. 2015", output=CONSERVING)
def _eabf(epsilon: float = 1e-6, stabilizer: float = 1e-6, attention: str = "attnlrp") -> Method:
    return _lrp("epsilon_alpha2_beta1_flat", AlphaBeta(2.0, 1.0, stabilizer), linear=Epsilon(epsilon),
                first_rule=Flat(stabilizer), stabilizer=stabilizer, attention=attention)


@register("attn_lrp", "AttnLRP: LRP-ε in every layer, the softmax Taylor rule and the uniform rule in attention",
          "Achtibat et al. 2024", output=CONSERVING)
def _attn_lrp(epsilon: float = 1e-6, attention: str = "attnlrp") -> Method:
    rule = Epsilon(epsilon)
    return _lrp("attn_lrp", rule, affine=rule, stabilizer=epsilon, attention=attention)
