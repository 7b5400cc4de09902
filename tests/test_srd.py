"""SRD (Han, Kim, Kwak 2024; specs/srd.md): the closed-form rules against a literal per-kernel-position
implementation (sharing ratios summing to 1), max-pool → conv (→ BN) stages against a literal per-(pool offset × tap)
one, exact stage-to-stage conservation on random architectures with and without bias, no NaN where every
contribution is zero, the initial sharing ratios against independent autograd computations, the identity check,
batching and compiling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import fxrel
from fxrel.graphs import ops
from fxrel.graphs.analysis import feature_layer
from fxrel.text import parse_spec
from tests.helpers import random_targets, rel_error
from tests.strategies import cnn_architectures

#: the paper's exact conservation: the signed logit share without contrast, the input stage's bias shared
EXACT = dict(init="logit_share", contrast="none", input_bias="shared")


def _x(n: int = 2, size: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def stage_net(stride: int = 2, padding: int = 1, bias: bool = True) -> nn.Sequential:
    """ReLU → conv (the stage under test) → ReLU (X) → head."""
    torch.manual_seed(1)
    return nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3, stride=stride, padding=padding, bias=bias), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval().double()


# --- the literal per-kernel-position implementation (App. B, Eq. 6-8, 11) --------------------------------------------
def literal_conv_stage(conv: nn.Conv2d, x: torch.Tensor, relevance: torch.Tensor, bias_norm: str,
                       absorb_bias: bool = False) -> torch.Tensor:
    """R_i = Σ_{j, taps} μ_{i→j} R_j for one image ``x`` [C, H, W] and the target relevance ``R`` [Ho, Wo], looping
    over output positions and kernel taps; asserts Σ μ = 1 at every position with v_j ≠ 0. ``absorb_bias``: the
    pieces are the weight taps alone (the bias's share is not passed on)."""
    w, b = conv.weight, conv.bias
    (s, _), (p, _) = conv.stride, conv.padding
    v = conv(x[None])[0]
    out = torch.zeros(x.shape[1:], dtype=x.dtype)
    for oy in range(v.shape[1]):
        for ox in range(v.shape[2]):
            pieces, sources = [], []
            for u in range(w.shape[2]):
                for t in range(w.shape[3]):
                    iy, ix = s * oy + u - p, s * ox + t - p
                    if 0 <= iy < x.shape[1] and 0 <= ix < x.shape[2]:
                        pieces.append(w[:, :, u, t] @ x[:, iy, ix])
                        sources.append((iy, ix))
            if b is not None and not absorb_bias:
                norms = [piece.norm() if bias_norm == "piece" else x[:, iy, ix].norm()
                         for piece, (iy, ix) in zip(pieces, sources)]
                total = sum(norms)
                pieces = [piece + (b * n / total if total > 0 else 0 * b) for piece, n in zip(pieces, norms)]
            target = v[:, oy, ox]
            if target.norm() == 0:
                continue
            mu = [piece @ target / (target @ target) for piece in pieces]
            if b is None or (not absorb_bias and total > 0):
                assert abs(sum(mu).item() - 1) < 1e-10          # Σ_i μ_{i→j} = 1 (Eq. 6)
            for m, (iy, ix) in zip(mu, sources):
                out[iy, ix] += m * relevance[oy, ox]
    return out


@pytest.mark.parametrize("bias_norm", ["piece", "source"])
@pytest.mark.parametrize("stride, padding, bias", [(2, 1, True), (1, 1, True), (2, 0, False), (1, 2, True)])
def test_closed_form_equals_the_per_kernel_position_loop(bias_norm, stride, padding, bias):
    net = stage_net(stride, padding, bias)
    x = _x(2, 7)
    explanation = fxrel.Explainer(net, "srd", bias_norm=bias_norm).attribute(x, [0, 2], stops=["0", "1"])
    with torch.no_grad():
        for i in range(2):
            source = explanation.values["0"][i]
            target_relevance = explanation.relevance["1"][i].sum(0)          # R_j of the conv's output PFVs
            expected = literal_conv_stage(net[1], source, target_relevance, bias_norm)
            assert rel_error(explanation.relevance["0"][i].sum(0), expected) < 1e-10


@pytest.mark.parametrize("input_bias", ["absorbed", "shared"])
def test_the_stage_that_reads_the_image_absorbs_or_shares_its_bias(input_bias):
    """input_bias='absorbed' (default): the pixels take the weight pieces' shares ⟨W_tap x_i, v_j⟩/‖v_j‖² R_j alone,
    so Σ R at the image is Σ R_j less the bias's part Σ_j ⟨b, v_j⟩/‖v_j‖² R_j; 'shared': the literal stage, Σ kept."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval().double()
    x = _x(2, 7)
    explanation = fxrel.Explainer(net, "srd", input_bias=input_bias).attribute(x, [0, 2], stops=["1"])
    at_input = fxrel.Explainer(net, "srd", input_bias=input_bias)(x, [0, 2])
    absorbed = input_bias == "absorbed"
    with torch.no_grad():
        v = net[0](x)
        for i in range(2):
            r = explanation.relevance["1"][i].sum(0)
            expected = literal_conv_stage(net[0], x[i], r, "piece", absorb_bias=absorbed)
            assert rel_error(at_input[i].sum(0), expected) < 1e-10
            bias_part = ((net[0].bias.view(-1, 1, 1) * v[i]).sum(0) / (v[i] * v[i]).sum(0) * r).sum()
            assert abs(at_input[i].sum() - (r.sum() - bias_part * absorbed)) < 1e-10 * r.abs().sum()
            assert abs(bias_part) > 1e-3 * r.abs().sum()     # the case is not trivial


def test_every_contribution_zero_at_a_position_gives_no_nan():
    """A conv with bias over an input that is zero on a whole region: the positions that see only zeros have
    v_j = b and no piece to share the bias with (the official code divides 0 by 0 there)."""
    net = stage_net(1, 1, True)
    x = _x(1, 9).abs()
    x[..., :5, :5] = -1.0      # the ReLU in front zeroes this block
    for bias_norm in ("piece", "source"):
        r = fxrel.Explainer(net, "srd", bias_norm=bias_norm)(x, 1)
        assert torch.isfinite(r).all()
        assert (r[..., :4, :4] == 0).all()


# --- the literal per-piece max-pool → conv (→ BN) stage (Eq. 12-13, cal_simmap_mcr / mcbr) --------------------------
def pool_stage_net(pool: tuple[int, int, int], bn: bool) -> nn.Sequential:
    """conv → ReLU → max-pool → conv with bias (→ BatchNorm) → ReLU (X) → head."""
    torch.manual_seed(2)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(*pool), nn.Conv2d(4, 5, 3, padding=1)]
    if bn:
        norm = nn.BatchNorm2d(5)
        with torch.no_grad():
            norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
        layers.append(norm)
    net = nn.Sequential(*layers, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval().double()
    with torch.no_grad():
        for conv in (net[0], net[3]):
            conv.bias.normal_(0, 0.5)
    return net


def literal_pool_conv_stage(pool: nn.MaxPool2d, conv: nn.Conv2d, norm: nn.BatchNorm2d | None, x: torch.Tensor,
                            relevance: torch.Tensor, bias_norm: str) -> torch.Tensor:
    """R_i = Σ_{j, (q, o, tap)} μ R_j for the stage ReLU output ``x`` [C, H, W] → max-pool → conv (→ BN) with the
    target relevance ``R`` [Ho, Wo], one piece per (pooled position q, window offset o, conv tap): Eq. 12's channel
    selection 1[argmax(q, c) = o] ⊙ x_i at i = s_p·q + o − π_p, then the tap W[:, :, u, v] (then the BN scale
    γ/√(var+ε)); the bias (b, or BN's folded β + γ(b − μ)/√(var+ε)) shared by ‖piece‖ or ‖selected sub-vector‖ over
    all of j's (o, tap) pieces. Asserts Σ pieces = v_j and Σ μ = 1."""
    (kp, sp, pp), (s, _), (p, _) = (pool.kernel_size, pool.stride, pool.padding), conv.stride, conv.padding
    w, scale, bias = conv.weight, torch.ones(conv.out_channels, dtype=x.dtype), conv.bias
    if norm is not None:
        scale = norm.weight / (norm.running_var + norm.eps).sqrt()
        bias = norm.bias + scale * (conv.bias - norm.running_mean)
    pooled = pool(x[None])[0]
    hq, wq = pooled.shape[1:]
    argmax = {}                                   # (q, c) → source position, the first maximum in the window
    for qy in range(hq):
        for qx in range(wq):
            for c in range(x.shape[0]):
                window = [(sp * qy + a - pp, sp * qx + b - pp) for a in range(kp) for b in range(kp)]
                window = [(iy, ix) for iy, ix in window if 0 <= iy < x.shape[1] and 0 <= ix < x.shape[2]]
                argmax[qy, qx, c] = max(window, key=lambda i: (x[c, i[0], i[1]].item(), -window.index(i)))
    v = conv(pooled[None])[0] * scale[:, None, None] + (bias - conv.bias * scale)[:, None, None]
    out = torch.zeros(x.shape[1:], dtype=x.dtype)
    for oy in range(v.shape[1]):
        for ox in range(v.shape[2]):
            pieces, norms, sources = [], [], []
            for u in range(w.shape[2]):
                for t in range(w.shape[3]):
                    qy, qx = s * oy + u - p, s * ox + t - p
                    if not (0 <= qy < hq and 0 <= qx < wq):
                        continue
                    for a in range(kp):
                        for b in range(kp):
                            iy, ix = sp * qy + a - pp, sp * qx + b - pp
                            if not (0 <= iy < x.shape[1] and 0 <= ix < x.shape[2]):
                                continue
                            selected = torch.tensor([float(argmax[qy, qx, c] == (iy, ix)) for c in range(len(x))],
                                                    dtype=x.dtype) * x[:, iy, ix]
                            pieces.append(scale * (w[:, :, u, t] @ selected))
                            norms.append(pieces[-1].norm() if bias_norm == "piece" else selected.norm())
                            sources.append((iy, ix))
            total = sum(norms)
            pieces = [piece + (bias * n / total if total > 0 else 0 * bias) for piece, n in zip(pieces, norms)]
            target = v[:, oy, ox]
            if total > 0:
                assert (sum(pieces) - target).abs().max() < 1e-12
            mu = [piece @ target / (target @ target) for piece in pieces]
            if total > 0:
                assert abs(sum(mu).item() - 1) < 1e-10          # Σ_i μ_{i→j} = 1 (Eq. 6)
            for m, (iy, ix) in zip(mu, sources):
                out[iy, ix] += m * relevance[oy, ox]
    return out


@pytest.mark.parametrize("bias_norm", ["piece", "source"])
@pytest.mark.parametrize("pool, bn", [((2, 2, 0), False), ((3, 2, 1), True), ((3, 1, 1), False)],
                         ids=["vgg-mcr", "resnet-mcbr", "overlapping-mcr"])
def test_max_pool_conv_stage_shares_the_bias_over_pool_offsets_and_taps(bias_norm, pool, bn):
    """§2 "MaxPool before a conv": the bias of a conv (with BN: the folded bias) that reads a max-pool is shared by
    norm over every (pool offset × conv tap) piece. fxrel's input map equals the literal per-piece stage followed
    by the literal per-tap first stage, from fxrel's relevance at X."""
    net = pool_stage_net(pool, bn)
    relu_x = "5" if bn else "4"
    x = _x(2, 8, seed=4)
    explainer = fxrel.Explainer(net, "srd", init="logit_share", bias_norm=bias_norm)
    at_input, explanation = explainer(x, [0, 2]), explainer.attribute(x, [0, 2], stops=[relu_x])
    with torch.no_grad():
        for i in range(2):
            at_x = explanation.relevance[relu_x][i].sum(0)
            hidden = net[:2](x[i:i + 1])[0]
            middle = literal_pool_conv_stage(net[2], net[3], net[4] if bn else None, hidden, at_x, bias_norm)
            expected = literal_conv_stage(net[0], x[i], middle, bias_norm, absorb_bias=True)  # input_bias="absorbed"
            assert abs(middle.sum() - at_x.sum()) < 1e-10 * at_x.abs().sum()
            assert rel_error(at_input[i].sum(0), expected) < 1e-10


# --- conservation ----------------------------------------------------------------------------------------------------
def _stage_sums(explainer: fxrel.Explainer, x: torch.Tensor, targets: torch.Tensor):
    """(Σ R at X, Σ R at every node below X that all paths pass through, Σ R at the input, Σ of the dropped bias
    shares: the relevance of conv outputs whose every source PFV is zero)."""
    explanation = explainer.attribute(x, targets, stops=["*"])
    canonical = explainer.canonical_graph(x)
    layer, above = feature_layer(canonical)
    from fxrel.graphs.analysis import cut_nodes

    order = list(canonical.graph.nodes)
    below = [n for n in cut_nodes(canonical) if order.index(n) <= order.index(layer)]
    sums = {n.name: explanation.relevance[n.name].flatten(1).sum(1) for n in below}
    dropped = torch.zeros(len(x), dtype=x.dtype)
    for node in canonical.graph.nodes:
        kind = node.meta.get("fxrel_kind")
        if kind not in (ops.CONV, ops.AFFINE) or node.name not in explanation.relevance or node.args[2] is None:
            continue
        seen = explanation.values[node.args[0].name].abs().sum(1, keepdim=True)
        if kind == ops.CONV:
            _, _, _, stride, padding, dilation, _, _, _ = node.args
            kernel = torch.ones(1, 1, *node.args[1].meta["tensor_meta"].shape[2:], dtype=x.dtype)
            seen = F.conv2d(seen, kernel, None, stride, padding, dilation)
        dropped += (explanation.relevance[node.name].sum(1, keepdim=True) * (seen == 0)).flatten(1).sum(1)
    return sums[layer.name], sums, sums[order[0].name], dropped


@given(spec=cnn_architectures(bias=False))
@settings(max_examples=20, deadline=None)
def test_relevance_is_kept_exactly_from_stage_to_stage_without_bias(spec):
    model, x = spec.build()
    model, x = model.double(), x.double()
    start, sums, _, _ = _stage_sums(fxrel.Explainer(model, "srd", **EXACT), x, random_targets(model, x))
    scale = start.abs().clamp(min=1e-12)
    for name, total in sums.items():
        assert ((total - start).abs() / scale).max() < 1e-9, name


@given(spec=cnn_architectures(bias=True))
@settings(max_examples=20, deadline=None)
def test_relevance_is_kept_with_bias_apart_from_positions_that_see_only_zeros(spec):
    """With biases every conv (or unfolded BatchNorm) output PFV whose sources are all zero is the bias alone and has
    no piece to pass its relevance to: Σ R_input = Σ R_X − Σ of those (the only leak; none where no source PFV is
    zero)."""
    model, x = spec.build()
    model, x = model.double(), x.double()
    start, _, at_input, dropped = _stage_sums(fxrel.Explainer(model, "srd", **EXACT), x,
                                              random_targets(model, x))
    assert ((at_input - (start - dropped)).abs() / start.abs().clamp(min=1e-12)).max() < 1e-9


# --- the initial sharing ratio (Eq. 4 and the official alternatives) -----------------------------------------------
def _head_gradients(net: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A at X = the output of the last ReLU, every class's ∂y_k/∂A [K, N, C, H, W], logits)."""
    a = net[:3](x).detach().requires_grad_()
    logits = net[3:](a)
    grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), a, retain_graph=True)[0]
                         for k in range(logits.shape[1])])
    return a.detach(), grads, logits.detach()


@pytest.mark.parametrize("init", ["paper", "logit_share", "grad_cam"])
def test_initial_sharing_ratio_matches_an_autograd_computation(init):
    net, x, targets = stage_net(1, 1, True), _x(2, 6), torch.tensor([2, 0])
    contrast = {} if init == "paper" else {"contrast": "none"}
    explanation = fxrel.Explainer(net, "srd", init=init, **contrast).attribute(x, targets, stops=["2"])
    a, grads, logits = _head_gradients(net, x)
    rows = torch.arange(2)
    phi = (a.unsqueeze(0) * grads.mean((3, 4), keepdim=True)).sum(2)          # Φ^k, [K, N, H, W]
    if init == "paper":
        expected = (phi[targets, rows] - phi.mean(0)).clamp(min=0)
    elif init == "grad_cam":
        expected = phi[targets, rows].clamp(min=0)
    else:
        share = (a * grads[targets, rows]).sum(1)
        live = (a.abs().sum(1) > 0).double()
        rest = (logits[rows, targets] - share.flatten(1).sum(1)).view(-1, 1, 1)
        expected = share + live * rest / live.sum((1, 2), keepdim=True)
        assert torch.allclose(expected.flatten(1).sum(1), logits[rows, targets])   # Σ μ = y_t
    assert rel_error(explanation.relevance["2"].sum(1), expected) < 1e-12


def test_spatial_mean_contrast_centres_the_initial_map():
    net, x = stage_net(1, 1, True), _x(2, 6)
    explainer = fxrel.Explainer(net, "srd", init="logit_share", contrast="spatial_mean")
    at_x = explainer.attribute(x, 1, stops=["2"]).relevance["2"]
    assert at_x.flatten(1).sum(1).abs().max() < 1e-12 and at_x.abs().sum() > 0
    assert explainer(x, 1).flatten(1).sum(1).abs().max() < 1e-12


def test_contrast_none_in_a_method_spec_means_no_contrast():
    """``srd[contrast=none]`` parses to ``contrast=None``: no contrast, as ``"none"`` — not the default ``"auto"``
    (the spatial mean for the official initialisations)."""
    net, x = stage_net(1, 1, True), _x(2, 6)
    name, params = parse_spec("srd[init=grad_cam,contrast=none]")
    from_spec = fxrel.Explainer(net, name, **params)(x, 1)
    assert rel_error(from_spec, fxrel.Explainer(net, "srd", init="grad_cam", contrast="none")(x, 1)) == 0
    assert rel_error(from_spec, fxrel.Explainer(net, "srd", init="grad_cam")(x, 1)) > 1e-3


def test_options_are_checked():
    net = stage_net()
    for bad, match in ((dict(init="cam"), "init"), (dict(contrast="class"), "contrast"),
                       (dict(init="paper", contrast="spatial_mean"), "paper"), (dict(bias_norm="l1"), "bias_norm"),
                       (dict(input_bias="dropped"), "input_bias")):
        with pytest.raises(fxrel.RuleError, match=match):
            fxrel.Explainer(net, "srd", **bad)(_x(1, 6), 0)


# --- invariants ------------------------------------------------------------------------------------------------------
def test_identity_pointwise_conv_passes_relevance_unchanged():
    """§6.5: a 1×1 identity conv without bias between two ReLUs has μ_{i→i} = 1."""
    torch.manual_seed(0)
    identity = nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), identity, nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).eval().double()
    r = fxrel.Explainer(net, "srd").attribute(_x(2, 6), 1, stops=["1", "3"]).relevance
    assert rel_error(r["1"].sum(1), r["3"].sum(1)) < 1e-12


def test_relevance_stays_in_the_receptive_field_of_the_relevant_positions():
    """§6.6 locality: a classifier that reads only position (5, 5) of X gives X relevance there alone (logit share,
    no bias); after two 3×3 convs it reaches only the 5×5 receptive field around it."""
    torch.manual_seed(0)
    head = nn.Linear(4 * 11 * 11, 3, bias=False)
    with torch.no_grad():
        head.weight.view(3, 4, 11, 11)[:, :, [i for i in range(11) if i != 5]] = 0
        head.weight.view(3, 4, 11, 11)[:, :, :, [i for i in range(11) if i != 5]] = 0
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), head).eval().double()
    x = _x(1, 11).abs() + 0.1
    target = int(net(x).argmax())
    explainer = fxrel.Explainer(net, "srd", **EXACT)
    top, bottom = explainer.attribute(x, target, stops=["3"]).relevance["3"].sum(1)[0], explainer(x, target).sum(1)[0]
    assert top[5, 5] != 0 and (top.abs().sum() == top[5, 5].abs())
    inside = torch.zeros_like(bottom, dtype=torch.bool)
    inside[3:8, 3:8] = True
    assert (bottom[~inside] == 0).all() and bottom[inside].abs().sum() > 0
    assert abs(bottom.sum() - top.sum()) < 1e-10 * abs(top.sum())


def test_batched_equals_per_image_and_every_stage_sums_the_same():
    net, x = stage_net(2, 1, True), _x(3, 9)
    batched = fxrel.Explainer(net, "srd")(x, [0, 1, 2])
    single = torch.cat([fxrel.explain(net, x[i:i + 1], t, method="srd") for i, t in enumerate([0, 1, 2])])
    assert rel_error(batched, single) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("pooled", [False, True], ids=["conv", "maxpool-conv-bn"])
def test_compiled_equals_eager(pooled):
    net, x = (pool_stage_net((3, 2, 1), True) if pooled else stage_net(2, 1, True)), _x(2, 9)
    eager = fxrel.Explainer(net, "srd")(x, [1, 2])
    assert rel_error(fxrel.Explainer(net, "srd", compile=True)(x, [1, 2]), eager) < 1e-10


# --- full architectures, other activations, several layers ------------------------------------------------------------
def _timm_with(act: str) -> nn.Module:
    import timm

    from fxrel.random_weights import calibrate_batchnorm
    torch.manual_seed(0)
    return calibrate_batchnorm(timm.create_model("resnet18", pretrained=False, num_classes=10, act_layer=act), 32, 1)


FULL = [("torchvision", "vgg16", 32), ("torchvision", "resnet50", 32), ("torchvision", "densenet121", 32),
        ("torchvision", "inception_v3", 75), ("timm-act", "gelu", 32), ("timm-act", "silu", 32)]


@pytest.mark.parametrize("source,name,size", FULL, ids=[f"{s}-{n}" for s, n, _ in FULL])
def test_full_architectures_keep_every_stage_and_give_maps_at_every_resolution(source, name, size):
    """VGG16, ResNet-50, DenseNet-121, Inception-v3 (random weights, calibrated BatchNorm, biases on) and a timm
    ResNet with GELU / SiLU activations (pre-activation targets: no change to the rules, App. G): Σ R equal at X,
    at every stage below and at the input (measured: to 1e-15; no position saw only zeros), batched."""
    from fxrel.srd_maps import srd_maps
    from tests.test_models import build

    model = (build(source, name, size) if source == "torchvision" else _timm_with(name)).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    explainer = fxrel.Explainer(model, "srd", **EXACT)
    start, sums, _, dropped = _stage_sums(explainer, x, torch.tensor([1, 7]))
    assert (dropped == 0).all()
    for node, total in sums.items():
        assert ((total - start).abs() <= 1e-9 * start.abs()).all(), node
    maps = srd_maps(model, x, [1, 7], explainer=explainer)
    assert maps["input"].shape == (2, size, size)
    assert maps["low"].shape[1] <= maps["high"].shape[1] <= size and maps["high"].shape[1] * 8 >= size
    for label, m in maps.items():
        assert torch.allclose(m.flatten(1).sum(1), start, rtol=1e-9, atol=0), label
    up = srd_maps(model, x, [1, 7], upsample="input", explainer=explainer)
    assert all(m.shape == (2, size, size) for m in up.values())
