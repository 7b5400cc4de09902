"""A set of small models shipped inside the package with their trained weights (the demo models, the zoo)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class ShippedModels:
    """Names → constructors, and the directory their weights live in (``<name with _>.pt``, a state dict)."""

    def __init__(self, kind: str, architectures: dict[str, Callable[[], nn.Module]], directory: Path) -> None:
        self.kind, self.architectures, self.directory = kind, dict(architectures), directory

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.architectures)

    def _check(self, name: str) -> None:
        if name not in self.architectures:
            raise ValueError(f"unknown {self.kind} model {name!r}; valid names: {', '.join(self.names)}")

    def build(self, name: str) -> nn.Module:
        """A freshly initialised (untrained) model."""
        self._check(name)
        return self.architectures[name]()

    def weights_path(self, name: str, directory: Path | None = None) -> Path:
        """Where the weights of ``name`` live: ``demo-resnet`` → ``<directory>/demo_resnet.pt``."""
        self._check(name)
        return (self.directory if directory is None else directory) / f"{name.replace('-', '_')}.pt"

    def load(self, name: str, device: torch.device | str = "cpu") -> nn.Module:
        """The trained model ``name`` in eval mode on ``device`` (weights read with ``weights_only=True``)."""
        model = self.build(name)
        model.load_state_dict(torch.load(self.weights_path(name), map_location="cpu", weights_only=True))
        return model.to(device).eval()
