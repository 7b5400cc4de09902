"""Integrated Gradients and SmoothGrad wrappers: agreement with captum / autograd references, completeness,
chunking, determinism, LRP methods and input errors."""
from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients
from torch import nn

import fxrel
from fxrel.streams import stream_seed
from fxrel.wrappers import INTEGRATION_RULES, integrated_gradients, integration_parameters, smoothgrad
from tests.helpers import autograd_input_gradient, rel_error

torch.set_num_threads(2)

TARGETS = torch.tensor([1, 4])


def relu_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 6)).eval()


def smooth_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(4, 5, 3), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 6)).eval()


def images(n: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(seed))


# -- Integrated Gradients -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["riemann_trapezoid", "gausslegendre", "riemann_middle", "riemann_right"])
@pytest.mark.parametrize("baseline", ["zeros", "float", "per_image", "shared"])
def test_ig_of_gradient_matches_captum(rule: str, baseline: str) -> None:
    model, x = relu_net(), images()
    shared = 0.3 * images(1, seed=8)[0]
    base = {"zeros": None, "float": 0.25, "per_image": 0.3 * images(seed=7), "shared": shared}[baseline]
    captum_base = shared.expand_as(x) if baseline == "shared" else base
    ours = integrated_gradients(fxrel.Explainer(model, "gradient"), x, TARGETS, baseline=base, steps=16, rule=rule)
    ref = IntegratedGradients(model).attribute(x, baselines=captum_base, target=TARGETS, n_steps=16, method=rule)
    assert ours.shape == x.shape
    assert rel_error(ours, ref) < 1e-5


def test_integration_parameters_match_captum() -> None:
    from captum.attr._utils.approximation_methods import approximation_parameters
    for rule in INTEGRATION_RULES:
        for steps in (2, 5, 32):
            step_sizes, alphas = approximation_parameters(rule)
            ours_alphas, ours_weights = integration_parameters(rule, steps)
            assert torch.allclose(torch.tensor(ours_alphas), torch.tensor(alphas(steps)), atol=1e-12, rtol=0)
            assert torch.allclose(torch.tensor(ours_weights), torch.tensor(step_sizes(steps)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_middle", "riemann_trapezoid"])
def test_ig_completeness_improves_with_steps(rule: str) -> None:
    """Σ IG ≈ f_t(x) − f_t(x₀) (Sundararajan et al. 2017, Prop. 1), better with more steps (down to float32
    round-off, ~1e-6). captum's trapezoid weights sum to 1 − 1/steps, hence its error of ≈ 1/steps."""
    model, x = smooth_net(), images()
    x0 = torch.full_like(x, 0.1)
    with torch.no_grad():
        gap = (model(x) - model(x0))[torch.arange(2), TARGETS]
    explainer = fxrel.Explainer(model, "gradient")
    errors = []
    for steps in (2, 8, 128):
        ig = integrated_gradients(explainer, x, TARGETS, baseline=x0, steps=steps, rule=rule)
        errors.append(((ig.flatten(1).sum(1) - gap).abs() / gap.abs()).max().item())
    assert errors[2] < 1e-2
    assert errors[2] <= max(errors[1], 1e-5) and errors[1] <= max(errors[0], 1e-5)


def test_ig_chunking_matches_one_batch_and_reuses_one_program() -> None:
    model, x = relu_net(), images(3)
    whole = integrated_gradients(fxrel.Explainer(model, "gradient"), x, [0, 2, 5], steps=10, max_batch=1000)
    explainer = fxrel.Explainer(model, "gradient")
    chunked = integrated_gradients(explainer, x, [0, 2, 5], steps=10, chunk_size=7)  # 30 rows: 4 chunks + padding
    assert rel_error(chunked, whole) < 1e-6
    assert len(explainer._graphs) <= 2
    default = fxrel.Explainer(model, "gradient")
    integrated_gradients(default, x, "top1", steps=50, max_batch=64)  # 150 rows → 3 chunks of 50
    assert len(default._graphs) <= 2


def test_ig_top1_target_resolved_on_input() -> None:
    model, x = relu_net(), images()
    explainer = fxrel.Explainer(model, "gradient")
    with torch.no_grad():
        top = model(x).argmax(1)
    assert torch.equal(integrated_gradients(explainer, x, "top1", steps=8),
                       integrated_gradients(explainer, x, top, steps=8))


# -- SmoothGrad -----------------------------------------------------------------------------------------------------
def smoothgrad_reference(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, samples: int, noise: float,
                         seed: int, squared: bool) -> torch.Tensor:
    """Autograd over the documented noise: for image i, the j-th randn(x.shape[1:]) draw of a generator seeded with
    the BLAKE2b stream seed of ``(seed, "smoothgrad", i)``."""
    gens = [torch.Generator().manual_seed(stream_seed(seed, "smoothgrad", i)) for i in range(len(x))]
    sigma = noise * (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, 1, 1, 1)
    total = torch.zeros_like(x)
    for _ in range(samples):
        eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
        grad = autograd_input_gradient(model, x + sigma * eps, targets)
        total += grad.square() if squared else grad
    return total / samples


@pytest.mark.parametrize("squared", [False, True])
def test_smoothgrad_of_gradient_matches_autograd(squared: bool) -> None:
    model, x = relu_net(), images()
    ours = smoothgrad(fxrel.Explainer(model, "gradient"), x, TARGETS, samples=8, noise=0.2, seed=5, squared=squared,
                      chunk_size=5)
    ref = smoothgrad_reference(model, x, TARGETS, 8, 0.2, 5, squared)
    assert rel_error(ours, ref) < 1e-5
    if squared:
        assert (ours >= 0).all()


def test_smoothgrad_deterministic_chunk_independent_and_leaves_global_rng() -> None:
    model, x = relu_net(), images()
    explainer = fxrel.Explainer(model, "gradient")
    state = torch.get_rng_state()
    a = smoothgrad(explainer, x, TARGETS, samples=6, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    b = smoothgrad(explainer, x, TARGETS, samples=6, seed=11, chunk_size=5)
    c = smoothgrad(explainer, x, TARGETS, samples=6, seed=12)
    assert torch.equal(a, smoothgrad(explainer, x, TARGETS, samples=6, seed=11))
    assert rel_error(b, a) < 1e-6
    assert rel_error(c, a) > 1e-3
    assert len(explainer._graphs) <= 2


def test_smoothgrad_of_a_keyed_image_does_not_depend_on_its_batch() -> None:
    """The noise of an image comes from its key's stream: alone, or second in a batch of three, same map."""
    model, x = relu_net(), images(3)
    explainer = fxrel.Explainer(model, "gradient")
    batch = smoothgrad(explainer, x, torch.tensor([0, 1, 4]), samples=4, seed=2, keys=[(7, 0), (9, 1), (3, 4)])
    alone = smoothgrad(explainer, x[1:2], torch.tensor([1]), samples=4, seed=2, keys=[(9, 1)])
    assert rel_error(alone[0], batch[1]) < 1e-6
    other_key = smoothgrad(explainer, x[1:2], torch.tensor([1]), samples=4, seed=2, keys=[(9, 2)])
    assert rel_error(other_key[0], batch[1]) > 1e-3
    with pytest.raises(fxrel.InputError, match="keys must name each of the 1 rows"):
        smoothgrad(explainer, x[1:2], torch.tensor([1]), samples=4, keys=[1, 2])


def test_smoothgrad_without_noise_is_the_plain_map() -> None:
    model, x = relu_net(), images()
    explainer = fxrel.Explainer(model, "epsilon_plus_flat")
    assert rel_error(smoothgrad(explainer, x, TARGETS, samples=3, noise=0.0), explainer(x, TARGETS)) < 1e-5


# -- LRP methods ----------------------------------------------------------------------------------------------------
def test_wrappers_work_on_lrp_methods() -> None:
    model, x = relu_net(), images()
    explainer = fxrel.Explainer(model, "epsilon_plus_flat")
    ig = integrated_gradients(explainer, x, TARGETS, steps=6, chunk_size=5)
    sg = smoothgrad(explainer, x, "top1", samples=4, squared=True)
    for r in (ig, sg):
        assert r.shape == x.shape and torch.isfinite(r).all()
    # one right-Riemann step at α = 1 without the (x − x₀) factor is the method's own map
    one = integrated_gradients(explainer, x, TARGETS, steps=1, rule="riemann_right", multiply_by_inputs=False)
    assert rel_error(one, explainer(x, TARGETS)) < 1e-6


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda e, x: integrated_gradients(e, x, 0, steps=0), "steps"),
    (lambda e, x: integrated_gradients(e, x, 0, steps=1), "trapezoid"),
    (lambda e, x: integrated_gradients(e, x, 0, rule="simpson"), "integration rule"),
    (lambda e, x: integrated_gradients(e, x, 0, baseline=torch.zeros(3, 5, 5)), "baseline has shape"),
    (lambda e, x: integrated_gradients(e, x, 0, baseline=torch.full_like(x, float("nan"))), "NaN"),
    (lambda e, x: integrated_gradients(e, x, 0, chunk_size=0), "chunk_size"),
    (lambda e, x: integrated_gradients(e, x, [0, 1, 2]), "targets"),
    (lambda e, x: integrated_gradients(e, torch.where(x > 1, float("nan"), x), 0), "NaN"),
    (lambda e, x: smoothgrad(e, x, 0, samples=0), "samples"),
    (lambda e, x: smoothgrad(e, x, 0, noise=-0.1), "noise"),
    (lambda e, x: smoothgrad(e, torch.where(x > 1, float("nan"), x), 0), "NaN"),
])
def test_errors(call, match: str) -> None:
    with pytest.raises(fxrel.InputError, match=match):
        call(fxrel.Explainer(relu_net(), "gradient"), images())
