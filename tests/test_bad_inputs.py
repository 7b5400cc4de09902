"""The bad-input suite: every case is a named error (its type, and a message naming the argument) or a correct
result, and no case changes the user's model (a hash of its state and attributes before and after)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxrel
from fxrel.rules import ZPlus, kind
from tests.helpers import autograd_input_gradient, rel_error


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


MODEL = tiny()
X = torch.randn(2, 3, 8, 8)


def model_state(model: nn.Module) -> str:
    """A hash of everything a call could change: parameters, buffers, modes, hooks and plain attributes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for name, m in model.named_modules():
        plain = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
        h.update(f"{name}:{m.training}:{sorted(plain)}:{len(m._forward_hooks)}:{len(m._forward_pre_hooks)}".encode())
    return h.hexdigest()


def raises_naming(error: type, words: str, call) -> None:
    before = model_state(MODEL)
    with pytest.raises(error, match=words):
        call()
    assert model_state(MODEL) == before


# -- targets ----------------------------------------------------------------------------------------------------------
BAD_TARGETS = [
    (1.5, "integer class index, got 1.5"), ([0, 1.5], r"target\[1\] must be an integer"),
    (torch.tensor([0.7, 1.2]), "float32 tensor"), (torch.tensor([True, False]), "bool tensor"),
    (float("nan"), "integer class index, got nan"), (2 ** 70, "class index 1180591620717411303424 out of range"),
    ([0, "a"], r"target\[1\] must be an integer"), (-1, "class index -1 out of range"), (3, "class index 3 out"),
    ([0, 1, 2], "3 targets for a batch of 2"), (torch.zeros(2, device="meta", dtype=torch.long), "meta tensor"),
    (True, "integer class index, got True"), ("top9", "top-9 requested"), ("best", "not understood"),
    ([[0], [1]], r"target\[0\] must be an integer"), (torch.tensor([[0, 1]]), None),
]


@pytest.mark.parametrize("target, words", BAD_TARGETS, ids=[repr(t)[:30] for t, _ in BAD_TARGETS])
@pytest.mark.parametrize("method", ["gradient", "epsilon_plus_flat", "grad_cam"])
def test_bad_targets_are_named(method, target, words):
    if words is None:  # a [1, 2] tensor of whole indices is one per row: accepted
        assert fxrel.explain(MODEL, X, target, method=method).shape[0] == 2
        return
    raises_naming(fxrel.InputError, words, lambda: fxrel.explain(MODEL, X, target, method=method))


# -- inputs -----------------------------------------------------------------------------------------------------------
BAD_INPUTS = [
    ([[1.0]], "x must be a torch.Tensor, got list"), (torch.ones(2, 3, 8, 8, dtype=torch.long), "floating-point"),
    (torch.randn(3), "batched"), (X.to_sparse(), "dense tensor"), (torch.empty(2, 3, 8, 8, device="meta"), "meta"),
    (X.clone().index_fill_(0, torch.tensor([1]), float("nan")), "NaN"),
    (X.clone().index_fill_(0, torch.tensor([0]), float("inf")), "infinite"),
]


@pytest.mark.parametrize("x, words", BAD_INPUTS, ids=[w for _, w in BAD_INPUTS])
@pytest.mark.parametrize("method", ["gradient", "lrp_epsilon", "integrated_gradients", "smoothgrad"])
def test_bad_inputs_are_named(method, x, words):
    raises_naming(fxrel.InputError, words, lambda: fxrel.explain(MODEL, x, 0, method=method))


# -- method parameters ------------------------------------------------------------------------------------------------
BAD_PARAMETERS = [
    ("lrp_epsilon", {"epsilon": -1e-3}, "epsilon must be ≥ 0"), ("lrp_epsilon", {"epsilon": float("nan")}, "finite"),
    ("lrp_epsilon", {"epsilon": "1e-3"}, "epsilon must be a real number, got '1e-3'"),
    ("lrp_gamma", {"gamma": -0.25}, "gamma must be ≥ 0"), ("lrp_zplus", {"stabilizer": -1.0}, "stabilizer"),
    ("lrp_zbox", {"low": 2.0, "high": 1.0}, r"low \(2.0\) must not exceed high"),
    ("lrp_zbox", {"low": "imagenet"}, "low must be 'image'"), ("lrp_alpha_beta", {"beta": -1.0}, "beta must be ≥ 0"),
    ("integrated_gradients", {"steps": 0}, "steps must be a positive integer"),
    ("integrated_gradients", {"steps": 2.5}, "steps must be a positive integer"),
    ("smoothgrad", {"noise": -0.1}, "noise must be ≥ 0"), ("smoothgrad", {"samples": True}, "samples must be"),
    ("grad_cam", {"relu": "yes"}, "relu must be True or False"), ("ucag", {"n": 0}, "n must be a positive integer"),
    ("ucag", {"alpha": -2.0}, "alpha must be > 0"), ("agf", {"ridge": -1.0}, "ridge must be ≥ 0"),
    ("agf", {"no_a": 1}, "no_a must be True or False"), ("lrp_epsilon", {"epsilon": float("inf")}, "finite"),
]


@pytest.mark.parametrize("method, params, words", BAD_PARAMETERS, ids=[f"{m}-{w[:20]}" for m, _, w in BAD_PARAMETERS])
def test_bad_parameter_values_are_named(method, params, words):
    raises_naming(fxrel.RuleError, f"method '{method}'.*{words}",
                  lambda: fxrel.explain(MODEL, X, 0, method=method, **params))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.floats(max_value=-1e-300), st.just(float("nan")), st.text(max_size=5), st.none(),
                 st.lists(st.integers(), max_size=2)))
def test_any_bad_epsilon_is_named(epsilon):
    raises_naming(fxrel.RuleError, "epsilon", lambda: fxrel.Explainer(MODEL, "lrp_epsilon", epsilon=epsilon))


@settings(max_examples=15, deadline=None)
@given(st.floats(min_value=0.0, max_value=10.0))
def test_any_valid_epsilon_is_accepted(epsilon):
    assert torch.isfinite(fxrel.Explainer(MODEL, "lrp_epsilon", epsilon=epsilon)(X, 1)).all()


# -- models, seeds, stops, rules --------------------------------------------------------------------------------------
class _Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny()

    def forward(self, x):
        return self.body(x)[:, :1].reshape(-1)


def test_a_function_is_not_a_model():
    with pytest.raises(fxrel.InputError, match="model must be a torch.nn.Module, got function"):
        fxrel.explain(lambda x: x.sum(1), X, 0, method="gradient")


def test_training_mode_after_the_first_call_is_refused():
    model = tiny()
    explainer = fxrel.Explainer(model, "gradient")
    explainer(X, 0)
    fxrel.explain(model, X, 0, method="gradient")
    model.train()
    with pytest.raises(fxrel.CaptureError, match="training mode"):
        explainer(X, 0)
    with pytest.raises(fxrel.CaptureError, match="training mode"):
        fxrel.explain(model, X, 0, method="gradient")


def test_a_model_with_scalar_outputs_is_named():
    raises_naming(fxrel.InputError, r"outputs shape \(2,\).*seed=",
                  lambda: fxrel.explain(_Scalar().eval(), X, 0, method="gradient"))


BAD_SEEDS = [([[0.0, 1.0, 0.0]] * 2, "seed must be a torch.Tensor"), (torch.ones(2, 4), r"seed has shape \(2, 4\)"),
             (torch.full((2, 3), float("nan")), "seed must be a finite"),
             (torch.ones(2, 3, dtype=torch.long), "finite")]


@pytest.mark.parametrize("seed, words", BAD_SEEDS, ids=[w[:20] for _, w in BAD_SEEDS])
def test_bad_seeds_are_named(seed, words):
    explainer = fxrel.Explainer(MODEL, "gradient")
    raises_naming(fxrel.InputError, words, lambda: explainer.attribute(X, seed=seed))


def test_a_string_stop_is_one_name_and_bad_stops_are_named():
    explainer = fxrel.Explainer(MODEL, "gradient", stops="1")
    assert list(explainer.attribute(X, 0).relevance) == ["1"]
    raises_naming(fxrel.RuleError, "no node or module named '10'",
                  lambda: fxrel.Explainer(MODEL, "gradient", stops="10")(X, 0))
    raises_naming(fxrel.InputError, "stops must be a node or module name",
                  lambda: fxrel.Explainer(MODEL, "gradient", stops=[1, 2]))
    raises_naming(fxrel.InputError, "start must be one node",
                  lambda: fxrel.Explainer(MODEL, "gradient", start=["1", "2"]))


@pytest.mark.parametrize("rules", [[(kind("conv"), "zplus")], [("conv", ZPlus())], [kind("conv")]])
def test_bad_rule_overrides_are_named(rules):
    raises_naming(fxrel.InputError, r"rules\[0\] must be a \(matcher, Rule\) pair",
                  lambda: fxrel.Explainer(MODEL, "lrp_epsilon", rules=rules))


@pytest.mark.parametrize("method", [3, None, object()])
def test_a_method_that_is_not_a_name_is_named(method):
    raises_naming(fxrel.FxrelError, "method", lambda: fxrel.Explainer(MODEL, method))


# -- weights changed behind the version counter ------------------------------------------------------------------------
def test_weights_changed_through_data_rebuild_the_program():
    model = tiny().double()
    x = X.double()
    explainer = fxrel.Explainer(model, "gradient")
    explainer(x, 1)
    model[0].weight.data.mul_(-2)                          # in place, bypassing the version counter
    assert rel_error(explainer(x, 1), autograd_input_gradient(model, x, torch.tensor([1, 1]))) < 1e-12
    model[4].weight.data = torch.randn_like(model[4].weight)   # a new storage under the same Parameter
    assert rel_error(explainer(x, 1), autograd_input_gradient(model, x, torch.tensor([1, 1]))) < 1e-12


# -- non-finite results -----------------------------------------------------------------------------------------------
def test_an_overflowing_forward_pass_is_a_numerical_error_naming_the_node():
    with pytest.raises(fxrel.NumericalError, match="forward pass is not finite from node"):
        fxrel.explain(MODEL, torch.full((1, 3, 8, 8), 3e38), 0, method="lrp_epsilon")


def test_a_non_finite_relevance_names_its_relevance_node_and_rule():
    class Exploding(fxrel.rules.Rule):
        def __call__(self, ctx, relevance):
            return [r / 0.0 for r in ctx.vjp(relevance)]

    explainer = fxrel.Explainer(MODEL, "gradient", rules=[(kind("linear"), Exploding())])
    with pytest.raises(fxrel.NumericalError, match=r"relevance-graph node .*rule Exploding.*forward node"):
        explainer(X, 0)


@pytest.mark.parametrize("method", ["srd", "rsp", "crsp"])
def test_methods_entering_at_layer_x_name_themselves_on_an_mlp(method):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with pytest.raises(fxrel.RuleError, match=r"no spatial feature map.*methods entering at layer X \(RSP, SRD\)"):
        fxrel.explain(mlp, X, 0, method=method)
