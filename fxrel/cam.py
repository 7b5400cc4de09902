"""The CAM family (Grad-CAM, Grad-CAM++, LayerCAM) computed from the engine's own gradient stream.

One :meth:`fxrel.Explainer.attribute` call with the ``"gradient"`` method and the CAM layer as stop node returns
both what every CAM needs: the layer's forward activation ``A = values[layer]`` and the exact gradient
``G = ∂y_t/∂A = relevance[layer]`` (a vector–Jacobian sweep recorded into an fx graph: no hooks, no autograd).
The map formulas are pure functions of ``(A, G)``, both ``[N, C, H, W]``, returning ``[N, H, W]``:

* :func:`gradcam_map` — Grad-CAM (Selvaraju et al. 2017, Eq. 1–2)::

      α_c = 1/(HW) Σ_ij G_cij                       (Eq. 1, global-average-pooled gradients)
      L   = ReLU(Σ_c α_c A_c)                        (Eq. 2)

* :func:`gradcam_pp_map` — Grad-CAM++ (Chattopadhay et al. 2018, Eq. 19 with Eq. 7), in the closed form used by
  pytorch-grad-cam's ``GradCAMPlusPlus`` (exponential score ``Y = exp(S)`` so that higher derivatives are powers of
  the first one; the common factor ``exp(S)`` cancels in ``α`` and the gradients of the logit ``S`` are used)::

      α_cij = G_cij² / (2 G_cij² + (Σ_ab A_cab) · G_cij³ + ε)    with α_cij := 0 where G_cij = 0   (Eq. 19)
      w_c   = Σ_ij α_cij · ReLU(G_cij)                                                         (Eq. 7)
      L     = ReLU(Σ_c w_c A_c)

  ``ε = 1e-6`` (pytorch-grad-cam's guard against a zero denominator) plus the explicit zero where ``G = 0``.

* :func:`layercam_map` — LayerCAM (Jiang et al. 2021, Eq. 5–6)::

      L = ReLU(Σ_c ReLU(G_c) ⊙ A_c)

``relu=False`` drops the final ReLU of each map (signed maps for methods that reuse these weights).

:func:`cam` runs the whole thing for a model (or a gradient :class:`~fxrel.Explainer`), choosing the layer
automatically with ``layer=None`` (see :func:`default_cam_layer`).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from fxrel.errors import InputError, RuleError
from fxrel.explainer import Explainer, Target
from fxrel.graphs.analysis import find_node, last_feature_map, module_outputs
from fxrel.imageops import resize_maps
from fxrel.text import candidate_list

__all__ = [
    "CAM_KINDS",
    "cam",
    "cam_explainer",
    "cam_layers",
    "default_cam_layer",
    "gradcam_map",
    "gradcam_pp_map",
    "layercam_map",
]

CamKind = Literal["gradcam", "gradcam++", "layercam"]
Upsample = None | Literal["input"] | tuple[int, int]


# -- map formulas -----------------------------------------------------------------------------------------------------
def _check_pair(activation: torch.Tensor, gradient: torch.Tensor) -> None:
    if activation.dim() != 4 or activation.shape != gradient.shape:
        raise InputError(f"CAM maps need an activation and a gradient shaped [N, C, H, W] alike; got "
                         f"{tuple(activation.shape)} and {tuple(gradient.shape)}")


def _weighted_sum(weights: torch.Tensor, activation: torch.Tensor, relu: bool) -> torch.Tensor:
    """``(ReLU)(Σ_c w_c A_c)`` for per-channel weights ``w`` [N, C]: the map [N, H, W]."""
    out = torch.einsum("nc,nchw->nhw", weights, activation)
    return out.clamp(min=0) if relu else out


def gradcam_map(activation: torch.Tensor, gradient: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``α_c = mean_ij G_cij`` (Eq. 1), ``L = ReLU(Σ_c α_c A_c)`` (Eq. 2).

    ``activation``/``gradient``: ``[N, C, H, W]``; returns ``[N, H, W]``. ``relu=False``: the signed map.
    """
    _check_pair(activation, gradient)
    return _weighted_sum(gradient.mean(dim=(2, 3)), activation, relu)


def gradcam_pp_map(activation: torch.Tensor, gradient: torch.Tensor, relu: bool = True,
                   eps: float = 1e-6) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, Eq. 19 and Eq. 7), pytorch-grad-cam's closed form::

        α_cij = G² / (2 G² + (Σ_ab A_cab) · G³ + eps),   α_cij = 0 where G_cij = 0
        w_c   = Σ_ij α_cij · ReLU(G_cij)
        L     = ReLU(Σ_c w_c A_c)

    ``G`` is the gradient of the target logit (the exp-score form of the paper; its ``exp(S)`` factor cancels in
    ``α`` and only scales ``w`` per image). Returns ``[N, H, W]``; ``relu=False`` drops the final ReLU.
    """
    _check_pair(activation, gradient)
    g2 = gradient.pow(2)
    g3 = g2 * gradient
    sum_a = activation.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + eps)
    alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * gradient.clamp(min=0)).sum(dim=(2, 3))
    return _weighted_sum(weights, activation, relu)


def layercam_map(activation: torch.Tensor, gradient: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021, Eq. 5–6): ``L = ReLU(Σ_c ReLU(G_c) ⊙ A_c)`` (per-location weights).

    Returns ``[N, H, W]``; ``relu=False`` drops the final ReLU (the gradient's ReLU is part of the method and stays).
    """
    _check_pair(activation, gradient)
    out = (gradient.clamp(min=0) * activation).sum(dim=1)
    return out.clamp(min=0) if relu else out


_MAPS: dict[str, Callable[..., torch.Tensor]] = {"gradcam": gradcam_map, "gradcam++": gradcam_pp_map,
                                                  "layercam": layercam_map}
CAM_KINDS = tuple(_MAPS)


def _normalise_kind(kind: str) -> str:
    key = kind.lower().replace("-", "").replace("_", "") if isinstance(kind, str) else None
    key = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}.get(key, key)
    if key not in _MAPS:
        raise InputError(f"unknown CAM kind {kind!r}; use one of {list(CAM_KINDS)}")
    return key


# -- explainer cache and layer choice ---------------------------------------------------------------------------------
class _CachedExplainer(Explainer):
    """A gradient explainer that holds its model weakly, so the per-model cache does not keep models alive."""

    @property  # type: ignore[override]
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise InputError("the model of this cached CAM explainer has been garbage-collected")
        return model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self._model_ref = weakref.ref(model)


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
        explainer = _EXPLAINERS[model] = _CachedExplainer(model, "gradient")
    return explainer


def default_cam_layer(model: nn.Module | Explainer, x: torch.Tensor) -> str:
    """The canonical node ``layer=None`` picks: the last spatial feature map
    (:func:`fxrel.graphs.analysis.last_feature_map`: ResNet's final ReLU of ``layer4``, VGG's last ReLU before the
    pooling in ``features``). Returns the node name (usable as ``layer``)."""
    graph = cam_explainer(model).canonical_graph(x)
    try:
        return last_feature_map(graph).name
    except RuleError as err:
        raise InputError(f"{err}; give layer= explicitly") from None


def cam_layers(model: nn.Module | Explainer, x: torch.Tensor) -> list[str]:
    """Module names whose output (their last canonical node) is a 4-D feature map: valid ``layer`` values."""
    return module_outputs(cam_explainer(model).canonical_graph(x))


# -- the driver -------------------------------------------------------------------------------------------------------
def _upsample(maps: torch.Tensor, x: torch.Tensor, upsample: Upsample, mode: str) -> torch.Tensor:
    if upsample is None:
        return maps
    if isinstance(upsample, str):
        if upsample != "input":
            raise InputError(f"upsample must be None, 'input' or (height, width); got {upsample!r}")
        size = tuple(x.shape[-2:])
    elif (isinstance(upsample, (tuple, list)) and len(upsample) == 2
          and all(isinstance(s, int) and s > 0 for s in upsample)):
        size = tuple(upsample)
    else:
        raise InputError(f"upsample must be None, 'input' or (height, width); got {upsample!r}")
    return resize_maps(maps, size, mode)


def cam(model: nn.Module | Explainer, x: torch.Tensor, target: Target = None, layer: str | None = None,
        kind: CamKind | str = "gradcam", upsample: Upsample = "input", mode: str = "bilinear",
        relu: bool = True) -> torch.Tensor:
    """A class activation map ``[N, H, W]`` for a batch ``x`` (on ``x``'s device).

    ``model``: an eval-mode ``nn.Module`` (its gradient explainer is built once and cached, see
    :func:`cam_explainer`) or a gradient :class:`~fxrel.Explainer`. ``target``: as in
    :meth:`~fxrel.Explainer.attribute` (int, one per row, ``None``/``"top1"``). ``layer``: node or module name
    whose output is the feature map (a module name stands for its output, e.g. ``"layer4"``, ``"features.29"``);
    ``None`` picks the last spatial feature map (:func:`default_cam_layer`). ``kind``: ``"gradcam"``,
    ``"gradcam++"`` or ``"layercam"`` (formulas in the module docstring). ``upsample``: ``"input"`` (default: ``x``'s
    H×W, as pytorch-grad-cam and captum users get), ``None`` (the layer's resolution) or ``(h, w)``, by
    ``F.interpolate(mode=mode, align_corners=False)``.
    ``relu=False`` returns the signed map (before the final ReLU).
    """
    map_fn = _MAPS[_normalise_kind(kind)]
    explainer = cam_explainer(model)
    if layer is None:
        layer = default_cam_layer(explainer, x)
    elif not isinstance(layer, str):
        raise InputError(f"layer must be a node or module name (str), got {type(layer).__name__}")
    try:
        find_node(explainer.canonical_graph(x), layer)
    except RuleError as err:
        raise RuleError(f"no node or module named '{layer}' in {type(explainer.model).__name__}; layers with "
                        f"4-D outputs: {candidate_list(cam_layers(explainer, x))}") from err
    explanation = explainer.attribute(x, target, stops=[layer])
    activation, gradient = explanation.values[layer], explanation.relevance[layer]
    if activation.dim() != 4:
        raise InputError(f"layer '{layer}' outputs shape {tuple(activation.shape)}; CAMs need a 4-D feature map "
                         f"[N, C, H, W] (layers with 4-D outputs: {candidate_list(cam_layers(explainer, x))})")
    return _upsample(map_fn(activation, gradient, relu=relu), x, upsample, mode)
