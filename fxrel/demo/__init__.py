"""Offline demo data and models: multi-digit scenes with ground truth and four small trained classifiers.

>>> from fxrel.demo import make_scenes, demo_model
>>> scenes = make_scenes(n=16, seed=0, split="test")   # images [16, 3, 64, 64] in [0, 1], labels, masks, boxes
>>> model = demo_model("demo-resnet")                   # eval mode; 10 multi-label logits, one per digit class
>>> logits = model(scenes.images)

Scenes are built from scikit-learn's bundled 8×8 handwritten digits, so nothing is downloaded; the weights ship in
``fxrel/demo/weights`` and are reproduced by ``python3 -m fxrel.demo.train`` (see ``manifest.json``).
"""
from fxrel.demo.models import DEMO_MODELS, demo_model
from fxrel.demo.scenes import CLASS_NAMES, SceneBatch, make_scenes, split_indices

__all__ = ["CLASS_NAMES", "DEMO_MODELS", "SceneBatch", "make_scenes", "demo_model", "split_indices"]
