"""LXT 2.1 as the peer of fxrel's attention rules, for ``tests/test_attention.py`` and ``benchmarks/bench_vit.py``:
AttnLRP on torchvision's VisionTransformer written with LXT's explicit rules (``lxt.explicit``), and LXT's CP-LRP
patches of torchvision's classes (:func:`lxt_cp_patches`). Test-only: LXT patches no model for full AttnLRP on
torchvision's ViT, so its forward pass is written out here, op by op, with LXT's rule functions.

Every stabiliser is passed as ``epsilon`` (LXT's own defaults: 1e-6 in linear layers and LayerNorm, 1e-8 in sums
and products; it adds ``+ε``, fxrel ``+ε·sign z``)."""
from __future__ import annotations

import contextlib
import math
import pathlib
import sys
import types

import lxt
import torch
from lxt.explicit import functional as lf
from lxt.explicit.functional import layer_norm_grad_fn
from lxt.explicit.rules import epsilon_lrp, identity
from torchvision.models import vision_transformer
from torchvision.models.vision_transformer import VisionTransformer


def _attention(mha: torch.nn.MultiheadAttention, x: torch.Tensor, eps: float) -> torch.Tensor:
    n, t, d = x.shape
    heads = mha.num_heads
    qkv = lf.linear_epsilon(x, mha.in_proj_weight, mha.in_proj_bias, eps)
    q, k, v = (part.reshape(n, t, heads, d // heads).transpose(1, 2) for part in qkv.chunk(3, -1))
    logits = lf.matmul(q, k.transpose(-1, -2), epsilon=eps)
    weights = lf.softmax(logits, -1, temperature=math.sqrt(d // heads))
    out = lf.matmul(weights, v, epsilon=eps).transpose(1, 2).reshape(n, t, d)
    return lf.linear_epsilon(out, mha.out_proj.weight, mha.out_proj.bias, eps)


def _norm(ln: torch.nn.LayerNorm, x: torch.Tensor, eps: float) -> torch.Tensor:
    return layer_norm_grad_fn.apply(x, ln.weight, ln.bias, ln.eps, eps)


def attnlrp_relevance(model: VisionTransformer, x: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """AttnLRP relevance at the input ``[N, 3, H, W]`` for the classes ``target``, seeded with the target logit."""
    x = x.detach().clone().requires_grad_(True)
    conv = model.conv_proj
    h = epsilon_lrp(lambda a: torch.nn.functional.conv2d(a, conv.weight, conv.bias, conv.stride), eps, x)
    n = h.shape[0]
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([model.class_token.expand(n, -1, -1), h], 1)
    h = lf.add2(h, model.encoder.pos_embedding.expand(n, -1, -1), epsilon=eps)
    for block in model.encoder.layers:
        h = lf.add2(h, _attention(block.self_attention, _norm(block.ln_1, h, eps), eps), epsilon=eps)
        mlp = block.mlp
        u = lf.linear_epsilon(_norm(block.ln_2, h, eps), mlp[0].weight, mlp[0].bias, eps)
        u = lf.linear_epsilon(identity(torch.nn.functional.gelu, u), mlp[3].weight, mlp[3].bias, eps)
        h = lf.add2(h, u, epsilon=eps)
    h = _norm(model.encoder.ln, h, eps)[:, 0]
    head = model.heads.head
    logits = lf.linear_epsilon(h, head.weight, head.bias, eps)
    chosen = logits.gather(1, target[:, None])
    chosen.backward(chosen.detach())
    return x.grad


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
    patched = {vision_transformer.nn.GELU: non_linear_forward, vision_transformer.nn.LayerNorm: layer_norm_forward,
               vision_transformer.nn.MultiheadAttention: cp_multi_head_attention_forward}
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
