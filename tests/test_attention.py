"""Transformers: CP-LRP and AttnLRP against LXT 2.1 on torchvision's ViT (float64), AttnLRP's attention-weights
rule against the paper's chain written out, the batch axis moved by attention, and timm's non-CNN families.

The LXT references run from outside the package: LXT's ``efficient`` patches (CP-LRP) on torchvision's classes, and
AttnLRP written with its explicit rules (``tests/lxt_reference.py``)."""
from __future__ import annotations

import contextlib
import pathlib
import sys
import types

import pytest
import torch
from torch import nn

import fxrel
from fxrel.coverage import check_model
from fxrel.graphs import ops
from fxrel.rules.attention import AttentionWeightsTaylor

tv_vit = pytest.importorskip("torchvision.models.vision_transformer")
lxt = pytest.importorskip("lxt")
timm = pytest.importorskip("timm")
from tests.lxt_reference import attnlrp_relevance  # noqa: E402  (needs lxt)


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


@contextlib.contextmanager
def lxt_cp_patches():
    """LXT 2.1's CP-LRP patches of torchvision's GELU, LayerNorm and MultiheadAttention (its ``vit_torch`` map),
    undone afterwards. ``lxt.efficient``'s package init imports its Hugging Face patches, which need a module
    transformers 5 removed, so the package is registered without running it."""
    if "lxt.efficient" not in sys.modules:
        package = types.ModuleType("lxt.efficient")
        package.__path__ = [str(pathlib.Path(lxt.__file__).parent / "efficient")]
        sys.modules["lxt.efficient"] = package
    from lxt.efficient.patches import cp_multi_head_attention_forward, layer_norm_forward, non_linear_forward
    patched = {tv_vit.nn.GELU: non_linear_forward, tv_vit.nn.LayerNorm: layer_norm_forward,
               tv_vit.nn.MultiheadAttention: cp_multi_head_attention_forward}
    saved = {cls: cls.forward for cls in patched}
    try:
        for cls, forward in patched.items():
            cls.original_forward = cls.forward   # what LXT's patch_method(keep_original=True) sets
            cls.forward = forward
        yield
    finally:
        for cls, forward in saved.items():
            cls.forward = forward
            if "original_forward" in vars(cls):
                delattr(cls, "original_forward")


def test_cp_lrp_equals_lxt():
    """fxrel's LRP-ε with attention weights constant (the structural default) is LXT's CP-LRP: 4.8e-8 relative,
    from LXT's ``gelu(x) / (x + 1e-10)`` in its GELU identity rule."""
    x, targets = _inputs()
    model = _vit()
    ours = fxrel.explain(model, x, targets, method="lrp_epsilon", epsilon=1e-12)
    xg = x.clone().requires_grad_()
    with lxt_cp_patches():   # gradient × input through LXT's patched modules
        model(xg).gather(1, targets[:, None]).sum().backward()
    assert _relative(ours, xg * xg.grad) < 1e-6


def test_attnlrp_equals_lxt():
    """``attn_lrp`` equals AttnLRP written with LXT's explicit rules: 6.4e-10 relative at ε = 1e-12 (at ε = 1e-6,
    6.4e-4: LXT stabilises with ``+ε``, fxrel with ``+ε·sign z``)."""
    x, targets = _inputs()
    model = _vit()
    ours = fxrel.explain(model, x, targets, method="attn_lrp", epsilon=1e-12)
    assert _relative(ours, attnlrp_relevance(model, x, targets, 1e-12)) < 1e-8
    cp = fxrel.explain(model, x, targets, method="lrp_epsilon", epsilon=1e-12)
    assert _relative(cp, ours) > 1e-2   # the attention rule matters: the two differ
    same = fxrel.explain(model, x, targets, method="lrp_epsilon", epsilon=1e-12, attention="attnlrp")
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
    for method in ("gradient", "lrp_epsilon", "attn_lrp"):
        batch = fxrel.explain(model, x, targets, method=method)
        rows = torch.cat([fxrel.explain(model, x[i:i + 1], targets[i:i + 1], method=method) for i in range(3)])
        assert torch.allclose(batch, rows, rtol=1e-10, atol=1e-15), method
    xg = x.clone().requires_grad_()
    (reference,) = torch.autograd.grad(model(xg).gather(1, targets[:, None]).sum(), xg)
    assert _relative(fxrel.explain(model, x, targets, method="gradient"), reference) < 1e-12


def test_unknown_attention_rule_is_named():
    with pytest.raises(fxrel.RuleError, match="attention must be one of \\['cp', 'attnlrp'\\]"):
        fxrel.explain(_vit(1), _inputs(1)[0], 0, method="lrp_epsilon", attention="attn")


def test_rows_per_sample_need_the_batch_first():
    """RSP's relative gradient folds one row per class into the batch axis: a model whose attention moves the batch
    gets a named error, not wrong shapes."""
    with pytest.raises((fxrel.UnsupportedOpError, fxrel.RuleError), match="batch|spatial feature map"):
        fxrel.explain(_vit(1), _inputs(1)[0], 0, method="rsp")


#: small timm models of the families the issue sampled (random weights); the smallest input each takes
TIMM_FAMILIES = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "mobilevit_xxs", "poolformer_s12",
                 "edgenext_xx_small"]


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_transformers_and_hybrids_pass_the_coverage_checks(name):
    """Captured, canonical, gradient ≡ autograd (1e-4), LRP-0 conserving on the constant-free copy (1e-3), finite
    LRP-ε: :func:`fxrel.coverage.check_model`'s five checks."""
    report = check_model(timm.create_model(name, pretrained=False), name)
    assert report.passed, report.error


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "pvt_v2_b0", "tiny_vit_5m_224",
                                  "eva02_tiny_patch14_224", "xcit_nano_12_p16_224", "cait_xxs24_224", "levit_128s",
                                  "efficientformer_l1", "fastvit_t8", "mixer_s16_224", "convmixer_768_32"])
def test_more_timm_families_pass_the_coverage_checks(name):
    report = check_model(timm.create_model(name, pretrained=False), name)
    assert report.passed, report.error

