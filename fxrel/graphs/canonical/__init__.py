"""Canonicalisation: map a captured ATen graph onto fxrel's closed op set (see :mod:`fxrel.graphs.ops`).

The pass is a single walk over the captured graph with one small handler per ATen target. It

* evaluates every node that computes from parameters and constants alone (NFNet's weight standardisation, a layer
  scale's reshape) and keeps the result as a constant;
* turns every convolution into ``aten.convolution``, BatchNorm and products/sums with constants into
  ``channel_affine``;
* turns Layer/Group/RMS/Simple/EvoNorm into ``affine(gate(center(x), stat))``, ConvNeXt-V2's response
  normalisation, softmax branch attention and attention pooling into gates, and scaled dot-product attention into
  ``attend(v, attention_weights(q, k))`` — statistics are recognised from their op pattern (``rsqrt(mean(x²) + ε)``
  …) while it is walked, emitting nothing until the pattern closes;
* drops no-ops (eval-mode dropout, ``_assert`` nodes, identity copies, dtype casts);
* records on every node: ``fxrel_kind``, the module it came from (``fxrel_module``), its source line
  (``fxrel_source``), the original ATen target (``fxrel_origin``), and, after shape propagation, ``tensor_meta``.

A pass then follows the batch axis through every node (:mod:`~fxrel.graphs.canonical.batch_axis`: transformers
move it) and refuses ops that would mix samples. A second pass folds each per-channel affine into a directly
preceding conv/linear whose output has no other user (``fold_affine``): ``W' = W·s``, ``b' = b·s + t``. An affine
that cannot be folded (DenseNet's pre-activation BatchNorm after a concatenation) stays an ``affine`` node. Any
other target raises :class:`UnsupportedOpError` naming the node, its target and its source line.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

# the handler modules register their handlers on import
from fxrel.graphs.canonical import arithmetic, gates, layers, normalisers, reductions, structural  # noqa: F401
from fxrel.graphs.canonical.batch_axis import BatchAxis, mark_batch_axis
from fxrel.graphs.canonical.passes import fold_affine, mark_nonnegative
from fxrel.graphs.canonical.registry import HANDLERS, Handler, handles, module_path, source_line
from fxrel.graphs.canonical.walker import _Canonicalizer

__all__ = ["HANDLERS", "BatchAxis", "Handler", "canonicalize", "mark_batch_axis", "fold_affine", "handles",
           "mark_nonnegative", "module_path", "source_line"]


def canonicalize(captured: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...],
                 fold_batchnorm: bool = True) -> fx.GraphModule:
    """Map a captured graph onto the canonical op set, fold BatchNorm, and annotate every node's shape, batch axis
    and sign."""
    gm = _Canonicalizer(captured).run()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    if fold_batchnorm:
        fold_affine(gm)
    ShapeProp(gm).propagate(*example_inputs)
    mark_batch_axis(gm)
    mark_nonnegative(gm)
    return gm
