"""The CAM family (Grad-CAM, Grad-CAM++, LayerCAM) as ordinary sweeps: the exact gradient down to a feature map,
where the map formula turns the layer's activation ``A`` and gradient ``G = ∂y_t/∂A``, both ``[N, C, H, W]``, into
the map ``[N, H, W]`` (``Method.finalize(relevance=G, value=A)``, recorded into the relevance graph like every
method's output transform, so CAMs get ``fxrel graph``, ``compile=True`` and rule plans).

* :func:`gradcam_map` — Grad-CAM (Selvaraju et al. 2017, Eq. 1–2)::

      α_c = 1/(HW) Σ_ij G_cij                       (Eq. 1, global-average-pooled gradients)
      L   = ReLU(Σ_c α_c A_c)                        (Eq. 2)

* :func:`gradcam_pp_map` — Grad-CAM++ (Chattopadhay et al. 2018, Eq. 19 with Eq. 7), in the closed form used by
  pytorch-grad-cam's ``GradCAMPlusPlus`` (exponential score ``Y = exp(S)`` so that higher derivatives are powers of
  the first one; the common factor ``exp(S)`` cancels in ``α`` and the gradients of the logit ``S`` are used)::

      α_cij = G_cij² / (2 G_cij² + (Σ_ab A_cab) · G_cij³ + ε)    with α_cij := 0 where G_cij = 0   (Eq. 19)
      w_c   = Σ_ij α_cij · ReLU(G_cij)                                                         (Eq. 7)
      L     = ReLU(Σ_c w_c A_c)

  ``ε = 1e-6`` (pytorch-grad-cam's guard against a zero denominator) plus the explicit zero where ``G = 0``;
  ``ε`` is only kept from rounding to 0 in the dtype (float16's smallest subnormal, ``6e-8``:
  :func:`fxrel.rules.generic.stabilizer_for` with ``normal=False``), not raised to float16's smallest normal
  ``6.1e-5``: the denominator is in units of ``G²``, and at a feature map ``|G| ~ 1e-3`` (the CAM++ map's
  correlation with float32's drops to 0.78 on a small ResNet with ``ε = 6.1e-5``; 1.00 with 1e-6).

* :func:`layercam_map` — LayerCAM (Jiang et al. 2021, Eq. 5–6)::

      L = ReLU(Σ_c ReLU(G_c) ⊙ A_c)

``relu=False`` drops the final ReLU of each map (signed maps for methods that reuse these weights, UCAG's crops).
The layer: ``layer=None`` is the last spatial feature map (:func:`fxrel.graphs.analysis.last_feature_map`: ResNet's
final ReLU of ``layer4``, VGG's last ReLU before the pooling in ``features``); a node or module name otherwise.
On a vision transformer it is the last token map (:func:`fxrel.graphs.analysis.last_token_map`: the tokens entering
the last attention, ``blocks[-1].norm1`` of timm's ViT), read on the patch grid with the class and other constant
tokens dropped — what pytorch-grad-cam needs a hand-written ``reshape_transform`` for, found from the graph.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, Sequence

import torch
from torch import fx

from fxrel.catalog.lrp import gradient_composite
from fxrel.catalog.method import Method, seed_gradient
from fxrel.catalog.registry import register
from fxrel.errors import InputError, RuleError
from fxrel.graphs.analysis import (
    TokenGrid,
    find_node,
    last_feature_map,
    last_token_map,
    module_outputs,
    node_shape,
    token_grid,
    token_layout,
)
from fxrel.graphs.builder import Stream
from fxrel.imageops import resize_maps
from fxrel.rules.base import Rule
from fxrel.rules.composite import Matcher
from fxrel.rules.generic import dtype_of, stabilizer_for
from fxrel.text import candidate_list

CamKind = Literal["gradcam", "gradcam++", "layercam"]
Upsample = None | Literal["input"] | tuple[int, int]
CAM_OUTPUT = "non-negative [N, H, W] map at the input's size (upsample=None: at the layer's; relu=False: signed)"


# -- map formulas: pure functions of (A, G), traceable (no shape checks), so they run inside relevance graphs ----------
def _weighted_sum(weights: torch.Tensor, activation: torch.Tensor, relu: bool) -> torch.Tensor:
    """``(ReLU)(Σ_c w_c A_c)`` for per-channel weights ``w`` [N, C]: the map [N, H, W]."""
    out = torch.einsum("nc,nchw->nhw", weights, activation)
    return out.clamp(min=0) if relu else out


def _gradcam(activation: torch.Tensor, gradient: torch.Tensor, relu: bool) -> torch.Tensor:
    return _weighted_sum(gradient.mean(dim=(2, 3)), activation, relu)


def _gradcam_pp(activation: torch.Tensor, gradient: torch.Tensor, relu: bool, eps: float = 1e-6) -> torch.Tensor:
    g2 = gradient.pow(2)
    g3 = g2 * gradient
    sum_a = activation.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + stabilizer_for(eps, dtype_of(activation), normal=False))
    alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * gradient.clamp(min=0)).sum(dim=(2, 3))
    return _weighted_sum(weights, activation, relu)


def _layercam(activation: torch.Tensor, gradient: torch.Tensor, relu: bool) -> torch.Tensor:
    out = (gradient.clamp(min=0) * activation).sum(dim=1)
    return out.clamp(min=0) if relu else out


def _check_pair(activation: torch.Tensor, gradient: torch.Tensor) -> None:
    if activation.dim() != 4 or activation.shape != gradient.shape:
        raise InputError(f"CAM maps need an activation and a gradient shaped [N, C, H, W] alike; got "
                         f"{tuple(activation.shape)} and {tuple(gradient.shape)}")


def gradcam_map(activation: torch.Tensor, gradient: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``α_c = mean_ij G_cij`` (Eq. 1), ``L = ReLU(Σ_c α_c A_c)`` (Eq. 2).

    ``activation``/``gradient``: ``[N, C, H, W]``; returns ``[N, H, W]``. ``relu=False``: the signed map.
    """
    _check_pair(activation, gradient)
    return _gradcam(activation, gradient, relu)


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
    return _gradcam_pp(activation, gradient, relu, eps)


def layercam_map(activation: torch.Tensor, gradient: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021, Eq. 5–6): ``L = ReLU(Σ_c ReLU(G_c) ⊙ A_c)`` (per-location weights).

    Returns ``[N, H, W]``; ``relu=False`` drops the final ReLU (the gradient's ReLU is part of the method and stays).
    """
    _check_pair(activation, gradient)
    return _layercam(activation, gradient, relu)


#: CAM kind → traceable map formula ``(A, G, relu) → [N, H, W]``
MAPS: dict[str, Callable[..., torch.Tensor]] = {"gradcam": _gradcam, "gradcam++": _gradcam_pp, "layercam": _layercam}
CAM_KINDS = tuple(MAPS)
#: registered method name → CAM kind
CAM_METHODS = {"grad_cam": "gradcam", "grad_cam_pp": "gradcam++", "layer_cam": "layercam"}


def normalise_kind(kind: str) -> str:
    """A CAM kind from its spellings (``"gradcam++"``, ``"grad_cam_pp"``, ``"GradCAM-PlusPlus"`` …)."""
    key = kind.lower().replace("-", "").replace("_", "") if isinstance(kind, str) else None
    key = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}.get(key, key)
    if key not in MAPS:
        raise InputError(f"unknown CAM kind {kind!r}; use one of {list(CAM_KINDS)}")
    return key


# -- the layer and the output size ------------------------------------------------------------------------------------
def cam_layer(graph: fx.GraphModule, layer: str | None) -> tuple[fx.Node, TokenGrid | None]:
    """The CAM's feature-map node and, for a transformer's tokens, their grid. ``None`` → the last spatial feature
    map, or a vision transformer's last token map when it comes later (:func:`fxrel.graphs.analysis.last_token_map`:
    the tokens entering the last attention); a name → that node, a 4-D map ``[N, C, H, W]`` or tokens
    ``[N, prefix + h·w, C]`` of the patch grid."""
    if layer is None:
        tokens = last_token_map(graph)
        try:
            spatial = last_feature_map(graph)
        except RuleError as err:
            if tokens is None:
                raise InputError(f"{err}; give layer= explicitly") from None
            return tokens
        order = {n: i for i, n in enumerate(graph.graph.nodes)}
        return tokens if tokens is not None and order[tokens[0]] > order[spatial] else (spatial, None)
    if not isinstance(layer, str):
        raise InputError(f"layer must be a node or module name (str), got {type(layer).__name__}")
    try:
        node = find_node(graph, layer)
    except RuleError as err:
        raise RuleError(f"no node or module named '{layer}'; layers with 4-D outputs: "
                        f"{candidate_list(module_outputs(graph))}") from err
    shape = node_shape(node)
    grid = token_grid(graph)
    layout = token_layout(node, grid) if grid is not None else None
    if layout is not None:
        return node, layout
    if shape is None or len(shape) != 4:
        tokens = f" or tokens [N, prefix + {grid.tokens}, {grid.channels}]" if grid is not None else ""
        raise InputError(f"layer '{layer}' outputs shape {tuple(shape or ())}; CAMs need a 4-D "
                         f"feature map [N, C, H, W]{tokens} (layers with 4-D outputs: "
                         f"{candidate_list(module_outputs(graph))})")
    return node, None


def as_grid(tokens: Any, grid: TokenGrid) -> Any:
    """Tokens ``[N, prefix + h·w, C]`` as the map ``[N, C, h, w]`` of their patch grid, the constant tokens dropped
    (what pytorch-grad-cam's ``reshape_transform`` does for ViTs)."""
    return tokens[:, grid.prefix:].reshape(-1, grid.height, grid.width, grid.channels).permute(0, 3, 1, 2)


def check_upsample(upsample: Upsample) -> None:
    """``upsample`` must be ``None``, ``"input"`` or a positive ``(height, width)``."""
    if upsample is None or upsample == "input":
        return
    if not (isinstance(upsample, (tuple, list)) and len(upsample) == 2
            and all(isinstance(s, int) and s > 0 for s in upsample)):
        raise InputError(f"upsample must be None, 'input' or (height, width); got {upsample!r}")


def cam_stop(graph: fx.GraphModule, layer: str | None) -> tuple[str, TokenGrid | None]:
    """The stop label of the CAM's layer (checked) — the name given, or the chosen node's — and its token grid
    (:func:`cam_layer`)."""
    node, grid = cam_layer(graph, layer)
    return (node.name if layer is None else layer), grid


def output_size(graph: fx.GraphModule, upsample: Upsample) -> tuple[int, int] | None:
    """The map's size: ``"input"`` → the model input's H×W, ``(h, w)`` as given, ``None`` → the layer's own."""
    check_upsample(upsample)
    if upsample != "input":
        return None if upsample is None else tuple(upsample)
    placeholder = next(n for n in graph.graph.nodes if n.op == "placeholder")
    return tuple(placeholder.meta["tensor_meta"].shape[-2:])


def cam_transform(kind: str, relu: bool, size: tuple[int, int] | None, mode: str, grid: TokenGrid | None = None
                  ) -> Callable[[Any, Any], Any]:
    """``(G, A) → map``: the formula of ``kind`` (on the patch grid for tokens) and the resize to ``size`` (None:
    none)."""
    formula = MAPS[normalise_kind(kind)]

    def transform(gradient: Any, activation: Any) -> Any:
        if grid is not None:
            gradient, activation = as_grid(gradient, grid), as_grid(activation, grid)
        maps = formula(activation, gradient, relu)
        return maps if size is None else resize_maps(maps, size, mode)
    return transform


# -- the sweeps -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CamMethod(Method):
    """A CAM: the gradient sweep stopping at ``layer``, whose output transform is the map formula (and the resize
    to ``upsample``). Its stops default to the layer (:meth:`default_stops`)."""

    kind: str = "gradcam"
    layer: str | None = None
    upsample: Upsample = "input"
    mode: str = "bilinear"
    relu: bool = True

    def default_stops(self, graph: fx.GraphModule) -> list[str]:
        return [cam_stop(graph, self.layer)[0]]

    def streams(self, graph: fx.GraphModule, overrides: Sequence[tuple[Matcher, Rule]] = ()) -> list[Stream]:
        transform = cam_transform(self.kind, self.relu, output_size(graph, self.upsample), self.mode,
                                  cam_layer(graph, self.layer)[1])
        return Method.streams(dataclasses.replace(self, finalize=transform), graph, overrides)


def _cam_method(name: str, layer: str | None, upsample: Upsample, mode: str, relu: bool) -> CamMethod:
    check_upsample(upsample)
    return CamMethod(name, gradient_composite(), seed_gradient, kind=CAM_METHODS[name], layer=layer,
                     upsample=upsample, mode=mode, relu=relu)


@register("grad_cam", "Grad-CAM at any layer from the gradient stream", "Selvaraju et al. 2017", CAM_OUTPUT)
def _grad_cam(layer: str | None = None, upsample: Upsample = "input", mode: str = "bilinear", relu: bool = True
              ) -> Method:
    return _cam_method("grad_cam", layer, upsample, mode, relu)


@register("grad_cam_pp", "Grad-CAM++ at any layer", "Chattopadhay et al. 2018", CAM_OUTPUT)
def _grad_cam_pp(layer: str | None = None, upsample: Upsample = "input", mode: str = "bilinear", relu: bool = True
                 ) -> Method:
    return _cam_method("grad_cam_pp", layer, upsample, mode, relu)


@register("layer_cam", "LayerCAM at any layer", "Jiang et al. 2021", CAM_OUTPUT)
def _layer_cam(layer: str | None = None, upsample: Upsample = "input", mode: str = "bilinear", relu: bool = True
               ) -> Method:
    return _cam_method("layer_cam", layer, upsample, mode, relu)
