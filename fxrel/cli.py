"""Command-line interface: ``fxrel demo``, ``fxrel explain``, ``fxrel explain-dataset``, ``fxrel eval``,
``fxrel fidelity``, ``fxrel graph``, ``fxrel methods`` and ``fxrel models``.

Every error a user can cause (a bad argument, an unknown method or model, a missing image or weight file, a class
index out of range, any :class:`fxrel.FxrelError`) is reported as one ``fxrel: error: <message>`` line on stderr with
exit code 2 and no traceback.

A command's output files are all or nothing (:mod:`fxrel.outputs`): their paths are claimed before any work (two
outputs naming one file, or a folder in an output's place, is a usage error up front), each is written to a temp file
in its destination folder, and all are moved into place together at the end, only when the whole command succeeded.
A failed or interrupted run leaves no new output and no temp file, and files already at the destinations unchanged.
Paths are printed once the files are in place. (``explain-dataset`` writes a folder shard by shard instead, each
shard file atomically, so that a killed run resumes: :mod:`fxrel.datasets`.)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from fxrel.outputs import OutputSet, staged_outputs
from fxrel.text import parse_value, split_specs

__all__ = ["main"]

EXIT_OK = 0
EXIT_IO = 1
EXIT_USAGE = 2
_FORMATS = ("code", "dot", "svg", "json", "plan", "layers", "audit", "profile")


class CLIError(Exception):
    """A user error found by the CLI itself (reported like an :class:`fxrel.FxrelError`)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _UsageError(CLIError):
    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so ``main`` returns the exit code."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, self.format_usage())


# --- argument parsing helpers ---------------------------------------------------------------------------------------
def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise CLIError(f"--param expects key=value (e.g. epsilon=1e-3), got '{item}'")
        if key in params:
            raise CLIError(f"--param '{key}' given twice")
        params[key] = parse_value(value)
    return params


def parse_targets(text: str) -> list[int | str]:
    """``--target``: comma-separated class indices and/or ``top1``/``top-k`` (k-th highest class)."""
    targets: list[int | str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            raise CLIError(f"--target '{text}' has an empty entry")
        topk = re.fullmatch(r"top-?(\d+)", token.lower())
        if re.fullmatch(r"[+-]?\d+", token):
            targets.append(int(token))
        elif topk and int(topk.group(1)) > 0:
            targets.append(f"top{int(topk.group(1))}")
        else:
            raise CLIError(f"--target entry '{token}' not understood; use a class index, 'top1' or 'top-k' "
                           "(several separated by commas)")
    return targets


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


# --- models, weights, inputs ----------------------------------------------------------------------------------------
def _model_label(spec: str) -> str:
    return spec.split(":", 1)[1] if ":" in spec else spec


def is_demo(spec: str) -> bool:
    """A trained scene classifier shipped with fxrel (``demo-*`` or ``zoo-*``): inputs in [0, 1], 64 px."""
    return spec.startswith(("demo-", "zoo-"))


def build_model(spec: str, num_classes: int | None = None):
    """``demo-NAME`` / ``zoo-NAME`` → a trained scene classifier shipped with fxrel (``fxrel.demo``,
    ``fxrel.zoo``); ``tv:NAME`` → torchvision (``weights=None``); ``timm:NAME`` or ``NAME`` → timm
    (``pretrained=False``)."""
    if is_demo(spec):
        from fxrel.zoo import SCENE_MODELS, scene_model

        if spec not in SCENE_MODELS:
            raise CLIError(f"unknown scene model '{spec}'; the demo and zoo models are {', '.join(SCENE_MODELS)}")
        if num_classes not in (None, 10):
            raise CLIError("the demo and zoo models have 10 classes; --num-classes cannot change that")
        return scene_model(spec)
    source, sep, name = spec.partition(":")
    if not sep:
        source, name = "timm", spec
    if not name:
        raise CLIError(f"model '{spec}' has no name; use tv:NAME or timm:NAME")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if source in ("tv", "torchvision"):
        import torchvision

        if name not in torchvision.models.list_models():
            raise CLIError(f"unknown torchvision model '{name}' (see torchvision.models.list_models())")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if source == "timm":
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name}*")[:8]
            hint = f"; similar: {', '.join(close)}" if close else " (see timm.list_models())"
            raise CLIError(f"unknown timm model '{name}'{hint}")
        return timm.create_model(name, pretrained=False, **kwargs)
    raise CLIError(f"unknown model source '{source}' in '{spec}'; use tv:NAME (torchvision) or timm:NAME")


def _read_state_dict(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise CLIError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling / format errors: the file is the problem, not fxrel
        raise CLIError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
    # common checkpoint wrappers: {"state_dict": ...}, {"model": ...}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"weights {path} do not hold a state dict (name → tensor), got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _key_list(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model, path: str, strict: bool = True) -> list[str]:
    """Load a state dict into ``model``; returns warnings (missing/unexpected keys when not ``strict``)."""
    state = _read_state_dict(Path(path))
    own = model.state_dict()
    shapes = [f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and own[k].shape != v.shape]
    if shapes:
        raise CLIError(f"weights {path} do not fit the model: shape mismatch for {_key_list(shapes, 4)}"
                       " (a different classifier size? pass --num-classes)")
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys: {_key_list(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys: {_key_list(result.unexpected_keys)}")
    if problems and strict:
        raise CLIError(f"weights {path} do not match the model: " + "; ".join(problems)
                       + " (use --no-strict to load them anyway)")
    return [f"weights {path}: {p}" for p in problems]


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def _prepare_model(args: argparse.Namespace):
    import torch

    torch.manual_seed(args.seed)  # random (not loaded) weights are reproducible
    model = build_model(args.model, args.num_classes)
    warnings = load_weights(model, args.weights, strict=args.strict) if args.weights else []
    for warning in warnings:
        print(f"fxrel: warning: {warning}", file=sys.stderr)
    return model.eval().to(_device(args.device))


def _input_image(image: str | None, size: int, seed: int = 0, demo: bool = False):
    """The image to explain as ``[3, size, size]`` in [0, 1]: the file, else a demo scene (demo models) or the
    synthetic test image."""
    from fxrel import sample_images

    try:
        if image is not None:
            return sample_images.load_image(image, size)
        if demo:
            from fxrel.demo import make_scenes

            return make_scenes(1, seed=seed, split="test", size=size).images[0]
        return sample_images.synthetic_image(size)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:  # undecodable image, size too small
        raise CLIError(str(exc)) from None


def _model_input(args: argparse.Namespace, image):
    """The model's input batch for an image in [0, 1]: demo models take it as is, ImageNet models normalised."""
    from fxrel import sample_images

    x = image if is_demo(args.model) else sample_images.imagenet_normalize(image)
    return x.unsqueeze(0).to(_device(args.device))


def _size(args: argparse.Namespace) -> int:
    return args.size if args.size is not None else (64 if is_demo(args.model) else 224)


def _check_method(name: str, params: dict) -> bool:
    """Fail fast on an unknown method or parameter; returns whether it is a wrapper (no single relevance graph)."""
    from fxrel.catalog.registry import make_method, method_info

    info = method_info(name)
    if info.is_sweep:
        make_method(name, **params)
    else:
        info.check(params)
    return not info.is_sweep


# --- output ---------------------------------------------------------------------------------------------------------
def _claim_outputs(**paths: str | os.PathLike[str] | None) -> OutputSet:
    """The command's output files (option name → path, ``None`` when not asked for), claimed before any work."""
    outputs = staged_outputs()
    for option, path in paths.items():
        if path is not None:
            outputs.claim(path, f"--{option}")
    return outputs


def _print_written(outputs: OutputSet) -> None:
    for path in outputs.paths:
        print(f"wrote {path}")


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    # disable=None: shown only on a terminal, so logs and pipes stay clean
    # set_description() appends ": " itself, so the format adds no separator after {desc}
    return tqdm(total=total, desc=f"{desc}: ", file=sys.stderr, disable=True if quiet else None, leave=False,
                bar_format="{desc}{n_fmt}/{total_fmt} |{bar}| {elapsed}")


def _target_label(target: int | str) -> str:
    return f"t{target}" if isinstance(target, int) else str(target)


# --- subcommands ----------------------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    import fxrel

    table = fxrel.methods(detail=True)
    width = max(map(len, table))
    for name, info in table.items():
        print(f"{name.ljust(width)}  {info['description']} [{info['reference']}]")
        print(f"{''.ljust(width)}  output: {info['output']}")
        if not info["sweep"]:
            print(f"{''.ljust(width)}  post-hoc wrapper (no single relevance graph): its parameters go to --param")
    return EXIT_OK


def _at_input_size(relevance, x):
    """Relevance as drawn: as is when shaped like the input, else a map ``[N, H, W]`` resized to the input's."""
    from fxrel.imageops import resize_maps
    from fxrel.metrics import as_maps

    if relevance.shape[-2:] == x.shape[-2:]:
        return relevance
    return resize_maps(as_maps(relevance), x.shape[-2:])


def _explain_posthoc(model, x, target, method: str, params: dict):
    """A post-hoc wrapper's map for one target, at the input's size, and the model's logits."""
    import torch

    import fxrel
    from fxrel.explainer import resolve_targets

    cls = resolve_targets(model, x, target)
    relevance = _at_input_size(fxrel.explain(model, x, target=cls, method=method, **params).detach(), x)
    with torch.no_grad():
        logits = model(x)
    return relevance.cpu(), logits, cls


def _default_input_label(args: argparse.Namespace, size: int) -> str:
    return f"demo scene (test split, seed {args.seed})" if is_demo(args.model) else f"synthetic image {size}x{size}"


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    import fxrel
    from fxrel import visualize

    params = parse_params(args.param)
    targets = parse_targets(args.target)
    posthoc = _check_method(args.method, params)       # fails fast on an unknown method or parameter
    size = _size(args)
    image = _input_image(args.image, size, args.seed, is_demo(args.model))   # fails fast on a missing/bad image

    model_label = _model_label(args.model)
    out = Path(args.out) if args.out else Path(f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model_label)}_{args.method}.png")
    plan_path = None if posthoc else (Path(args.plan) if args.plan else out.with_name(f"{out.stem}.plan.txt"))
    outs = [out] if len(targets) == 1 else [out.with_name(f"{out.stem}.{_target_label(t)}{out.suffix}")
                                            for t in targets]
    outputs = staged_outputs()   # every file or none: a clash (e.g. --plan = --out, a target twice) fails here
    for path, target in zip(outs, targets):
        outputs.claim(path, "heatmap" if len(targets) == 1 else f"heatmap of target {target}")
    if plan_path is not None:
        outputs.claim(plan_path, "rule plan")

    with outputs, _progress(3 + len(targets), "fxrel explain", args.quiet) as bar:
        bar.set_description("loading model")
        model = _prepare_model(args)
        x = _model_input(args, image)
        explainer = None if posthoc else fxrel.Explainer(model, args.method, compile=args.compile, **params)
        bar.update()

        bar.set_description("building relevance graph")
        plan_text = None
        if explainer is not None:
            plan_text = str(explainer.rule_plan(x))
            explainer.relevance_graph(x)
        bar.update()

        results = []   # (target, class, relevance [C,H,W] or [H,W], logits)
        for target in targets:
            bar.set_description(f"explaining {target}")
            if explainer is None:
                relevance, logits, cls = _explain_posthoc(model, x, target, args.method, params)
            else:
                explanation = explainer.attribute(x, target)
                relevance = _at_input_size(next(iter(explanation.relevance.values())).detach(), x).cpu()
                logits, cls = explanation.output, explanation.targets
            results.append((target, int(cls[0]), relevance[0], logits.detach().float().cpu()[0]))
            bar.update()

        bar.set_description("writing")
        for path, (_, _, relevance, _) in zip(outs, results):
            visualize.save_heatmap(outputs.stage(path), relevance, image=image)
        if plan_path is not None:
            outputs.write_text(plan_path, plan_text)
        bar.update()
    # here every file is in place

    logits = results[0][3]
    probs = torch.softmax(logits, dim=0)
    predicted = int(logits.argmax())
    source = " (trained demo weights)" if is_demo(args.model) else " (random weights)"
    lines = [f"model:      {args.model}" + (f" (weights {args.weights})" if args.weights else source),
             f"method:     {args.method}" + (f" {params}" if params else ""),
             f"input:      {args.image or _default_input_label(args, size)}",
             f"prediction: class {predicted} (logit {logits[predicted]:+.6g}, p={probs[predicted]:.4f})"]
    for (target, cls, relevance, _), path in zip(results, outs):
        total, logit = float(relevance.sum()), float(logits[cls])
        conserving = not posthoc and relevance.dim() == 3    # relevance shaped like the input (not a CAM map)
        ratio = f", ratio {total / logit:.4f}" if logit != 0 and conserving else ""
        shown = f"{cls} ({target})" if isinstance(target, str) else f"{cls}"
        lines += [f"target:     class {shown}: relevance sum {total:+.6g} vs target logit {logit:+.6g}{ratio}",
                  f"heatmap:    {path}"]
    if plan_path is not None:
        lines.append(f"rule plan:  {plan_path}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_explain_dataset(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fxrel import sample_images
    from fxrel.datasets import explain_dataset, image_files, parse_target

    methods = _demo_methods(",".join(args.method), ())   # fails fast on an unknown method or parameter
    if args.param:
        parse_params(args.param)
        if len(methods) != 1 or "[" in methods[0]:
            raise CLIError("--param sets the parameters of a single --method given by name; with several methods "
                           "(or parameters in brackets) write each as name[key=value,…]")
        methods = _demo_methods(f"{methods[0]}[{','.join(item.strip() for item in args.param)}]", ())
    parse_target(args.target)
    size = _size(args)
    _device(args.device)
    dataset = image_files(args.source, size)   # fails fast on a missing, empty or malformed source
    model = _prepare_model(argparse.Namespace(**{**vars(args), "device": "cpu"}))   # explain_dataset places it
    rank = int(os.environ.get("RANK", 0))
    bar = tqdm(desc="fxrel explain-dataset", unit="img", file=sys.stderr, leave=False,
               disable=True if args.quiet or rank != 0 else None)

    def progress(done: int, total: int) -> None:
        if bar.total != total:   # the first call: the images of shards kept from an earlier run count as done
            bar.reset(total)
            bar.initial = bar.n = done
            bar.refresh()
        bar.update(done - bar.n)

    with bar:
        run = explain_dataset(model, dataset, args.out, methods, target=args.target, size=size,
                              transform=None if is_demo(args.model) else sample_images.imagenet_normalize,
                              batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype,
                              workers=args.workers, device=args.device, model_name=args.model, png=args.png,
                              progress=progress)
    if run.index is None:   # a rank other than 0: rank 0 reports
        return EXIT_OK
    source = f" (weights {args.weights})" if args.weights else (" (trained demo weights)" if is_demo(args.model)
                                                                else " (random weights)")
    print("\n".join([
        f"source:  {run.source}",
        f"model:   {args.model}{source}",
        f"methods: {', '.join(methods)}",
        f"target:  {args.target}: {run.maps // len(methods)} (image, class) maps per method",
        f"stored:  {size}x{size} {args.dtype} maps in {run.shard_files} shard file(s), {run.world} process(es); rank 0 "
        f"wrote {run.shards_written} now and kept {run.shards_kept} from an earlier run",
        f"time:    {run.seconds:.1f} s, {run.images_per_second:.1f} images/s (rank 0)",
        f"wrote {run.index}"]))
    return EXIT_OK


def cmd_graph(args: argparse.Namespace) -> int:
    import json

    from fxrel.explainer import audit_table
    from fxrel.graphs import export
    from fxrel.graphs.profile import profile_table

    params = parse_params(args.param)
    targets = parse_targets(args.target)
    if _check_method(args.method, params):
        raise CLIError(f"'{args.method}' is a post-hoc wrapper (several sweeps), it has no single relevance "
                       "graph; inspect its base method instead")
    if args.format in ("layers", "audit", "profile") and len(targets) != 1:
        raise CLIError(f"graph --format {args.format} takes a single --target")
    outputs = _claim_outputs(out=args.out)

    import fxrel

    with outputs, _progress(2, "fxrel graph", args.quiet) as bar:
        bar.set_description("loading model")
        model = _prepare_model(args)
        explainer = fxrel.Explainer(model, args.method, compile=False, **params)
        x = _model_input(args, _input_image(None, _size(args), args.seed, is_demo(args.model)))
        bar.update()
        bar.set_description(f"building {args.format}")
        if args.format == "plan":
            text = str(explainer.rule_plan(x))
        elif args.format == "layers":
            text = explainer.layer_table(x, targets[0])
        elif args.format == "audit":
            text = audit_table(explainer.conservation_audit(x, targets[0]))
        elif args.format == "profile":
            text = profile_table(explainer.profile(x, targets[0]))
        elif args.format == "dot":
            text = export.to_dot(explainer.relevance_graph(x))
        elif args.format == "svg":
            text = export.to_svg(explainer.relevance_graph(x))
        elif args.format == "json":
            text = json.dumps(export.to_json(explainer.relevance_graph(x)), indent=1)
        else:
            text = explainer.relevance_graph(x).code
        if args.out:
            outputs.write_text(args.out, text)
        bar.update()

    if args.out:
        print(f"wrote {args.out}")
    else:
        print(text.strip("\n"))
    return EXIT_OK


def _csv(text: str | None, default: Sequence[str], known: Sequence[str] | None, what: str) -> list[str]:
    items = list(default) if text is None else split_specs(text)
    if not items:
        raise CLIError(f"--{what} is empty")
    if known is not None:
        bad = [t for t in items if t not in known]
        if bad:
            raise CLIError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(known)}")
    return items


def _demo_methods(text: str | None, default: Sequence[str]) -> list[str]:
    from fxrel.evaluation import method_fn

    methods = _csv(text, default, None, "methods")
    for spec in methods:
        try:
            method_fn(spec)
        except Exception as exc:  # unknown method: the message names it
            raise CLIError(str(exc)) from None
    return methods


DEMO_GRID_METHODS = ("gradient_x_input", "integrated_gradients", "epsilon_plus_flat", "clrp", "sglrp",
                     "contrastive_excitation_backprop", "rap", "rsp", "agf", "srd", "grad_cam", "ucag:grad_cam")


def cmd_demo(args: argparse.Namespace) -> int:
    from fxrel.demo import DEMO_MODELS

    (model_name,) = _csv(args.model, (), DEMO_MODELS, "model")
    methods = _demo_methods(args.methods, DEMO_GRID_METHODS)
    out = Path(args.out)
    with _claim_outputs(out=out) as outputs:
        n_scenes, pairs = _demo_grid(args, model_name, methods, outputs)
    print(f"model:   {model_name} (trained demo weights, {n_scenes} test scenes, seed {args.seed})")
    print(f"rows:    image, explained class (its logit); {len(pairs)} rows")
    print(f"methods: {', '.join(methods)}")
    print(f"grid:    {out}")
    return EXIT_OK


def _demo_grid(args: argparse.Namespace, model_name: str, methods: list[str], outputs: OutputSet):
    """``fxrel demo``'s work: the grid staged in ``outputs``; returns the number of scenes and the (scene, class)
    pairs, the grid's rows."""
    import torch

    from fxrel import visualize
    from fxrel.demo import CLASS_NAMES, demo_model, make_scenes
    from fxrel.evaluation import method_fn

    scenes = make_scenes(args.images, seed=args.seed, split="test", size=args.size)
    model = demo_model(model_name, device=_device(args.device))
    pairs = [(i, int(c)) for i in range(len(scenes)) for c in scenes.labels[i].nonzero().flatten().tolist()]
    x = scenes.images[[i for i, _ in pairs]].to(_device(args.device))
    targets = torch.tensor([c for _, c in pairs], device=x.device)
    columns = []
    with _progress(len(methods), "fxrel demo", args.quiet) as bar:
        for spec in methods:
            bar.set_description(spec)
            columns.append(method_fn(spec)(model, x, targets).detach().cpu())
            bar.update()
    with torch.no_grad():
        logits = model(x).cpu()
    rows = [f"image {i}: {CLASS_NAMES[c]} ({logits[k, c]:+.1f})" for k, (i, c) in enumerate(pairs)]
    maps = [[columns[j][k] for j in range(len(methods))] for k in range(len(pairs))]
    images = [scenes.images[i] for i, _ in pairs]
    visualize.save_grid(outputs.stage(args.out), rows, methods, maps, images=images, overlay_alpha=0.6)
    return len(scenes), pairs


def _provenance(args: argparse.Namespace) -> str:
    """How to make a table again: the command line that made it, and the versions and date it was made with."""
    import datetime
    import platform
    import shlex
    import subprocess

    import timm
    import torch

    from fxrel import __version__

    version = __version__
    checkout = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):   # the commit, when fxrel runs from its checkout
        def git(*command: str) -> str:
            done = subprocess.run(["git", *command], cwd=checkout, capture_output=True, text=True, timeout=10)
            return done.stdout.strip() if done.returncode == 0 else ""

        top = git("rev-parse", "--show-toplevel")
        if top and Path(top).resolve() == checkout:
            version += f" (git {git('describe', '--always', '--dirty', '--abbrev=7')})"   # -dirty: uncommitted edits
    return (f"Made by `fxrel {shlex.join(args.argv)}` with fxrel {version}, torch {torch.__version__}, "
            f"timm {timm.__version__}, Python {platform.python_version()}, on {datetime.date.today().isoformat()}.")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from fxrel import evaluation
    from fxrel.demo import DEMO_MODELS, make_scenes
    from fxrel.zoo import SCENE_MODELS, ZOO_MODELS, scene_model

    groups = {"demo": DEMO_MODELS, "zoo": ZOO_MODELS}
    model_names = [name for item in _csv(args.models, DEMO_MODELS, (*groups, *SCENE_MODELS), "models")
                   for name in groups.get(item, (item,))]
    methods = _demo_methods(args.methods, evaluation.DEFAULT_METHODS)
    metric_names = _csv(args.metrics, evaluation.DEFAULT_METRICS, list(evaluation.METRICS), "metrics")
    outputs = _claim_outputs(markdown=args.markdown, json=args.json)
    rank, world = evaluation.distributed_world()
    device = _device(args.device)
    if world > 1 and device.type == "cuda":
        import torch

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    scenes = make_scenes(args.images, seed=args.seed, split="test", size=args.size)
    models = {name: scene_model(name, device=device) for name in model_names}
    total = int(scenes.labels.sum())   # (image, class) pairs
    chunks = -(-total // (world * args.batch_size)) + (world > 1)   # per process (shards differ by a pair or so)
    with _progress(chunks * len(methods) * len(models), "fxrel eval", args.quiet or rank != 0) as bar:
        def step(description: str) -> None:
            bar.set_description(description)
            bar.update()

        stores = _map_stores(args, models, scenes, methods, device)
        kwargs = dict(batch_size=args.batch_size, device=device, seed=args.metric_seed, progress=step,
                      stored=None if stores is None else lambda model, spec: stores[model].map_fn(spec))
        if world > 1:
            result = evaluation.evaluate_distributed(models, scenes, methods, metric_names, **kwargs)
        else:
            result = evaluation.evaluate(models, scenes, methods, metric_names, **kwargs)
    if result is None:   # a non-zero rank: rank 0 reports
        return EXIT_OK
    header = (f"{len(scenes)} test scenes (seed {args.seed}, {args.size} px), {total} (image, class) pairs, "
              f"{world} process{'es' if world > 1 else ''}, metric seed {args.metric_seed}; ↑/↓: higher/lower is "
              f"better; (L) all labels, (P) correctly predicted labels; s: seconds; {result.LEGEND}")
    table = result.table()
    with outputs:
        if args.markdown:
            outputs.write_text(args.markdown, f"{_provenance(args)}\n\n{header}\n\n{result.table(markdown=True)}\n")
        if args.json:
            outputs.write_text(args.json, json.dumps(result.to_json(), indent=1))
    print(header)
    print(table)
    _print_written(outputs)
    return EXIT_OK


def _map_stores(args: argparse.Namespace, models: dict, scenes, methods: list[str], device) -> dict | None:
    """``eval --save-maps``: explain every (scene, present class) once and store the maps (one folder per model);
    ``--maps``: open the stores of an earlier run. ``None`` without either."""
    folder = args.save_maps or args.maps
    if folder is None:
        return None
    from torch.utils.data import TensorDataset

    from fxrel.datasets import MapStore, explain_dataset

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise CLIError("--save-maps and --maps run in one process; run them without torchrun")
    for name, model in models.items() if args.save_maps else ():
        explain_dataset(model, TensorDataset(scenes.images, scenes.labels), Path(folder) / name, methods,
                        target="present", size=args.size, batch_size=args.batch_size, dtype="float32",
                        device=device, model_name=name)
    stores = {name: MapStore(Path(folder) / name) for name in models}
    for store in stores.values():
        for spec in methods:
            store.map_fn(spec)   # every method is there, or an InputError naming the one missing
    return stores


def cmd_fidelity(args: argparse.Namespace) -> int:
    import json

    from fxrel import evaluation, fidelity
    from fxrel.demo import make_scenes
    from fxrel.zoo import CNN_ZOO, SCENE_MODELS, scene_model

    model_names = _csv(args.models, CNN_ZOO, SCENE_MODELS, "models")
    seeds = _csv(args.methods, fidelity.SEED_METHODS, fidelity.SEED_METHODS, "methods")
    methods = fidelity.methods_to_run(seeds)
    metric_names = _csv(args.metrics, fidelity.FIDELITY_METRICS, list(evaluation.METRICS), "metrics")
    outputs = _claim_outputs(markdown=args.markdown, json=args.json)
    scenes = make_scenes(args.images, seed=args.seed, split="test")
    device = _device(args.device)
    models = {name: scene_model(name, device=device) for name in model_names}
    chunks = -(-int(scenes.labels.sum()) // args.batch_size)
    with _progress(chunks * len(methods) * len(models), "fxrel fidelity", args.quiet) as bar:
        def step(description: str) -> None:
            bar.set_description(description)
            bar.update()

        result = evaluation.evaluate(models, scenes, methods, metric_names, batch_size=args.batch_size,
                                     device=device, seed=args.metric_seed, progress=step)
    header = (f"{len(scenes)} test scenes (seed {args.seed}, 64 px), {int(scenes.labels.sum())} (image, class) pairs, "
              f"{int((scenes.labels.sum(1) > 1).sum())} scenes with several objects, metric seed {args.metric_seed}; "
              f"every method with its default parameters; {result.LEGEND}")
    verdicts = fidelity.verdict_table(result, model_names, seeds)
    with outputs:
        if args.markdown:
            text = (f"# Seed methods on the evaluation zoo\n\n{fidelity.__doc__.strip()}\n\n{_provenance(args)}\n\n"
                    f"{fidelity.model_summary(model_names)}\n\n{header}; ↑/↓: higher/lower is better, s: seconds\n\n"
                    f"{result.table(markdown=True)}\n\n## The bar\n\n{verdicts}\n")
            outputs.write_text(args.markdown, text)
        if args.json:
            outputs.write_text(args.json, json.dumps(result.to_json(), indent=1))
    print(header)
    print(result.table())
    print(verdicts)
    _print_written(outputs)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from fxrel import coverage

    names = list(args.names) or (list(coverage.SAMPLE) if args.sample else coverage.family_sample() if args.families
                                 else coverage.attention_models(args.pattern) if args.attention
                                 else coverage.cnn_models(args.pattern))
    if args.reverse:
        names = names[::-1]
    if args.limit:
        names = names[:args.limit]
    if not names:
        raise CLIError(f"no timm model matches '{args.pattern}'")
    # the journal is appended to row by row (a sweep resumes from it), so it is claimed against clashes, not staged
    outputs = _claim_outputs(markdown=args.markdown, json=args.json, journal=args.journal)
    with _progress(len(names), "fxrel models", args.quiet) as bar:
        def step(name: str) -> None:
            bar.set_description(name)
            bar.update()

        rows = coverage.coverage(names, peers=args.peers, progress=step, journal=args.journal, isolate=args.isolate)
    with outputs:
        if args.markdown:
            outputs.write_text(args.markdown,
                               f"{_provenance(args)}\n\n{coverage.table(rows, markdown=True, peers=args.peers)}\n")
        if args.json:
            outputs.write_text(args.json, coverage.to_json(rows))
    print(coverage.table(rows, peers=args.peers))
    _print_written(outputs)
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------------------------------
def _add_model_options(p: argparse.ArgumentParser, *, positional_model: bool) -> None:
    if positional_model:
        p.add_argument("model", metavar="MODEL",
                       help="demo-NAME (trained demo model), tv:NAME (torchvision), timm:NAME or NAME (timm)")
    else:
        p.add_argument("--model", required=True, metavar="NAME",
                       help="demo-NAME (trained demo model: demo-vgg, demo-resnet, demo-densenet, demo-inception), "
                            "tv:NAME (torchvision, weights=None), timm:NAME or NAME (timm, pretrained=False)")
    p.add_argument("--weights", metavar="PATH", help="state dict to load (torch.save file or .safetensors)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="load --weights even with missing/unexpected keys (reported as warnings)")
    p.add_argument("--num-classes", type=_positive_int, metavar="N", help="classifier size (default: the model's)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed for the model's random initialisation (default 0)")
    p.add_argument("--method", required=True, metavar="NAME", help="explanation method (see `fxrel methods`)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="method parameter, e.g. epsilon=1e-3 (repeatable; int/float/bool/str)")
    p.add_argument("--size", type=_positive_int, default=None, metavar="N",
                   help="input side length (default 224; 64 for the demo models)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--target", default="top1", metavar="T",
                   help="class index, 'top1' (default) or 'top-k'; several separated by commas")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_table_options(p: argparse.ArgumentParser, images: int, written: str) -> None:
    """The options ``eval`` and ``fidelity`` share: the scenes, batching, device, output files and progress bar."""
    p.add_argument("--images", type=_positive_int, default=images, metavar="N", help=f"test scenes (default {images})")
    p.add_argument("--seed", type=int, default=1, metavar="N", help="scene seed (default 1)")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="pairs per batch (16)")
    p.add_argument("--metric-seed", type=int, default=0, metavar="N",
                   help="seed of the metrics' random draws, each keyed by (seed, metric, image, class) (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--markdown", metavar="FILE.md", help=f"also write the {written} as markdown")
    p.add_argument("--json", metavar="FILE.json", help="also write the means as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxrel", description="Explain CNN image classifiers with relevance graphs.")
    from fxrel import __version__
    from fxrel.evaluation import DEFAULT_METHODS
    from fxrel.fidelity import SEED_METHODS

    parser.add_argument("--version", action="version", version=f"fxrel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("explain", help="explain one image and write a heatmap PNG and the rule plan",
                       description="Explain IMAGE (default: a synthetic demo image) and write a heatmap PNG "
                                   "(image | overlay) and the rule plan.")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="image file (default: synthetic demo image)")
    _add_model_options(p, positional_model=False)
    p.add_argument("--out", metavar="FILE.png", help="heatmap PNG (default: <model>_<method>.png); with several "
                                                     "targets each gets .<target> before the suffix")
    p.add_argument("--plan", metavar="FILE.txt", help="rule plan text (default: <out stem>.plan.txt)")
    p.add_argument("--compile", action="store_true", help="run the relevance graph through torch.compile")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("explain-dataset", conflict_handler="resolve",
                       help="explain every image of a folder or list file and store the maps (resumable; "
                            "torchrun: several processes)",
                       description="Explain every image of SOURCE with one or more methods and store the maps "
                                   "([H, W], channel sums) as sharded safetensors files with an index.jsonl in "
                                   "--out (read them with fxrel.datasets.MapStore). A run restarted on the same "
                                   "folder keeps the shard files already written; under torchrun each process "
                                   "takes every N-th image and writes its own shards.")
    p.add_argument("source", metavar="SOURCE", help="image folder (ImageFolder layout, one subfolder per class, or "
                                                    "flat) or list file (one image path per line, optional label)")
    _add_model_options(p, positional_model=False)
    p.add_argument("--method", action="append", required=True, metavar="SPEC",
                   help="method spec, name or name[key=value,…] (repeatable, or several separated by commas)")
    p.add_argument("--target", default="top1", metavar="T",
                   help="label (the dataset's), top1 (default), top-k (the k highest-scoring classes) or present "
                        "(every class of a multi-label vector)")
    p.add_argument("--out", required=True, metavar="FOLDER", help="output folder (made if needed)")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="rows per batch (16)")
    p.add_argument("--shard-size", type=_positive_int, default=256, metavar="N", help="images per shard file (256)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader worker processes (0)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="storage dtype of the maps (default float16)")
    p.add_argument("--png", action="store_true", help="also write png/<method>/<image>.c<class>.png overlays")
    p.set_defaults(func=cmd_explain_dataset)

    p = sub.add_parser("methods", help="list the explanation methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("graph", help="show a model's relevance graph code, DOT graph, rule plan, layer table, "
                                     "conservation audit or rule-by-rule profile",
                       description="Print (or write with --out) the relevance program of MODEL for one method.")
    _add_model_options(p, positional_model=True)
    p.add_argument("--format", choices=_FORMATS, default="code", help="default code")
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("demo", help="methods × classes grid on a trained demo model (offline)",
                       description="Explain every digit class present in a few generated test scenes with several "
                                   "methods on a trained demo model and write one grid PNG (rows: image and class, "
                                   "columns: methods; red positive, blue negative, over the image).")
    p.add_argument("--model", default="demo-vgg", metavar="NAME",
                   help="demo-vgg (default), demo-resnet, demo-densenet or demo-inception")
    p.add_argument("--methods", metavar="A,B,…", help="comma-separated method names, name[key=value,…] or "
                   "ucag:BASE (default: " + ", ".join(DEMO_GRID_METHODS) + ")")
    p.add_argument("--images", type=_positive_int, default=3, metavar="N", help="scenes (default 3)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="scene seed (default 0)")
    p.add_argument("--size", type=_positive_int, default=64, metavar="N", help="scene side length (default 64)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--out", default="out/demo.png", metavar="FILE.png", help="default out/demo.png")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="methods × metrics table on the demo or zoo models (torchrun: several processes)",
                       description="Evaluate explanation methods with localisation, faithfulness, complexity, "
                                   "robustness and randomisation metrics on generated test scenes with ground "
                                   "truth, for the trained demo or evaluation-zoo models. Under torchrun each process "
                                   "takes a "
                                   "DistributedSampler shard and rank 0 prints the gathered table.")
    p.add_argument("--models", metavar="A,B,…", help="demo or zoo models, or 'demo' / 'zoo' for all of one set "
                                                      "(default: the four demo models)")
    p.add_argument("--methods", metavar="A,B,…", help="methods, name[key=value,…] (e.g. agf[residual=official]) "
                   "or ucag:BASE (default: " + ", ".join(DEFAULT_METHODS) + ")")
    p.add_argument("--metrics", metavar="A,B,…", help="metrics (default: all but randomisation, the cascading "
                                                       "sanity check, which re-captures the model per layer, and "
                                                       "road, which imputes 18 images per pair; names in "
                                                       "fxrel.evaluation.METRICS)")
    _add_table_options(p, images=16, written="table")
    p.add_argument("--size", type=_positive_int, default=64, metavar="N", help="scene side length (default 64)")
    stored = p.add_mutually_exclusive_group()
    stored.add_argument("--save-maps", metavar="DIR", help="also store every map (float32, DIR/MODEL, as "
                                                            "`fxrel explain-dataset` does) for later --maps runs")
    stored.add_argument("--maps", metavar="DIR", help="score the maps stored by an earlier --save-maps run instead "
                                                       "of explaining again (metrics that explain perturbed inputs "
                                                       "still run the method)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fidelity", help="the seed methods against LRP-ε+♭ and their papers' bases on the zoo",
                       description="Evaluate every seed method (default parameters) on the evaluation zoo next to "
                                   "epsilon_plus_flat and the bases its paper compares against (pointing game, "
                                   "energy pointing game, class discrimination, correlation of two classes' maps, "
                                   "insertion, deletion) and say, per model, whether it meets the bar of "
                                   "fxrel.fidelity.")
    p.add_argument("--models", metavar="A,B,…", help="zoo or demo models (default: the six zoo CNNs)")
    p.add_argument("--methods", metavar="A,B,…", help="seed methods (default: " + ", ".join(SEED_METHODS) + ")")
    p.add_argument("--metrics", metavar="A,B,…", help="metrics (default: pointing_game, energy_pointing_game, "
                   "discrimination, class_correlation, insertion, deletion; the bar needs the first three)")
    _add_table_options(p, images=40, written="tables")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("models", help="coverage report: which timm models fxrel explains, with peer columns",
                       description="Per timm model (random weights, batch 1, float64, the smallest input it "
                                   "accepts): captured, canonical, gradient rule set == autograd (1e-4), LRP-0 "
                                   "conservation with every additive constant removed (1e-3), LRP-ε finite, build "
                                   "and run times; --peers adds zennit's and captum's LRP-0 conservation.")
    p.add_argument("names", nargs="*", metavar="NAME", help="timm model names (default: every CNN in "
                                                            "timm.list_models(--pattern))")
    p.add_argument("--pattern", default="*", help="timm.list_models pattern when no names are given")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N models")
    p.add_argument("--sample", action="store_true",
                   help="the fixed sample of 30 models across families that CI runs (fxrel.coverage.SAMPLE)")
    p.add_argument("--attention", action="store_true",
                   help="the transformers, conv-attention hybrids and MLP models instead of the CNNs "
                        "(fxrel.coverage.attention_models, with --pattern)")
    p.add_argument("--families", action="store_true",
                   help="one model per non-CNN family, its smallest by name (fxrel.coverage.family_sample)")
    p.add_argument("--reverse", action="store_true",
                   help="check the models last to first (a second process sharing the --journal meets the first)")
    p.add_argument("--isolate", action="store_true",
                   help="check each model in its own process (one killed for memory is a failed row, the sweep "
                        "goes on)")
    p.add_argument("--peers", action="store_true", help="add zennit and captum columns")
    p.add_argument("--markdown", metavar="FILE.md", help="also write the table as markdown")
    p.add_argument("--json", metavar="FILE.json", help="also write every row as JSON")
    p.add_argument("--journal", metavar="FILE.jsonl",
                   help="append each row as soon as it is done and skip models already there (resumable sweeps)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 usage/input error, 1 I/O error, 130 interrupted)."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
            args.argv = list(sys.argv[1:] if argv is None else argv)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args)
    except _UsageError as exc:
        print(exc.usage.rstrip("\n"), file=sys.stderr)
        print(f"fxrel: error: {exc}", file=sys.stderr)
        return exc.code
    except CLIError as exc:
        print(f"fxrel: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # `fxrel graph … | head`: the reader left; not an error
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return EXIT_OK
    except KeyboardInterrupt:
        print("fxrel: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from fxrel.errors import FxrelError

        if isinstance(exc, FxrelError):
            print(f"fxrel: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, OSError):  # cannot write an output file, …
            print(f"fxrel: error: {exc}", file=sys.stderr)
            return EXIT_IO
        raise


if __name__ == "__main__":
    raise SystemExit(main())
