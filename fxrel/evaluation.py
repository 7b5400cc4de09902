"""Methods × metrics evaluation on scenes with ground truth (the papers' tables), single-process or distributed.

Every (image, present class) pair is one evaluation sample: the method explains the image for that class, the
map (channel sum at the input's size; CAMs up-sampled bilinearly) is scored against that class's box (pointing
games, IoU) and mask (attribution localisation), and by the model (perturbation metrics). A pair is *predicted*
when the model's logit for the class is positive (the demo models are multi-label): the ``(P)`` columns average
over the correctly predicted pairs only, the ``(L)`` columns over all labels (RSP, Table 1).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) each process evaluates the images of its
``DistributedSampler`` shard and the per-sample records are gathered on rank 0, which reduces them exactly like a
single process would (records are keyed by image index, so the sampler's padding is dropped).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fxrel import metrics, statistics
from fxrel.catalog.registry import REGISTRY, make_method, method_info
from fxrel.errors import InputError, RuleError
from fxrel.explainer import explain
from fxrel.imageops import resize_maps
from fxrel.metrics.robustness import ExplainFn
from fxrel.text import format_markdown, format_table, parse_spec
from fxrel.ucag import ucag

__all__ = ["MetricSpec", "METRICS", "DEFAULT_METRICS", "DEFAULT_METHODS", "method_fn", "evaluate", "EvalResult"]

#: ``(model, x, targets, keys=None) → maps``; ``keys`` (one ``(image, class)`` per row) key a method's random draws
MapFn = Callable[..., torch.Tensor]


# -- methods --------------------------------------------------------------------------------------------------------
DEFAULT_METHODS = (
    "gradient", "gradient_x_input", "guided_backprop", "integrated_gradients", "smoothgrad",
    "lrp_epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "lrp_alpha_beta", "lrp_rap",
    "clrp", "sglrp", "contrastive_excitation_backprop", "rap", "rsp", "crsp", "agf", "srd",
    "grad_cam", "grad_cam_pp", "layer_cam", "ucag:grad_cam", "ucag:lrp_epsilon",
)


def _parsed(spec: str, whole: str) -> tuple[str, dict]:
    """(name, parameters) of ``name`` / ``name[key=value,…]``, the parameters checked against the method's."""
    try:
        name, params = parse_spec(spec)
    except ValueError as err:
        raise InputError(str(err)) from None
    if name not in REGISTRY or name == "ucag":
        where = f" in '{whole}'" if whole != name else ""
        raise InputError(f"unknown method '{name}'{where}; use a name from `fxrel methods` or ucag:BASE")
    info = method_info(name)
    try:
        if info.is_sweep:
            make_method(name, **params)  # parameters checked, and their values by the method's own factory
        else:
            info.check(params)
    except RuleError as err:  # a spec the user wrote
        raise InputError(f"{err} (in '{whole}')") from None
    return name, params


def method_fn(spec: str, ucag_weighting: str = "sigmoid") -> MapFn:
    """The map function ``(model, x, targets) → [N, H, W]`` of a method spec: a name from ``fxrel.methods()``, with
    parameters as ``name[key=value,…]`` (``agf[residual=absolute]``), or ``ucag:BASE`` (UCAG over BASE, which may
    carry parameters); every method runs with its defaults but for those given (z^β bounds: each image's min/max).
    ``ucag_weighting``: UCAG's crop confidence (Eq. 4); ``"sigmoid"`` by default because the scenes are multi-label
    (the paper's ``"exp_softmax"`` assumes one class per image). ``keys`` (one per row) go to a method that draws
    random numbers (SmoothGrad), so a pair's map does not depend on its batch (:mod:`fxrel.streams`); under UCAG the
    base explains crops, whose draws are keyed by the crop's position."""
    base, _, wrapped = spec.partition(":")
    if base == "ucag" and wrapped:
        name, chosen = _parsed(wrapped, spec)
        params = chosen

        def run_ucag(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, keys=None) -> torch.Tensor:
            return ucag(model, x, targets, method=name, method_params=params, weighting=ucag_weighting)
        return run_ucag
    name, params = _parsed(spec, spec)
    keyed = "keys" in method_info(name).defaults

    def run(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, keys=None) -> torch.Tensor:
        extra = {"keys": keys} if keyed and keys is not None else {}
        return metrics.as_maps(explain(model, x, target=targets, method=name, **params, **extra))
    return run


# -- metrics --------------------------------------------------------------------------------------------------------
@dataclass
class Samples:
    """One chunk of evaluation samples (image, class) with everything a metric may need."""

    model: nn.Module
    x: torch.Tensor             #: [P, C, H, W]
    targets: torch.Tensor       #: [P]
    masks: torch.Tensor         #: [P, H, W] bool, the class's pixels
    boxes: torch.Tensor         #: [P, H, W] bool, the class's box
    maps: torch.Tensor          #: [P, H, W]
    explain: MapFn              #: the method, its random draws keyed by ``keys`` (re-explains perturbed inputs)
    others: torch.Tensor        #: [P, H, W] bool, the union of the other present classes' boxes
    other_targets: torch.Tensor  #: [P] another class present in the image (the next one), -1 for single objects
    keys: list[tuple[int, int]]  #: the (image, class) of each row: the key of every random draw (fxrel.streams)
    seed: int = 0                #: the seed of every random draw
    lookup: MapFn | None = None  #: where the maps of the scenes themselves come from (stored maps), else ``explain``
    shared: dict = field(default_factory=dict)   #: results that several metrics read (insertion and deletion …)

    def once(self, key: str, compute: Callable[[], dict]) -> dict:
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]


def _insdel(s: Samples) -> dict:
    return s.once("insdel", lambda: metrics.insertion_deletion(s.model, s.x, s.maps, s.targets, score="sigmoid"))


def _density(s: Samples) -> dict:
    return s.once("density", lambda: metrics.map_density(s.model, s.x, s.maps, s.targets, score="sigmoid"))


@dataclass(frozen=True)
class MetricSpec:
    label: str
    higher_is_better: bool
    compute: Callable[[Samples], torch.Tensor]
    reference: str


def _other_maps(s: Samples) -> dict:
    """The maps of the same images for :attr:`Samples.other_targets` (only the samples that have one)."""
    def compute() -> dict:
        valid = s.other_targets >= 0
        # the whole chunk (single-object rows re-explain their own class), so the batch keeps the shape the
        # method's relevance program was built for
        other = torch.where(valid, s.other_targets, s.targets)
        keys = [(image, c) for (image, _), c in zip(s.keys, other.tolist())]
        maps = (s.lookup or s.explain)(s.model, s.x, other, keys=keys).detach()
        if maps.shape[-2:] != s.maps.shape[-2:]:
            maps = resize_maps(maps, s.maps.shape[-2:])
        return {"maps": maps, "valid": valid}
    return s.once("other_maps", compute)


#: ROAD's removal percentages in the evaluation (the paper's curves step by 10 %; quantus's default 1, 3, … 99)
ROAD_PERCENTAGES = tuple(range(10, 100, 10))


def _patch(s: Samples) -> int:
    """Region perturbation's patch side: about an 8 × 8 grid of regions whatever the input size (8 px at 64 px),
    the largest side up to ``min(H, W)/8`` that divides both ``H`` and ``W``."""
    height, width = s.x.shape[-2:]
    return next(d for d in range(max(1, min(height, width) // 8), 0, -1) if height % d == 0 and width % d == 0)


def _tolerance(s: Samples) -> int:
    return max(1, round(15 * s.x.shape[-1] / 224))  # Zhang et al.'s 15 px at 224 px, scaled to the input


METRICS: dict[str, MetricSpec] = {
    "pointing_game": MetricSpec("PG", True, lambda s: metrics.pointing_game(s.maps, s.boxes, _tolerance(s)),
                                "Zhang et al. 2018 (box, 15 px at 224 px)"),
    "energy_pointing_game": MetricSpec("EPG", True, lambda s: metrics.energy_pointing_game(s.maps, s.boxes),
                                       "Wang et al. 2020"),
    "attribution_localisation": MetricSpec(
        "AttLoc", True, lambda s: metrics.attribution_localisation(s.maps, s.masks), "Kohlbrenner et al. 2020"),
    "discrimination": MetricSpec("Disc", True, lambda s: metrics.discrimination(s.maps, s.boxes, s.others),
                                 "target's share of positive relevance on all objects' boxes (multi-object scenes)"),
    "class_correlation": MetricSpec(
        "Corr", False, lambda s: metrics.map_correlation(s.maps, _other_maps(s)["maps"], _other_maps(s)["valid"]),
        "Pearson r of the maps of two classes of one image (multi-object scenes)"),
    "iou": MetricSpec("IoU", True, lambda s: metrics.box_iou(s.maps, s.boxes, threshold="zero"),
                      "RSP Table 1 (box vs positive map)"),
    "iou_mean": MetricSpec("IoU-m", True, lambda s: metrics.box_iou(s.maps, s.boxes, threshold="mean"),
                           "RSP Table 1 (mean threshold)"),
    "sparseness": MetricSpec("Gini", True, lambda s: metrics.sparseness(s.maps), "Chalasani et al. 2020"),
    "faithfulness": MetricSpec(
        "Fid", True, lambda s: metrics.faithfulness_correlation(s.model, s.x, s.maps, s.targets, seed=s.seed,
                                                                keys=s.keys),
        "Bhatt et al. 2020"),
    "insertion": MetricSpec("Ins", True, lambda s: _insdel(s)["insertion"], "Petsiuk et al. 2018"),
    "deletion": MetricSpec("Del", False, lambda s: _insdel(s)["deletion"], "Petsiuk et al. 2018"),
    "negative_perturbation": MetricSpec(
        "NegP", True, lambda s: metrics.negative_perturbation(s.model, s.x, s.maps, s.targets, score="sigmoid")[
            "auc"], "Gur et al. 2021 (AGF)"),
    "abpc": MetricSpec(
        "ABPC", True, lambda s: metrics.region_perturbation(s.model, s.x, s.maps, s.targets, patch=_patch(s),
                                                            patches_per_step=4, score="sigmoid")["abpc"],
        "Samek et al. 2017 region perturbation, ABPC = AUC(LeRF) − AUC(MoRF) as AttnLRP 2024 (8×8 patches, 4 a step)"),
    "road": MetricSpec(
        "ROAD", True, lambda s: metrics.road(s.model, s.x, s.maps, s.targets, percentages=ROAD_PERCENTAGES,
                                             score="sigmoid", seed=s.seed, keys=s.keys)["difference"],
        "Rong et al. 2022 (ROAD, noisy linear imputation, 10–90 %): AUC(LeRF) − AUC(MoRF)"),
    "density_positive": MetricSpec("D+", True, lambda s: _density(s)["positive"],
                                   "Jalwana et al. 2021 (UCAG Table 5)"),
    "density_negative": MetricSpec("D-", False, lambda s: _density(s)["negative"],
                                   "Jalwana et al. 2021 (UCAG Table 5)"),
    "stability": MetricSpec(
        "Stab", False, lambda s: metrics.max_sensitivity(_keyed(s), s.model, s.x, s.targets, radius=0.05, samples=3,
                                                         seed=s.seed, keys=s.keys),
        "Yeh et al. 2019 (max sensitivity, 3 samples, r=0.05)"),
    "randomisation": MetricSpec(
        "MPRT", False, lambda s: _randomised_similarity(s), "Adebayo et al. 2018 (cascading, mean Spearman)"),
}
#: every metric but two opt-in ones: the cascading randomisation re-captures the model once per randomised layer,
#: ROAD solves 18 imputations per pair (about 1 s a pair on 2 cores at 64 px)
DEFAULT_METRICS = tuple(name for name in METRICS if name not in ("randomisation", "road"))


def _keyed(s: Samples) -> ExplainFn:
    """The method as ``(model, x, targets) → maps`` with its random draws keyed by the rows' pairs."""
    return lambda model, x, targets: s.explain(model, x, targets, keys=s.keys)


def _randomised_similarity(s: Samples) -> torch.Tensor:
    """Mean Spearman similarity to the original map over the cascade (lower: more sensitive to the weights)."""
    steps = metrics.cascading_randomisation(s.model, _keyed(s), s.x, s.targets, similarity="spearman", seed=s.seed)
    return torch.stack(list(steps.values())).nanmean(dim=0)


# -- running --------------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Per-sample records ``(model, method, metric) → {(image, class): (value, predicted)}`` and their table: each
    cell the mean over pairs with its 95% bootstrap interval (:mod:`fxrel.statistics`, resamples keyed by
    ``seed``)."""

    records: dict[tuple[str, str, str], dict[tuple[int, int], tuple[float, bool]]] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    seed: int = 0

    #: what the table's cells mean (printed with it)
    LEGEND = ("cells: mean ± half-width of its 95% bootstrap interval over the pairs (1,000 resamples); *: the best "
              "of its model and column, or its interval overlaps the best one's")

    def merge(self, other: "EvalResult") -> None:
        for key, rows in other.records.items():
            self.records.setdefault(key, {}).update(rows)
        for key, sec in other.seconds.items():
            self.seconds[key] = max(self.seconds.get(key, 0.0), sec)

    def _values(self, model: str, method: str, metric: str, predicted_only: bool) -> list[float]:
        """The finite values in pair order (``predicted_only``: the correctly predicted pairs)."""
        rows = self.records.get((model, method, metric), {})
        return [v for _, (v, pred) in sorted(rows.items()) if (pred or not predicted_only) and math.isfinite(v)]

    def mean(self, model: str, method: str, metric: str, predicted_only: bool = False) -> float:
        values = self._values(model, method, metric, predicted_only)
        return sum(values) / len(values) if values else float("nan")

    def estimate(self, model: str, method: str, metric: str, predicted_only: bool = False) -> statistics.Estimate:
        """The mean with its bootstrap interval."""
        return statistics.estimate(self._values(model, method, metric, predicted_only), self.seed)

    def difference(self, model: str, method: str, other: str, metric: str) -> statistics.Estimate:
        """``method − other`` on ``metric``, pair by pair over the pairs both have a finite value for, with the
        paired bootstrap interval of its mean: an interval that holds 0 is a difference within the noise."""
        a, b = self.records.get((model, method, metric), {}), self.records.get((model, other, metric), {})
        return statistics.estimate([a[p][0] - b[p][0] for p in sorted(a.keys() & b.keys())], self.seed)

    def rows(self) -> list[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        for model, method, _ in self.records:
            seen[(model, method)] = None
        return list(seen)

    def _columns(self) -> list[tuple[str, str, bool]]:
        """``(header, metric, predicted_only)`` of every column; the pointing game has an (L) and a (P) column."""
        columns = []
        for name in self.metrics:
            spec = METRICS[name]
            arrow = "↑" if spec.higher_is_better else "↓"
            if name == "pointing_game":
                columns += [(f"PG(L){arrow}", name, False), (f"PG(P){arrow}", name, True)]
            else:
                columns.append((f"{spec.label}{arrow}", name, False))
        return columns

    def _cells(self) -> dict[tuple[str, str], list[tuple[statistics.Estimate, bool]]]:
        """``(model, method) → [(estimate, same as the best)]`` per column, the best taken within each model."""
        rows, columns = self.rows(), self._columns()
        cells: dict[tuple[str, str], list[tuple[statistics.Estimate, bool]]] = {row: [] for row in rows}
        for _, metric, predicted in columns:
            for model in dict.fromkeys(model for model, _ in rows):
                group = [row for row in rows if row[0] == model]
                estimates = [self.estimate(*row, metric, predicted) for row in group]
                marks = statistics.same_as_best(estimates, METRICS[metric].higher_is_better)
                for row, e, mark in zip(group, estimates, marks):
                    cells[row].append((e, mark))
        return cells

    def table(self, markdown: bool = False) -> str:
        """The methods × metrics table (``(P)``: correctly predicted pairs only), as aligned text or ``markdown``;
        :attr:`LEGEND` says what a cell holds."""
        header = ["model", "method", *(label for label, _, _ in self._columns()), "s"]
        body = [[model, method, *[f"{e.mean:.3f}±{e.half_width:.3f}{'*' if mark else ''}" for e, mark in cells],
                 f"{self.seconds.get((model, method), float('nan')):.1f}"]
                for (model, method), cells in self._cells().items()]
        return (format_markdown if markdown else format_table)(header, body)

    def to_json(self) -> dict:
        """Per row: every column's mean (``pointing_game_predicted`` for PG(P)), its interval under ``ci95`` and its
        mark under ``same_as_best``."""
        keys = [metric + ("_predicted" if predicted else "") for _, metric, predicted in self._columns()]
        rows = []
        for (model, method), cells in self._cells().items():
            rows.append({"model": model, "method": method, "seconds": self.seconds.get((model, method)),
                         **{k: e.mean for k, (e, _) in zip(keys, cells)},
                         "pairs": {k: e.n for k, (e, _) in zip(keys, cells)},
                         "ci95": {k: [e.low, e.high] for k, (e, _) in zip(keys, cells)},
                         "same_as_best": {k: mark for k, (_, mark) in zip(keys, cells)}})
        return {"metrics": list(self.metrics), "seed": self.seed, "bootstrap_resamples": statistics.RESAMPLES,
                "rows": rows}


def _pairs(labels: torch.Tensor, indices: Sequence[int]) -> list[tuple[int, int]]:
    return [(i, int(c)) for i in indices for c in labels[i].nonzero().flatten().tolist()]


def evaluate(models: dict[str, nn.Module], scenes, methods: Sequence[str] = DEFAULT_METHODS,
             metric_names: Sequence[str] = DEFAULT_METRICS, *, indices: Iterable[int] | None = None,
             batch_size: int = 16, device: torch.device | str = "cpu", seed: int = 0,
             stored: Callable[[str, str], MapFn] | None = None,
             progress: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate ``methods`` on ``models`` over the (image, present class) pairs of ``scenes`` (a
    :class:`fxrel.demo.SceneBatch`, or anything with ``images``, ``labels``, ``masks``, ``boxes``); ``indices``
    restricts the images (a distributed shard). ``progress(description)`` is called after every chunk.

    Every random draw (faithfulness subsets, max-sensitivity noise, SmoothGrad's noise) comes from a stream keyed by
    ``(seed, metric, image, class)`` (:mod:`fxrel.streams`), so a pair's figure is the same for any batch size,
    shard, process count, order or device (up to floating-point rounding).

    ``stored(model name, method spec)`` gives a map function that reads the maps of the scenes' pairs instead of
    explaining them (:meth:`fxrel.datasets.MapStore.map_fn`): the method is explained once and scored many times;
    the metrics that explain perturbed inputs (max-sensitivity, randomisation) still run the method."""
    import time

    unknown = [m for m in metric_names if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metrics {unknown}; available: {list(METRICS)}")
    fns = {spec: method_fn(spec) for spec in methods}   # fails fast on an unknown method
    indices = list(range(len(scenes.labels))) if indices is None else list(indices)
    pairs = _pairs(scenes.labels, indices)
    result = EvalResult(metrics=tuple(metric_names), seed=seed)
    for model_name, model in models.items():
        model = model.eval().to(device)
        for spec, fn in fns.items():
            start = time.perf_counter()
            for chunk_start in range(0, len(pairs), batch_size):
                chunk = pairs[chunk_start:chunk_start + batch_size]
                # the last chunk is padded with its last pair: one batch shape, one relevance program per method
                padded = chunk + chunk[-1:] * (min(batch_size, len(pairs)) - len(chunk))
                lookup = stored(model_name, spec) if stored is not None else None
                samples, predicted = _samples(model, scenes, padded, fn, device, seed, lookup)
                for name in metric_names:
                    values = METRICS[name].compute(samples).detach().double().cpu().tolist()[:len(chunk)]
                    rows = result.records.setdefault((model_name, spec, name), {})
                    rows.update({pair: (v, p) for pair, v, p in zip(chunk, values, predicted)})
                if progress is not None:
                    progress(f"{model_name} {spec}")
            result.seconds[(model_name, spec)] = time.perf_counter() - start
    return result


def _samples(model: nn.Module, scenes, chunk: list[tuple[int, int]], fn: MapFn, device, seed: int,
             lookup: MapFn | None = None) -> tuple[Samples, list]:
    img = torch.tensor([i for i, _ in chunk])
    cls = torch.tensor([c for _, c in chunk])
    x = scenes.images[img].to(device)
    targets = cls.to(device)
    height, width = x.shape[-2:]
    box = scenes.boxes[img, cls]
    boxes = metrics.box_masks(box, height, width).to(device)
    masks = scenes.masks[img, cls].to(device)
    present = scenes.labels[img].clone()
    present[torch.arange(len(chunk)), cls] = False
    others = torch.zeros_like(boxes)
    for k, c in present.nonzero().tolist():
        others[k] |= metrics.box_masks(scenes.boxes[img[k], c][None], height, width)[0].to(device)
    following = (torch.arange(scenes.labels.shape[1])[None] - cls[:, None]) % scenes.labels.shape[1]
    following = torch.where(present, following, torch.full_like(following, scenes.labels.shape[1]))
    other_targets = torch.where(present.any(1), following.argmin(1), torch.full_like(cls, -1)).to(device)
    maps = (lookup or fn)(model, x, targets, keys=chunk).detach()
    if maps.shape[-2:] != (height, width):
        maps = resize_maps(maps, (height, width))
    with torch.no_grad():
        predicted = (model(x).gather(1, targets[:, None])[:, 0] > 0).cpu().tolist()
    return Samples(model, x, targets, masks, boxes, maps, fn, others, other_targets, chunk, seed, lookup), predicted


# -- distributed ----------------------------------------------------------------------------------------------------
def distributed_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def evaluate_distributed(models: dict[str, nn.Module], scenes, methods: Sequence[str], metric_names: Sequence[str],
                         **kwargs) -> EvalResult | None:
    """:func:`evaluate` on this process's ``DistributedSampler`` shard; the records are gathered to rank 0, which
    returns the merged result (other ranks return ``None``). Initialises the default process group from torchrun's
    environment (gloo on CPU, nccl on CUDA) when it is not yet initialised."""
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    own_group = not dist.is_initialized()
    if own_group:
        device = torch.device(kwargs.get("device", "cpu"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        sampler = DistributedSampler(range(len(scenes.labels)), num_replicas=world, rank=rank, shuffle=False)
        local = evaluate(models, scenes, methods, metric_names, indices=sorted(set(sampler)), **kwargs)
        gathered: list[EvalResult | None] = [None] * world
        dist.gather_object(local, gathered if rank == 0 else None, dst=0)
        if rank != 0:
            return None
        merged = EvalResult(metrics=local.metrics, seed=local.seed)
        for part in gathered:
            merged.merge(part)
        return merged
    finally:
        if own_group:
            dist.destroy_process_group()
