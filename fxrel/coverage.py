"""Model-zoo coverage: which timm models fxrel explains, checked model by model (issue "Explain every timm CNN").

For each model (random weights, ``pretrained=False``; batch 1; float64 — float32, noted, where a float64 check would
not fit in memory; the smallest input it accepts, and its configured size when a check fails there) the report
records, stage by stage — a stage that fails skips the rest and its first error line is kept:

* **captured** — ``torch.export`` traced it (:func:`fxrel.graphs.capture`);
* **canonical** — every node maps onto the closed canonical op set (:func:`fxrel.graphs.canonicalize`);
* **gradient** — the ``gradient`` rule set equals autograd's input gradient (max |a − b| / max |b| ≤ 1e-4), or,
  where autograd's own gradient disagrees with central finite differences, fxrel's matches them (noted);
* **lrp0** — on a copy with every additive constant removed (biases, BatchNorm shifts and running means zeroed), the
  LRP-0 relevance at the input sums to the target logit (relative 1e-3), or, where relevance inside the network
  outgrows what the dtype resolves, every rule application conserves (the local audit, noted);
* **lrp_eps** — LRP-ε on the model itself is finite;

with the time to build (capture + canonicalise + relevance graph) and to run. ``peers=True`` adds the same
conservation check for zennit (ε = 1e-12 in every conv/linear layer, Pass at activations, Norm at average pooling
and at its canonizer's residual ``Sum``, with its BatchNorm-merging or ResNet canonizer) and captum's ``LRP``, each
on the same constant-free copy; ``-`` marks a peer that refuses the model. :func:`coverage` returns the rows;
:func:`table` and :func:`to_json` format them.
"""
from __future__ import annotations

import copy
import functools
import gc
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from fxrel.explainer import Explainer
from fxrel.graphs import canonicalize, capture
from fxrel.text import format_markdown, format_table

CHECKS = ("captured", "canonical", "gradient", "lrp0", "lrp_eps")
PEERS = ("zennit", "captum")
#: name fragments of timm's transformer and attention-hybrid families: not CNNs
NOT_CNN = ("vit", "deit", "swin", "beit", "cait", "coat", "convit", "crossvit", "eva", "levit", "mvit", "pit_",
           "tnt", "twins", "xcit", "volo", "gcvit", "maxvit", "maxxvit", "coatnet", "efficientformer", "edgenext",
           "mobilevit", "poolformer", "metaformer", "davit", "fastvit", "hiera", "hgnet", "nest_", "sequencer",
           "mixer", "resmlp", "gmlp", "gmixer", "convmixer", "focalnet", "inception_next", "nextvit", "rdnet",
           "repvit", "samvit", "sam2", "tiny_vit", "vitamin", "aimv2", "naflex", "mambaout", "caformer",
           "convformer", "cspvit", "halonet", "halonext", "lambda", "botnet", "botnext", "sebotnet", "haloregnet",
           "lamhalobotnet",
           "efficientvit", "shvit", "starnet", "swiftformer", "pvt_", "visformer", "iformer", "lowformer",
           "efficientvim", "csatv2", "test_")
SIZES = (32, 64, 96, 128, 160, 224)
#: a fixed sample across families, the small member of each (CI runs it): what each one exercises
SAMPLE = (
    "resnet10t",            # plain residual blocks, stem pooling
    "resnetv2_18",          # pre-activation: BatchNorm left unfolded
    "seresnext26ts",        # squeeze-excitation, grouped convs, SiLU
    "ecaresnet26t",         # ECA's expanded 1-D-conv gate
    "efficientnet_b0",      # depthwise convs, SE on 1×1 maps
    "tf_mixnet_s",          # TF 'SAME' padding, mixed kernels by channel split
    "mobilenetv3_small_050",  # Hardswish, Hardsigmoid gates
    "ghostnet_050",         # ghost modules: cat and slice
    "ghostnetv2_100",       # nearest-upsampled sigmoid gate (DFC attention)
    "cspresnet50",          # cross-stage partial splits
    "res2net50d",           # Res2Net split/concat hierarchy
    "densenetblur121d",     # dense concatenation, reflect-padded blur pooling
    "vgg11",                # plain conv stack with a conv head
    "regnetx_002",          # group convs
    "dla34",                # deep layer aggregation trees
    "dpn68",                # dual path: sum and concat paths
    "repvgg_a0",            # three-branch blocks
    "mobileone_s0",         # ``0 + x`` branch sums
    "lcnet_035",            # PP-LCNet
    "hardcorenas_a",        # NAS blocks
    "rexnet_100",           # channel-padding residuals
    "xception41",           # separable convs
    "inception_v3",         # Inception branches, 96 px
    "convnext_atto",        # LayerNorm (channels last), layer scale
    "convnext_atto_rms",    # hand-written RMSNorm
    "convnextv2_atto",      # GlobalResponseNorm
    "nf_resnet26",          # weight standardisation in the graph, scalar gains
    "skresnet18",           # selective kernel: stack, softmax over branches
    "gcresnext26ts",        # global-context attention pooling (softmax, matmul)
    "hrnet_w18_small",      # multi-resolution fusion with nearest upsampling
)


@dataclass
class ModelReport:
    """One model's row."""

    name: str
    size: int | None = None
    results: dict[str, bool | None] = field(default_factory=lambda: dict.fromkeys(CHECKS))
    peers: dict[str, bool | None] = field(default_factory=dict)
    gradient_error: float | None = None
    lrp0_error: float | None = None
    build_s: float | None = None
    run_s: float | None = None
    error: str = ""
    note: str = ""       #: a check's second look on an ill-conditioned model (see ``_second_look``)

    @property
    def passed(self) -> bool:
        return all(self.results.get(c) for c in CHECKS)


def cnn_models(pattern: str = "*") -> list[str]:
    """Every timm model name matching ``pattern`` that is not a transformer or attention hybrid."""
    import timm

    return [n for n in timm.list_models(pattern) if not any(part in n for part in NOT_CNN)]


def attention_models(pattern: str = "*") -> list[str]:
    """Every timm model name matching ``pattern`` that :func:`cnn_models` leaves out: the transformers, conv–attention
    hybrids and MLP models (names in :data:`NOT_CNN`)."""
    import timm

    return [n for n in timm.list_models(pattern) if any(part in n for part in NOT_CNN)]


#: model-size words, smallest first: the family sample takes each family's smallest-named model
_SIZES = ("atto", "femto", "pico", "nano", "xxs", "xxsmall", "xs", "xsmall", "tiny", "mini", "small", "s")


def family_sample() -> list[str]:
    """One model per non-CNN family of :data:`NOT_CNN` (its smallest by name: ``nano`` before ``tiny`` before
    ``small``), the sample ``fxrel models --families`` checks."""
    def size(name: str) -> tuple[int, int]:
        parts = name.replace(".", "_").split("_")
        ranks = [i for i, word in enumerate(_SIZES) for part in parts if part == word or part.startswith(word)]
        return (min(ranks) if ranks else len(_SIZES), len(name))

    chosen: list[str] = []
    for family in NOT_CNN:
        members = [n for n in attention_models(f"*{family}*") if n not in chosen]
        if members:
            chosen.append(min(members, key=size))
    return chosen


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _smallest_input(model: nn.Module) -> int:
    """The timm config's ``input_size`` for a model it marks ``fixed_input_size`` (BoTNets: their position tables
    are built for it, whatever ``min_input_size`` says), its ``min_input_size``, else the smallest of :data:`SIZES`
    a forward pass accepts, else the config's own ``input_size`` (MaxViT's 256: its windows need a side divisible by
    32·8)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    if cfg.get("min_input_size"):
        return int(cfg["min_input_size"][-1])
    last: BaseException | None = None
    native = int(cfg["input_size"][-1]) if cfg.get("input_size") else None
    for size in (*SIZES, *([native] if native and native not in SIZES else [])):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size, dtype=next(model.parameters()).dtype))
            return size
        except Exception as err:  # too small for its pooling or padding: try the next size
            last = err
    raise RuntimeError(f"no input size in {SIZES} or the config's {native} runs: {first_line(last)}")


def constant_free(model: nn.Module, x: torch.Tensor | None = None, copy_model: bool = True) -> nn.Module:
    """A copy (``copy_model=False``: the model itself) with every additive constant zeroed: biases (every parameter
    named ``bias…``: an LSTM's ``bias_ih_l0`` too), BatchNorm/
    GroupNorm/LayerNorm shifts, running means, the parameters broadcast over the batch (shaped ``[1, …]`` with ≥ 3
    dims: a transformer's class/distillation/register tokens and position embeddings, which enter by concatenation or
    addition) and, given an example ``x``, every module that computes from no input (XCiT's Fourier position
    encoding, a conv over fixed features). Zeroing a parameter that multiplies instead only removes a branch; LRP-0
    still has to conserve."""
    clone = copy.deepcopy(model) if copy_model else model
    with torch.no_grad():
        for parameter in clone.parameters():
            if parameter.dim() >= 3 and parameter.shape[0] == 1:
                parameter.zero_()
        for module in clone.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if name.startswith("bias"):   # also a recurrent layer's bias_ih_l0 … bias_hh_l1_reverse
                    parameter.zero_()
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):   # a bias that is a buffer
                bias.zero_()
            mean = getattr(module, "running_mean", None)
            if isinstance(mean, torch.Tensor):
                mean.zero_()
    if x is not None:
        for module in _input_free_modules(clone, x):
            with torch.no_grad():
                for parameter in module.parameters():
                    parameter.zero_()
    return clone


def _input_free_modules(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The modules none of whose tensor arguments depends on ``x`` (their outputs are constants)."""
    free: list[nn.Module] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not any(t.requires_grad for t in tensors) and next(module.parameters(), None) is not None:
            free.append(module)

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules() if m is not model]
    try:
        with torch.enable_grad():
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            model(x.detach().clone().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    return free


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (the absolute difference when b vanishes)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def check_model(model: nn.Module, name: str, size: int | None = None, peers: bool = False,
                seed: int = 0) -> ModelReport:
    """Run the checks of the module docstring on one model: on a float64 copy in eval mode (``model`` itself is not
    changed)."""
    return _check_owned(copy.deepcopy(model), name, size, peers, seed)


def _check_owned(model: nn.Module, name: str, size: int | None = None, peers: bool = False, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> ModelReport:
    """:func:`check_model` on a model it may change: converted to ``dtype`` (float64) in place, its additive constants
    zeroed for the LRP-0 check (a sweep creates each model for this alone, and the largest timm models fit in memory
    only once)."""
    report = ModelReport(name)
    model = model.eval().to(dtype)
    stage = "input size"
    try:
        report.size = size or _smallest_input(model)
        x = torch.randn(1, 3, report.size, report.size, dtype=dtype,
                        generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(x)
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"the output {shape} is not a batch of class logits (a feature encoder?)")
        target = int(logits.argmax(1))
        stage = "captured"
        start = time.perf_counter()
        captured = capture(model, x)
        report.results["captured"] = True
        stage = "canonical"
        canonicalize(captured, (x,))
        report.results["canonical"] = True
        del captured
        stage = "gradient"
        explainer = Explainer(model, "gradient")
        explainer.relevance_graph(x)
        report.build_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = explainer(x, target)
        report.run_s = time.perf_counter() - start
        xg = x.clone().requires_grad_()
        (reference,) = torch.autograd.grad(model(xg)[0, target], xg)
        report.gradient_error = relative_error(ours, reference)
        report.results["gradient"] = report.gradient_error <= 1e-4 or _second_look(
            report, "gradient", model, x, lambda: relative_error(
                Explainer(model, "gradient", fold_batchnorm=False)(x, target), reference), 1e-4) or (
            _finite_differences_side(report, model, x, target, ours, reference))
        stage = "lrp_eps"
        report.results["lrp_eps"] = bool(torch.isfinite(explainer.using("lrp_epsilon")(x, target)).all())
        del explainer, ours
        stage = "lrp0"
        bare = constant_free(model, x, copy_model=False)
        with torch.no_grad():
            logit = bare(x)[0, target].item()
        total = Explainer(bare, "lrp_0", attention="cp")(x, target).sum().item()   # CP-LRP: the conserving rule
        report.lrp0_error = abs(total - logit) / max(abs(logit), 1e-12)

        def unfolded_lrp0() -> float:
            unfolded = Explainer(bare, "lrp_0", attention="cp", fold_batchnorm=False)(x, target).sum().item()
            return abs(unfolded - logit) / max(abs(logit), 1e-12)

        report.results["lrp0"] = report.lrp0_error <= 1e-3 or _second_look(report, "lrp0", bare, x, unfolded_lrp0,
                                                                            1e-3) or _audited(report, bare, x,
                                                                                              target, logit)
        if peers:
            report.peers = {peer: _peer_conserves(peer, bare, x, target, logit) for peer in PEERS}
    except Exception as err:  # one model's failure is a row of the report, not the end of the sweep
        report.results[stage] = False if stage in report.results else None
        report.error = f"{stage}: {first_line(err)}"
    if not report.error:
        failed = [c for c in CHECKS if report.results[c] is False]
        reasons = {"gradient": f"relative error {report.gradient_error:.1e} > 1e-4",
                   "lrp0": f"|ΣR − y|/|y| = {report.lrp0_error:.1e} > 1e-3", "lrp_eps": "non-finite relevance"}
        report.error = "; ".join(f"{c}: {reasons[c]}" for c in failed) + (f" ({report.note})" if report.note else "")
    return report


def _sensitivity(model: nn.Module, x: torch.Tensor) -> float:
    """How far a relative input change of 1e-15 moves the logits (relative): above 1e-8 the model is chaotic at
    this input (random weights in very deep nets), and the rounding of folded BatchNorm alone moves its results."""
    with torch.no_grad():
        logits = model(x)
        return relative_error(model(x * (1 + 1e-15)), logits)


def _notes(parts: list[str]) -> str:
    """A row's note: its non-empty parts, joined."""
    return "; ".join(filter(None, parts))


def _second_look(report: ModelReport, check: str, model: nn.Module, x: torch.Tensor,
                 unfolded_error: Callable[[], float], tolerance: float) -> bool:
    """A failed check on an ill-conditioned model is repeated with BatchNorm left unfolded — the model's own
    arithmetic, op for op; it holds if that passes, and the note gives both figures."""
    moved = _sensitivity(model, x)
    if moved <= 1e-8:
        return False
    error = unfolded_error()
    report.note = _notes([report.note, (
        f"{check}: ill-conditioned (a 1e-15 relative input change moves the logits by {moved:.1e}); with BatchNorm "
        f"unfolded the error is {error:.1e}")])
    return error <= tolerance


def _audited(report: ModelReport, model: nn.Module, x: torch.Tensor, target: int, logit: float) -> bool:
    """When LRP-0's sum at the input misses the logit because relevance inside the network grows so far beyond it
    that the dtype cannot resolve the sum (``A·eps·n > 1e-3``: the largest ``Σ|R|`` at a node is ``A`` times the
    logit, over ``n`` rule applications — LRP-0's z-rule at residual sums whose operands nearly cancel, in deep
    random-weight nets), the local audit decides: the check holds if every rule application conserves to
    ``max(1e-9, 1e3·eps)`` of its own ``Σ|R|`` (:meth:`fxrel.Explainer.conservation_audit`), noted in the report."""
    rows = Explainer(model, "lrp_0", attention="cp").conservation_audit(x, target)
    eps = torch.finfo(x.dtype).eps
    amplification = max(max(r.size_out, r.size_in) for r in rows) / max(abs(logit), 1e-300)
    if amplification * eps * len(rows) <= 1e-3:
        return False
    worst = max(rows, key=lambda r: r.leak)
    holds = worst.leak <= max(1e-9, 1e3 * eps)
    report.note = _notes([report.note, (
        f"lrp0: ill-conditioned (Σ|R| reaches {amplification:.1e} × the logit); every rule conserves to "
        f"{worst.leak:.1e} (worst: {worst.rule} at '{worst.node}')")])
    return holds


def _finite_differences_side(report: ModelReport, model: nn.Module, x: torch.Tensor, target: int,
                             ours: torch.Tensor, reference: torch.Tensor, directions: int = 3,
                             steps: Sequence[float] = (1e-3, 1e-4, 1e-5, 1e-6)) -> bool:
    """When fxrel's gradient and autograd's disagree, central finite differences (float64) along random directions
    ``v`` decide: the check holds if, at one of ``steps``, fxrel's directional derivatives match them to 1e-4 and
    autograd's are off by more than 1e-2 (timm's XCiT, LeViT and EfficientFormer: autograd through the model itself
    is off), noted in the report. Errors are relative to ``‖g‖``, the root-mean-square of ``g·v`` over Gaussian
    ``v`` (one direction's own derivative may be near zero). Several steps, because no one step suits every model:
    a gradient 1e-8 of the logit's size (a 24-block XCiT) drowns in rounding at 1e-6, a ReLU kink spoils a large
    step."""
    if x.dtype != torch.float64:   # steps of 1e-3 … 1e-6 need float64
        return False
    scale = max(ours.norm().item(), 1e-300)
    with torch.no_grad():
        errors = []
        for step in steps:
            generator = torch.Generator().manual_seed(1)
            ours_error = autograd_error = 0.0
            for _ in range(directions):
                v = torch.randn(x.shape, dtype=x.dtype, generator=generator)
                fd = (model(x + step * v)[0, target] - model(x - step * v)[0, target]).item() / (2 * step)
                ours_error = max(ours_error, abs((ours * v).sum().item() - fd) / scale)
                autograd_error = max(autograd_error, abs((reference * v).sum().item() - fd) / scale)
            errors.append((ours_error, autograd_error, step))
    ours_error, autograd_error, step = min(errors)
    holds = ours_error <= 1e-4 and autograd_error > 1e-2
    if holds:
        report.note = _notes([report.note, (
            f"gradient: autograd's own gradient is off against finite differences (directional error "
            f"{autograd_error:.1e}, step {step:.0e}); fxrel's matches them ({ours_error:.1e})")])
    return holds


def _peer_conserves(peer: str, model: nn.Module, x: torch.Tensor, target: int, logit: float) -> bool | None:
    """The peer's LRP-0 relevance sums to the logit (relative 1e-3); None when the peer raises or is missing."""
    try:
        if peer == "zennit":
            relevance = _zennit_lrp0(model, x, target)
        else:
            from captum.attr import LRP

            relevance = LRP(copy.deepcopy(model)).attribute(x.clone().requires_grad_(), target=target)
        total = relevance.sum().item()
        return bool(abs(total - logit) <= 1e-3 * max(abs(logit), 1e-12))
    except Exception:  # the peer refuses the model (captum: no rule for a layer type)
        return None


def _zennit_lrp0(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.types import Activation, AvgPool, Convolution, Linear

    canonizers = [SequentialMergeBatchNorm()]
    if "resnet" in type(model).__name__.lower():
        from zennit.torchvision import ResNetCanonizer
        canonizers = [ResNetCanonizer()]
    composite = LayerMapComposite([(Activation, Pass()), (Sum, Norm()), (AvgPool, Norm()),
                                   (Convolution, Epsilon(1e-12)), (Linear, Epsilon(1e-12))], canonizers=canonizers)
    model = copy.deepcopy(model)
    with torch.no_grad():
        onehot = torch.zeros_like(model(x))
    onehot[0, target] = 1
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.clone(), lambda y: y * onehot)
    return relevance


def from_dict(row: dict) -> ModelReport:
    """The :class:`ModelReport` of one :func:`to_json` / journal row."""
    fields = {k: row[k] for k in ModelReport.__dataclass_fields__ if k in row}
    return ModelReport(**fields)


def read_journal(path: str | Path) -> dict[str, ModelReport]:
    """The rows a previous sweep appended to ``path`` (JSON lines), by model name; ``{}`` when there is none.

    A truncated last line (a sweep killed while writing) is ignored, so that model is checked again."""
    path = Path(path)
    rows: dict[str, ModelReport] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            rows[row.name] = row
    return rows


def coverage(models: Iterable[str] | None = None, peers: bool = False,
             progress: Callable[[str], None] | None = None,
             journal: str | Path | None = None, isolate: bool = False) -> list[ModelReport]:
    """The report for timm ``models`` (default: every CNN in ``timm.list_models()``), one row per model.

    With ``journal`` (a JSON-lines file) each row is appended as soon as its model is done, and models already in
    the journal are not checked again: a sweep of the whole zoo can be interrupted and resumed, or split between
    processes that share the journal (``fxrel models --journal J`` in one, ``--reverse`` in another).
    ``isolate`` checks each model in its own process, so that one the machine cannot hold (killed for memory) is a
    failed row, not the end of the sweep."""
    names = list(models) if models is not None else cnn_models()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        if isolate and journal is None:
            journal = Path(scratch) / "journal.jsonl"
        for name in names:
            done = read_journal(journal) if journal is not None else {}  # re-read: sweeps may share a journal
            if name in done:
                rows.append(done[name])
            else:
                rows.append(_isolated(name, peers, journal) if isolate else _checked(name, peers))
                if journal is not None and name not in read_journal(journal):
                    with open(journal, "a") as handle:
                        handle.write(json.dumps(asdict(rows[-1])) + "\n")
                gc.collect()
            if progress is not None:
                progress(name)
    return rows


def _checked(name: str, peers: bool) -> ModelReport:
    """One timm model's row; a model that fails a check at its smallest input is checked again at its configured
    input size, the row that counts (iFormer at 32 px pads its 2 × 2 maps to 7 × 7 attention windows, and the
    padded positions carry the constant sigmoid(0) = ½ into the attention, which LRP-0 cannot conserve); the note
    keeps the smaller size's error."""
    import timm

    def created() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False)

    try:
        model = created()
    except Exception as err:
        return ModelReport(name, error=f"create: {first_line(err)}")
    native = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (None,))[-1]
    dtype, lean = _check_dtype(model)
    report = _check_owned(model, name, peers=peers, dtype=dtype)
    report.note = _notes([lean, report.note])
    if report.passed or report.size is None or native is None or report.size >= native or not report.results.get(
            "canonical"):
        return report
    del model
    gc.collect()
    again = _check_owned(created(), name, size=int(native), peers=peers, dtype=dtype)
    again.note = _notes([lean, again.note, f"at {report.size} px: {report.error}"])
    return again


#: resident memory of a float64 check, in multiples of the model's float64 weights (2.2 measured on
#: vit_base_patch16_224, with a margin)
CHECK_MEMORY_FACTOR = 3.0


def _available_bytes() -> int | None:
    """Linux's estimate of the memory available to a new process (``MemAvailable``), or ``None``."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_dtype(model: nn.Module) -> tuple[torch.dtype, str]:
    """float64, or float32 with a note when the float64 check would not fit in the available memory (timm's
    billion-parameter ViTs on a 24 GB machine): the same checks and tolerances, on half the bytes."""
    need = CHECK_MEMORY_FACTOR * 8 * sum(p.numel() for p in model.parameters())
    available = _available_bytes()
    if available is None or need <= available:
        return torch.float64, ""
    return torch.float32, f"float32: float64 would need about {need / 2**30:.0f} GB, {available / 2**30:.0f} available"


def _first_to_go() -> None:
    """In the child: ask Linux's out-of-memory killer to pick this process before any other."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def _isolated(name: str, peers: bool, journal: str | Path) -> ModelReport:
    """Check one model in a child process that appends its row to ``journal``; a child that dies is a failed row."""
    command = [sys.executable, "-m", "fxrel.cli", "models", name, "--journal", str(journal), "-q",
               *(["--peers"] if peers else [])]
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=_first_to_go)
    row = read_journal(journal).get(name)
    if row is not None:
        return row
    how = (f"killed by {signal.Signals(-result.returncode).name}" if result.returncode < 0
           else f"exit status {result.returncode}")
    last = (result.stderr.strip().splitlines() or [""])[-1][:200]
    memory = " (out of memory)" if result.returncode == -signal.SIGKILL else ""
    return ModelReport(name, error=f"process: {how}{memory} {last}".strip())


def _mark(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[value]


def timm_family(name: str) -> str:
    """The timm module that registers ``name`` (``vision_transformer``, ``resnet`` …): a model's family; ``-`` for a
    name timm does not list."""
    return _families().get(name, "-")


@functools.lru_cache(maxsize=1)
def _families() -> dict[str, str]:
    import timm

    return {n: module for module in timm.list_modules() for n in timm.list_models(module=module)}


def family_table(rows: Sequence[ModelReport], markdown: bool = False) -> str:
    """Pass counts by timm family, most models first, with the failing models named."""
    groups: dict[str, list[ModelReport]] = {}
    for r in rows:
        groups.setdefault(timm_family(r.name), []).append(r)
    body = [[family, str(len(members)), str(sum(r.passed for r in members)),
             f"{100 * sum(r.passed for r in members) / len(members):.0f}%",
             ", ".join(r.name for r in members if not r.passed) or "-"]
            for family, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    return (format_markdown if markdown else format_table)(["family", "models", "pass", "%", "failing"], body)


def table(rows: Sequence[ModelReport], markdown: bool = False, peers: bool = False) -> str:
    """The report as a text or markdown table, with the pass count and every failure with its first error line."""
    header = ["model", "px", *CHECKS, *(PEERS if peers else ()), "grad err", "ΣR/y−1", "build s", "run s"]
    body = [[r.name, str(r.size or "-"), *(_mark(r.results[c]) for c in CHECKS),
             *(_mark(r.peers.get(p)) for p in (PEERS if peers else ())),
             f"{r.gradient_error:.1e}" if r.gradient_error is not None else "-",
             f"{r.lrp0_error:.1e}" if r.lrp0_error is not None else "-",
             f"{r.build_s:.1f}" if r.build_s is not None else "-",
             f"{r.run_s:.2f}" if r.run_s is not None else "-"] for r in rows]
    passed = sum(r.passed for r in rows)
    text = (format_markdown if markdown else format_table)(header, body)
    failures = [f"- {r.name}: {r.error}" for r in rows if not r.passed]
    notes = [f"- {r.name}: {r.note}" for r in rows if r.passed and r.note]
    summary = f"{passed}/{len(rows)} models pass all {len(CHECKS)} checks" + (f" ({100 * passed / len(rows):.1f}%)"
                                                                              if rows else "")
    return "\n".join([summary, "", family_table(rows, markdown), "", text, *([""] + failures if failures else []),
                      *(["", "Passed on a second look:"] + notes if notes else [])])


def to_json(rows: Sequence[ModelReport]) -> str:
    return json.dumps([{**asdict(r), "passed": r.passed} for r in rows], indent=1)
