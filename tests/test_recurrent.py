"""Recurrent layers (Sequencer's 2-D LSTMs): ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` are unrolled at capture into their
cells by torch's decompositions; the gradient rule set equals autograd and LRP-0 conserves through them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrel
from fxrel.graphs import ops
from tests.helpers import assert_exact_and_conserving


class _RowReader(nn.Module):
    """A recurrent layer reading an image's rows as a sequence (batch first), its last step classified."""

    def __init__(self, layer: nn.Module, width: int) -> None:
        super().__init__()
        self.stem, self.layer = nn.Conv2d(3, 4, 3, padding=1), layer
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.relu(self.stem(x)).mean(1)                  # [B, H, W]: H steps of W features
        out, _ = self.layer(rows)
        return self.head(out[:, -1])


LAYERS = {
    "lstm": lambda: nn.LSTM(6, 5, batch_first=True),
    "lstm_bidirectional_two_layers": lambda: nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True),
    "gru": lambda: nn.GRU(6, 5, batch_first=True),
    "rnn_tanh": lambda: nn.RNN(6, 5, batch_first=True),
}


@pytest.mark.parametrize("name", LAYERS)
def test_recurrent_layers_are_exact_and_conserving(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    width = layer.hidden_size * (2 if layer.bidirectional else 1)
    net = _RowReader(layer, width).double().eval()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    listed = list(net.layer._flat_weights)
    assert_exact_and_conserving(net, x, torch.tensor([0, 2]))
    assert all(a is b for a, b in zip(net.layer._flat_weights, listed, strict=True))   # the user's RNN as it was


def test_an_lstm_cell_gates_its_signals():
    """Arras et al. (2017)'s LSTM-LRP: the sigmoid gates multiply the cell input, the previous cell state and the
    squashed cell state as gates (relevance goes to the signal, none to the gate)."""
    torch.manual_seed(0)
    net = _RowReader(nn.LSTM(6, 5, batch_first=True), 5).double().eval()
    graph = fxrel.Explainer(net, "gradient").canonical_graph(torch.randn(1, 3, 4, 6, dtype=torch.float64))
    gates = [n for n in graph.graph.nodes if n.target is ops.channel_gate]
    assert gates and all(g.args[1].target is torch.ops.aten.sigmoid.default for g in gates)
    assert not [n for n in graph.graph.nodes if n.meta.get("fxrel_kind") == ops.BILINEAR]
