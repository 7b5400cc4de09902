"""A CLI command's output files are all or nothing (fxrel.outputs): a run that fails or is interrupted part-way leaves
no new output and no temp file, and files already at the destinations byte for byte as they were.

Small inputs (tv:resnet18 at 32 px, one demo scene) keep each run around a second on CPU.
"""
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxrel import evaluation, outputs, visualize  # noqa: E402
from fxrel.cli import main  # noqa: E402
from fxrel.outputs import OutputError, OutputSet, staged_outputs  # noqa: E402

EXPLAIN = ["explain", "--model", "tv:resnet18", "--size", "32", "--method", "gradient", "--target", "0,1", "-q"]
EVAL = ["eval", "--models", "demo-vgg", "--methods", "gradient", "--metrics", "sparseness", "--images", "1", "-q"]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (temp files included: their names start with a dot) → its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fail_on_call(monkeypatch, owner, name: str, call: int, exc: BaseException) -> list:
    """Make ``owner.name`` raise ``exc`` on its ``call``-th call (1-based); returns the list of calls made."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


# --- explain --------------------------------------------------------------------------------------------------------
def test_explain_writes_every_file_on_success(tmp_path, capsys):
    out = tmp_path / "sub" / "heat.png"
    assert main([*EXPLAIN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    heat0, heat1, plan = (out.with_name(name) for name in ("heat.t0.png", "heat.t1.png", "heat.plan.txt"))
    assert set(_files(tmp_path)) == {"sub/heat.t0.png", "sub/heat.t1.png", "sub/heat.plan.txt"}   # no temp files
    for path in (heat0, heat1):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 32)
        assert f"heatmap:    {path}\n" in printed          # the final paths, not the temp files'
    assert f"rule plan:  {plan}" in printed and "Gradient" in plan.read_text()
    assert oct(heat0.stat().st_mode & 0o777) == oct(0o666 & ~outputs._umask())   # as a plain open() gives


@pytest.mark.parametrize("exc, code", [(OSError("disk full"), 1), (KeyboardInterrupt(), 130)])
def test_explain_failing_on_the_second_heatmap_leaves_nothing(tmp_path, monkeypatch, capsys, exc, code):
    calls = _fail_on_call(monkeypatch, visualize, "save_heatmap", 2, exc)
    out = tmp_path / "new" / "deeper" / "heat.png"
    assert main([*EXPLAIN, "--out", str(out)]) == code
    assert len(calls) == 2                                  # the first heatmap was written (to its temp file)
    assert list(tmp_path.iterdir()) == []                   # no heatmap, no plan, no temp file, no folder made
    assert "heatmap:" not in capsys.readouterr().out


def test_explain_failing_on_the_plan_after_both_heatmaps_leaves_nothing(tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, OutputSet, "write_text", 1, OSError("quota exceeded"))
    assert main([*EXPLAIN, "--out", str(tmp_path / "heat.png")]) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_failed_explain_keeps_existing_files_byte_for_byte(tmp_path, monkeypatch):
    (tmp_path / "heat.t0.png").write_bytes(b"an older heatmap")
    (tmp_path / "heat.plan.txt").write_text("an older plan\n")
    os.chmod(tmp_path / "heat.plan.txt", 0o640)
    before = _files(tmp_path)
    modes = {name: (tmp_path / name).stat().st_mode for name in before}
    _fail_on_call(monkeypatch, visualize, "save_heatmap", 2, OSError("disk full"))
    assert main([*EXPLAIN, "--out", str(tmp_path / "heat.png")]) == 1
    assert _files(tmp_path) == before                       # neither truncated nor deleted, heat.t1.png not made
    assert {name: (tmp_path / name).stat().st_mode for name in before} == modes


def test_a_successful_explain_replaces_existing_files(tmp_path):
    (tmp_path / "heat.t0.png").write_bytes(b"an older heatmap")
    assert main([*EXPLAIN, "--out", str(tmp_path / "heat.png")]) == 0
    assert set(_files(tmp_path)) == {"heat.t0.png", "heat.t1.png", "heat.plan.txt"}
    assert (tmp_path / "heat.t0.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("extra, needle", [
    (["--target", "3,3"], "same file"),                     # one target twice: one heatmap path twice
    (["--target", "3", "--plan", "{out}"], "same file"),    # the plan onto the heatmap
    (["--target", "3", "--plan", "{tmp}/./h.png"], "same file"),   # spelled differently, the same file
    (["--target", "3", "--plan", "{tmp}"], "folder"),        # a folder where the plan should go
])
def test_explain_outputs_that_clash_are_refused_before_any_work(tmp_path, monkeypatch, capsys, extra, needle):
    import fxrel.cli

    monkeypatch.setattr(fxrel.cli, "_prepare_model", lambda args: pytest.fail("the model was loaded"))
    out = tmp_path / "h.png"
    extra = [e.format(out=out, tmp=tmp_path) for e in extra]
    argv = [a for a in EXPLAIN if a not in ("--target", "0,1")]
    assert main([*argv, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("fxrel: error: ") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# --- eval (--markdown and --json) -----------------------------------------------------------------------------------
def test_eval_failing_on_the_second_table_leaves_nothing_and_keeps_an_old_one(tmp_path, monkeypatch, capsys):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    js.write_text('{"old": true}\n')
    before = _files(tmp_path)
    _fail_on_call(monkeypatch, OutputSet, "write_text", 2, OSError("disk full"))
    assert main([*EVAL, "--markdown", str(md), "--json", str(js)]) == 1
    assert _files(tmp_path) == before                       # no t.md, t.json as it was, no temp file
    assert "wrote" not in capsys.readouterr().out


def test_eval_interrupted_while_moving_files_into_place_leaves_nothing(tmp_path, monkeypatch):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    md.write_text("old markdown\n")
    before = _files(tmp_path)
    real_replace, moves = os.replace, []

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            moves.append(dst)
            if len(moves) == 2:
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert main([*EVAL, "--markdown", str(md), "--json", str(js)]) == 130
    assert len(moves) == 2                                  # t.md was already in place when t.json's move failed
    assert _files(tmp_path) == before                       # … and is the old one again


def test_eval_writes_both_tables(tmp_path, capsys):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    assert main([*EVAL, "--markdown", str(md), "--json", str(js)]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {md}\nwrote {js}\n")
    assert "| demo-vgg |" in md.read_text() and json.loads(js.read_text())["rows"][0]["method"] == "gradient"
    assert set(_files(tmp_path)) == {"t.md", "t.json"}


def test_eval_tables_onto_one_file_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("the evaluation ran"))
    assert main([*EVAL, "--markdown", str(tmp_path / "t"), "--json", str(tmp_path / "t")]) == 2
    assert "--json" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# --- demo, graph ----------------------------------------------------------------------------------------------------
def test_demo_interrupted_while_drawing_leaves_nothing_and_keeps_the_old_grid(tmp_path, monkeypatch):
    out = tmp_path / "demo.png"
    out.write_bytes(b"the old grid")
    _fail_on_call(monkeypatch, visualize, "save_grid", 1, KeyboardInterrupt())
    assert main(["demo", "--images", "1", "--methods", "gradient", "--out", str(out), "-q"]) == 130
    assert _files(tmp_path) == {"demo.png": b"the old grid"}


def test_graph_out_onto_a_folder_is_refused_before_any_work(tmp_path, capsys):
    assert main(["graph", "tv:resnet18", "--method", "lrp_0", "--size", "16", "--format", "plan", "--out",
                 str(tmp_path), "-q"]) == 2
    assert "folder" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# --- OutputSet ------------------------------------------------------------------------------------------------------
def test_output_set_commits_together_and_discards_on_any_exception(tmp_path):
    with staged_outputs() as out:
        out.write_text(tmp_path / "a.txt", "a")
        out.write(tmp_path / "b" / "b.bin", lambda tmp: Path(tmp).write_bytes(b"b"))
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["b"]
        assert len(list(tmp_path.glob(".a.txt.*.tmp"))) == 1   # staged next to its destination
        assert not (tmp_path / "a.txt").exists()            # nothing in place before the block ends
    assert _files(tmp_path) == {"a.txt": b"a\n", "b/b.bin": b"b"}

    with pytest.raises(KeyboardInterrupt), staged_outputs() as out:
        out.write_text(tmp_path / "a.txt", "new a")
        out.write_text(tmp_path / "c" / "d" / "c.txt", "c")
        raise KeyboardInterrupt
    assert _files(tmp_path) == {"a.txt": b"a\n", "b/b.bin": b"b"} and not (tmp_path / "c").exists()


def test_output_set_refuses_one_file_twice(tmp_path):
    out = staged_outputs()
    out.claim(tmp_path / "x.txt", "--markdown")
    with pytest.raises(OutputError, match=r"--json .*x\.txt is the same file as --markdown"):
        out.claim(tmp_path / "sub" / ".." / "x.txt", "--json")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    out.claim(tmp_path / "sub" / "y.txt")
    with pytest.raises(OutputError, match="same file"):
        out.claim(tmp_path / "link" / "y.txt")              # through a linked folder
    out.write_text(tmp_path / "x.txt", "x")
    with pytest.raises(OutputError, match="written twice"):
        out.write_text(tmp_path / "x.txt", "x")
    out.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "sub"]


def test_a_failed_move_restores_every_replaced_file(tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text(f"old {name}\n")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    before = {p.name: (p.is_symlink(), p.read_bytes()) for p in tmp_path.iterdir()}
    real_replace, moves = os.replace, []

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            moves.append(dst)
            if len(moves) == 4:
                raise OSError("device gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="device gone"), staged_outputs() as out:
        for name in ("link", "a", "new", "b"):
            out.write_text(tmp_path / name, f"new {name}")
    assert {p.name: (p.is_symlink(), p.read_bytes()) for p in tmp_path.iterdir()} == before
    assert os.readlink(tmp_path / "link") == str(tmp_path / "a")
