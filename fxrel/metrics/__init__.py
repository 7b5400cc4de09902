"""Evaluation metrics for attribution maps, batched in torch on the inputs' device.

Conventions: ``maps`` ``[B, H, W]`` (``[B, C, H, W]`` is summed over channels, :func:`as_maps`), ``masks`` bool
``[B, H, W]`` (:func:`box_masks` from ``(x0, y0, x1, y1)`` boxes), ``targets`` ``[B]`` class indices, ``model`` an
eval-mode module returning logits ``[B, K]``, ``explain_fn(model, x, targets) -> [B, (C,) H, W]``. Each metric
returns a per-sample ``[B]`` tensor (or a dict of them); bad input raises :class:`fxrel.errors.InputError`.

=============================  ====  ==========================================================================
metric                         dir.  reference
=============================  ====  ==========================================================================
``pointing_game``              ↑     Zhang et al., IJCV 2018 (excitation backprop), tolerance 15 px there
``energy_pointing_game``       ↑     Wang et al., CVPRW 2020 (Score-CAM)
``attribution_localisation``   ↑     Kohlbrenner et al., IJCNN 2020 (``weighted``: μ·(H·W)/|mask|)
``box_iou``                    ↑     Nam et al., AAAI 2020 (RSP), Table 1 mIoU, ``threshold="zero"|"mean"``
``sparseness``                 ↑     Chalasani et al., ICML 2020 (Gini index, as quantus ``Sparseness``)
``faithfulness_correlation``   ↑     Bhatt et al., IJCAI 2020
``insertion_deletion``         ↑/↓   Petsiuk et al., BMVC 2018 (RISE): insertion AUC ↑, deletion AUC ↓
``negative_perturbation``      ↑     Gur et al., AAAI 2021 (AGF), least relevant pixels removed first
``region_perturbation``        ↑     Samek et al., TNNLS 2017; ``abpc`` = LeRF − MoRF AUC (AttnLRP, ICML 2024)
``road``                       ↑/↓   Rong et al., ICML 2022 (ROAD): MoRF AUC ↓, LeRF AUC ↑, ``difference`` ↑
``noisy_linear_imputation``    —     ROAD's imputation of removed pixels (a tool, not a metric)
``map_density``                ↑/↓   Jalwana et al., CVPR 2021 (CAMERAS), UCAG Table 5: D⁺ ↑, D⁻ ↓
``discrimination``             ↑     target's share of the positive relevance on the objects' regions (fxrel)
``map_correlation``            ↓     Pearson r of two classes' maps of one image (fxrel)
``max_sensitivity``            ↓     Yeh et al., NeurIPS 2019
``cascading_randomisation``    ↓     Adebayo et al., NeurIPS 2018 (similarity to the original explanation)
=============================  ====  ==========================================================================
"""
from fxrel.metrics.complexity import sparseness
from fxrel.metrics.discrimination import discrimination, map_correlation
from fxrel.metrics.localisation import (
                                        as_maps,
                                        attribution_localisation,
                                        box_iou,
                                        box_masks,
                                        energy_pointing_game,
                                        pointing_game,
)
from fxrel.metrics.perturbation import faithfulness_correlation, insertion_deletion, map_density, negative_perturbation
from fxrel.metrics.randomisation import cascading_randomisation, spearman, ssim
from fxrel.metrics.region import noisy_linear_imputation, region_perturbation, road
from fxrel.metrics.robustness import max_sensitivity

__all__ = ["as_maps", "box_masks", "pointing_game", "energy_pointing_game", "attribution_localisation", "box_iou",
           "sparseness", "discrimination", "map_correlation",
           "faithfulness_correlation", "insertion_deletion", "negative_perturbation", "map_density",
           "region_perturbation", "road", "noisy_linear_imputation",
           "max_sensitivity", "cascading_randomisation", "spearman", "ssim"]
