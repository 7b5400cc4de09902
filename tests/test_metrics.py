"""fxrel.metrics: identities on constructed maps, exact answers on linear models, batching, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxrel import metrics as M
from fxrel.errors import InputError

H = W = 12


def small_cnn(channels: int = 3, classes: int = 5) -> nn.Module:
    """Conv–BN–ReLU–conv–ReLU–linear; BatchNorm with non-trivial statistics so randomising it matters."""
    model = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * H * W, classes))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0, 0.1)
        model[1].running_mean.normal_(0, 0.1)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """∂ y_t / ∂ x summed over channels: an explain_fn."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)
    return g.sum(1)


def linear_model(channels: int = 2, classes: int = 4) -> nn.Module:
    """A linear classifier over flattened pixels (float64): logit_t(x) = w_t · x + b_t."""
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * H * W, classes)).double().eval()


def exact_relevance(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """w_t ⊙ x summed over channels: the exact contribution of every pixel to the target logit."""
    w = model[1].weight[targets].view_as(x)
    return (w * x).sum(1).detach()


@pytest.fixture
def cnn_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return small_cnn(), torch.randn(4, 3, H, W), torch.tensor([0, 3, 1, 4])


@pytest.fixture
def linear_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return linear_model(), torch.randn(3, 2, H, W, dtype=torch.float64), torch.tensor([2, 0, 3])


def one_box(x0: int, y0: int, x1: int, y1: int, batch: int = 1) -> torch.Tensor:
    return M.box_masks(torch.tensor([[x0, y0, x1, y1]] * batch), H, W)


def peak(row: int, col: int, value: float = 1.0) -> torch.Tensor:
    """A [1, H, W] map, zero except ``value`` at (row, col)."""
    m = torch.zeros(1, H, W)
    m[0, row, col] = value
    return m


# --- helpers -----------------------------------------------------------------------------------------------------

def test_as_maps_sums_channels_and_keeps_maps() -> None:
    a = torch.randn(2, 3, H, W)
    torch.testing.assert_close(M.as_maps(a), a[:, 0] + a[:, 1] + a[:, 2])
    assert torch.equal(M.as_maps(a[:, 0]), a[:, 0])
    with pytest.raises(InputError, match="B, H, W"):
        M.as_maps(torch.zeros(H, W))


def test_box_masks_exclusive_corners() -> None:
    masks = M.box_masks(torch.tensor([[1, 2, 4, 7], [0, 0, W, H]]), H, W)
    assert masks.dtype == torch.bool and masks.shape == (2, H, W)
    assert masks[0].sum() == 3 * 5 and masks[1].all()
    assert masks[0, 2, 1] and masks[0, 6, 3] and not masks[0, 7, 3] and not masks[0, 6, 4]


# --- localisation ------------------------------------------------------------------------------------------------

def test_pointing_game_hit_and_miss() -> None:
    mask = one_box(2, 2, 5, 5)
    assert M.pointing_game(peak(3, 3), mask).item() == 1.0
    assert M.pointing_game(peak(8, 8), mask).item() == 0.0


@pytest.mark.parametrize("tolerance", [1, 3])
def test_pointing_game_tolerance_boundary(tolerance: int) -> None:
    mask = one_box(5, 5, 6, 6)  # the single pixel (5, 5)
    for dr, dc in [(tolerance, 0), (0, -tolerance), (tolerance, tolerance)]:  # Chebyshev distance == tolerance
        assert M.pointing_game(peak(5 + dr, 5 + dc), mask, tolerance).item() == 1.0
    for dr, dc in [(tolerance + 1, 0), (0, -tolerance - 1), (tolerance + 1, 1)]:
        assert M.pointing_game(peak(5 + dr, 5 + dc), mask, tolerance).item() == 0.0


def test_pointing_game_ties_and_constant_maps() -> None:
    mask = one_box(0, 0, 3, 3)
    tied = peak(1, 1) + peak(9, 9)
    assert M.pointing_game(tied, mask).item() == 1.0  # one of the tied maxima is inside
    assert M.pointing_game(torch.zeros(1, H, W), mask).item() == 0.0
    assert M.pointing_game(torch.full((1, H, W), 2.0), mask).item() == 0.0


def test_energy_pointing_game_known_fraction() -> None:
    mask = one_box(0, 0, 4, 4)  # 16 pixels
    m = torch.full((1, H, W), -5.0)  # negative relevance is ignored
    m[0, :4, :4] = 0.5  # 8 inside
    m[0, 10, 10] = 24.0  # 24 outside
    assert M.energy_pointing_game(m, mask).item() == pytest.approx(8 / 32)
    assert M.energy_pointing_game(-m.abs(), mask).item() == 0.0


def test_attribution_localisation_weighting() -> None:
    masks = torch.stack([one_box(0, 0, 4, 6)[0], one_box(3, 3, 12, 12)[0]])
    maps = torch.randn(2, H, W)
    plain = M.attribution_localisation(maps, masks)
    torch.testing.assert_close(plain, M.energy_pointing_game(maps, masks))
    area = masks.flatten(1).sum(1).float()
    torch.testing.assert_close(M.attribution_localisation(maps, masks, weighted=True), plain * H * W / area)
    uniform = M.attribution_localisation(torch.ones(2, H, W), masks, weighted=True)
    torch.testing.assert_close(uniform, torch.ones(2))


def test_box_iou_thresholds() -> None:
    mask = one_box(2, 3, 8, 9)
    assert M.box_iou(mask.float(), mask).item() == 1.0
    assert M.box_iou(mask.float() - 0.5, mask).item() == 1.0
    m = 0.1 + 1.9 * mask.float()  # positive everywhere, 2.0 on the box
    assert M.box_iou(m, mask, "zero").item() == pytest.approx(36 / (H * W))
    assert M.box_iou(m, mask, "mean").item() == 1.0
    shifted = one_box(5, 3, 11, 9)  # half the box
    assert M.box_iou(shifted.float(), mask).item() == pytest.approx(18 / 54)


# --- complexity --------------------------------------------------------------------------------------------------

def test_sparseness_extremes() -> None:
    n = H * W
    assert M.sparseness(torch.full((1, H, W), 3.0)).item() == pytest.approx(0.0, abs=1e-6)
    assert M.sparseness(torch.zeros(1, H, W)).item() == pytest.approx(0.0, abs=1e-6)
    assert M.sparseness(peak(4, 7, -2.0), eps=0.0).item() == pytest.approx(1 - 1 / n, rel=1e-6)
    assert M.sparseness(peak(4, 7, -2.0)).item() == pytest.approx((1 - 1 / n) / (1 + n * 1e-7), rel=1e-6)


@given(values=st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=H * W, max_size=H * W),
       scale=st.floats(0.01, 100))
def test_sparseness_is_the_gini_mean_difference(values: list[float], scale: float) -> None:
    """G = Σ_ij |a_i − a_j| / (2 n Σ a) with a = |M|/max|M| (eps = 0), and invariant to scaling the map."""
    m = torch.tensor(values, dtype=torch.float64).view(1, H, W)
    a = m.abs().flatten() / m.abs().max() if m.abs().max() > 0 else m.abs().flatten() + 1.0
    expected = (a[:, None] - a[None, :]).abs().sum() / (2 * a.numel() * a.sum())
    assert M.sparseness(m, eps=0.0).item() == pytest.approx(expected.item(), abs=1e-9)
    assert M.sparseness(scale * m).item() == pytest.approx(M.sparseness(m).item(), abs=1e-9)


# --- perturbation ------------------------------------------------------------------------------------------------

def scores(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    with torch.no_grad():
        logits = model(x)
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    return {"logit": picked, "sigmoid": picked.sigmoid(), "softmax": logits.softmax(1)[range(len(x)), targets]}[kind]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_insertion_deletion_curve_endpoints(cnn_batch, kind: str) -> None:
    model, x, t = cnn_batch
    base = 0.3 * torch.randn(3, H, W)
    out = M.insertion_deletion(model, x, torch.randn(4, H, W), t, steps=6, baseline=base, score=kind)
    at_x, at_base = scores(model, x, t, kind), scores(model, base.expand_as(x), t, kind)
    for curve, start, end in [("insertion_curve", at_base, at_x), ("deletion_curve", at_x, at_base)]:
        assert out[curve].shape == (4, 7)
        torch.testing.assert_close(out[curve][:, 0], start)
        torch.testing.assert_close(out[curve][:, -1], end)
    torch.testing.assert_close(out["insertion"], torch.trapezoid(out["insertion_curve"], dx=1 / 6))


def test_blur_baseline_keeps_constant_images(cnn_batch) -> None:
    model, _, t = cnn_batch
    x = torch.full((4, 3, H, W), 0.7)
    out = M.insertion_deletion(model, x, torch.randn(4, H, W), t, steps=3, baseline="blur")
    torch.testing.assert_close(out["insertion_curve"], out["deletion_curve"])  # blur(x) == x: nothing changes


@pytest.mark.parametrize("kind", ["logit", "sigmoid"])
def test_oracle_map_beats_random_maps(linear_batch, kind: str) -> None:
    """On a linear model, removing pixels by w ⊙ x (the exact contributions) lowers the logit fastest."""
    model, x, t = linear_batch
    oracle = M.insertion_deletion(model, x, exact_relevance(model, x, t), t, steps=12, baseline="zero", score=kind)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        noise = M.insertion_deletion(model, x, torch.rand(3, H, W, generator=g, dtype=torch.float64), t, steps=12,
                                     baseline="zero", score=kind)
        assert (oracle["deletion_curve"] <= noise["deletion_curve"] + 1e-12).all()
        assert (oracle["insertion_curve"] >= noise["insertion_curve"] - 1e-12).all()
        assert (oracle["deletion"] < noise["deletion"]).all() and (oracle["insertion"] > noise["insertion"]).all()


def test_chunking_does_not_change_results(cnn_batch) -> None:
    model, x, t = cnn_batch
    maps = torch.randn(4, H, W)
    a = M.insertion_deletion(model, x, maps, t, steps=5, batch_size=1)
    b = M.insertion_deletion(model, x, maps, t, steps=5, batch_size=1000)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_faithfulness_correlation_exact_on_linear_model(linear_batch) -> None:
    model, x, t = linear_batch
    relevance = exact_relevance(model, x, t)
    torch.testing.assert_close(M.faithfulness_correlation(model, x, relevance, t), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(M.faithfulness_correlation(model, x, -relevance, t, subset_size=7, runs=10),
                               -torch.ones(3, dtype=torch.float64))
    assert (M.faithfulness_correlation(model, x, torch.zeros(3, H, W), t) == 0).all()  # undefined: 0


def test_faithfulness_correlation_seeded(cnn_batch) -> None:
    model, x, t = cnn_batch
    maps = torch.randn(4, H, W)
    a = M.faithfulness_correlation(model, x, maps, t, runs=8, seed=3)
    torch.testing.assert_close(a, M.faithfulness_correlation(model, x, maps, t, runs=8, seed=3))
    assert not torch.equal(a, M.faithfulness_correlation(model, x, maps, t, runs=8, seed=4))


def test_negative_perturbation(linear_batch) -> None:
    model, x, t = linear_batch
    relevance = exact_relevance(model, x, t)
    good = M.negative_perturbation(model, x, relevance, t, score="sigmoid")
    bad = M.negative_perturbation(model, x, -relevance, t, score="sigmoid")
    assert good["curve"].shape == (3, 10)
    torch.testing.assert_close(good["curve"][:, 0], scores(model, x, t, "sigmoid"))
    assert (good["curve"] >= bad["curve"] - 1e-12).all() and (good["auc"] > bad["auc"]).all()
    acc = M.negative_perturbation(model, x, relevance, t, fractions=(0.5, 1.0))
    with torch.no_grad():
        hit = (model(x).argmax(1) == t).double()
        zero_hit = (model(torch.zeros_like(x)).argmax(1) == t).double()
    torch.testing.assert_close(acc["curve"], torch.stack([hit, acc["curve"][:, 1], zero_hit], 1))
    torch.testing.assert_close(acc["auc"], 0.25 * (hit + 2 * acc["curve"][:, 1] + zero_hit))


def test_map_density_of_constant_and_rescaled_maps(cnn_batch) -> None:
    model, x, t = cnn_batch
    flat = M.map_density(model, x, torch.ones(4, H, W), t)
    torch.testing.assert_close(flat["positive"], scores(model, x, t, "softmax"))
    assert flat["negative"].isnan().all()  # the complement has no mass
    maps = torch.randn(4, H, W)
    a, b = M.map_density(model, x, maps, t, score="sigmoid"), M.map_density(model, x, 3 * maps - 1, t, score="sigmoid")
    torch.testing.assert_close(a, b)
    m = (maps - maps.amin((1, 2), keepdim=True)) / (maps.amax((1, 2), keepdim=True) - maps.amin((1, 2), keepdim=True))
    expected = scores(model, x * (1 - m[:, None]), t, "sigmoid") / (1 - m).mean((1, 2))
    torch.testing.assert_close(a["negative"], expected)


# --- robustness --------------------------------------------------------------------------------------------------

def test_max_sensitivity_constant_and_identity(cnn_batch) -> None:
    model, x, t = cnn_batch
    constant = M.max_sensitivity(lambda m, xx, tt: torch.ones(len(xx), H, W), model, x, t, samples=3)
    assert (constant == 0).all()
    noise = 0.1 * torch.randn(3, *x.shape)
    identity = M.max_sensitivity(lambda m, xx, tt: xx, model, x, t, noise=noise)
    expected = noise.flatten(2).norm(dim=2).amax(0) / x.flatten(1).norm(dim=1)
    torch.testing.assert_close(identity, expected)
    seeded = M.max_sensitivity(lambda m, xx, tt: xx, model, x, t, radius=0.05, samples=4, seed=2)
    bound = 0.05 * x[0].numel() ** 0.5 / x.flatten(1).norm(dim=1)
    assert (seeded > 0).all() and (seeded <= bound).all()
    torch.testing.assert_close(seeded, M.max_sensitivity(lambda m, xx, tt: xx, model, x, t, 0.05, 4, seed=2))


# --- randomisation -----------------------------------------------------------------------------------------------

def test_randomisation_leaves_model_and_rng_alone(cnn_batch) -> None:
    model, x, t = cnn_batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = M.cascading_randomisation(model, gradient, x, t)
    assert list(out) == ["6", "3", "1", "0"]  # Linear, Conv, BatchNorm, Conv: output side first
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and torch.equal(rng, torch.get_rng_state())


def test_randomisation_gradient_loses_similarity(cnn_batch) -> None:
    model, x, t = cnn_batch
    for similarity in ["spearman", "pearson", "ssim"]:
        out = M.cascading_randomisation(model, gradient, x, t, similarity=similarity, seed=5)
        final = out["0"]
        assert final.shape == (4,) and (final < 0.5).all(), (similarity, final)
    model_free = M.cascading_randomisation(model, lambda m, xx, tt: xx.sum(1), x, t)
    for scores_ in model_free.values():
        torch.testing.assert_close(scores_, torch.ones(4))  # an explanation that ignores the model fails the check


def test_randomisation_layer_selection(cnn_batch) -> None:
    model, x, t = cnn_batch
    out = M.cascading_randomisation(model, gradient, x, t, layers=["3", "6"], seed=1)
    assert list(out) == ["3", "6"]
    full = M.cascading_randomisation(model, gradient, x, t, seed=1)
    torch.testing.assert_close(out["6"], full["3"])  # same modules randomised, same seeding per module
    with pytest.raises(InputError, match="not re-initialisable"):
        M.cascading_randomisation(model, gradient, x, t, layers=["2"])


def test_spearman_and_ssim_identities() -> None:
    a = torch.randn(3, H, W)
    torch.testing.assert_close(M.spearman(a, a.exp()), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(M.spearman(a, -a), -torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(M.ssim(a, a), torch.ones(3, dtype=torch.float64))
    assert (M.ssim(a, torch.randn(3, H, W)) < 0.5).all()


def test_spearman_ties_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    a = torch.randint(0, 4, (3, H, W)).float()
    b = torch.randn(3, H, W).relu()
    expected = torch.tensor([stats.spearmanr(a[i].flatten(), b[i].flatten())[0] for i in range(3)])
    torch.testing.assert_close(M.spearman(a, b), expected.double())


def test_ssim_matches_skimage() -> None:
    skm = pytest.importorskip("skimage.metrics")
    a, b = torch.randn(2, 16, 20), torch.randn(2, 16, 20)
    b[1] = a[1] + 0.3 * b[1]
    both = torch.cat([a, b], 1)
    expected = [skm.structural_similarity(a[i].double().numpy(), b[i].double().numpy(),
                                          data_range=float(both[i].max() - both[i].min())) for i in range(2)]
    torch.testing.assert_close(M.ssim(a, b), torch.tensor(expected, dtype=torch.float64))


# --- batching ----------------------------------------------------------------------------------------------------

def test_batched_equals_per_sample(cnn_batch) -> None:
    model, x, t = cnn_batch
    maps, masks = torch.randn(4, H, W), torch.rand(4, H, W) > 0.6
    indices = torch.stack([torch.stack([torch.randperm(H * W)[:9] for _ in range(4)]) for _ in range(6)])
    noise = 0.1 * torch.randn(2, *x.shape)
    model64 = copy.deepcopy(model).double()
    calls = {
        "pointing": lambda s: M.pointing_game(maps[s], masks[s], 1),
        "energy": lambda s: M.energy_pointing_game(maps[s], masks[s]),
        "al": lambda s: M.attribution_localisation(maps[s], masks[s], weighted=True),
        "iou": lambda s: M.box_iou(maps[s], masks[s], "mean"),
        "sparse": lambda s: M.sparseness(maps[s]),
        # float64: a correlation near 0 (0.013 here) turns float32's batch-size-dependent conv rounding (5e-6) into
        # more than the tolerance
        "faith": lambda s: M.faithfulness_correlation(model64, x[s].double(), maps[s].double(), t[s],
                                                      indices=indices[:, s]),
        "insdel": lambda s: M.insertion_deletion(model, x[s], maps[s], t[s], steps=4)["deletion_curve"],
        "neg": lambda s: M.negative_perturbation(model, x[s], maps[s], t[s], score="softmax")["curve"],
        "density": lambda s: M.map_density(model, x[s], maps[s], t[s])["positive"],
        "sens": lambda s: M.max_sensitivity(gradient, model, x[s], t[s], noise=noise[:, s]),
        "random": lambda s: M.cascading_randomisation(model, gradient, x[s], t[s], layers=["6", "3"])["3"],
    }
    for name, call in calls.items():
        single = torch.cat([call(slice(i, i + 1)) for i in range(4)])
        torch.testing.assert_close(call(slice(None)), single, rtol=1e-5, atol=1e-6, msg=name)


# --- errors ------------------------------------------------------------------------------------------------------

def test_errors_name_the_problem(cnn_batch) -> None:
    model, x, t = cnn_batch
    maps, masks = torch.randn(4, H, W), torch.rand(4, H, W) > 0.5
    assert issubclass(InputError, ValueError)
    cases = [
        (lambda: M.pointing_game(maps, masks[:3]), "masks have shape"),
        (lambda: M.energy_pointing_game(maps, masks[:, :5]), "masks have shape"),
        (lambda: M.box_iou(maps, torch.zeros_like(masks)), "empty"),
        (lambda: M.sparseness(maps.clone().index_fill_(1, torch.tensor([2]), float("nan"))), "NaN"),
        (lambda: M.insertion_deletion(model, x, maps[:3], t), "3 samples"),
        (lambda: M.map_density(model, x, maps[:, :6], t), r"\(6, 12\)"),
        (lambda: M.faithfulness_correlation(model, x, maps, torch.tensor([0, 1, 2, 5])), r"\[5\] out of range"),
        (lambda: M.negative_perturbation(model, x, maps, torch.tensor([0, -1, 2, 3])), "out of range"),
        (lambda: M.negative_perturbation(model, x, maps, t[:2]), "targets must be"),
        (lambda: M.insertion_deletion(model, x, maps, t, score="accuracy"), "score must be"),
        (lambda: M.insertion_deletion(model, x, maps, t, baseline=torch.zeros(2, H, W)), "broadcast"),
        (lambda: M.negative_perturbation(model, x, maps, t, fractions=(0.5, 0.2)), "fractions"),
        (lambda: M.max_sensitivity(gradient, model, x, t + 5), "out of range"),
        (lambda: M.max_sensitivity(lambda m, xx, tt: xx[:, 0] * float("nan"), model, x, t), "NaN"),
        (lambda: M.cascading_randomisation(model, gradient, x, t, similarity="cosine"), "similarity"),
        (lambda: M.pointing_game(maps, masks, tolerance=-1), "tolerance"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(cnn_batch) -> None:
    model, x, t = cnn_batch
    maps, masks = torch.randn(4, H, W), torch.rand(4, H, W) > 0.5
    dev = torch.device("cuda")
    gpu = (copy.deepcopy(model).to(dev), x.to(dev), maps.to(dev), t.to(dev))
    a = M.insertion_deletion(*gpu, steps=4)["deletion"].cpu()
    torch.testing.assert_close(a, M.insertion_deletion(model, x, maps, t, steps=4)["deletion"], rtol=1e-4, atol=1e-5)
    f = M.faithfulness_correlation(*gpu, runs=6).cpu()
    torch.testing.assert_close(f, M.faithfulness_correlation(model, x, maps, t, runs=6), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(M.pointing_game(maps.to(dev), masks.to(dev), 2).cpu(), M.pointing_game(maps, masks, 2))
    r = M.cascading_randomisation(gpu[0], gradient, gpu[1], gpu[3], seed=3)
    assert list(r) == ["6", "3", "1", "0"] and all(v.device.type == "cuda" for v in r.values())


def test_randomisation_with_fxrels_cached_explainers_matches_autograd(cnn_batch) -> None:
    """fxrel.explain caches one explainer per model object and its program snapshots the parameters: every
    cascade step must therefore see a fresh model object, or the steps after the first would repeat a stale map."""
    import fxrel

    model, x, t = cnn_batch
    ours = M.cascading_randomisation(model, lambda m, xx, tt: fxrel.explain(m, xx, tt, method="gradient"), x, t)
    reference = M.cascading_randomisation(model, gradient, x, t)
    assert list(ours) == list(reference)
    for layer in ours:
        torch.testing.assert_close(ours[layer], reference[layer], rtol=1e-4, atol=1e-5)
