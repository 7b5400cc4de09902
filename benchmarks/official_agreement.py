"""fxrel's official-code options for RAP, RSP, AGF, SRD and UCAG against the official PyTorch code of each paper.

Both sides explain the same torchvision VGG-16 / ResNet-50 (1000 classes, random weights, BatchNorm calibrated as in
fxrel's tests, every conv/linear bias drawn at random so that the bias paths are exercised), on the same random
images and each image's top-1 class. The official side runs its own model classes (``modules/vgg.py``,
``modules/resnet.py``, UCAG's ``ATTR/resnet_rsp.py``) loaded with the torchvision state dict, one image at a time.
Per (method, model) the table gives max|Δ| / max|R_official| and, as the floor float rounding sets, how much fxrel's
own result moves when the input is multiplied by ``1 + 1e-15·ε`` (ε standard normal): methods with a signed
residual-sum z-rule amplify rounding where the two operands nearly cancel.

Rows marked "cause:" re-run a comparison with one thing changed, to show where a departure comes from: the official
AGF ``safe_divide`` (which adds 1e-9 to every denominator) replaced by exact zero-safe division, the biases of the
convolutions that read a max-pool zeroed (SRD), UCAG's partial CAMs left at fxrel's default upsampling.

The official checkouts are imported from the given paths at run time and never modified; the script patches from
outside only: ``.cuda()`` is the identity and new tensors default to the comparison dtype while official code runs
(its ``torch.zeros``/``torch.eye`` buffers would be float32 otherwise); the SRD VGG module's import-time
``torchvision.models.vgg16(pretrained=True)`` (a download) returns the model under test, which its Grad-CAM then
uses; UCAG's ``parsing`` module gets an empty ``AGFVisualization.modules.utils`` (the CLRP seeds it imports from
there are not used here); the "cause:" AGF row replaces ``safe_divide`` in the loaded AGF layers module::

    python3 benchmarks/official_agreement.py --rap /tmp/official/rap --rsp /tmp/official/rsp \\
        --agf /tmp/official/agf --srd /tmp/official/srd --ucag /tmp/official/ucag

A path left out skips the methods that need it (RSP on ResNet-50 and UCAG need ``--ucag``: the RSP repository's
ResNet code does not run, UCAG's ``ATTR/resnet_rsp.py`` is its working copy). Official dependencies beyond torch:
einops and torchray (SRD), kornia and tqdm (UCAG).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import sys
import time
import types
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxrel
from fxrel.random_weights import calibrate_batchnorm
from fxrel.text import format_markdown, parse_spec

#: top-level names the official repositories give their own modules (imported in isolation per repository)
OFFICIAL_TOP_LEVEL = ("modules", "ATTR", "cam", "baselines", "util", "render", "parsing", "Extrans",
                      "AGFVisualization", "unfold_and_conquer")
MODELS = ("vgg16", "resnet50")
#: AGF as the official code computes it: the paper's score, gate and F_x, the official flats and signed z-split
OFFICIAL_AGF = "agf[score=softmax_gaussian,gate=sigmoid,no_fx=false,flat=official,residual=official,normalize=true]"
Patch = tuple[object, str, object]
Official = Callable[[argparse.Namespace, str, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# --- models and inputs ---------------------------------------------------------------------------------------------
def build_model(name: str, size: int, dtype: torch.dtype, bias_std: float) -> nn.Module:
    """torchvision ``name`` (1000 classes) with random weights, BatchNorm calibrated as in fxrel's tests
    (``calibrate_batchnorm(model, size, seed=1, perturb=0.1)``) and every conv/linear bias ~ N(0, ``bias_std``)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.normal_(0.0, bias_std, generator=generator)
    return calibrate_batchnorm(model, size, seed=1, perturb=0.1).to(dtype)


def zero_pooled_conv_biases(model: nn.Module) -> None:
    """Zero the additive constants of the convolutions that read a max-pool output (VGG: features 5, 10, 17, 24;
    ResNet: layer1.0's conv1 and downsample, whose BatchNorms hold them), where SRD shares a bias among the
    (pool offset × tap) pieces."""
    with torch.no_grad():
        if isinstance(model, torchvision.models.VGG):
            layers = list(model.features)
            for before, conv in zip(layers, layers[1:]):
                if isinstance(before, nn.MaxPool2d):
                    conv.bias.zero_()
        else:
            for bn in (model.layer1[0].bn1, model.layer1[0].downsample[1]):
                bn.bias.zero_()
                bn.running_mean.zero_()


def inputs(count: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` standard-normal images (seed 0), as in the tests."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)


def top1(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max|ours − reference| / max|reference| (only dimensions of size 1 may differ between the two)."""
    ours, reference = ours.detach().double(), reference.detach().double().reshape(ours.shape)
    return float((ours - reference).abs().max() / reference.abs().max())


def one_hot(targets: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(targets, classes).to(dtype)


# --- importing and running official code ---------------------------------------------------------------------------
def _official_entries() -> dict[str, types.ModuleType]:
    return {k: v for k, v in sys.modules.items() if k.split(".")[0] in OFFICIAL_TOP_LEVEL}


@contextmanager
def patched(patches: tuple[Patch, ...]) -> Iterator[None]:
    """``setattr(object, attribute, value)`` for each patch, the originals restored afterwards."""
    originals = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in originals:
            setattr(obj, attr, value)


@contextmanager
def official_imports(root: Path, stubs: dict[str, types.ModuleType] | None = None) -> Iterator[None]:
    """Import from the checkout ``root``, isolated from the other checkouts' packages of the same names
    (``modules``, ``ATTR``, …); the imported objects keep working after the context closes."""
    saved = _official_entries()
    for key in saved:
        del sys.modules[key]
    sys.modules.update(stubs or {})
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for key in _official_entries():
            del sys.modules[key]
        sys.modules.update(saved)


def load(root: Path, *names: str, stubs: dict[str, types.ModuleType] | None = None,
         patches: tuple[Patch, ...] = ()) -> list[types.ModuleType]:
    """Fresh copies of the official modules ``names`` of ``root`` (imported in that order; ``patches`` hold during
    the import only)."""
    with official_imports(root, stubs), patched(patches):
        return [importlib.import_module(name) for name in names]


def architecture_module(name: str) -> str:
    return f"modules.{'vgg' if name == 'vgg16' else 'resnet'}"


@contextmanager
def official_runtime(dtype: torch.dtype) -> Iterator[None]:
    """While official code runs: ``.cuda()`` is the identity, new tensors default to ``dtype`` and what it prints
    goes to stderr (stdout carries the table)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with patched(((torch.Tensor, "cuda", lambda self, *a, **k: self),
                      (nn.Module, "cuda", lambda self, *a, **k: self))), redirect_stdout(sys.stderr):
            yield
    finally:
        torch.set_default_dtype(default)


def official_copy(factory: Callable[[], nn.Module], reference: nn.Module) -> nn.Module:
    """An official model class loaded with ``reference``'s state dict (strict), in its dtype, in eval mode."""
    model = factory()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.to(next(reference.parameters()).dtype).eval()


def per_image(run: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, targets: torch.Tensor
              ) -> torch.Tensor:
    """Official code one image at a time (several of them normalise, or take weight gradients, over the batch)."""
    return torch.cat([run(x[i:i + 1], int(targets[i])) for i in range(len(x))])


def exact_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b ≠ 0``, else 0 (fxrel's zero-safe division)."""
    return torch.where(b != 0, a / torch.where(b == 0, torch.ones_like(b), b), torch.zeros_like(a))


# --- the official methods ------------------------------------------------------------------------------------------
def official_rap(args: argparse.Namespace, name: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor
                 ) -> torch.Tensor:
    """``main.py --method RAP``: ``model.RAP_relprop(R=T)`` with the one-hot seed ``T`` — [N, 3, H, W]."""
    (module,) = load(args.rap, architecture_module(name))
    net = official_copy(getattr(module, name), model)

    def run(image: torch.Tensor, target: int) -> torch.Tensor:
        output = net(image.clone().requires_grad_(True))
        return net.RAP_relprop(R=one_hot(torch.tensor([target]), output.shape[1], output.dtype)).detach()
    return per_image(run, x, targets)


def rsp_gradient_map(args: argparse.Namespace, name: str, net: nn.Module
                     ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``A ⊙ GAP(∂y_t/∂A)`` at X without the channel sum: the RSP repository's ``GradCam(model, 29)
    .generate_cam_without_sum`` for VGG (``main.py``), UCAG's ``GradCAM(model, 'layer4', without_sum=True)`` for
    ResNet (``parsing.py``'s ``'rsp'`` branch)."""
    if name == "vgg16":
        (gradcam,) = load(args.rsp, "baselines.gradcam")
        cam = gradcam.GradCam(net, target_layer=29)
        return lambda image, target: cam.generate_cam_without_sum(image, target).detach()
    (cams,) = load(args.ucag, "cam")
    cam = cams.GradCAM(net, target_layer="layer4", without_sum=True)
    return lambda image, target: cam(image.clone(), torch.tensor([target])).detach()


def official_rsp(args: argparse.Namespace, name: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor
                 ) -> torch.Tensor:
    """RSP's executed path: the gradient map divided by its max + 1e-9, then ``model.RSP`` — [N, 3, H, W]."""
    (module,) = load(args.rsp, "modules.vgg") if name == "vgg16" else load(args.ucag, "ATTR.resnet_rsp")
    return rsp_of(official_copy(getattr(module, name), model), args, name, x, targets)


def official_rsp_repository_resnet(args: argparse.Namespace, name: str, model: nn.Module, x: torch.Tensor,
                                   targets: torch.Tensor) -> torch.Tensor:
    """The RSP repository's own ``modules/resnet.py``, loaded as ``main.py --arc resnet`` would (strict)."""
    (module,) = load(args.rsp, "modules.resnet")
    return rsp_of(official_copy(module.resnet50, model), args, name, x, targets)


def rsp_of(net: nn.Module, args: argparse.Namespace, name: str, x: torch.Tensor, targets: torch.Tensor
           ) -> torch.Tensor:
    """RSP with the official model ``net``: the gradient map / (its max + 1e-9), then ``net.RSP``."""
    gradient_map = rsp_gradient_map(args, name, net)

    def run(image: torch.Tensor, target: int) -> torch.Tensor:
        net(image.clone().requires_grad_(True))
        cam = gradient_map(image, target)
        return net.RSP(R=cam / (cam.max() + 1e-9)).detach()
    return per_image(run, x, targets)


def official_agf(args: argparse.Namespace, name: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                 exact_division: bool = False) -> torch.Tensor:
    """``model.AGF(class_id=[t])`` after a forward pass: Φ at the input over its max, summed over the channels
    [N, 1, H, W]. ``exact_division``: the layers module's ``safe_divide`` (``a / (b + 1e-9)``, 0 where ``b = 0``)
    replaced by exact zero-safe division."""
    (module,) = load(args.agf, architecture_module(name))
    if exact_division:
        module.Conv2d.AGF.__globals__["safe_divide"] = exact_divide  # this fresh copy's modules.layers only
    net = official_copy(getattr(module, name), model)

    def run(image: torch.Tensor, target: int) -> torch.Tensor:
        net(image.clone().requires_grad_(True))
        return net.AGF(class_id=[target]).detach()
    return per_image(run, x, targets)


def official_srd(args: argparse.Namespace, name: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                 contrast: bool = False) -> torch.Tensor:
    """The notebooks' ``model(x, pkg)``, ``model.get_pixel_cont(x, t, pkg, rule)`` with ``rule`` the identity or
    ``m − m.mean()`` — the PFV map [N, H, W]. VGG's initial map is TorchRay's Grad-CAM (``features.28``) of the
    module-level torchvision ``model``, here the model under test."""
    # the notebooks' import order: modules.* before util (the two import each other)
    module, util = load(args.srd, architecture_module(name), "util",
                        patches=((torchvision.models, "vgg16", lambda *a, **k: model),))
    net = official_copy(lambda: getattr(module, name)(name=name), model)
    rule = (lambda m: m - m.mean()) if contrast else (lambda m: m)

    def run(image: torch.Tensor, target: int) -> torch.Tensor:
        pkg = util.InferencePkg()
        with torch.no_grad():
            net(image, pkg)
        return net.get_pixel_cont(image, target, pkg, rule).detach()
    return per_image(run, x, targets)


def official_ucag(args: argparse.Namespace, name: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor
                  ) -> torch.Tensor:
    """``ucag(GradCAM(model, layer), x, t, args)`` with the CLI defaults and ``--score`` (the intended call
    ``-c 124 -n 6 -a 2.6 --ours --score``): the blurred [0, 1] map [N, 1, H, W]."""
    stubs = {key: types.ModuleType(key)
             for key in ("AGFVisualization", "AGFVisualization.modules", "AGFVisualization.modules.utils")}
    cams, unfold_and_conquer = load(args.ucag, "cam", "unfold_and_conquer", stubs=stubs)
    cam = cams.GradCAM(model, target_layer="features.29" if name == "vgg16" else "layer4")
    options = argparse.Namespace(cam="gradcam", crop_size=124, num_units=6, padding=0, score=True, alpha=2.6,
                                 dilation=1, limit_batch_size=16, stride=None, divide=False, multi=False)
    return per_image(lambda image, target: unfold_and_conquer.ucag(cam, image, target, args=options).detach(),
                     x, targets)


# --- fxrel ---------------------------------------------------------------------------------------------------------
def fxrel_result(spec: str, extra: dict, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``fxrel.explain`` with the method spec ``name[key=value,…]`` and the further keyword arguments ``extra``."""
    method, params = parse_spec(spec)
    return fxrel.explain(model, x, targets, method=method, **params, **extra).detach()


def identity(r: torch.Tensor) -> torch.Tensor:
    return r


def channel_sum(r: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] → [N, H, W] (AGF's official heatmap, SRD's PFV map)."""
    return r.sum(1)


# --- the comparisons -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    method: str                     #: row label
    model: str
    spec: str                       #: fxrel method spec
    needs: tuple[str, ...]          #: checkout arguments it needs
    official: Official
    size: int                       #: input side (px)
    shape: Callable[[torch.Tensor], torch.Tensor] = identity   #: fxrel's output → the official layout
    note: str = ""
    extra: dict = field(default_factory=dict)   #: keyword arguments of ``fxrel.explain`` a spec cannot express
    prepare: Callable[[nn.Module], None] | None = None          #: a change to the model, for both sides

    @property
    def label(self) -> str:
        return f"`{self.spec}`" + "".join(f" + `{k}={v!r}`" for k, v in self.extra.items())


def model_cases(model: str, args: argparse.Namespace) -> list[Case]:
    """The comparisons on one model. The official VGG code needs 7×7 maps at pool5, i.e. 224 px (RAP reshapes the
    classifier's relevance to pool5's output; RSP's GradCam and SRD's VGG skip the adaptive pooling); AGF runs at
    the same size for comparability."""
    vgg = model == "vgg16"
    size = args.vgg_size if vgg else args.size
    srd_init = "grad_cam" if vgg else "logit_share"
    srd_spec = f"srd[init={srd_init},contrast=none,input_bias=shared]"   # the official code's settings
    ucag_spec = "ucag[base=grad_cam,alpha=2.6,weighting=exp_softmax_max,blend=uniform,average=coverage_plus_one]"
    at_layer = {"base_params": {"upsample": None}}
    table = [Case("RAP", model, "rap[first_prop=official,dense=rap,residual=official]", ("rap",), official_rap, size),
             Case("RSP", model, "rsp[rgam_mode=official_single]", ("rsp",) if vgg else ("ucag",), official_rsp,
                  size if vgg else 224, note="" if vgg else "UCAG's ATTR/resnet_rsp.py; its AvgPool2d(7) needs 224 px")]
    if not vgg:
        table.append(Case("RSP (RSP repository's resnet.py)", model, "rsp[rgam_mode=official_single]",
                          ("rsp", "ucag"), official_rsp_repository_resnet, 224))
    table += [
        Case("AGF", model, OFFICIAL_AGF, ("agf",), official_agf, size, channel_sum),
        Case("cause: AGF, official safe_divide exact", model, OFFICIAL_AGF, ("agf",),
             lambda a, n, m, x, t: official_agf(a, n, m, x, t, exact_division=True), size, channel_sum,
             "official layers.safe_divide → a/b (0 where b=0)"),
        Case("SRD", model, srd_spec, ("srd",), official_srd, size, channel_sum)]
    if not vgg:
        table.append(Case("SRD (contrastive)", model, srd_spec.replace("none", "spatial_mean"), ("srd",),
                          lambda a, n, m, x, t: official_srd(a, n, m, x, t, contrast=True), size, channel_sum))
    return table + [
        Case("cause: SRD, pool→conv biases 0", model, srd_spec, ("srd",), official_srd, size,
             channel_sum, "both sides", prepare=zero_pooled_conv_biases),
        Case("UCAG (Grad-CAM, --score)", model, ucag_spec, ("ucag",), official_ucag, args.ucag_size,
             note="partial CAMs at the layer's resolution, as the official wonorm maps", extra=at_layer),
    ] + ([] if vgg else [  # the same resampling on both models: ResNet-50 only (it is the cheaper)
        Case("cause: UCAG, fxrel's default CAM upsampling", model, ucag_spec, ("ucag",), official_ucag, 112,
             note="partial CAMs upsampled to the crop first (cam's default upsample='input'); at 88 px the 4×4 "
             "layer4 maps upsample to 124 = 31·4 px, where re-sampling happens to be exact")])


def error_text(error: Exception) -> str:
    return f"does not run: {type(error).__name__}: {' '.join(str(error).split())[:110]}"


def release_fxrel_caches() -> None:
    """Drop the explainers ``fxrel.explain`` keeps per model: its weak-key cache holds each model strongly through
    the cached explainer (every VGG-16 case would otherwise stay in memory, several GB)."""
    from fxrel import explainer

    explainer._CACHE.clear()
    gc.collect()


def run_case(case: Case, args: argparse.Namespace, dtype: torch.dtype) -> tuple[str, ...]:
    """One table row; an official run that raises is reported with its error."""
    model = build_model(case.model, case.size, dtype, args.bias_std)
    if case.prepare is not None:
        case.prepare(model)
    x = inputs(args.images, case.size, dtype)
    targets = top1(model, x)
    started = time.perf_counter()
    ours = case.shape(fxrel_result(case.spec, case.extra, model, x, targets))
    nudged = x * (1 + 1e-15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype))
    floor = relative_difference(case.shape(fxrel_result(case.spec, case.extra, model, nudged, targets)), ours)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    try:
        with official_runtime(dtype):
            result = f"{relative_difference(ours, case.official(args, case.model, model, x, targets)):.1e}"
    except Exception as error:  # noqa: BLE001 — reported in the table
        result = error_text(error)
    official_s = time.perf_counter() - started
    print(f"  {case.method} / {case.model}: {result} (floor {floor:.0e}; fxrel {ours_s:.0f} s, official "
          f"{official_s:.0f} s)", file=sys.stderr, flush=True)
    return case.method, case.model, str(case.size), case.label, result, f"{floor:.0e}", case.note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("rap", "rsp", "agf", "srd", "ucag"):
        parser.add_argument(f"--{name}", type=Path, default=None, help=f"official {name.upper()} checkout")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only rows whose label starts with one of these (e.g. RAP 'cause: AGF')")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--size", type=int, default=112, help="ResNet-50 input side")
    parser.add_argument("--vgg-size", type=int, default=224, help="VGG-16 input side (its official code needs 224)")
    parser.add_argument("--ucag-size", type=int, default=88,
                        help="UCAG input side: H − ⌊124·H/224⌋ must be a multiple of 5 for the official stride")
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--bias-std", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for model in args.models:
        for case in model_cases(model, args):
            if args.methods and not any(case.method.startswith(m) for m in args.methods):
                continue
            missing = [n for n in case.needs if getattr(args, n) is None]
            if missing:
                print(f"  {case.method} / {case.model}: skipped (no --{missing[0]})", file=sys.stderr)
                continue
            rows.append(run_case(case, args, dtype))
            release_fxrel_caches()
    header = ("method", "model", "px", "fxrel", "max abs Δ / max abs R", "floor", "note")
    print(format_markdown(header, rows))


if __name__ == "__main__":
    main()
