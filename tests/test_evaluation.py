"""The methods × metrics evaluation (fxrel.evaluation): per-sample records, the (L)/(P) split, the table, and
distributed evaluation under torchrun (gloo, 2 CPU processes) reproducing the single-process numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fxrel import evaluation, metrics
from fxrel.errors import InputError
from fxrel.text import parse_spec, split_specs

ROOT = Path(__file__).resolve().parents[1]


def toy_scenes(n: int = 5, size: int = 24, seed: int = 0) -> SimpleNamespace:
    """Scenes with one or two bright squares of distinct classes (0–3) and their boxes/masks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 0.2
    labels = torch.zeros(n, 4, dtype=torch.bool)
    masks = torch.zeros(n, 4, size, size, dtype=torch.bool)
    boxes = torch.full((n, 4, 4), -1, dtype=torch.long)
    for i in range(n):
        for k, c in enumerate(torch.randperm(4, generator=g)[: 1 + i % 2].tolist()):
            x0, y0 = 2 + 12 * k, 2 + int(torch.randint(0, 10, (1,), generator=g))
            images[i, c % 3, y0:y0 + 8, x0:x0 + 8] = 1.0
            labels[i, c] = True
            masks[i, c, y0:y0 + 8, x0:x0 + 8] = True
            boxes[i, c] = torch.tensor([x0, y0, x0 + 8, y0 + 8])
    return SimpleNamespace(images=images, labels=labels, masks=masks, boxes=boxes)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_records_are_the_metrics_of_each_image_class_pair():
    scenes, model = toy_scenes(), toy_model()
    result = evaluation.evaluate({"toy": model}, scenes, ["gradient_x_input", "grad_cam"],
                                 ["pointing_game", "sparseness"], batch_size=3)
    pairs = [(i, c) for i in range(5) for c in scenes.labels[i].nonzero().flatten().tolist()]
    rows = result.records[("toy", "gradient_x_input", "sparseness")]
    assert sorted(rows) == pairs
    i, c = pairs[-1]
    x = scenes.images[i:i + 1]
    own = metrics.sparseness(evaluation.method_fn("gradient_x_input")(model, x, torch.tensor([c])))
    assert rows[(i, c)][0] == pytest.approx(float(own), rel=1e-6)
    logits = model(scenes.images)
    predicted = {(i, c) for i, c in pairs if logits[i, c] > 0}
    assert {p for p, (_, pred) in rows.items() if pred} == predicted
    pg = result.records[("toy", "grad_cam", "pointing_game")]
    expected = sum(v for v, _ in pg.values()) / len(pg)
    assert result.mean("toy", "grad_cam", "pointing_game") == pytest.approx(expected)
    table = result.table()
    assert "PG(L)↑" in table and "PG(P)↑" in table and "Gini↑" in table and "grad_cam" in table


def test_chunking_order_and_seed_of_the_random_metrics():
    """Every random draw is keyed by (seed, metric, image, class): batch size and order leave each pair's figure as
    it is (faithfulness subsets, max-sensitivity noise, SmoothGrad's noise), another seed changes it."""
    scenes, model = toy_scenes(), toy_model()
    methods = ["gradient", "smoothgrad[samples=3]"]
    names = ["energy_pointing_game", "iou", "faithfulness", "stability", "class_correlation"]
    a = evaluation.evaluate({"toy": model}, scenes, methods, names, batch_size=2)
    b = evaluation.evaluate({"toy": model}, scenes, methods, names, batch_size=16)
    c = evaluation.evaluate({"toy": model}, scenes, methods, names, batch_size=3, indices=[4, 2, 0, 3, 1])
    for other in (b, c):
        for key in a.records:
            assert a.records[key].keys() == other.records[key].keys()
            for pair, (v, p) in a.records[key].items():
                assert other.records[key][pair] == (pytest.approx(v, rel=1e-5, abs=1e-7, nan_ok=True), p), (key, pair)
    reseeded = evaluation.evaluate({"toy": model}, scenes, ["gradient"], ["faithfulness"], batch_size=16, seed=1)
    key = ("toy", "gradient", "faithfulness")
    assert reseeded.records[key].keys() == a.records[key].keys()
    assert any(abs(reseeded.records[key][pair][0] - v) > 1e-3 for pair, (v, _) in a.records[key].items())


def test_unknown_metric_and_method_are_named():
    with pytest.raises(InputError, match="unknown metrics"):
        evaluation.evaluate({"toy": toy_model()}, toy_scenes(), ["gradient"], ["nope"])
    with pytest.raises(InputError, match="unknown method 'nope'"):
        evaluation.method_fn("nope")
    with pytest.raises(InputError, match="unknown method 'nope' in 'ucag:nope'"):
        evaluation.method_fn("ucag:nope")


def test_method_specs_carry_parameters():
    assert split_specs("agf,agf[residual=official,no_a=true], ucag:rap[residual=official]") == [
        "agf", "agf[residual=official,no_a=true]", "ucag:rap[residual=official]"]
    assert parse_spec("agf[ridge=0,slope=none,no_a=yes]") == ("agf", {"ridge": 0, "slope": None, "no_a": True})
    model, x, targets = toy_model().double(), toy_scenes().images[:2].double(), torch.tensor([0, 1])
    import fxrel

    expected = metrics.as_maps(fxrel.explain(model, x, targets, method="lrp_epsilon", epsilon=0.5))
    assert torch.equal(evaluation.method_fn("lrp_epsilon[epsilon=0.5]")(model, x, targets), expected)
    assert not torch.equal(evaluation.method_fn("lrp_epsilon")(model, x, targets), expected)
    with pytest.raises(Exception, match="no parameter.*gamma"):
        evaluation.method_fn("lrp_epsilon[gamma=1]")
    with pytest.raises(InputError, match="no parameter.*alpha"):
        evaluation.method_fn("grad_cam[alpha=1]")
    with pytest.raises(InputError, match="unclosed"):
        evaluation.method_fn("agf[no_a=true")


def _eval_argv(out: Path) -> list[str]:
    return ["eval", "--models", "demo-vgg", "--methods", "gradient_x_input,grad_cam,smoothgrad[samples=2]", "--metrics",
            "pointing_game,energy_pointing_game,sparseness,insertion,faithfulness,stability", "--images", "5",
            "--json", str(out), "-q"]


def test_torchrun_two_processes_reproduce_the_single_process_table(tmp_path):
    """`fxrel eval` under torchrun (gloo, 2 CPU processes, DistributedSampler shards, gather to rank 0) and with
    another batch size: the same figure for every metric, the random ones (faithfulness, max-sensitivity, SmoothGrad)
    included, to floating-point rounding."""
    pytest.importorskip("fxrel.demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single, double, small = tmp_path / "single.json", tmp_path / "double.json", tmp_path / "small.json"
    for argv in (_eval_argv(single), [*_eval_argv(small), "--batch-size", "3"]):
        run = subprocess.run([sys.executable, "-m", "fxrel.cli", *argv], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "fxrel.cli", *_eval_argv(double)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "2 processes" in run.stdout and run.stdout.count("PG(L)") == 1   # only rank 0 reports
    a = json.loads(single.read_text())
    assert len(a["rows"]) == 3
    for other in (json.loads(double.read_text()), json.loads(small.read_text())):
        assert len(other["rows"]) == 3
        for row_a, row_b in zip(a["rows"], other["rows"]):
            for metric in a["metrics"]:
                assert row_b[metric] == pytest.approx(row_a[metric], rel=1e-6, abs=1e-9), (row_a["method"], metric)


def test_abpc_and_road_in_the_evaluation_are_the_metrics_on_each_pair():
    """The evaluation's ABPC and ROAD columns are fxrel.metrics.region_perturbation / road on the pair alone,
    with ROAD's noise keyed by the pair (so a pair scores the same in any chunk)."""
    scenes, model = toy_scenes(), toy_model()
    result = evaluation.evaluate({"toy": model}, scenes, ["gradient_x_input"], ["abpc", "road"], batch_size=3)
    (i, c), = [(i, c) for i in range(5) for c in scenes.labels[i].nonzero().flatten().tolist()][-1:]
    x, t = scenes.images[i:i + 1], torch.tensor([c])
    maps = evaluation.method_fn("gradient_x_input")(model, x, t)
    abpc = metrics.region_perturbation(model, x, maps, t, patch=3, patches_per_step=4, score="sigmoid")["abpc"]
    road = metrics.road(model, x, maps, t, percentages=evaluation.ROAD_PERCENTAGES, score="sigmoid",
                        keys=[(i, c)])["difference"]
    assert result.records[("toy", "gradient_x_input", "abpc")][(i, c)][0] == pytest.approx(float(abpc), abs=1e-6)
    assert result.records[("toy", "gradient_x_input", "road")][(i, c)][0] == pytest.approx(float(road), abs=1e-6)
    assert "road" not in evaluation.DEFAULT_METRICS and "abpc" in evaluation.DEFAULT_METRICS


def test_eval_scores_stored_maps_as_it_scores_fresh_ones(tmp_path, monkeypatch, capsys):
    """`fxrel eval --save-maps` stores each pair's maps once; `--maps` scores them without explaining (the method
    is never called) to the same figures; maps of other scenes are refused (a missing pair, or a recorded score
    the model does not give)."""
    pytest.importorskip("fxrel.demo")
    from fxrel.cli import main

    argv = ["eval", "--models", "demo-vgg", "--methods", "gradient_x_input,smoothgrad[samples=2]", "--metrics",
            "pointing_game,faithfulness,class_correlation,abpc", "--images", "3", "--batch-size", "4", "-q"]
    fresh, saved, read = tmp_path / "fresh.json", tmp_path / "saved.json", tmp_path / "read.json"
    maps = tmp_path / "maps"
    assert main([*argv, "--json", str(fresh)]) == 0
    assert main([*argv, "--json", str(saved), "--save-maps", str(maps)]) == 0
    assert (maps / "demo-vgg" / "index.jsonl").is_file()

    def no_explaining(*args, **kwargs):
        raise AssertionError("the method ran although its maps are stored")

    monkeypatch.setattr(evaluation, "explain", no_explaining)
    assert main([*argv, "--json", str(read), "--maps", str(maps)]) == 0
    a = json.loads(fresh.read_text())
    for other in (json.loads(saved.read_text()), json.loads(read.read_text())):
        for row_a, row_b in zip(a["rows"], other["rows"]):
            for metric in a["metrics"]:
                assert row_b[metric] == pytest.approx(row_a[metric], rel=1e-6, abs=1e-9), (row_a["method"], metric)
    capsys.readouterr()
    assert main([*argv, "--seed", "5", "--maps", str(maps)]) == 2
    err = capsys.readouterr().err     # other scenes: a pair the store lacks, or one whose score differs
    assert "holds no gradient_x_input map for (image, class)" in err or "other images or another model" in err
