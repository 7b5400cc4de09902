"""Property tests of the engine on random architectures (sequential, residual, dense-concat, inception).

* the gradient rule set reproduces torch.autograd (DESIGN principle 3);
* LRP-0 equals gradient × input (LRP spec §7.2; holds with biases too);
* LRP-0 / ε / z⁺ conserve relevance on bias-free nets: Σ R_in = f_t(x) (LRP spec §7.1);
* z⁺ relevance is non-negative below the first layer when the seed is positive (spec §7.3);
* LRP is linear in the initial relevance (spec §7.6).
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.interpreter import Interpreter

import fxrel
from fxrel.graphs import ops
from tests.helpers import autograd_input_gradient, random_targets, rel_error
from tests.strategies import cnn_architectures


@given(spec=cnn_architectures())
def test_gradient_rule_set_equals_autograd(spec):
    model, x = spec.build()
    targets = random_targets(model, x)
    relevance = fxrel.Explainer(model, "gradient")(x, targets)
    reference = autograd_input_gradient(model, x, targets)
    assert rel_error(relevance, reference) < 1e-5


@given(spec=cnn_architectures())
def test_lrp0_equals_gradient_times_input(spec):
    model, x = spec.build()
    targets = random_targets(model, x)
    relevance = fxrel.Explainer(model, "lrp_0")(x, targets)
    reference = autograd_input_gradient(model, x, targets) * x
    assert rel_error(relevance, reference) < 1e-4


def _conservation_error(model, x, method, **params):
    targets = random_targets(model, x)
    explainer = fxrel.Explainer(model, method, **params)
    explanation = explainer.attribute(x, targets)
    logits = explanation.output[torch.arange(len(x)), targets]
    relevance = explanation.relevance["x"].flatten(1)
    # float32 rounding scales with the contributions, not with their (possibly cancelling) sum: a logit of 5e-4
    # made of contributions of size 4 cannot be conserved to 1e-4 of itself, so compare with max(|f_t|, Σ|R|)
    scale = torch.maximum(logits.abs(), relevance.abs().sum(1)).clamp(min=1e-12)
    return ((relevance.sum(1) - logits).abs() / scale).max().item(), logits


@given(spec=cnn_architectures(bias=False))
def test_lrp0_conserves_on_bias_free_nets(spec):
    model, x = spec.build()
    error, _ = _conservation_error(model, x, "lrp_0")
    assert error < 1e-4


@given(spec=cnn_architectures(bias=False))
def test_lrp_epsilon_conserves_on_bias_free_nets(spec):
    model, x = spec.build()
    error, _ = _conservation_error(model, x, "lrp_epsilon", epsilon=1e-9)
    assert error < 1e-4


def _forward_values(graph, x):
    values = {}

    class Record(Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    Record(graph).run(x)
    return values


@given(spec=cnn_architectures(bias=False))
def test_lrp_zplus_conserves_up_to_its_zero_denominator_leak(spec):
    """z⁺ conserves except at outputs whose positive contributions all vanish (Z⁺_j = 0, spec §6/§7.1): there
    R_j is dropped. So Σ R_input = f_t(x) − Σ_layers Σ_j R_j·[Z⁺_j = 0], computed here from the forward values."""
    model, x = spec.build()
    targets = random_targets(model, x)
    explainer = fxrel.Explainer(model, "lrp_zplus", stabilizer=1e-12, stops=["*"])
    explanation = explainer.attribute(x, targets)
    graph = explainer.canonical_graph(x)
    values = _forward_values(graph, x)
    leak = torch.zeros(len(x))
    for node in graph.graph.nodes:
        if node.meta.get("fxrel_kind") not in ("conv", "linear"):
            continue
        spec_ = ops.spec_of(node)
        inp = values[node.args[0].name]
        weight = getattr(graph, node.args[1].target)
        z_plus = (spec_.forward(node, [inp.clamp(min=0)], weight.clamp(min=0), None)
                  + spec_.forward(node, [inp.clamp(max=0)], weight.clamp(max=0), None))
        leak += (explanation.relevance[node.name] * (z_plus == 0)).flatten(1).sum(1)
    logits = explanation.output[torch.arange(len(x)), targets]
    total = explanation.relevance["x"].flatten(1).sum(1)
    scale = explanation.relevance[graph.graph.find_nodes(op="output")[0].args[0].name].abs().flatten(1).sum(1)
    assert torch.allclose(total, logits - leak, rtol=1e-4, atol=1e-5 * scale.max().item())


@given(spec=cnn_architectures(bias=False, kinds=("sequential",)))
def test_zplus_is_nonnegative_below_the_first_layer(spec):
    """Spec §7.3: with z⁺, inputs x ≥ 0 and R_out ≥ 0 give R_in ≥ 0. In conv-ReLU stacks every layer input but the
    image is a ReLU output, so a positive seed keeps every relevance above the first layer non-negative."""
    model, x = spec.build()
    explainer = fxrel.Explainer(model, "lrp_zplus", stops=["*"])
    canonical = explainer.canonical_graph(x)
    output = model(x).detach()
    seed = torch.zeros_like(output)
    seed[:, 0] = output[:, 0].sign()  # LRP starts from y·seed: this makes the initial relevance |y_0| ≥ 0
    relevance = explainer.attribute(x, seed=seed).relevance
    first_conv = next(n for n in canonical.graph.nodes if n.meta.get("fxrel_kind") == "conv")
    for node in canonical.graph.nodes:
        if node.name in relevance and node.name not in ("x", first_conv.args[0].name):
            assert relevance[node.name].min().item() >= -1e-6, node.name


@given(spec=cnn_architectures())
def test_lrp_is_linear_in_the_seed(spec):
    model, x = spec.build()
    explainer = fxrel.Explainer(model, "epsilon_gamma_box", low=-4.0, high=4.0)
    out = model(x).detach()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(out.shape, generator=g), torch.randn(out.shape, generator=g)
    combined = explainer(x, seed=2 * a - 3 * b)
    separate = 2 * explainer(x, seed=a) - 3 * explainer(x, seed=b)
    assert rel_error(combined, separate) < 1e-4


@settings(max_examples=2)
@given(spec=cnn_architectures(), method=st.sampled_from(["gradient", "epsilon_plus_flat", "lrp_alpha_beta"]))
def test_compiled_equals_eager(spec, method):
    """torch.compile(fullgraph=True) of the relevance graph agrees with eager execution (two examples, about 30 s
    each: each one compiles a new graph; the API, norm, contrastive, RSP and CAM tests compile fixed nets)."""
    model, x = spec.build()
    targets = random_targets(model, x)
    eager = fxrel.Explainer(model, method)(x, targets)
    compiled = fxrel.Explainer(model, method, compile=True)(x, targets)
    assert rel_error(compiled, eager) < 1e-5



@settings(max_examples=5, deadline=None)
@given(spec=cnn_architectures(), method=st.sampled_from(["epsilon_plus_flat", "lrp_zplus", "lrp_alpha_beta",
                                                         "lrp_wsquare", "lrp_flat"]))
def test_denominators_nonnegative_by_construction_take_the_one_pass_stabiliser_bit_for_bit(spec, method):
    """z⁺, flat and w² denominators are ≥ 0 by their terms' signs, so ``stab(z) = z + ε`` replaces the four-pass
    ``where(z ≥ 0, z + ε, z − ε)``: the relevance is bit for bit that of the general stabiliser (``divide`` made to
    ignore the sign), in fewer program nodes; and no ReLU output is clamped to its positive part."""
    from fxrel.rules import generic

    model, x = spec.build()
    targets = random_targets(model, x)
    fast = fxrel.Explainer(model, method)
    program = fast.relevance_graph(x).module.graph
    relevance = fast(x, targets)
    general_divide = generic.divide
    generic.divide = lambda r, z, eps, dtype=None, nonnegative=False: general_divide(r, z, eps, dtype)
    try:
        general = fxrel.Explainer(model, method)
        reference = general(x, targets)
        slow = general.relevance_graph(x).module.graph
    finally:
        generic.divide = general_divide
    assert torch.equal(relevance, reference)
    assert len(program.nodes) < len(slow.nodes)
    clamped = [n.args[0] for n in program.nodes if n.op == "call_method" and n.target == "clamp"]
    assert not any(a.meta.get("fxrel_nonnegative") for a in clamped if isinstance(a, torch.fx.Node))
