"""Methods that are not a single relevance sweep to the input: class activation maps at a layer and the
path/noise wrappers (Integrated Gradients, SmoothGrad) over any rule-set method. They are listed by
``fxrel.methods()`` next to the rule sets and reachable through ``fxrel.explain(..., method=NAME)``."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from fxrel import cam, ssl, ucag, wrappers
from fxrel.explainer import Explainer, Target


def keyword_defaults(fn: Callable[..., Any], *names: str) -> dict[str, Any]:
    """The defaults of ``fn``'s keyword parameters ``names``, read from its signature (one place for each default)."""
    parameters = inspect.signature(fn).parameters
    return {name: parameters[name].default for name in names}


CAM_OUTPUT = "non-negative [N, H, W] map at the input's size (upsample=None: at the layer's)"
CAM_DEFAULTS = keyword_defaults(cam.cam, "layer", "upsample")


@dataclass(frozen=True)
class PostHocInfo:
    name: str
    run: Callable[..., torch.Tensor]
    description: str
    reference: str
    output: str
    defaults: dict = field(default_factory=dict)


def _cam(kind: str) -> Callable[..., torch.Tensor]:
    def run(model: nn.Module, x: torch.Tensor, target: Target, **params: Any) -> torch.Tensor:
        return cam.cam(model, x, target, kind=kind, **params)
    return run


def _wrapped(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(model: nn.Module, x: torch.Tensor, target: Target, base: str = "gradient", **params: Any
            ) -> torch.Tensor:
        base_params = params.pop("base_params", {})
        return fn(Explainer(model, base, **base_params), x, target, **params)
    return run


def _unfolded(model: nn.Module, x: torch.Tensor, target: Target, base: str = "grad_cam", **params: Any
              ) -> torch.Tensor:
    return ucag.ucag(model, x, target, method=base, method_params=params.pop("base_params", None), **params)


POST_HOC: dict[str, PostHocInfo] = {
    "grad_cam": PostHocInfo("grad_cam", _cam("gradcam"), "Grad-CAM at any layer from the gradient stream",
                            "Selvaraju et al. 2017", CAM_OUTPUT, CAM_DEFAULTS),
    "grad_cam_pp": PostHocInfo("grad_cam_pp", _cam("gradcam++"), "Grad-CAM++ at any layer",
                               "Chattopadhay et al. 2018", CAM_OUTPUT, CAM_DEFAULTS),
    "layer_cam": PostHocInfo("layer_cam", _cam("layercam"), "LayerCAM at any layer", "Jiang et al. 2021",
                             CAM_OUTPUT, CAM_DEFAULTS),
    "integrated_gradients": PostHocInfo(
        "integrated_gradients", _wrapped(wrappers.integrated_gradients),
        "Integrated Gradients of any method (base=NAME): path points batched and chunked", "Sundararajan et al. 2017",
        "signed, shaped like the input; Σ ≈ f(x) − f(x₀) for base='gradient'",
        {"base": "gradient", **keyword_defaults(wrappers.integrated_gradients, "steps", "baseline")}),
    "smoothgrad": PostHocInfo(
        "smoothgrad", _wrapped(wrappers.smoothgrad), "SmoothGrad of any method (base=NAME): noisy copies batched",
        "Smilkov et al. 2017", "as the base method (squared=True: non-negative)",
        {"base": "gradient", **keyword_defaults(wrappers.smoothgrad, "samples", "noise")}),
    "ucag": PostHocInfo(
        "ucag", _unfolded, "UCAG of any method (base=NAME): n² crops (3/4 of the image) up-scaled to the input "
        "size (the paper's rho=0.555, alpha=2.6: 1.44×) explained as one batch, "
        "confidence-weighted and folded back", "Hong et al. 2023",
        "[N, H, W] at the input's size; CAM bases: in [0, 1] (ReLU, min–max, blur), others: signed",
        {"base": "grad_cam", **keyword_defaults(ucag.ucag, "n", "rho", "alpha", "weighting", "average")}),
    "agf_ssl": PostHocInfo(
        "agf_ssl", ssl.agf_ssl, "AGF of a self-supervised network: the class its own classifier gives the latent "
        "minus the nearest reference latent (references=images or latents; further parameters go to agf)",
        "Gur, Ali, Wolf 2021 (AGF, Alg. 2)", "as agf",
        keyword_defaults(ssl.agf_ssl, "references", "combine", "batch_size")),
}
