"""Capturing never changes the user's model: no attribute left behind, no fake tensor handed to a hook, and a custom
autograd Function (whose backward tracing cannot see) is refused by name."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import fxrel
from fxrel.graphs.capture import capture
from tests.test_bad_inputs import model_state


class Recording(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        h = self.conv(x).relu()
        self.last_features = h                  # state a forward sets: must not survive tracing as a FakeTensor
        self.calls += 1
        return self.fc(h.mean((2, 3)))


class MyClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return 3 * grad


class WithFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(MyClamp.apply(x))


def _no_fakes(value) -> bool:
    return not isinstance(value, FakeTensor)


@pytest.mark.parametrize("method", ["gradient", "epsilon_plus_flat", "rsp", "grad_cam"])
def test_attributes_set_by_forward_are_restored(method):
    model, x = Recording().eval(), torch.randn(2, 3, 8, 8)
    model(x)
    before_keys, before_calls, before_state = set(vars(model)), model.calls, model_state(model)
    fxrel.explain(model, x, 0, method=method)
    assert set(vars(model)) == before_keys and model.calls == before_calls and model_state(model) == before_state
    assert all(_no_fakes(v) for v in vars(model).values())
    fresh = Recording().eval()
    capture(fresh, x)
    assert "last_features" not in vars(fresh) and fresh.calls == 0


class Caching(nn.Module):
    """Caches a derived tensor in a plain dict on its first call, as timm's LeViT and EfficientFormer do with their
    attention biases: tracing would leave a FakeTensor in the cache, and every later call would use it."""

    def __init__(self):
        super().__init__()
        self.fc, self.offsets = nn.Linear(4, 3), nn.Parameter(torch.randn(3))
        self.cache: dict[str, torch.Tensor] = {}
        self.seen: list[int] = []

    def forward(self, x):
        if "offsets" not in self.cache:
            self.cache["offsets"] = self.offsets * 2
        self.seen.append(x.shape[0])
        return self.fc(x) + self.cache["offsets"]


def test_containers_filled_by_forward_are_restored():
    model, x = Caching().eval(), torch.randn(2, 4, dtype=torch.float64)
    model.double()
    fxrel.explain(model, x, 0, method="gradient")
    assert model.cache == {} and model.seen == []
    xg = x.clone().requires_grad_()
    (reference,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)   # the model still computes with real tensors
    assert torch.allclose(fxrel.explain(model, x, 0, method="gradient"), reference, rtol=1e-12)
    assert all(_no_fakes(v) for v in model.cache.values())


def test_hooks_see_no_fake_tensors_and_stay_registered():
    model, x = Recording().eval(), torch.randn(2, 3, 8, 8)
    seen: list[type] = []
    model.register_forward_hook(lambda m, i, o: seen.append(type(o)))
    model.conv.register_forward_pre_hook(lambda m, i: seen.append(type(i[0])))
    fxrel.explain(model, x, 1, method="gradient")
    assert seen == []                       # not called while tracing
    model(x)
    assert seen == [torch.Tensor, torch.Tensor]


def test_a_custom_autograd_function_is_refused_by_name():
    model = WithFunction().eval()
    with pytest.raises(fxrel.UnsupportedOpError, match=r"custom torch.autograd.Function MyClamp.*backward"):
        fxrel.explain(model, torch.randn(2, 4), 0, method="gradient")
    assert torch.autograd.Function.__dict__["apply"] is not None and MyClamp.apply(torch.ones(1)).item() == 1.0


def test_a_failed_capture_restores_the_model_and_names_the_users_line():
    class Branching(Recording):
        def forward(self, x):
            self.tmp = x
            if x.sum() > 0:                         # data-dependent control flow
                return self.fc(self.conv(x).mean((2, 3)))
            return self.fc(self.conv(-x).mean((2, 3)))

    model = Branching().eval()
    model.register_forward_hook(lambda m, i, o: None)
    before = (set(vars(model)), model_state(model))
    with pytest.raises(fxrel.CaptureError, match=r"could not capture Branching.*test_model_untouched.py:\d+"):
        capture(model, torch.randn(2, 3, 8, 8))
    assert (set(vars(model)), model_state(model)) == before and len(model._forward_hooks) == 1
