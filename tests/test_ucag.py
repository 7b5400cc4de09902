"""UCAG (fxrel.ucag): the invariants of ../shared/specs/ucag.md §5 — geometry, the averaging divisor, linearity,
weight bounds, pixel alignment, class passthrough, CAM post-processing — plus chunking and batching."""
import math
import re

import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

import fxrel
from fxrel.errors import InputError
from fxrel.imageops import gaussian_blur, minmax_normalise
from fxrel.ucag import blend_window, confidence_weights, fold, ucag, unfold, unfold_geometry


def small_cnn(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes)).eval()


def echo(model: nn.Module, crops: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The 'pixel echo' explanation E(P) = Σ_channels P."""
    return crops.sum(dim=1)


def test_geometry_matches_official_layout_at_224():
    g = unfold_geometry(224, 224, rho=0.555, alpha=2.6)
    assert g.crop == (124, 124) and g.scaled == (322, 322)
    assert unfold_geometry(224, 224).scaled == (224, 224)  # the default explains every crop at the input's size
    assert unfold_geometry(96, 96).scaled == (96, 96)      # alpha = 1/rho would floor to 95 px
    official_stride = (224 - 124 + 2) // (6 - 1)  # (H + 2p − (h_c − 1)·d + 1) // (n − 1) with p=0, d=1
    assert g.rows == g.cols == tuple(official_stride * a for a in range(6))
    assert len(g.windows) == 36 and g.rows[-1] + g.crop[0] == 224
    cover = g.coverage()
    assert cover.min() == 1 and cover.max() == 36 and cover[0, 0] == 1 and cover[112, 112] == 36


def test_geometry_ends_at_the_border_for_299():
    g = unfold_geometry(299, 299, rho=0.555)
    assert g.crop == (165, 165) and g.rows[0] == 0 and g.rows[-1] + 165 == 299
    assert g.coverage().min() >= 1


@pytest.mark.parametrize("blend, average, expected", [
    ("uniform", "coverage", lambda c, cover: c * torch.ones_like(cover)),              # the paper: Γ
    ("uniform", "coverage_plus_one", lambda c, cover: c * cover / (cover + 1)),        # the official code: Γ + 1
    ("gaussian", "coverage", lambda c, cover: c * torch.ones_like(cover)),
    ("gaussian", "coverage_plus_one", lambda c, cover: c * cover / (cover + 1)),
    (None, None, lambda c, cover: c * torch.ones_like(cover)),                         # the default
])
def test_constant_explanation_is_averaged_by_the_coverage(blend, average, expected):
    """A constant partial map c comes back as c wherever the divisor is the windows' coverage G (Γ for the uniform
    window): the fold is a weighted mean; with G + 1 it is c·G/(G + 1), G counted independently here."""
    c = 2.5
    x = torch.rand(2, 3, 48, 40)
    options = {k: v for k, v in (("blend", blend), ("average", average)) if v is not None}
    out = ucag(small_cnn(), x, 1, method=lambda m, p, t: torch.full((len(p), 7, 9), c), weighting="none", **options)
    g = unfold_geometry(48, 40)
    window = torch.ones(g.crop) if blend == "uniform" else blend_window(g.crop, "gaussian")
    cover = torch.zeros(48, 40)
    for r in g.rows:
        for col in g.cols:
            cover[r:r + g.crop[0], col:col + g.crop[1]] += window
    torch.testing.assert_close(out, expected(c, cover).expand_as(out), rtol=1e-6, atol=1e-6)


def test_gaussian_fold_equals_monais_sliding_window_blending():
    """The Gaussian fold is the blending of MONAI's sliding-window inference (mode="gaussian", sigma_scale=0.125):
    on a layout where both tile the image alike (40 px, crops of 30 at stride 2), a crop-level explanation that
    depends on the whole crop (so that blending matters) folds to MONAI's output, and the window is its
    importance map."""
    pytest.importorskip("monai")
    from monai.data.utils import compute_importance_map
    from monai.inferers import sliding_window_inference

    def explanation(crops: torch.Tensor) -> torch.Tensor:   # [P, C, h, w] → [P, 1, h, w]
        return (crops.sum(1, keepdim=True) ** 2 - crops.mean(dim=(1, 2, 3), keepdim=True)) * crops[:, :1].amax(
            dim=(2, 3), keepdim=True)

    x = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    g = unfold_geometry(40, 40, n=6, rho=0.75, alpha=1.0)
    assert g.crop == (30, 30) and g.rows == g.cols == (0, 2, 4, 6, 8, 10)
    ours = ucag(small_cnn().double(), x, 0, method=lambda m, p, t: explanation(p)[:, 0], alpha=1.0,
                weighting="none", postprocess="none")
    theirs = sliding_window_inference(x, roi_size=(30, 30), sw_batch_size=36, predictor=explanation, overlap=0.93,
                                      mode="gaussian", sigma_scale=0.125)
    torch.testing.assert_close(ours, theirs[:, 0].to(ours.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blend_window((30, 26), "gaussian", dtype=torch.float32),
                               compute_importance_map((30, 26), mode="gaussian", sigma_scale=0.125), rtol=1e-6,
                               atol=1e-7)


def test_linear_in_the_base_explanation():
    model, x = small_cnn(), torch.rand(2, 3, 40, 40)
    proj = torch.randn(3)

    def e1(m, p, t):
        return p.sum(1)

    def e2(m, p, t):
        return torch.einsum("nchw,c->nhw", p, proj)

    kw = dict(weighting="exp_softmax", postprocess="none")
    both = ucag(model, x, 0, method=lambda m, p, t: e1(m, p, t) + e2(m, p, t), **kw)
    torch.testing.assert_close(both, ucag(model, x, 0, method=e1, **kw) + ucag(model, x, 0, method=e2, **kw))


def test_linear_in_real_methods():
    """gradient + gradient×input as one base equals the sum of the two UCAG maps (same crops, same weights)."""
    model, x = small_cnn(), torch.rand(2, 3, 32, 32, dtype=torch.float64)
    model = model.double()

    def summed(m, p, t):
        return fxrel.explain(m, p, t, method="gradient") + fxrel.explain(m, p, t, method="gradient_x_input")

    a = ucag(model, x, 2, method=summed, n=3)
    b = ucag(model, x, 2, method="gradient", n=3) + ucag(model, x, 2, method="gradient_x_input", n=3)
    torch.testing.assert_close(a, b)


def test_weights_with_score_lie_in_the_paper_bounds():
    logits = torch.randn(4 * 36, 10) * 5
    targets = torch.randint(10, (4,)).repeat_interleave(36)
    w = confidence_weights(logits, targets, 36, "exp_softmax_max").view(4, 36)
    assert (w > math.exp(-1)).all() and (w <= 1).all() and (w.max(1).values == 1).all()
    assert (w.max(1).values / w.min(1).values <= math.e).all()
    paper = confidence_weights(logits, targets, 36, "exp_softmax")
    torch.testing.assert_close(paper, logits.softmax(1)[torch.arange(len(logits)), targets].exp())


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
def test_pixel_echo_realigns_with_the_image(blend):
    """E(P) = Σ_c P folds back onto Σ_c I (only resampling error); a transposed fold would not."""
    y, x_ = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    image = torch.stack([torch.sin(3 * x_) * y, x_ ** 2, torch.cos(2 * y + x_)]).unsqueeze(0)
    out = ucag(small_cnn(), image, 0, method=echo, weighting="none", average="coverage", blend=blend)[0]
    expected = image[0].sum(0)
    err = (out - expected).norm() / expected.norm()
    assert err < 0.02
    assert (out - expected.T).norm() / expected.norm() > 10 * err


def test_every_crop_is_explained_for_the_full_images_class():
    model, x = small_cnn(), torch.rand(3, 3, 40, 40)
    seen = []

    def record(m, p, t):
        seen.append(t.clone())
        return p.sum(1)

    ucag(model, x, None, method=record, n=4, chunk_size=7)
    expected = model(x).argmax(1).repeat_interleave(16)
    got = torch.cat(seen)[: len(expected)]
    assert torch.equal(got, expected)
    seen.clear()
    ucag(model, x, [4, 0, 2], method=record, n=4, chunk_size=48)
    assert torch.equal(torch.cat(seen), torch.tensor([4, 0, 2]).repeat_interleave(16))


def test_chunking_and_batching_do_not_change_the_map():
    model, x = small_cnn(), torch.rand(3, 3, 40, 40)
    whole = ucag(model, x, 1, method="gradient_x_input", n=3, chunk_size=27)
    chunked = ucag(model, x, 1, method="gradient_x_input", n=3, chunk_size=4)
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-6)
    single = torch.cat([ucag(model, x[i:i + 1], 1, method="gradient_x_input", n=3) for i in range(3)])
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-6)


def test_cam_base_is_relu_minmax_blur_of_the_signed_aggregate():
    model, x = small_cnn(), torch.rand(2, 3, 48, 48)
    raw = ucag(model, x, 3, method="grad_cam", postprocess="none", alpha=2.6)  # (this random net's map has a
    # positive part at the paper's zoom)
    assert (raw < 0).any(), "CAM partial maps are aggregated signed (wonorm), before the ReLU"
    pre_blur = minmax_normalise(raw.clamp(min=0))
    assert torch.allclose(pre_blur.flatten(1).amin(1), torch.zeros(2))
    assert torch.allclose(pre_blur.flatten(1).amax(1), torch.ones(2))
    out = fxrel.explain(model, x, 3, method="ucag", base="grad_cam", alpha=2.6)
    torch.testing.assert_close(out, gaussian_blur(pre_blur, 5, 3.0))
    assert out.min() >= 0 and out.max() <= 1


def test_gaussian_blur_matches_torchvision():
    img = torch.rand(2, 3, 20, 17)
    torch.testing.assert_close(gaussian_blur(img, 5, 3.0), TF.gaussian_blur(img, [5, 5], [3.0, 3.0]))


def test_fold_of_unfolded_constant_image_is_identity():
    g = unfold_geometry(30, 30, n=4, alpha=1.0)
    x = torch.full((1, 1, 30, 30), 0.7)
    crops = unfold(x, g)
    for blend in ("gaussian", "uniform"):
        out = fold(crops.sum(1), torch.ones(len(crops)), g, blend=blend)
        torch.testing.assert_close(out, x[:, 0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n (crops per side)"), (dict(rho=1.5), "rho"), (dict(alpha=0.0), "alpha"),
    (dict(method="no_such_method"), "unknown base method"), (dict(method="ucag"), "cannot wrap itself"),
    (dict(average="mean"), "average"), (dict(weighting="bogus"), "weighting"), (dict(chunk_size=0), "chunk_size"),
    (dict(blend="hann"), "blend must be one of"), (dict(blend_sigma=0), "blend_sigma"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        ucag(small_cnn(), torch.rand(1, 3, 32, 32), 0, **{"method": "gradient", **kwargs})


def test_bad_input_is_named():
    x = torch.rand(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        ucag(small_cnn(), x, 0)
    with pytest.raises(InputError, match="out of range"):
        ucag(small_cnn(), torch.rand(1, 3, 32, 32), 9)
