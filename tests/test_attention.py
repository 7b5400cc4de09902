"""Transformers: CP-LRP and AttnLRP against LXT 2.1 on torchvision's ViT (float64), AttnLRP's attention-weights
rule against the paper's chain written out, the batch axis moved by attention, and timm's non-CNN families.

The LXT references run from outside the package: LXT's ``efficient`` patches (CP-LRP) on torchvision's classes, and
AttnLRP written with its explicit rules (``tests/lxt_reference.py``)."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import fxrel
from fxrel.coverage import check_model
from fxrel.graphs import ops
from fxrel.rules.attention import AttentionWeightsTaylor

tv_vit = pytest.importorskip("torchvision.models.vision_transformer")
timm = pytest.importorskip("timm")


@pytest.fixture
def lxt_reference() -> types.ModuleType:
    """``tests/lxt_reference.py``; it needs LXT (a test-only peer), so only the two LXT tests skip without it."""
    return pytest.importorskip("tests.lxt_reference")


def _vit(layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = tv_vit.VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2, hidden_dim=16,
                                     mlp_dim=32, num_classes=5).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _inputs(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([1, 3, 0, 2][:n])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_cp_lrp_equals_lxt(lxt_reference):
    """fxrel's LRP-ε with attention weights constant (``attention="cp"``) is LXT's CP-LRP: 4.8e-8 relative,
    from LXT's ``gelu(x) / (x + 1e-10)`` in its GELU identity rule."""
    x, targets = _inputs()
    model = _vit()
    ours = fxrel.explain(model, x, targets, method="lrp_epsilon", epsilon=1e-12, attention="cp")
    xg = x.clone().requires_grad_()
    with lxt_reference.lxt_cp_patches():   # gradient × input through LXT's patched modules
        model(xg).gather(1, targets[:, None]).sum().backward()
    assert _relative(ours, xg * xg.grad) < 1e-6


def test_attnlrp_equals_lxt(lxt_reference):
    """``attn_lrp`` equals AttnLRP written with LXT's explicit rules: 6.4e-10 relative at ε = 1e-12 (at ε = 1e-6,
    6.4e-4: LXT stabilises with ``+ε``, fxrel with ``+ε·sign z``)."""
    x, targets = _inputs()
    model = _vit()
    ours = fxrel.explain(model, x, targets, method="attn_lrp", epsilon=1e-12)
    assert _relative(ours, lxt_reference.attnlrp_relevance(model, x, targets, 1e-12)) < 1e-8
    cp = fxrel.explain(model, x, targets, method="lrp_epsilon", epsilon=1e-12, attention="cp")
    assert _relative(cp, ours) > 1e-2   # the attention rule matters: the two differ
    same = fxrel.explain(model, x, targets, method="lrp_epsilon", epsilon=1e-12)   # AttnLRP is the default
    assert torch.equal(same, ours)


def test_attention_weights_rule_is_the_papers_chain():
    """The fused rule at ``softmax(s q kᵀ + b)`` against Prop. 3.1 then Prop. 3.3 written out: the softmax's
    Taylor rule at its input ``L = s q kᵀ + b``, the bias's z-share, the uniform rule on ``q kᵀ`` (ε → 0)."""
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g) for _ in range(2))
    bias = torch.randn(3, 5, 5, dtype=torch.float64, generator=g)
    relevance = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g)
    scale = 0.5
    products = q @ k.transpose(-2, -1)
    logits = scale * products + bias
    a = logits.softmax(-1)
    r_logits = logits * (relevance - a * relevance.sum(-1, keepdim=True))      # Prop. 3.1
    r_products = r_logits * (scale * products) / logits                        # the z-rule of s·qkᵀ + b
    terms = q[..., :, None, :] * k[..., None, :, :] / products[..., None]     # z_ija / z_ij
    expected_q = 0.5 * (terms * r_products[..., None]).sum(-2)                 # Prop. 3.3, half to each factor
    expected_k = 0.5 * (terms * r_products[..., None]).sum(-3)

    graph = torch.fx.Graph()
    nodes = [graph.placeholder(name) for name in ("q", "k")]
    for node in nodes:
        node.meta["tensor_meta"] = types.SimpleNamespace(shape=q.shape)
    context = types.SimpleNamespace(inputs=[q, k], output=a,
                                    node=graph.call_function(ops.attention_weights, (*nodes, scale)))
    got_q, got_k = AttentionWeightsTaylor()(context, relevance)
    assert torch.allclose(got_q, expected_q, rtol=1e-9) and torch.allclose(got_k, expected_k, rtol=1e-9)


def test_batch_rows_are_explained_independently():
    """torchvision's attention runs sequence-first with the heads folded into the batch: explaining a batch equals
    explaining each image alone, for the gradient, CP-LRP and AttnLRP."""
    x, targets = _inputs(3)
    model = _vit(layers=1)
    for method, params in (("gradient", {}), ("lrp_epsilon", {"attention": "cp"}), ("attn_lrp", {})):
        batch = fxrel.explain(model, x, targets, method=method, **params)
        rows = torch.cat([fxrel.explain(model, x[i:i + 1], targets[i:i + 1], method=method, **params)
                          for i in range(3)])
        assert torch.allclose(batch, rows, rtol=1e-10, atol=1e-15), method
    xg = x.clone().requires_grad_()
    (reference,) = torch.autograd.grad(model(xg).gather(1, targets[:, None]).sum(), xg)
    assert _relative(fxrel.explain(model, x, targets, method="gradient"), reference) < 1e-12


class _SwiGLU(nn.Module):
    """Flatten → SwiGLU MLP (``W_o (silu(x W_gᵀ) ⊙ x W_xᵀ)``, biases on), as in EVA-02 and LLaMA."""

    def __init__(self, d: int = 12, hidden: int = 10, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.gate, self.value, self.out = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.out(nn.functional.silu(self.gate(x)) * self.value(x))


def test_gated_linear_unit_takes_the_uniform_rule_under_attnlrp():
    """A SwiGLU product is a gate for CP-LRP (the activated branch a constant weight) and a product of two computed
    tensors for AttnLRP: each factor takes half of its relevance and the SiLU passes it on (the identity rule).
    Both against the rules written out with ε → 0 (LRP-ε at each linear layer: ``R_in = x ⊙ Wᵀ(R/z)``)."""
    model = _SwiGLU().double().eval()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 3, 1])
    graph = fxrel.Explainer(model, "gradient").canonical_graph(x)
    assert any(n.target is ops.gated_unit for n in graph.graph.nodes)
    flat = x.flatten(1)

    def through(weight: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        return flat * ((relevance / z) @ weight)

    with torch.no_grad():
        a, v = model.gate(flat), model.value(flat)
        h = nn.functional.silu(a) * v
        y = model.out(h)
        r_y = torch.zeros_like(y).scatter(1, targets[:, None], y.gather(1, targets[:, None]))
        r_h = h * ((r_y / y) @ model.out.weight)
        attnlrp = through(model.gate.weight, a, r_h / 2) + through(model.value.weight, v, r_h / 2)
        cp = through(model.value.weight, v, r_h)
    assert _relative(attnlrp, cp) > 1e-2   # the two rules differ here
    for attention, expected in (("attnlrp", attnlrp), ("cp", cp)):
        ours = fxrel.explain(model, x, targets, method="lrp_epsilon", epsilon=1e-12, attention=attention)
        assert _relative(ours.flatten(1), expected) < 1e-8, attention
    xg = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(model(xg).gather(1, targets[:, None]).sum(), xg)
    assert _relative(fxrel.explain(model, x, targets, method="gradient"), gradient) < 1e-12


class _Product(nn.Module):
    """A product of two computed tensors (iFormer's ``attention ⊙ gate``), bias-free, on small activations."""

    def __init__(self, d: int = 12, hidden: int = 8, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a, self.b = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.out = nn.Linear(hidden, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.out(self.a(x) * self.b(x))


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_lrp0_conserves_exactly_through_a_product_of_two_computed_tensors(attention):
    """The uniform rule at a product takes the rule set's ε — LRP-0's 0 — under either attention rule: the relevance
    sums to the logit to rounding. (With the structural default's ε = 1e-6, products of size 1e-6 lost most of it.)"""
    model = _Product().double().eval()
    x = 1e-3 * torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([0, 2, 3])
    graph = fxrel.Explainer(model, "gradient").canonical_graph(x)
    assert any(n.meta.get("fxrel_kind") == ops.BILINEAR for n in graph.graph.nodes)
    with torch.no_grad():
        logits = model(x).gather(1, targets[:, None]).squeeze(1)
    relevance = fxrel.explain(model, x, targets, method="lrp_0", attention=attention)
    assert torch.allclose(relevance.flatten(1).sum(1), logits, rtol=1e-12, atol=0.0)


def test_unknown_attention_rule_is_named():
    with pytest.raises(fxrel.RuleError, match="attention must be one of \\['cp', 'attnlrp'\\]"):
        fxrel.explain(_vit(1), _inputs(1)[0], 0, method="lrp_epsilon", attention="attn")


def test_rows_per_sample_need_the_batch_first():
    """RSP's relative gradient folds one row per class into the batch axis: given a layer X below attention that
    moves the batch, it is a named error, not wrong shapes."""
    with pytest.raises(fxrel.UnsupportedOpError, match="relevance rows per sample into the batch axis"):
        fxrel.explain(_vit(1), _inputs(1)[0], 0, method="rsp", layer="conv_proj")


#: small timm models of the families the issue sampled (random weights); the smallest input each takes
TIMM_FAMILIES = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "mobilevit_xxs", "poolformer_s12",
                 "edgenext_xx_small", "haloregnetz_b", "efficientvit_b0", "lowformer_b0", "naflexvit_base_patch16_map"]


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_transformers_and_hybrids_pass_the_coverage_checks(name):
    """Captured, canonical, gradient ≡ autograd (1e-4), LRP-0 conserving on the constant-free copy (1e-3), finite
    LRP-ε: :func:`fxrel.coverage.check_model`'s five checks."""
    report = check_model(timm.create_model(name, pretrained=False), name)
    assert report.passed, report.error


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "pvt_v2_b0", "tiny_vit_5m_224",
                                  "eva02_tiny_patch14_224", "xcit_nano_12_p16_224", "cait_xxs24_224", "levit_128s",
                                  "efficientformer_l1", "fastvit_t8", "mixer_s16_224", "convmixer_768_32",
                                  "sebotnet33ts_256", "swiftformer_xs", "crossvit_tiny_240", "convit_tiny",
                                  "mvitv2_tiny", "volo_d1_224"])
def test_more_timm_families_pass_the_coverage_checks(name):
    report = check_model(timm.create_model(name, pretrained=False), name)
    assert report.passed, report.error


@pytest.mark.slow
def test_a_model_padding_constants_into_its_windows_at_a_small_input_is_checked_at_its_own_size():
    """iFormer at 32 px pads 2 × 2 maps to 7 × 7 windows whose padded tokens carry sigmoid(0) = ½ into the attention
    (LRP-0 misses 3.6e-3 of the logit); the sweep's row is the check at the configured 224 px, which conserves."""
    from fxrel.coverage import coverage

    (row,) = coverage(["iformer_t"])
    assert row.passed and row.size == 224, row.error
    assert "at 32 px: lrp0" in row.note


@pytest.mark.slow
def test_sam_with_its_computed_relative_position_mask_passes_the_coverage_checks():
    """SAM's ViT (relative positions computed from the queries, passed to attention as a float mask), four blocks at
    128 px: its own 1024 px do not fit a float64 check in 24 GB."""
    model = timm.create_model("samvit_base_patch16", pretrained=False, img_size=128, depth=4,
                              global_attn_indexes=(1, 3), num_classes=10)
    report = check_model(model, "samvit_base_patch16 (4 blocks, 128 px)", size=128)
    assert report.passed, report.error


def _pgc_layer_map(cam_class, model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int], prefix: int,
                   grid: int):
    """pytorch-grad-cam's map at the layer's resolution (its ``get_cam_image`` on the hooked activations and
    gradients, then ReLU), with the ``reshape_transform`` its documentation gives for ViTs."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def reshape(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, prefix:].reshape(tensor.size(0), grid, grid, tensor.size(2)).permute(0, 3, 1, 2)

    cam = cam_class(model=model, target_layers=[layer], reshape_transform=reshape)
    chosen = [ClassifierOutputTarget(c) for c in targets]
    outputs = cam.activations_and_grads(x)
    model.zero_grad()
    sum(target(output) for target, output in zip(chosen, outputs)).backward()
    hooked = cam.activations_and_grads
    maps = cam.get_cam_image(x, layer, chosen, hooked.activations[0].numpy(), hooked.gradients[0].numpy(), False)
    hooked.release()
    return torch.from_numpy(maps).clamp(min=0)


@pytest.mark.parametrize("name, prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_transformer_cams_equal_pytorch_grad_cam(name, prefix):
    """With no ``reshape_transform``: fxrel finds the token grid (8 × 8 patches, the class and distillation tokens
    dropped) and the layer (``blocks[-1].norm1``, where pytorch-grad-cam's documentation puts ViT CAMs); Grad-CAM,
    Grad-CAM++ and LayerCAM equal pytorch-grad-cam's to 1.6e-15 (float64)."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, patch_size=8, depth=2, pretrained=False).eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    targets = [1, 4]
    layer = fxrel.cam.default_cam_layer(model, x)
    graph = fxrel.Explainer(model, "gradient").canonical_graph(x)
    assert next(n for n in graph.graph.nodes if n.name == layer).meta["fxrel_module"] == "blocks.1.norm1"
    for cam_class, method in ((pgc.GradCAM, "grad_cam"), (pgc.GradCAMPlusPlus, "grad_cam_pp"),
                              (pgc.LayerCAM, "layer_cam")):
        ours = fxrel.explain(model, x, torch.tensor(targets), method=method, upsample=None)
        reference = _pgc_layer_map(cam_class, model, model.blocks[-1].norm1, x, targets, prefix, 8)
        assert _relative(ours, reference) < 1e-12, method
    assert fxrel.explain(model, x, 0, method="grad_cam").shape == (2, 64, 64)


@pytest.mark.parametrize("method", ["rsp", "crsp", "srd"])
def test_methods_entering_at_a_cnns_last_feature_map_name_why_not_on_a_vit(method):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, pretrained=False).eval()
    with pytest.raises(fxrel.RuleError, match="patch embedding.*attn_lrp"):
        fxrel.explain(model, torch.randn(1, 3, 32, 32), 0, method=method)
