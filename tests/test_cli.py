"""Tests for the command-line interface (fxrel.cli) and the scripts in examples/.

Small inputs (16–32 px) keep every relevance-graph build around a second on CPU.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxrel  # noqa: E402
from fxrel import cli  # noqa: E402
from fxrel.cli import CLIError, main, parse_params, parse_targets  # noqa: E402
from fxrel.text import parse_value  # noqa: E402

MODEL = ["--model", "tv:resnet18", "--size", "32"]


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fxrel: error: ")


# --- explain --------------------------------------------------------------------------------------------------------
def test_explain_writes_png_and_plan(tmp_path, capsys):
    out = tmp_path / "sub" / "heat.png"
    code = main(["explain", *MODEL, "--method", "epsilon_plus_flat", "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = tmp_path / "sub" / "heat.plan.txt"
    assert out.is_file() and plan.is_file()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (64, 32)     # image | overlay, side by side
    plan_text = plan.read_text()
    assert "Flat()" in plan_text and "ZPlus" in plan_text and "conv1" in plan_text
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temp files left
    for word in ("tv:resnet18", "epsilon_plus_flat", "prediction: class", "relevance sum", "target logit",
                 str(out), str(plan)):
        assert word in captured.out


def test_explain_image_file_targets_and_params(tmp_path, capsys):
    img = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (200, 30, 60)).save(img)
    out, plan = tmp_path / "h.png", tmp_path / "rules.txt"
    code = main(["explain", str(img), *MODEL, "--method", "lrp_epsilon", "--param", "epsilon=1e-3",
                 "--target", "3,top-2", "--out", str(out), "--plan", str(plan), "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "h.t3.png").is_file() and (tmp_path / "h.top2.png").is_file() and plan.is_file()
    assert not out.exists()
    assert "Epsilon(epsilon=0.001" in plan.read_text()
    assert "class 3:" in captured.out and "(top2)" in captured.out and "{'epsilon': 0.001}" in captured.out


def test_unknown_method_exits_2(tmp_path, capsys):
    out = tmp_path / "h.png"
    code = main(["explain", *MODEL, "--method", "lrp_nonexistent", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "lrp_nonexistent" in err and "epsilon_plus_flat" in err   # names it and lists the valid ones
    _no_traceback(err)
    assert not out.exists()


def test_class_index_out_of_range_exits_2(tmp_path, capsys):
    out = tmp_path / "h.png"
    code = main(["explain", *MODEL, "--method", "gradient", "--target", "1000", "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "1000" in err and "out of range" in err
    _no_traceback(err)
    assert list(tmp_path.iterdir()) == []                    # neither PNG nor plan was written


def test_missing_image_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    code = main(["explain", str(missing), *MODEL, "--method", "gradient", "--out", str(tmp_path / "h.png")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err
    _no_traceback(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, needle", [
    (["explain", "--model", "tv:no_such_net", "--method", "gradient"], "no_such_net"),
    (["explain", "--model", "timm:no_such_net", "--method", "gradient"], "no_such_net"),
    (["explain", *MODEL, "--method", "gradient", "--param", "epsilon"], "key=value"),
    (["explain", *MODEL, "--method", "gradient", "--param", "epsilon=1"], "epsilon"),
    (["explain", *MODEL, "--method", "gradient", "--target", "best"], "best"),
    (["explain", "--model", "tv:resnet18", "--size", "8", "--method", "gradient"], "size"),
    (["explain", *MODEL, "--method", "gradient", "--weights", "/nonexistent/w.pt"], "/nonexistent/w.pt"),
    (["explain", "--method", "gradient"], "--model"),
    (["explain", *MODEL, "--method", "gradient", "--size", "zero"], "zero"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_arguments_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    _no_traceback(err)


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    assert "explain" in capsys.readouterr().out
    assert main([]) == 2


# --- weights --------------------------------------------------------------------------------------------------------
def test_load_weights_formats_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    model = cli.build_model("tv:resnet18", num_classes=10)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        fresh = cli.build_model("tv:resnet18", num_classes=10)
        assert cli.load_weights(fresh, str(tmp_path / name)) == []
        assert torch.equal(fresh.fc.bias, state["fc.bias"])

    bad = dict(state)
    del bad["fc.bias"]
    bad["head.extra"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CLIError, match=r"missing keys: fc\.bias.*unexpected keys: head\.extra"):
        cli.load_weights(cli.build_model("tv:resnet18", num_classes=10), str(tmp_path / "bad.pt"))
    warnings = cli.load_weights(cli.build_model("tv:resnet18", num_classes=10), str(tmp_path / "bad.pt"),
                                strict=False)
    assert any("fc.bias" in w for w in warnings) and any("head.extra" in w for w in warnings)
    with pytest.raises(CLIError, match=r"shape mismatch for fc\.weight.*--num-classes"):
        cli.load_weights(cli.build_model("tv:resnet18"), str(tmp_path / "w.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CLIError, match="cannot read weights"):
        cli.load_weights(model, str(tmp_path / "junk.pt"))


# --- methods / graph ------------------------------------------------------------------------------------------------
def test_methods_lists_epsilon_plus_flat(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "epsilon_plus_flat" in out and "gradient" in out and "lrp_0" in out


def test_graph_code_prints_convolution(capsys):
    assert main(["graph", "timm:resnet10t", "--method", "lrp_epsilon", "--size", "16", "--format", "code",
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "def forward" in out and "convolution" in out


def test_graph_plan_and_layers_to_file(tmp_path, capsys):
    plan, layers = tmp_path / "plan.txt", tmp_path / "layers.txt"
    assert main(["graph", "tv:resnet18", "--method", "lrp_0", "--size", "16", "--format", "plan",
                 "--out", str(plan), "-q"]) == 0
    assert main(["graph", "tv:resnet18", "--method", "lrp_0", "--size", "16", "--format", "layers",
                 "--target", "5", "--out", str(layers), "-q"]) == 0
    assert "conv1" in plan.read_text()
    text = layers.read_text()
    assert "relevance sum per image" in text and "convolution_default" in text
    assert str(plan) in capsys.readouterr().out


def test_graph_profile_prints_the_rule_by_rule_table(capsys):
    assert main(["graph", "tv:resnet18", "--method", "epsilon_plus_flat", "--size", "16", "--format", "profile",
                 "--target", "5", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["role", "rule", "kind", "nodes"] and lines[-1].startswith("total")
    assert any(line.startswith("relevance") and "ZPlus" in line for line in lines)


def test_graph_audit_prints_every_rule_application_with_its_leak(capsys):
    assert main(["graph", "tv:resnet18", "--method", "lrp_0", "--size", "16", "--format", "audit", "--target", "5",
                 "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["node", "kind", "module", "rule"] and lines[0].split()[-1] == "leak"
    rows = [line.split() for line in lines[2:]]
    assert rows[0][0] == "convolution_default" and any(r[0].startswith("add_tensor") for r in rows)


def test_graph_dot(capsys):
    pytest.importorskip("fxrel.graphs.export")
    assert main(["graph", "tv:resnet18", "--method", "gradient", "--size", "16", "--format", "dot", "-q"]) == 0
    assert "digraph" in capsys.readouterr().out


def test_graph_svg_and_json(tmp_path, capsys):
    svg, js = tmp_path / "g.svg", tmp_path / "g.json"
    assert main(["graph", "tv:resnet18", "--method", "epsilon_plus_flat", "--size", "16", "--format", "svg",
                 "--out", str(svg), "-q"]) == 0
    assert main(["graph", "tv:resnet18", "--method", "epsilon_plus_flat", "--size", "16", "--format", "json",
                 "--out", str(js), "-q"]) == 0
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and "ZPlus" in text   # rule labels are drawn
    data = json.loads(js.read_text())
    roles = {n["role"] for n in data["nodes"]}
    assert {"forward", "relevance"} <= roles and data["edges"] and data["stops"] == ["x"]
    names = {n["name"] for n in data["nodes"]}
    assert all(e["source"] in names and e["target"] in names for e in data["edges"])


def test_graph_of_posthoc_method_is_refused(capsys):
    assert main(["graph", "tv:resnet18", "--method", "ucag", "--size", "16", "-q"]) == 2
    assert "post-hoc" in capsys.readouterr().err


def test_graph_of_a_cam_is_its_gradient_sweep_with_the_map_at_the_layer(capsys):
    assert main(["graph", "tv:resnet18", "--method", "grad_cam", "--size", "32", "--format", "plan", "-q"]) == 0
    plan = capsys.readouterr().out
    assert "Gradient" in plan and "conv" in plan
    assert main(["graph", "tv:resnet18", "--method", "grad_cam", "--size", "32", "--format", "code", "-q"]) == 0
    code = capsys.readouterr().out
    assert "einsum" in code and "interpolate" in code   # Grad-CAM's weighted sum and the resize, in the graph


# --- demo models, demo grid, eval -----------------------------------------------------------------------------------
def test_explain_demo_model_with_posthoc_and_rule_methods(tmp_path, capsys):
    out = tmp_path / "cam.png"
    assert main(["explain", "--model", "demo-resnet", "--method", "ucag", "--target", "top2", "--out", str(out),
                 "-q"]) == 0
    captured = capsys.readouterr().out
    assert "trained demo weights" in captured and "demo scene" in captured and "(top2)" in captured
    with Image.open(out) as im:
        assert im.size == (128, 64)   # image | overlay at the demo's 64 px
    assert not (tmp_path / "cam.plan.txt").exists()   # post-hoc: no rule plan
    out = tmp_path / "lrp.png"
    assert main(["explain", "--model", "demo-vgg", "--method", "lrp_epsilon", "--out", str(out), "-q"]) == 0
    assert (tmp_path / "lrp.plan.txt").is_file() and "ratio" in capsys.readouterr().out


def test_unknown_demo_model_is_named(capsys):
    assert main(["explain", "--model", "demo-nope", "--method", "gradient", "-q"]) == 2
    assert "demo-vgg" in capsys.readouterr().err


def test_demo_grid(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--images", "2", "--methods", "gradient_x_input,grad_cam,ucag:grad_cam", "--out", str(out),
                 "-q"]) == 0
    text = capsys.readouterr().out
    rows = int(text.split("; ")[1].split(" rows")[0])
    from fxrel.demo import make_scenes

    assert rows == int(make_scenes(2, seed=0, split="test").labels.sum())
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] / rows * 3   # 4 columns (input + 3 methods)
    assert main(["demo", "--methods", "gradient,nope", "--out", str(out), "-q"]) == 2
    assert "nope" in capsys.readouterr().err


def test_eval_prints_and_writes_the_table(tmp_path, capsys):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    assert main(["eval", "--models", "demo-vgg", "--methods", "gradient,grad_cam", "--metrics",
                 "pointing_game,sparseness", "--images", "3", "--markdown", str(md), "--json", str(js), "-q"]) == 0
    out = capsys.readouterr().out
    assert "PG(L)↑" in out and "Gini↑" in out and "demo-vgg" in out
    page = md.read_text()
    assert page.count("| demo-vgg |") == 2 and "metric seed 0" in page and "95% bootstrap interval" in page
    assert page.startswith("Made by `fxrel eval --models demo-vgg --methods gradient,grad_cam --metrics ")
    assert f"torch {torch.__version__}" in page and f"fxrel {fxrel.__version__}" in page
    assert re.search(r"\| \d\.\d{3}±\d\.\d{3}\*? \|", page)
    rows = json.loads(js.read_text())["rows"]
    assert [r["method"] for r in rows] == ["gradient", "grad_cam"]
    assert all(0 <= r["pointing_game"] <= 1 and 0 <= r["sparseness"] <= 1 for r in rows)
    assert all(r["ci95"]["sparseness"][0] <= r["sparseness"] <= r["ci95"]["sparseness"][1] for r in rows)
    assert main(["eval", "--metrics", "bogus", "-q"]) == 2
    assert "bogus" in capsys.readouterr().err


# --- parsing helpers ------------------------------------------------------------------------------------------------
def test_parse_helpers():
    assert parse_value("1e-3") == 1e-3 and parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("true") is True and parse_value("False") is False and parse_value("abc") == "abc"
    assert parse_params(["epsilon=1e-3", "gamma=0.5"]) == {"epsilon": 1e-3, "gamma": 0.5}
    assert parse_targets("top1") == ["top1"]
    assert parse_targets("3, top-2,top5") == [3, "top2", "top5"]
    for bad in ("top0", "x", "1,,2"):
        with pytest.raises(CLIError):
            parse_targets(bad)
    with pytest.raises(CLIError, match="twice"):
        parse_params(["a=1", "a=2"])


# --- entry points ---------------------------------------------------------------------------------------------------
def test_module_entry_point_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "fxrel.cli", "explain", *MODEL, "--method", "no_such_method",
                           "--out", str(tmp_path / "h.png")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "no_such_method" in proc.stderr
    _no_traceback(proc.stderr)
    assert not (tmp_path / "h.png").exists()


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_example_explain_resnet(tmp_path, capsys):
    example = _load_example("explain_resnet")
    assert example.main(["--out-dir", str(tmp_path / "out"), "--size", "32"]) == 0
    out = capsys.readouterr().out
    grid = tmp_path / "out" / "explain_resnet.png"
    assert grid.is_file()
    with Image.open(grid) as im:
        assert im.format == "PNG"
    for method in ("gradient", "lrp_0", "epsilon_plus_flat"):
        assert method in out
    assert "relevance sum" in out and "target logit" in out


def test_example_inspect_relevance_graph(tmp_path, capsys):
    example = _load_example("inspect_relevance_graph")
    assert example.main(["--out-dir", str(tmp_path), "--size", "32"]) == 0
    assert "acyclic: True" in capsys.readouterr().out
    plan = (tmp_path / "rule_plan.txt").read_text()
    assert "layer4.0.conv1" in plan and "Epsilon(epsilon=0.25)" in plan
    assert (tmp_path / "relevance_graph.dot").read_text().startswith("digraph")
    assert "def forward" in (tmp_path / "relevance_graph.py").read_text()


def test_example_evaluate_ucag(tmp_path, capsys):
    example = _load_example("evaluate_ucag")
    assert example.main(["--images", "2", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ucag(grad_cam)" in out and "PG" in out and (tmp_path / "evaluate_ucag.png").is_file()


def test_example_apop_demo(capsys):
    example = _load_example("apop_demo")
    example.main(["--scenes", "4", "--models", "demo-vgg"])
    out = capsys.readouterr().out
    assert "chance" in out and "APOP & relu" in out and out.count("demo-vgg") == 7


def test_example_srd_layers(tmp_path, capsys):
    """Every layer's map sums to the same total with the first convolution's bias shared; absorbed (the default),
    the input's total differs and the hidden layers' still agree."""
    example = _load_example("srd_layers")
    for input_bias in ("shared", "absorbed"):
        assert example.main(["--images", "1", "--out-dir", str(tmp_path), "--input-bias", input_bias]) == 0
        out = capsys.readouterr().out
        sums = {line.split(":")[0]: json.loads(line.split("Σ per pair ")[1])
                for line in out.splitlines() if line.startswith("SRD-")}
        assert list(sums) == ["SRD-input", "SRD-high", "SRD-low"]
        assert sums["SRD-high"] == pytest.approx(sums["SRD-low"], abs=1e-3)
        assert (sums["SRD-input"] == pytest.approx(sums["SRD-low"], abs=1e-3)) == (input_bias == "shared")
    assert (tmp_path / "srd_layers.png").is_file()


def test_fidelity_writes_the_page_and_judges_against_the_reference_and_the_base(tmp_path, capsys):
    out = tmp_path / "fidelity.md"
    assert main(["fidelity", "--models", "zoo-resnet", "--methods", "clrp", "--images", "2", "--metrics",
                 "pointing_game,energy_pointing_game,discrimination", "--markdown", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    for method in ("epsilon_plus_flat", "lrp_zplus_box", "clrp"):   # the reference, the paper's base, the method
        assert method in printed
    page = out.read_text()
    assert page.startswith("# Seed methods on the evaluation zoo") and "## The bar" in page and "zoo-resnet" in page
    assert "(model, method) pairs hold" in page
    assert "Made by `fxrel fidelity --models zoo-resnet --methods clrp" in page
    assert main(["fidelity", "--methods", "gradient", "-q"]) == 2   # not a seed method: a usage error
    assert "unknown methods gradient" in capsys.readouterr().err
