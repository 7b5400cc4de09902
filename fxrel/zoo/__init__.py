"""The evaluation zoo: six small classifiers of the digit scenes trained with a plain recipe, for judging
explanation methods on networks nobody tuned them for (``fxrel eval --models zoo``, ``docs/fidelity.md``).

>>> from fxrel.zoo import ZOO_MODELS, zoo_model
>>> model = zoo_model("zoo-vgg")     # eval mode; [B, 3, 64, 64] in [0, 1] → 10 multi-label logits

The weights ship in ``fxrel/zoo/weights`` and are reproduced by ``python3 -m fxrel.zoo.train`` (see
``manifest.json``). :func:`scene_model` loads any trained scene classifier, demo or zoo, by name.
"""
from torch import nn

from fxrel.demo import DEMO_MODELS, demo_model
from fxrel.zoo.models import CNN_ZOO, INPUT_SIZE, ZOO_MODELS, build_zoo_model, zoo_model

__all__ = ["CNN_ZOO", "INPUT_SIZE", "SCENE_MODELS", "ZOO_MODELS", "build_zoo_model", "scene_model", "zoo_model"]

#: every trained classifier of the digit scenes shipped with fxrel: the demo models and the evaluation zoo
SCENE_MODELS: tuple[str, ...] = DEMO_MODELS + ZOO_MODELS


def scene_model(name: str, device: str = "cpu") -> nn.Module:
    """The trained demo (``demo-*``) or zoo (``zoo-*``) model ``name`` in eval mode."""
    if name in DEMO_MODELS:
        return demo_model(name, device)
    if name in ZOO_MODELS:
        return zoo_model(name, device)
    raise ValueError(f"unknown scene model {name!r}; valid names: {', '.join(SCENE_MODELS)}")
