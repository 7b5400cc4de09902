"""Tests for the random CNN architecture strategy in ``tests/strategies.py``."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.strategies import (
    ARCH_KINDS,
    BLOCK_CLASSES,
    ArchSpec,
    build_model,
    cnn_architectures,
)

SETTINGS = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add overhead (and stall badly on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conv_and_linear(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@SETTINGS
@given(spec=cnn_architectures())
def test_builds_in_eval_mode_and_runs(spec: ArchSpec) -> None:
    rng_state = torch.random.get_rng_state()
    model, x = build_model(spec)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert not any(m.training for m in model.modules())
    assert x.dtype == torch.float32 and tuple(x.shape) == spec.input_shape
    with torch.no_grad():
        out = model(x)
    assert out.shape == (spec.batch, spec.num_classes)
    assert torch.isfinite(out).all()
    assert out.abs().max() < 1e3


@SETTINGS
@given(spec=cnn_architectures())
def test_build_is_deterministic(spec: ArchSpec) -> None:
    (m1, x1), (m2, x2) = build_model(spec), spec.build()
    assert torch.equal(x1, x2)
    for (k1, v1), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    _, x3 = build_model(spec, seed=spec.seed + 1)
    assert not torch.equal(x1, x3)


@SETTINGS
@given(spec=cnn_architectures())
def test_fx_trace_matches_eager(spec: ArchSpec) -> None:
    model, x = build_model(spec)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.allclose(traced(x.clone()), model(x.clone()), atol=1e-6)


def _assert_homogeneous(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        y, y2 = model(x), model(2 * x)
    assert torch.allclose(y2, 2 * y, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(spec=cnn_architectures(bias=False))
def test_bias_free_nets_are_positively_homogeneous(spec: ArchSpec) -> None:
    assert spec.bias_free
    model, x = build_model(spec)
    assert all(m.bias is None for m in _conv_and_linear(model))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert not bn.running_mean.any() and not bn.bias.any()
        assert (bn.running_var > 0).all()
    _assert_homogeneous(model, x)


@SETTINGS
@given(spec=cnn_architectures())
def test_without_biases(spec: ArchSpec) -> None:
    model, x = build_model(spec.without_biases())
    assert all(m.bias is None for m in _conv_and_linear(model))
    _assert_homogeneous(model, x)


@SETTINGS
@given(spec=cnn_architectures(bias=True))
def test_bias_true_puts_bias_everywhere(spec: ArchSpec) -> None:
    model, _ = build_model(spec)
    assert all(m.bias is not None for m in _conv_and_linear(model))


@pytest.mark.parametrize("kind", ARCH_KINDS)
@SETTINGS
@given(data=st.data())
def test_kinds_restrict_blocks(kind: str, data: st.DataObject) -> None:
    spec = data.draw(cnn_architectures(kinds=(kind,)))
    assert spec.kinds and set(spec.kinds) == {kind}
    model, _ = build_model(spec)
    blocks = [m for m in model.features if isinstance(m, tuple(BLOCK_CLASSES.values()))]
    assert [type(b) for b in blocks] == [BLOCK_CLASSES[kind]] * len(spec.kinds)


@SETTINGS
@given(spec=cnn_architectures(kinds=("dense",)))
def test_dense_nets_have_batchnorm_after_cat(spec: ArchSpec) -> None:
    model, _ = build_model(spec)
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    assert any(
        node.op == "call_module"
        and isinstance(modules[node.target], nn.BatchNorm2d)
        and node.args[0].target is torch.cat
        for node in traced.graph.nodes
    )


@SETTINGS
@given(spec=cnn_architectures(kinds=("residual",), min_blocks=4))
def test_residual_nets_trace_to_adds(spec: ArchSpec) -> None:
    traced = torch.fx.symbolic_trace(build_model(spec)[0])
    adds = [n for n in traced.graph.nodes if n.target in (operator.add, torch.add)]
    assert len(adds) == len(spec.kinds)


def test_invalid_kinds_rejected() -> None:
    with pytest.raises(ValueError):
        cnn_architectures(kinds=("transformer",))
    with pytest.raises(ValueError):
        cnn_architectures(kinds=())


@SETTINGS
@given(spec=cnn_architectures())
def test_input_gradient_is_finite(spec: ArchSpec) -> None:
    model, x = build_model(spec)
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
