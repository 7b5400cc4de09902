"""Bad input gets a clear error that names what was wrong."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrel
from fxrel.rules.lrp import IMAGENET_HIGH, IMAGENET_LOW


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


class Sorting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.sort(y.flatten(1), dim=1).values[:, :3]


def test_training_mode_is_an_error_naming_the_modules():
    model = tiny().train()
    with pytest.raises(fxrel.CaptureError, match=r"training mode \(Sequential, 0, 1"):
        fxrel.Explainer(model, "gradient")


def test_unsupported_op_names_node_target_and_source_line():
    with pytest.raises(fxrel.UnsupportedOpError) as info:
        fxrel.Explainer(Sorting().eval(), "gradient")(torch.randn(1, 3, 8, 8), 0)
    message = str(info.value)
    assert "sort" in message and "node '" in message
    assert "test_errors.py" in message and "torch.sort" in message  # the user's source line


def test_class_index_out_of_range():
    with pytest.raises(fxrel.InputError, match="class index 7 out of range: the model has 3 classes"):
        fxrel.explain(tiny(), torch.randn(2, 3, 8, 8), [0, 7], method="gradient")


def test_nan_input():
    x = torch.randn(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(fxrel.InputError, match="NaN"):
        fxrel.explain(tiny(), x, 0)


def test_wrong_number_of_targets_and_bad_target_string():
    e = fxrel.Explainer(tiny(), "gradient")
    with pytest.raises(fxrel.InputError, match="3 targets for a batch of 2"):
        e(torch.randn(2, 3, 8, 8), [0, 1, 2])
    with pytest.raises(fxrel.InputError, match="top-5 requested but the model has only 3 classes"):
        e(torch.randn(2, 3, 8, 8), "top5")
    with pytest.raises(fxrel.InputError, match="not understood"):
        e(torch.randn(2, 3, 8, 8), "best")


def test_unbatched_and_integer_inputs():
    e = fxrel.Explainer(tiny(), "gradient")
    with pytest.raises(fxrel.InputError, match="floating-point"):
        e(torch.ones(1, 3, 8, 8, dtype=torch.long), 0)
    with pytest.raises(fxrel.InputError, match="batched"):
        e(torch.randn(8), 0)


def test_unknown_method_and_parameter():
    with pytest.raises(fxrel.RuleError, match="unknown method 'lrp_magic'"):
        fxrel.Explainer(tiny(), "lrp_magic")
    with pytest.raises(fxrel.RuleError, match="no parameter\\(s\\) gamma; it takes attention, epsilon"):
        fxrel.Explainer(tiny(), "lrp_epsilon", gamma=0.5)
    with pytest.raises(fxrel.RuleError, match="takes no parameters"):
        fxrel.Explainer(tiny(), "gradient", epsilon=1.0)


def test_alpha_beta_must_differ_by_one():
    with pytest.raises(ValueError, match="alpha − beta = 1"):
        fxrel.Explainer(tiny(), "lrp_alpha_beta", alpha=2.0, beta=2.0)


def test_unknown_start_node():
    with pytest.raises(fxrel.RuleError, match="no node or module named 'layer9'"):
        fxrel.Explainer(tiny(), "gradient", start="layer9")(torch.randn(1, 3, 8, 8), 0)


def test_model_returning_a_tuple_is_rejected():
    class Two(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x.amax((2, 3))

    with pytest.raises(fxrel.CaptureError, match="returns 2 outputs"):
        fxrel.Explainer(Two().eval(), "gradient")(torch.randn(1, 3, 4, 4), 0)


def test_zbox_bounds_must_match_the_input_channels():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    with pytest.raises(fxrel.RuleError, match="ZBox bounds have 3 channels but the input of node .* has 1"):
        fxrel.Explainer(model, "epsilon_gamma_box", low=IMAGENET_LOW, high=IMAGENET_HIGH)(torch.randn(1, 1, 6, 6), 0)
    for bounds in ({"low": -1.0, "high": 1.0}, {}):  # scalar bounds, and the default: each image's own min/max
        relevance = fxrel.Explainer(model, "epsilon_gamma_box", **bounds)(torch.randn(1, 1, 6, 6), 0)
        assert relevance.shape == (1, 1, 6, 6)


def test_wrong_channel_count_names_the_mismatch():
    with pytest.raises(fxrel.CaptureError, match="expected input.*to have 3 channels"):
        fxrel.Explainer(tiny(), "gradient")(torch.randn(1, 4, 8, 8), 0)
