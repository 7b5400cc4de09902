"""Tests for ``fxrel explain-dataset`` / :mod:`fxrel.datasets`: stored maps against ``fxrel.explain``, targets, one
relevance program per method, kill and resume, the reader's lazy loads, refusing to mix runs, bad inputs, and
torchrun with two gloo processes against one.

Tiny inputs: 23 generated scenes at 32 px on the trained demo-vgg, batches of 5, shards of 7 images (so the last
batch and the last shard are short).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn
from torch.utils.data import Dataset

import fxrel
import fxrel.datasets.store as store_module
from fxrel import cli
from fxrel.datasets import MapStore, explain_dataset, image_files
from fxrel.datasets.layout import rank_shards, shard_name
from fxrel.demo import make_scenes
from fxrel.errors import InputError, NumericalError
from fxrel.metrics import as_maps
from fxrel.text import parse_spec

ROOT = Path(__file__).resolve().parents[1]
SIZE, COUNT, BATCH, SHARD = 32, 23, 5, 7
METHODS = ["epsilon_plus_flat", "lrp_epsilon[epsilon=0.5]"]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return cli.build_model("demo-vgg")


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(COUNT, seed=3, split="test", size=SIZE)


def _write_png(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, scenes) -> Path:
    """The scenes as PNGs in the ImageFolder layout, each under its first digit."""
    root = tmp_path_factory.mktemp("scenes")
    for i, image in enumerate(scenes.images):
        _write_png(root / str(int(scenes.labels[i].nonzero()[0])) / f"scene{i:03d}.png", image)
    return root


class SceneDataset(Dataset):
    """The scenes as a multi-label dataset: (image, label vector)."""

    def __init__(self, scenes) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes.images)

    def __getitem__(self, index: int):
        return self.scenes.images[index], self.scenes.labels[index]


def _run(model, source, out, methods=METHODS, **kwargs):
    options = dict(target="label", size=SIZE, batch_size=BATCH, shard_size=SHARD, model_name="demo-vgg")
    return explain_dataset(model, source, out, methods, **{**options, **kwargs})


def _reference(model, x: torch.Tensor, classes: list[int], spec: str, keys=None) -> torch.Tensor:
    name, params = parse_spec(spec)
    extra = {} if keys is None else {"keys": keys}
    return as_maps(fxrel.explain(model, x, target=torch.tensor(classes), method=name, **params, **extra)).detach()


def _files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- stored maps ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float32_run(model, folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "maps32"
    _run(model, folder, out, [*METHODS, "smoothgrad[samples=2]"], dtype="float32")
    return out


def test_stored_maps_equal_fxrel_explain(model, folder, float32_run, tmp_path):
    """Every stored map (float32) is ``fxrel.explain``'s on the same image and class, all images in one batch; the
    float16 store holds those maps rounded to float16; SmoothGrad's noise is keyed by (image, class)."""
    files = image_files(folder, SIZE)
    x, labels = torch.stack([files[i][0] for i in range(len(files))]), files.labels
    exact = MapStore(float32_run)
    _run(model, folder, tmp_path / "maps16", dtype="float16")
    half = MapStore(tmp_path / "maps16")
    assert half.load(dtype=None).maps.dtype == torch.float16 and exact.load(dtype=None).maps.dtype == torch.float32
    for spec in exact.methods:
        found = exact.load(method=spec)
        assert [r["image"] for r in found.records] == list(range(COUNT))   # one map per image: no padding rows
        assert [r["class"] for r in found.records] == labels
        keys = [(i, c) for i, c in enumerate(labels)] if spec.startswith("smoothgrad") else None
        expected = _reference(model, x, labels, spec, keys)
        torch.testing.assert_close(found.maps, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
        if spec in half.methods:
            stored = half.load(method=spec).maps
            torch.testing.assert_close(stored, expected.half().float(), rtol=2**-10, atol=2**-24)
            assert not torch.equal(stored, expected)   # the store did round


def test_index_records_name_everything(float32_run, folder, model):
    store = MapStore(float32_run)
    record = store.select(image=4, method="lrp_epsilon")[0]
    run = json.loads((float32_run / "run.json").read_text())
    assert record["method"] == "lrp_epsilon[epsilon=0.5]" and record["params"] == {"epsilon": 0.5}
    assert record["model"] == "demo-vgg" and record["model_hash"] == run["model_hash"] == \
        fxrel.datasets.layout.model_hash(model)
    assert record["fxrel_version"] == fxrel.__version__
    assert Path(record["path"]).is_file() and record["path"].endswith(record["id"])
    assert record["label_name"] == record["id"].split("/")[0] == str(record["label"])
    assert record["shard"] == shard_name(0, 4 // SHARD)                 # images 0-6 in shard 0, 7-13 in shard 1 …
    with torch.no_grad():
        logit = model(image_files(folder, SIZE)[4][0][None])[0, record["class"]]
    assert record["score"] == pytest.approx(float(logit), rel=1e-5, abs=1e-5)


def test_targets_top_k_and_present_with_one_program_per_method(scenes, tmp_path, monkeypatch):
    """``present`` explains every label of a multi-label dataset, ``top-2`` the two highest classes; either way one
    relevance program per method serves the whole run (every batch padded to one shape)."""
    import fxrel.explainer as explainer_module

    builds = []
    original = explainer_module.build_relevance_graph
    monkeypatch.setattr(explainer_module, "build_relevance_graph",
                        lambda canonical, *a, **k: builds.append(canonical) or original(canonical, *a, **k))
    model = cli.build_model("demo-vgg")   # a fresh model: nothing cached for it yet
    _run(model, SceneDataset(scenes), tmp_path / "present", target="present")
    assert len(builds) == len(METHODS)
    present = MapStore(tmp_path / "present").select(method=METHODS[0])
    assert [(r["image"], r["class"]) for r in present] == [tuple(p) for p in scenes.labels.nonzero().tolist()]
    assert all(r["id"] == str(r["image"]) and r["path"] is None for r in present)

    _run(model, SceneDataset(scenes), tmp_path / "top2", target="top-2")
    assert len(builds) == len(METHODS)   # the same batch shape: no new program
    with torch.no_grad():
        top = model(scenes.images).topk(2, dim=1).indices
    top2 = MapStore(tmp_path / "top2").select(method=METHODS[1])
    assert [(r["image"], r["class"]) for r in top2] == [(i, int(c)) for i in range(COUNT) for c in top[i]]


# --- kill and resume ------------------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_killed_run_resumes_to_the_same_files(model, folder, tmp_path):
    """Stopped after two shards, then mid-shard (and a temp file planted as a kill -9 would leave it), then
    resumed: the same files, byte for byte, as an uninterrupted run; only the missing shards were written and no
    temp file remains."""
    whole = tmp_path / "whole"
    _run(model, folder, whole, png=True)
    out = tmp_path / "resumed"
    written: list[str] = []

    def stop_after_two(path: Path) -> None:
        written.append(path.name)
        if len(written) == 2:
            raise Stop

    with pytest.raises(Stop):
        _run(model, folder, out, png=True, on_shard=stop_after_two)
    assert sorted(p.name for p in out.glob("maps-*")) == [shard_name(0, 0), shard_name(0, 1)]
    assert not (out / "index.jsonl").exists()
    with pytest.raises(InputError, match="not finished"):
        MapStore(out)

    calls = []

    def stop_mid_shard(done: int, total: int) -> None:   # after the first batch of shard 2
        calls.append(done)
        if done > 2 * SHARD:
            raise Stop

    with pytest.raises(Stop):
        _run(model, folder, out, png=True, progress=stop_mid_shard)
    assert calls[0] == 2 * SHARD                      # the kept shards count as done
    assert not (out / shard_name(0, 2)).exists()      # a shard is written whole or not at all
    (out / f".{shard_name(0, 2)}.x1y2z3.tmp").write_bytes(b"half a shard")

    written.clear()
    resumed = _run(model, folder, out, png=True, on_shard=lambda path: written.append(path.name))
    assert written == [shard_name(0, s) for s in (2, 3)] and resumed.shards_kept == 2
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))
    assert _files_of(out) == _files_of(whole)
    pngs = sorted(p.relative_to(whole) for p in (whole / "png").rglob("*.png"))
    assert len(pngs) == COUNT * len(METHODS)
    assert pngs == sorted(p.relative_to(out) for p in (out / "png").rglob("*.png"))


_KILLED_RUN = """
import os, signal, sys
from fxrel import cli
from fxrel.datasets import explain_dataset

real_replace, renamed = os.replace, []


def replace(src, dst):   # a real kill -9 between the third shard's write and its rename into place
    if str(dst).endswith(".safetensors"):
        renamed.append(dst)
        if len(renamed) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)


os.replace = replace
explain_dataset(cli.build_model("demo-vgg"), sys.argv[1], sys.argv[2], sys.argv[3].split(";"), target="label",
                size=int(sys.argv[4]), batch_size=int(sys.argv[5]), shard_size=int(sys.argv[6]),
                model_name="demo-vgg")
"""


def test_a_process_killed_by_sigkill_mid_write_resumes_to_the_same_files(model, folder, tmp_path):
    """A separate process SIGKILLed while its third shard lies written but not yet renamed: two whole shards and a
    temp file are left, no index; the run resumed in this process gives the uninterrupted run's files."""
    whole, out = tmp_path / "whole", tmp_path / "killed"
    _run(model, folder, whole)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(folder), str(out), ";".join(METHODS), str(SIZE),
                             str(BATCH), str(SHARD)], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in out.glob("maps-*")) == [shard_name(0, 0), shard_name(0, 1)]
    assert list(out.glob(".*.tmp")) and not (out / "index.jsonl").exists()
    resumed = _run(model, folder, out)
    assert resumed.shards_kept == 2 and resumed.shards_written == 2
    assert not list(out.rglob(".*")) and _files_of(out) == _files_of(whole)


# --- reading --------------------------------------------------------------------------------------------------------
def test_reader_opens_only_the_shards_it_needs(float32_run, monkeypatch, tmp_path):
    """One image's maps come from its own shard file alone, one class's from the shards of its images, one
    method's from its own tensor only; the other shard files may even be gone."""
    opened, sliced = [], []

    class Recording:
        def __init__(self, path: str, framework: str) -> None:
            opened.append(Path(path).name)
            self.file = safe_open(path, framework=framework)

        def __enter__(self):
            inner = self.file.__enter__()

            class Proxy:
                def get_slice(self, name):
                    sliced.append(name)
                    return inner.get_slice(name)
            return Proxy()

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    store = MapStore(float32_run)
    everything = store.load()
    monkeypatch.setattr(store_module, "safe_open", Recording)

    one = store.load(image=9)
    assert opened == [shard_name(0, 9 // SHARD)] and len(one) == len(store.methods)
    assert [r["image"] for r in one.records] == [9] * len(store.methods)

    opened.clear()
    cls = one.records[0]["class"]
    of_class = store.load(cls=cls)
    images = sorted({r["image"] for r in of_class.records})
    assert sorted(opened) == sorted({shard_name(0, i // SHARD) for i in images})
    assert all(r["class"] == cls for r in of_class.records) and images

    opened.clear()
    sliced.clear()
    only = store.load(method="epsilon_plus_flat")
    assert set(sliced) == {"maps.0"} and len(only) == COUNT

    by_key = {(r["image"], r["class"], r["method"]): m for r, m in zip(everything.records, everything.maps)}
    for r, m in zip(of_class.records, of_class.maps):
        assert torch.equal(m, by_key[(r["image"], r["class"], r["method"])])

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("run.json", "index.jsonl", shard_name(0, 1)):
        (copy / name).write_bytes((float32_run / name).read_bytes())
    alone = MapStore(copy).load(image=one.records[0]["id"])   # by id, from shard 1 alone
    assert torch.equal(alone.maps, one.maps)
    with pytest.raises(InputError, match="no image with id"):
        store.load(image="missing.png")
    with pytest.raises(InputError, match="matches none.*stored"):
        store.load(method="grad_cam")


# --- refusing -------------------------------------------------------------------------------------------------------
def test_a_run_with_other_options_is_refused(model, folder, float32_run):
    before = _files_of(float32_run)
    methods = [*METHODS, "smoothgrad[samples=2]"]
    changed = cli.build_model("demo-vgg")
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    cases = [(dict(dtype="float16"), "dtype: folder has \"float32\", this run \"float16\""),
             (dict(methods=METHODS), "methods: folder has"),
             (dict(size=40), "size: folder has 32, this run 40"),
             (dict(model=changed), "model_hash: folder has"),
             (dict(shard_size=4), "shard_size")]
    for change, needle in cases:
        options = {"methods": methods, "dtype": "float32", **change}
        run_model = options.pop("model", model)
        with pytest.raises(InputError, match="another run") as info:
            _run(run_model, folder, float32_run, **options)
        assert needle in str(info.value)
    assert _files_of(float32_run) == before


def test_bad_inputs_are_clear_errors(model, folder, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    flat = tmp_path / "flat"
    _write_png(flat / "a.png", torch.rand(3, SIZE, SIZE))
    listing = tmp_path / "list.txt"
    listing.write_text("flat/a.png 3\nmissing.png 4\n")
    cases = [(dict(source=tmp_path / "nope"), "image source not found"),
             (dict(source=tmp_path / "empty"), "holds no images"),
             (dict(methods=["epsilon_plus_flat", "frobnicate"]), "unknown method 'frobnicate'"),
             (dict(methods=["lrp_epsilon[gamma=1]"]), "gamma"),
             (dict(target="top0"), "target 'top0' not understood; use 'label'"),
             (dict(target="best"), "'top-k'"),
             (dict(source=flat), "needs labels"),
             (dict(dtype="int8"), "dtype must be one of float16, bfloat16, float32"),
             (dict(workers=-1), "workers must be a non-negative integer"),
             (dict(source=listing), "line 2: image not found"),
             (dict(source=folder, target="top-11"), "more classes than the model has")]
    for change, needle in cases:
        options = {"source": folder, "methods": METHODS, **change}
        with pytest.raises(InputError) as info:
            _run(model, options.pop("source"), out, options.pop("methods"), **options)
        assert needle in str(info.value), (change, str(info.value))
    assert not out.exists()   # nothing is written before the inputs are checked

    _write_png(flat / "sub" / "b.png", torch.rand(3, SIZE, SIZE))
    with pytest.raises(InputError, match="both at its top level"):
        image_files(flat, SIZE)
    for argv, needle in [(["explain-dataset", str(tmp_path / "nope")], "image source not found"),
                         (["explain-dataset", str(folder), "--method", "frobnicate"], "unknown method"),
                         (["explain-dataset", str(folder), "--target", "top0"], "top0"),
                         (["explain-dataset", str(folder), "--method", "lrp_epsilon,gradient", "--param", "epsilon=1"],
                          "--param sets the parameters of a single --method")]:
        full = [*argv, "--model", "demo-vgg", "--out", str(out), "-q"]
        if "--method" not in full:
            full += ["--method", "epsilon_plus_flat"]
        assert cli.main(full) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


def test_float16_overflow_names_the_image(tmp_path):
    """A map beyond float16's range is an error that names the image and the way out, not inf in the store."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.abs() * 1e5)
    images = torch.rand(4, 3, SIZE, SIZE)
    dataset = [(image, 0) for image in images]
    with pytest.raises(NumericalError, match="image 0 is not finite in torch.float16.*float32"):
        explain_dataset(model, dataset, tmp_path / "o", "gradient_x_input", target="label", size=SIZE, batch_size=2)
    run = explain_dataset(model, dataset, tmp_path / "o32", "gradient_x_input", target="label", size=SIZE,
                          batch_size=2, dtype="float32")
    maps = MapStore(tmp_path / "o32").load().maps
    assert run.maps == 4 and torch.isfinite(maps).all() and maps.abs().max() > torch.finfo(torch.float16).max


# --- command line ---------------------------------------------------------------------------------------------------
def test_parser_takes_repeated_and_comma_separated_methods():
    args = cli.build_parser().parse_args(["explain-dataset", "imgs", "--model", "demo-vgg", "--method", "a,b[x=1,y=2]",
                                          "--method", "c", "--out", "o", "--dtype", "bfloat16", "--workers", "2"])
    assert args.method == ["a,b[x=1,y=2]", "c"] and args.target == "top1" and args.dtype == "bfloat16"
    assert args.func is cli.cmd_explain_dataset and args.param is None and args.batch_size == 16


def test_cli_on_a_list_file_with_overlays(model, folder, tmp_path, capsys):
    """``fxrel explain-dataset`` on a list file (paths relative to it, labels), two methods given two ways, one
    DataLoader worker, PNG overlays; the maps equal the API's on the folder (same images, same labels)."""
    files = image_files(folder, SIZE)
    listing = folder / "list.txt"
    listing.write_text("# scenes\n" + "".join(f"{i}\t{y}\n" for i, y in zip(files.ids, files.labels)))
    out = tmp_path / "cli"
    common = ["explain-dataset", str(listing), "--model", "demo-vgg", "--size", str(SIZE), "--target", "label",
              "--batch-size", str(BATCH), "--shard-size", str(SHARD), "-q"]
    code = cli.main([*common, "--method", METHODS[0], "--method", METHODS[1], "--out", str(out), "--workers", "1",
                     "--png"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"{COUNT} (image, class) maps per method" in captured.out and "list file" in captured.out
    store = MapStore(out)
    assert len(list((out / "png").rglob("*.png"))) == COUNT * len(METHODS)
    with Image.open(next((out / "png").rglob("*.png"))) as im:
        assert im.size == (2 * SIZE, SIZE)   # image | overlay
    api = tmp_path / "api"
    _run(model, folder, api)
    assert [(r["id"], r["class"], r["method"]) for r in store.records] == \
        [(r["id"], r["class"], r["method"]) for r in MapStore(api).records]
    assert torch.equal(store.load().maps, MapStore(api).load().maps)
    assert cli.main([*common, "--method", "lrp_epsilon", "--param", "epsilon=0.5", "--out", str(tmp_path / "p")]) == 0
    assert MapStore(tmp_path / "p").methods == [METHODS[1]]
    assert torch.equal(MapStore(tmp_path / "p").load().maps, store.load(method=METHODS[1]).maps)


# --- torchrun -------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_store_the_single_process_maps(model, folder, float32_run, tmp_path):
    """Two gloo CPU processes under torchrun: each writes the shards of every other image, rank 0 the index; the
    maps are the single process's (no image twice, none missing)."""
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = ["explain-dataset", str(folder), "--model", "demo-vgg", "--size", str(SIZE), "--method",
            ",".join([*METHODS, "smoothgrad[samples=2]"]), "--target", "label", "--out", str(out), "--batch-size",
            str(BATCH), "--shard-size", str(SHARD), "--dtype", "float32", "-q"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "fxrel.cli", *argv], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("source:") == 1 and "2 process(es)" in run.stdout   # only rank 0 reports
    expected = [shard_name(r, s) for r in range(2) for s, _ in enumerate(rank_shards(COUNT, r, 2, SHARD))]
    assert sorted(p.name for p in out.glob("maps-*")) == sorted(expected)
    with safe_open(str(out / shard_name(1, 0)), framework="pt") as f:
        assert f.get_tensor("image").tolist() == list(range(1, 2 * SHARD, 2))   # rank 1: images 1, 3, 5 …
    two, one = MapStore(out), MapStore(float32_run)
    key = [(r["image"], r["class"], r["method"]) for r in two.records]
    assert key == [(r["image"], r["class"], r["method"]) for r in one.records] and len(set(key)) == len(key)
    a, b = two.load().maps, one.load().maps
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


def test_map_fn_refuses_maps_of_other_images(model, folder, float32_run):
    """MapStore.map_fn checks each map's recorded score against the model: the right image passes, the same keys
    on other images are refused, naming the pair."""
    store = MapStore(float32_run)
    record = store.select(method=METHODS[0])[0]
    i, c = record["image"], record["class"]
    fn = store.map_fn(METHODS[0])
    x = image_files(folder, SIZE)[i][0][None]   # the image as the run read it (the PNG)
    stored = fn(model, x, torch.tensor([c]), keys=[(i, c)])
    assert torch.equal(stored[0], store.load(image=i, cls=c, method=METHODS[0]).maps[0])
    with pytest.raises(InputError, match=rf"\({i}, {c}\).*other images or another model"):
        fn(model, torch.flip(x, dims=[-1]) * 0.5, torch.tensor([c]), keys=[(i, c)])
    with pytest.raises(InputError, match="holds no"):
        fn(model, x, torch.tensor([c]), keys=[(i, (c + 1) % 10)])
