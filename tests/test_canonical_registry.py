"""The canonicalisation package's handler table: one handler per ATen target, registered on import, no cycles."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

import pytest
import torch

from fxrel.graphs import canonical, ops
from fxrel.graphs.canonical import HANDLERS, handles

aten = torch.ops.aten


def _other(c, n):
    return None


def test_a_second_handler_for_a_target_is_rejected_naming_both():
    before = dict(HANDLERS)
    named = r"aten\.relu\.default.*canonical\.structural\._passthrough.*test_canonical_registry\._other"
    with pytest.raises(ValueError, match=named):
        handles(aten.relu.default)(_other)
    assert HANDLERS == before


def test_a_rejected_registration_registers_none_of_its_targets():
    assert aten.abs.default not in HANDLERS
    with pytest.raises(ValueError, match=r"aten\.conv2d\.default"):
        handles(aten.abs.default, aten.conv2d.default)(_other)
    with pytest.raises(ValueError, match=r"aten\.abs\.default"):
        handles(aten.abs.default, aten.abs.default)(_other)
    assert aten.abs.default not in HANDLERS


def test_the_public_names_stay_importable_from_the_package():
    for name in ("canonicalize", "fold_affine", "mark_nonnegative", "HANDLERS", "handles", "source_line",
                 "module_path"):
        assert callable(getattr(canonical, name)) or name == "HANDLERS"


_MODULES = ["", ".registry", ".pending", ".walker", ".layers", ".structural", ".reductions", ".gates", ".arithmetic",
            ".normalisers", ".passes"]


def test_every_module_imports_first_without_a_cycle_and_the_package_registers_every_handler():
    """Each module of the package imports on its own in a fresh set of fxrel modules (an import cycle would fail
    for some order), and importing the package alone registers the handlers of every handler module."""
    script = textwrap.dedent(f"""
        import importlib, sys
        import torch
        for suffix in {_MODULES!r}:
            for name in [m for m in sys.modules if m == "fxrel" or m.startswith("fxrel.")]:
                del sys.modules[name]
            importlib.import_module("fxrel.graphs.canonical" + suffix)
        for name in [m for m in sys.modules if m == "fxrel" or m.startswith("fxrel.")]:
            del sys.modules[name]
        from fxrel.graphs.canonical import HANDLERS
        print(sorted({{fn.__module__ for fn in HANDLERS.values()}}))
        print(len(HANDLERS))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modules, count = result.stdout.split("\n")[:2]
    assert ast.literal_eval(modules) == [f"fxrel.graphs.canonical.{m}" for m in
                             ("arithmetic", "gates", "layers", "normalisers", "reductions", "structural")]
    assert int(count) == len(HANDLERS)


def test_every_canonical_aten_target_that_passes_through_has_a_handler():
    for target in (*ops.ACTIVATIONS, *ops.SHAPE_OPS, aten.convolution.default, aten.linear.default,
                   aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.mean.dim,
                   aten.add.Tensor, aten.cat.default, aten.constant_pad_nd.default, aten.pad.default,
                   aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.softmax.int, aten.slice.Tensor):
        assert target in HANDLERS, target
