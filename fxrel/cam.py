"""Class activation maps of a model, or of a gradient :class:`~fxrel.Explainer`, post hoc.

The CAMs are sweeps of the registry (``fxrel.explain(model, x, t, method="grad_cam")``, formulas and layer choice in
:mod:`fxrel.catalog.cam`). :func:`cam` is the other way to get them: one gradient explainer per model (cached weakly),
whose relevance program for an input signature and layer returns both what every CAM needs — the activation
``A = values[layer]`` and the gradient ``G = relevance[layer]`` — so the three kinds share one program, and an
explainer the user built (compiled, say) serves them too.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from fxrel.catalog.cam import (
    CAM_KINDS,
    CamKind,
    Upsample,
    cam_layer,
    cam_stop,
    cam_transform,
    check_upsample,
    gradcam_map,
    gradcam_pp_map,
    layercam_map,
    normalise_kind,
    output_size,
)
from fxrel.errors import InputError
from fxrel.explainer import Explainer, Target, WeakModelExplainer
from fxrel.graphs.analysis import module_outputs

__all__ = ["CAM_KINDS", "cam", "cam_explainer", "cam_layers", "default_cam_layer", "gradcam_map", "gradcam_pp_map",
           "layercam_map"]


_EXPLAINERS: weakref.WeakKeyDictionary[nn.Module, Explainer] = weakref.WeakKeyDictionary()


def cam_explainer(model: nn.Module | Explainer) -> Explainer:
    """The gradient explainer :func:`cam` uses for ``model`` (one per model, cached weakly; an explainer is
    returned as is). Its relevance programs are cached per input signature and CAM layer, so repeated calls reuse
    them. Like every explainer it rebuilds them when the model's parameters change.
    """
    if isinstance(model, Explainer):
        if model.method.name != "gradient":
            raise InputError(f"CAMs need the exact gradient; got an explainer with method '{model.method.name}' "
                             "(use fxrel.Explainer(model, 'gradient'))")
        return model
    if not isinstance(model, nn.Module):
        raise InputError(f"expected an nn.Module or a gradient fxrel.Explainer, got {type(model).__name__}")
    explainer = _EXPLAINERS.get(model)
    if explainer is None:
        explainer = _EXPLAINERS[model] = WeakModelExplainer(model, "gradient")
    return explainer


def default_cam_layer(model: nn.Module | Explainer, x: torch.Tensor) -> str:
    """The canonical node ``layer=None`` picks: the last spatial feature map, or a vision transformer's last token
    map (see :mod:`fxrel.catalog.cam`). Returns the node name (usable as ``layer``)."""
    return cam_layer(cam_explainer(model).canonical_graph(x), None)[0].name


def cam_layers(model: nn.Module | Explainer, x: torch.Tensor) -> list[str]:
    """Module names whose output (their last canonical node) is a 4-D feature map: valid ``layer`` values."""
    return module_outputs(cam_explainer(model).canonical_graph(x))


def cam(model: nn.Module | Explainer, x: torch.Tensor, target: Target = None, layer: str | None = None,
        kind: CamKind | str = "gradcam", upsample: Upsample = "input", mode: str = "bilinear",
        relu: bool = True) -> torch.Tensor:
    """A class activation map ``[N, H, W]`` for a batch ``x`` (on ``x``'s device).

    ``model``: an eval-mode ``nn.Module`` (its gradient explainer is built once and cached, see
    :func:`cam_explainer`) or a gradient :class:`~fxrel.Explainer`. ``target``: as in
    :meth:`~fxrel.Explainer.attribute` (int, one per row, ``None``/``"top1"``). ``layer``: node or module name
    whose output is the feature map (a module name stands for its output, e.g. ``"layer4"``, ``"features.29"``);
    ``None`` picks the last spatial feature map (:func:`default_cam_layer`). ``kind``: ``"gradcam"``,
    ``"gradcam++"`` or ``"layercam"`` (formulas in :mod:`fxrel.catalog.cam`). ``upsample``: ``"input"`` (default:
    ``x``'s H×W, as pytorch-grad-cam and captum users get), ``None`` (the layer's resolution) or ``(h, w)``, by
    ``F.interpolate(mode=mode, align_corners=False)``. ``relu=False`` returns the signed map (before the final ReLU).
    """
    kind = normalise_kind(kind)
    check_upsample(upsample)
    explainer = cam_explainer(model)
    graph = explainer.canonical_graph(x)
    name, grid = cam_stop(graph, layer)
    explanation = explainer.attribute(x, target, stops=[name])
    transform = cam_transform(kind, relu, output_size(graph, upsample), mode, grid)
    return transform(explanation.relevance[name], explanation.values[name])
