"""Explaining a self-supervised network with AGF (Gur, Ali, Wolf 2021, Alg. 2; ``specs/agf.md`` §8).

The network is ``M = φ_τ ∘ φ_F``: a feature extractor and the linear classifier of its self-supervised task (SCAN
clusters, SeLa pseudo-labels, rotation classes …), whose classes mean nothing to the user. For each image ``I``::

    L_I = φ_F(I)                          the latent vector: the input of the classifier layer
    L_N = argmin_{L ∈ 𝓛} ‖L_I − L‖₂       its nearest neighbour among the latents of a reference set
    t   = argmax φ_τ(L_I − L_N)           the class of what is unique to I
    explain class t of M(I) with AGF (Alg. 1)

``combine`` gives the paper's Table 4 alternatives: ``"difference"`` (Alg. 2), ``"sum"`` (``L_I + L_N``) and
``"none"`` (``L_I`` alone: the predicted class). A reference latent identical to ``L_I`` (the image itself, when it
is in the reference set) is skipped, as the paper compares each image with *another* one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxrel.catalog.registry import method_info, register_wrapper, signature_defaults
from fxrel.errors import InputError
from fxrel.explainer import Target, cached_explainer, explain
from fxrel.graphs import ops

COMBINE = ("difference", "sum", "none")


def classifier_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module]:
    """The model's last parametrised layer (name, module), found in its captured graph; it must be a linear layer
    (``φ_τ``)."""
    canonical = cached_explainer(model).canonical_graph(x[:1])
    layers = [n for n in canonical.graph.nodes if n.meta.get("fxrel_kind") in (ops.CONV, ops.LINEAR)]
    if not layers or layers[-1].meta.get("fxrel_kind") != ops.LINEAR:
        raise InputError("the self-supervised variant needs a model whose last layer is a linear classifier "
                         f"(found {layers[-1].meta.get('fxrel_kind') if layers else 'no conv/linear layer'})")
    name = layers[-1].meta.get("fxrel_module", "")
    module = model.get_submodule(name) if name else None
    if not isinstance(module, nn.Linear):
        raise InputError(f"the classifier node '{layers[-1].name}' does not come from an nn.Linear module "
                         f"(module '{name}')")
    return name, module


def latents(model: nn.Module, x: torch.Tensor, layer: nn.Module, batch_size: int = 64) -> torch.Tensor:
    """``φ_F(x)``: the input of ``layer`` (the classifier) for every row of ``x``, ``[N, D]``."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].flatten(1)))
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start:start + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


def neighbour_targets(model: nn.Module, x: torch.Tensor, references: torch.Tensor, combine: str = "difference",
                      batch_size: int = 64) -> torch.Tensor:
    """Alg. 2 lines 1–6: the class ``t`` per row of ``x``. ``references``: images ``[M, C, H, W]`` or their latent
    vectors ``[M, D]``."""
    if combine not in COMBINE:
        raise InputError(f"combine must be one of {COMBINE}, got {combine!r}")
    if not isinstance(references, torch.Tensor) or references.dim() not in (2, x.dim()):
        raise InputError(f"references must be a tensor of images shaped like x ({x.dim()}-D) or of latent vectors "
                         "[M, D]")
    _, head = classifier_layer(model, x)
    own = latents(model, x, head, batch_size)
    pool = references.flatten(1).to(own) if references.dim() == 2 else latents(model, references.to(x), head,
                                                                                batch_size)
    if pool.shape[1] != own.shape[1]:
        raise InputError(f"reference latents have {pool.shape[1]} features, the classifier reads {own.shape[1]}")
    if combine == "none":
        combined = own
    else:
        distance = torch.cdist(own, pool)
        distance = distance.masked_fill(distance == 0, float("inf"))
        if torch.isinf(distance).all(1).any():
            raise InputError("an image has no reference other than itself (every reference latent equals its own)")
        nearest = pool[distance.argmin(1)]
        combined = own - nearest if combine == "difference" else own + nearest
    with torch.no_grad():
        return F.linear(combined, head.weight, head.bias).argmax(1)


def agf_ssl(model: nn.Module, x: torch.Tensor, target: Target = None, references: torch.Tensor | None = None,
            combine: str = "difference", batch_size: int = 64, **agf_params: Any) -> torch.Tensor:
    """Alg. 2: AGF of the class :func:`neighbour_targets` picks (``target`` must be left out); ``agf_params`` go to
    the ``agf`` rule set."""
    if references is None:
        raise InputError("agf_ssl needs references=: images (or latent vectors) to find each image's nearest "
                         "neighbour among (a tensor: use the Python API, fxrel.explain(..., method='agf_ssl', "
                         "references=...))")
    if target is not None:
        raise InputError("agf_ssl chooses its own target class (Alg. 2); leave target=None")
    targets = neighbour_targets(model, x, references, combine, batch_size)
    return explain(model, x, targets, method="agf", **agf_params)


register_wrapper("agf_ssl", agf_ssl, "AGF of a self-supervised network: the class its own classifier gives the latent "
                 "minus the nearest reference latent (references=images or latents; further parameters go to agf)",
                 "Gur, Ali, Wolf 2021 (AGF, Alg. 2)", "as agf",
                 {**signature_defaults(agf_ssl, skip=3), **method_info("agf").defaults})
