"""Explain a whole dataset and store the maps for reuse (``fxrel explain-dataset``).

>>> from fxrel.datasets import MapStore, explain_dataset
>>> explain_dataset(model, "images/", "out/maps", ["lrp_epsilon[epsilon=0.5]", "grad_cam"], target="label", size=224)
>>> MapStore("out/maps").load(image="cat/001.png", method="grad_cam").maps     # [K, 224, 224], float32

:mod:`fxrel.datasets.run` runs it (batched, resumable, sharded over torchrun processes), :mod:`~.sources` reads image
folders, list files and datasets, :mod:`~.targets` picks the classes, :mod:`~.layout` names the files,
:mod:`~.shards` writes them atomically, :mod:`~.index` indexes them and :mod:`~.store` reads them back.
"""
from fxrel.datasets.run import DatasetRun, explain_dataset
from fxrel.datasets.sources import ImageFiles, image_files
from fxrel.datasets.store import Maps, MapStore
from fxrel.datasets.targets import TargetSpec, parse_target

__all__ = ["explain_dataset", "DatasetRun", "MapStore", "Maps", "ImageFiles", "image_files", "TargetSpec",
           "parse_target"]
