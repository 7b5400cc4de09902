"""Random-weight models that behave like trained ones where it matters for explanations.

Freshly initialised BatchNorms are the identity (and timm zero-initialises the last one of each residual block,
switching the branch off), so a random-weight model exercises neither BatchNorm folding nor residual relevance
splits. :func:`calibrate_batchnorm` gives every BatchNorm random affine parameters and running statistics measured on
random inputs, so activations keep a sane scale through deep nets and every branch contributes.
"""
from __future__ import annotations

import torch
from torch import nn


def calibrate_batchnorm(model: nn.Module, size: int, seed: int = 0, bias_std: float = 0.1,
                        perturb: float = 0.0, channels: int = 3) -> nn.Module:
    """Randomise every BatchNorm of ``model`` in place and return it in eval mode.

    Weights ~ U(0.5, 1.5), biases ~ N(0, ``bias_std``); running statistics from one train-mode pass over a batch
    of 4 random ``channels×size×size`` inputs; then, with ``perturb > 0``, the means are shifted by
    ``perturb·σ·N(0,1)`` and the variances scaled by U(0.8, 1.25) so the BatchNorm is not an exact standardisation.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        if bn.affine:
            bn.weight.data.uniform_(0.5, 1.5, generator=generator)
            bn.bias.data.normal_(0.0, bias_std, generator=generator)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration pass
    if norms:
        model.train()
        with torch.no_grad():
            model(torch.randn(4, channels, size, size, generator=generator))
    for bn in norms:
        if perturb > 0:
            c = bn.num_features
            bn.running_mean.add_(perturb * torch.randn(c, generator=generator) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty(c).uniform_(0.8, 1.25, generator=generator))
        bn.momentum = 0.1
    return model.eval()
