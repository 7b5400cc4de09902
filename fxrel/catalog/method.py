"""A method: a composite (rule per node), an initial relevance (seed) and an output transform, optionally with
further streams in the same sweep — the unit every sweep in the registry builds."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import fx

from fxrel.graphs.analysis import feature_layer
from fxrel.graphs.builder import Seed, Stream
from fxrel.rules.base import Rule
from fxrel.rules.composite import Composite, Matcher


def seed_gradient(output: Any, mask: Any) -> Any:
    """Gradient methods start from the mask itself: ``R = e_t`` (∂y_t/∂y)."""
    return mask


def seed_logit(output: Any, mask: Any) -> Any:
    """LRP starts from the target score: ``R = y_t · e_t`` (LRP spec §1)."""
    return output * mask


def times_input(relevance: Any, value: Any) -> Any:
    """Gradient × input at the stop nodes."""
    return relevance * value


@dataclass
class StreamSpec:
    """A further relevance stream of a method, run in the same sweep as its main stream (contrastive duals …).
    A ``helper`` stream is not returned; it only feeds the others (AGF's gradient stream)."""

    name: str
    composite: Composite
    seed: Seed
    finalize: Callable[[Any, Any], Any] | None = None
    helper: bool = False


@dataclass
class Method:
    """A named rule set: composite + initial relevance (+ transform at the stop nodes). Custom methods are built
    the same way: ``Method("mine", Composite([(kind("conv"), ZPlus()), …]), seed_logit)``.

    ``extra`` streams run in the same sweep (one relevance graph, batched); ``combine`` then maps the streams'
    relevance at each stop node, ``{stream name: R}``, to the method's result (recorded into the graph too).
    Helper streams come first in the sweep, so that at every node the main stream's rule finds what they sent to
    the node's inputs in ``ctx.downstream``; rule overrides apply to the returned streams only."""

    name: str
    composite: Composite
    seed: Seed
    finalize: Callable[[Any, Any], Any] | None = None
    extra: tuple[StreamSpec, ...] = ()
    combine: Callable[[dict[str, Any]], Any] | None = None

    def streams(self, graph: fx.GraphModule, overrides: Sequence[tuple[Matcher, Rule]] = ()) -> list[Stream]:
        specs = [StreamSpec(self.name, self.composite, self.seed, self.finalize), *self.extra]
        specs.sort(key=lambda s: not s.helper)
        return [Stream(s.name, (s.composite.with_rules(overrides) if overrides and not s.helper else s.composite
                                ).plan(graph), s.seed, s.finalize, helper=s.helper) for s in specs]

    def default_stops(self, graph: fx.GraphModule) -> list[str] | None:
        """Where relevance is returned when the caller names no stops (``None``: the model inputs; CAMs: their
        feature map)."""
        return None


@dataclass
class EnteringMethod(Method):
    """A method whose relevance enters at layer X (:func:`fxrel.graphs.analysis.feature_layer`; ``layer=None``: the
    last separating feature map) instead of the model output: its ``seed`` is an entry seed, called at X with
    ``(start output, mask, X's value, {stream: relevance at X})``, whose ``helpers(graph, above)`` are the helper
    streams that bring what it needs down to X (gradients, excitation signals). Its composite runs from X to the
    input. RSP (a relative map at X) and SRD (the initial sharing ratio) are such methods."""

    layer: str | None = None

    def streams(self, graph: fx.GraphModule, overrides: Sequence[tuple[Matcher, Rule]] = ()) -> list[Stream]:
        layer, above = feature_layer(graph, self.layer)
        main = dataclasses.replace(super().streams(graph, overrides)[0], entry=layer.name)
        return [main, *self.seed.helpers(graph, above)]


#: The default z^β bounds of every box rule: each image's own min and max (as RAP's code takes them), so the rule
#: fits whatever domain the inputs are in; ImageNet's normalised extremes only when asked
#: (``low=fxrel.rules.lrp.IMAGENET_LOW, high=IMAGENET_HIGH``).
IMAGE_BOUND = "image"

#: Output conventions, referenced by the registry entries.
SIGNED = "signed, shaped like the input (sum over channels for a heatmap)"
CONSERVING = "signed, shaped like the input; Σ R = target logit where every rule conserves (no biases/leaks)"
