"""Validation at the door: every argument a user passes is checked once, here, before anything is built or run.

Each check raises :class:`~fxrel.errors.InputError` (:class:`~fxrel.errors.CaptureError` for a model in training
mode, :class:`~fxrel.errors.RuleError` for a method parameter) naming the argument, what was given and what is
valid. The method parameters' domains (``epsilon ≥ 0`` …)
live beside the registry (:data:`PARAMETER_DOMAINS`), keyed by parameter name, so a parameter means the same thing
in every method that takes it.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fxrel.errors import CaptureError, InputError, RuleError


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the model --------------------------------------------------------------------------------------------------------
def check_model(model: Any) -> nn.Module:
    """An ``nn.Module`` in eval mode (every submodule); checked at every call, as the mode can change."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function in an "
                         "nn.Module whose forward calls it")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        raise CaptureError(
            f"model is in training mode ({shown}); call model.eval() first: BatchNorm and dropout must use their "
            "inference behaviour for an explanation to be well defined"
        )
    return model


# -- the input --------------------------------------------------------------------------------------------------------
def check_input(x: Any, device: torch.device | None = None) -> torch.Tensor:
    """A dense, batched, finite floating-point tensor on a real device (``device``: the model's, if it has one)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise InputError(f"x must be a dense tensor, got layout {x.layout}; call x.to_dense()")
    if x.device.type == "meta":
        raise InputError("x is on the meta device (no data); give a tensor with values")
    if not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise InputError(f"x must be batched (batch first), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "infinite"
        raise InputError(f"x contains {bad} values; relevance of a non-finite input is undefined")
    if device is not None and device != x.device:
        raise InputError(f"x is on {x.device} but the model is on {device}; move one of them")
    return x


# -- targets ----------------------------------------------------------------------------------------------------------
def _index(value: Any, where: str, classes: int | None) -> int:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"target{where} must be an integer class index, got {_shown(value)} "
                         f"({type(value).__name__}); class indices are not rounded")
    value = int(value)
    if value < 0 or (classes is not None and value >= classes):
        valid = f"valid 0…{classes - 1}" if classes is not None else "valid: non-negative"
        has = f"the model has {classes} classes" if classes is not None else "class indices are non-negative"
        raise InputError(f"class index {value} out of range: {has} ({valid})")
    return value


def target_indices(target: Any, rows: int, device: torch.device, classes: int | None) -> torch.Tensor:
    """One class index per row for an explicit ``target``: an int (every row), a sequence of ints or an integer
    tensor (one per row); floats, bools and out-of-range values are errors, never rounded or wrapped."""
    if isinstance(target, torch.Tensor):
        if target.device.type == "meta":
            raise InputError("target is a meta tensor (no values); give class indices")
        if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
            raise InputError(f"target must hold integer class indices, got a {target.dtype} tensor; class indices "
                             "are not rounded (use .long() if the values are whole)")
        values = target.flatten().tolist()
    elif isinstance(target, (list, tuple)):
        values = list(target)
    else:
        values = [target]
    indices = [_index(v, "" if len(values) == 1 else f"[{i}]", classes) for i, v in enumerate(values)]
    if len(indices) == 1:
        indices = indices * rows
    if len(indices) != rows:
        raise InputError(f"got {len(indices)} targets for a batch of {rows}")
    return torch.tensor(indices, dtype=torch.long, device=device)


# -- seeds and stops --------------------------------------------------------------------------------------------------
def check_seed(seed: Any, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A finite tensor shaped like the start node's output, in ``like``'s dtype and device."""
    if not isinstance(seed, torch.Tensor):
        raise InputError(f"seed must be a torch.Tensor shaped like the start node's output {tuple(shape)}, got "
                         f"{type(seed).__name__}")
    if tuple(seed.shape) != tuple(shape):
        raise InputError(f"seed has shape {tuple(seed.shape)}; it must be shaped like the start node's output "
                         f"{tuple(shape)}")
    if not seed.is_floating_point() or not torch.isfinite(seed).all():
        raise InputError("seed must be a finite floating-point tensor (it becomes the initial relevance)")
    return seed.to(like)


def node_names(value: Any, argument: str) -> list[str] | None:
    """``stops``/``start`` as a list of node or module names: a string is one name, a sequence of strings many."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InputError(f"{argument} must be a node or module name or a list of them, got {_shown(value)}")


# -- method parameters ------------------------------------------------------------------------------------------------
def _real(name: str, value: Any, low: float | None = 0.0, strict: bool = False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{name} must be a real number, got {_shown(value)} ({type(value).__name__})"
    if not math.isfinite(value):
        return f"{name} must be finite, got {value}"
    if low is not None and (value <= low if strict else value < low):
        return f"{name} must be {'>' if strict else '≥'} {low:g}, got {value}"
    return None


def _non_negative(name: str, value: Any) -> str | None:
    return _real(name, value)


def _optional_positive(name: str, value: Any) -> str | None:
    return None if value is None else _real(name, value, strict=True)


def _positive_int(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        return f"{name} must be a positive integer, got {_shown(value)}"
    return None


def _optional_positive_int(name: str, value: Any) -> str | None:
    return None if value is None else _positive_int(name, value)


def _bound(name: str, value: Any) -> str | None:
    if isinstance(value, str):
        return None if value == "image" else f"{name} must be 'image', a number or a tensor, got {value!r}"
    if isinstance(value, torch.Tensor):
        return None if torch.isfinite(value).all() else f"{name} must be finite"
    if isinstance(value, (list, tuple)):
        return next((e for e in (_real(name, v, low=None) for v in value) if e), None)
    return _real(name, value, low=None)


def _flag(name: str, value: Any) -> str | None:
    return None if isinstance(value, bool) else f"{name} must be True or False, got {_shown(value)}"


#: parameter name → check ``(name, value) → message or None``; a parameter means the same in every method
PARAMETER_DOMAINS: dict[str, Callable[[str, Any], str | None]] = {
    "epsilon": _non_negative, "stabilizer": _non_negative, "gamma": _non_negative, "alpha": _non_negative,
    "beta": _non_negative, "ridge": _non_negative, "noise": _non_negative, "slope": _optional_positive,
    "steps": _positive_int, "samples": _positive_int, "n": _positive_int, "chunk_size": _optional_positive_int,
    "max_batch": _positive_int, "batch_size": _positive_int, "low": _bound, "high": _bound,
    "relu": _flag, "squared": _flag, "center": _flag, "multiply_by_inputs": _flag, "normalize": _flag,
    "no_a": _flag, "no_fx": _flag, "no_fdx": _flag, "no_m": _flag, "no_reg": _flag, "gradcam": _flag,
}
#: parameters whose domain depends on the method (UCAG's ``alpha`` is a zoom factor or ``"input"``)
_METHOD_DOMAINS: dict[tuple[str, str], Callable[[str, Any], str | None]] = {
    ("ucag", "alpha"): lambda name, value: None if value == "input" else _real(name, value, strict=True),
    ("ucag", "rho"): lambda name, value: _real(name, value, strict=True),
}


def check_parameters(method: str, params: dict[str, Any]) -> None:
    """Check the values of a method's parameters against their declared domains."""
    for name, value in params.items():
        check = _METHOD_DOMAINS.get((method, name), PARAMETER_DOMAINS.get(name))
        message = check(name, value) if check is not None else None
        if message:
            raise RuleError(f"method '{method}': {message}")
    low, high = params.get("low"), params.get("high")
    if isinstance(low, numbers.Real) and isinstance(high, numbers.Real) and low > high:
        raise RuleError(f"method '{method}': low ({low}) must not exceed high ({high})")
