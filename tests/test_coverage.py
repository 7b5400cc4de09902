"""The model-zoo coverage report (fxrel.coverage, `fxrel models`): the checks on models that pass and fail, the
stage a failure is reported at with its first error line, the peer columns, and the table/JSON output."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from fxrel import coverage
from fxrel.cli import main


def test_a_supported_model_passes_every_check_and_zennit_conserves_too():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = coverage.check_model(model, "tv-resnet18", size=32, peers=True)
    assert report.passed and report.error == ""
    # the checks run on a float64 eval copy: the user's model keeps its dtype, mode and values
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert report.gradient_error < 1e-10 and report.lrp0_error < 1e-10
    assert report.peers["zennit"] is True       # bias-free ReLU nets: LRP-0 is gradient × input, which conserves
    assert report.peers["captum"] in (True, False, None)


def test_a_fixed_size_model_is_checked_at_its_input_size():
    """timm's ``fixed_input_size`` (BoTNets: position tables built for 256 px) wins over its ``min_input_size``."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model.pretrained_cfg = {"input_size": (3, 40, 40), "min_input_size": (3, 32, 32), "fixed_input_size": True}
    assert coverage._smallest_input(model) == 40
    model.pretrained_cfg = {"input_size": (3, 40, 40), "min_input_size": (3, 32, 32)}
    assert coverage._smallest_input(model) == 32


class _Cumulative(nn.Module):
    """A cumulative sum along the width: outside the canonical op set."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).cumsum(3)
        return self.head(h.mean((2, 3)))


def test_an_unsupported_op_fails_at_canonicalisation_with_its_node_named():
    report = coverage.check_model(_Cumulative(), "cumulative", size=8)
    assert report.results == {"captured": True, "canonical": False, "gradient": None, "lrp0": None, "lrp_eps": None}
    assert report.error.startswith("canonical: UnsupportedOpError") and "cumsum" in report.error
    assert not report.passed


class _DetachedBranch(nn.Module):
    """``s − s.detach()`` is zero, so the function is ``1 + 3e-5·head(pool(conv x))``; autograd differentiates the
    non-detached ``s`` and is off. The gradient, about 1e-7 of the logit's size, drowns in rounding at a
    finite-difference step of 1e-6 (relative 1e-3) and is exact at larger steps (the function is linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, bias=False), nn.Linear(4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.conv(x).mean((2, 3)))
        s = torch.tanh(z)
        return 1 + 3e-5 * z + (s - s.detach())


def test_finite_differences_decide_when_autograd_is_off_at_the_step_that_suits_the_model():
    torch.manual_seed(0)
    report = coverage.check_model(_DetachedBranch(), "detached", size=8)
    assert report.gradient_error > 1e-2                 # autograd and fxrel disagree …
    assert report.results["gradient"] is True           # … and the finite differences side with fxrel
    assert "autograd's own gradient is off" in report.note and "step 1e-06" not in report.note


def _rows(leak: float, size: float) -> list:
    from fxrel.explainer import AuditRow
    return [AuditRow("a", "conv", "m", "Epsilon(epsilon=0)", "lrp_0", 1.0, 1.0 + leak * size, size, size),
            AuditRow("b", "add", "m", "Norm(stabilizer=0)", "lrp_0", 1.0, 1.0, size, size)]


@pytest.mark.parametrize("leak, size, holds", [(1e-16, 1e17, True), (1e-6, 1e17, False), (1e-16, 10.0, False)])
def test_an_ill_conditioned_lrp0_sum_is_decided_by_the_local_audit(monkeypatch, leak, size, holds):
    """Where Σ|R| inside the net outgrows what float64 resolves (10^17 × the logit), every rule conserving to rounding
    decides the check (noted); a leaking rule fails it; a well-conditioned net is not second-guessed (False: the sum
    at the input stands)."""
    monkeypatch.setattr(coverage.Explainer, "conservation_audit", lambda self, x, target: _rows(leak, size))
    report = coverage.ModelReport("m")
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    assert coverage._audited(report, nn.Identity().eval(), x, 0, 1.0) is holds
    assert ("ill-conditioned" in report.note) is (size > 1e6)


def test_the_family_table_counts_passes_by_timm_module_and_names_the_failures():
    passed = {"captured": True, "canonical": True, "gradient": True, "lrp0": True, "lrp_eps": True}
    rows = [coverage.ModelReport("resnet50", results=dict(passed)), coverage.ModelReport("resnet18", error="x"),
            coverage.ModelReport("vit_tiny_patch16_224", results=dict(passed)), coverage.ModelReport("no_such")]
    lines = coverage.family_table(rows, markdown=True).splitlines()
    assert lines[2] == "| resnet | 2 | 1 | 50% | resnet18 |"
    assert "| vision_transformer | 1 | 1 | 100% | - |" in lines and "| - | 1 | 0 | 0% | no_such |" in lines
    assert "| family | models | pass | % | failing |" == lines[0]


def test_constant_free_copy_zeroes_biases_and_running_means_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(2, 2))
    model[1].running_mean.fill_(0.5)
    bare = coverage.constant_free(model)
    assert all((m.bias == 0).all() for m in (bare[0], bare[1], bare[2])) and (bare[1].running_mean == 0).all()
    assert torch.equal(bare[0].weight, model[0].weight) and (model[1].running_mean == 0.5).all()


def test_constant_free_copy_zeroes_tokens_and_input_free_modules_too():
    """A class token and a position embedding (shaped [1, …]) and a module that computes from no input (a learned
    encoding of fixed features) are additive constants of a transformer: zeroed given an example input."""
    class Encoding(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 4, bias=False)

        def forward(self, n: int) -> torch.Tensor:
            return self.proj(torch.ones(1, 3, 2)).expand(n, -1, -1)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls, self.pos = nn.Parameter(torch.randn(1, 1, 4)), nn.Parameter(torch.randn(1, 3, 4))
            self.encoding, self.head = Encoding(), nn.Linear(4, 2, bias=False)

        def forward(self, x):
            tokens = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos + self.encoding(len(x))
            return self.head(tokens.mean(1))

    model, x = Tokens(), torch.randn(2, 2, 4)
    bare = coverage.constant_free(model, x)
    assert not bare.cls.any() and not bare.pos.any() and not bare.encoding.proj.weight.any()
    assert torch.equal(bare.head.weight, model.head.weight) and model.cls.any()


def test_attention_models_complement_the_cnns_and_the_family_sample_takes_one_each():
    cnns, attention = set(coverage.cnn_models()), coverage.attention_models()
    assert not cnns & set(attention) and {"vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"} <= set(attention)
    sample = coverage.family_sample()
    assert len(sample) == len(set(sample)) and "deit_tiny_patch16_224" in sample and "mixer_s16_224" in sample
    assert all(any(family in name for family in coverage.NOT_CNN) for name in sample)


def test_cnn_list_leaves_out_transformers():
    names = coverage.cnn_models()
    assert "resnet50" in names and "densenet121" in names and "efficientnet_b0" in names
    assert not any(n.startswith(("vit_", "deit", "swin", "convnext_v2_no")) and "vit" in n for n in names)
    assert len(names) > 300


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "cov.json"
    assert main(["models", "resnet10t", "--json", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "1/1 models pass all 5 checks" in text and "resnet10t" in text
    rows = json.loads(out.read_text())
    assert rows[0]["name"] == "resnet10t" and rows[0]["passed"] and rows[0]["results"]["lrp0"]


#: the three slowest of the sample (31, 24 and 19 s on 2 cores), run with -m slow: xception's separable convs are
#: efficientnet's depthwise convs, mobileone's ``0 + x`` sums and ghostnetv2's upsampled gate have no other test
SLOW_SAMPLE = {"mobileone_s0", "ghostnetv2_100", "xception41"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow if n in SLOW_SAMPLE else ())
                                  for n in coverage.SAMPLE])
def test_the_fixed_zoo_sample_passes_every_check(name):
    """One small model per family (see ``coverage.SAMPLE`` for what each exercises): exact gradient, conserving
    LRP-0 without additive constants, finite LRP-ε."""
    import timm

    torch.manual_seed(0)
    report = coverage.check_model(timm.create_model(name, pretrained=False), name)
    assert report.passed, report.error
    assert report.gradient_error < 1e-12 and report.lrp0_error < 1e-10


def test_a_journal_keeps_finished_rows_and_a_resumed_sweep_skips_them(tmp_path, monkeypatch):
    journal = tmp_path / "sweep.jsonl"
    first = coverage.coverage(["resnet10t", "no_such_model"], journal=journal)
    assert [r.name for r in first] == ["resnet10t", "no_such_model"] and first[0].passed
    assert first[1].error.startswith("create:")
    with open(journal, "a") as handle:
        handle.write('{"name": "vgg11", "size": 3')      # a sweep killed while writing its last row
    monkeypatch.setattr(coverage, "_check_owned", lambda *a, **k: pytest.fail("a journalled model was re-checked"))
    seen = []
    again = coverage.coverage(["resnet10t", "no_such_model"], journal=journal, progress=seen.append)
    assert seen == ["resnet10t", "no_such_model"]
    assert [(r.name, r.passed, r.gradient_error) for r in again] == [(r.name, r.passed, r.gradient_error)
                                                                       for r in first]
    assert set(coverage.read_journal(journal)) == {"resnet10t", "no_such_model"}


def test_an_isolated_model_whose_process_is_killed_is_a_failed_row(tmp_path, monkeypatch):
    import subprocess

    killed = subprocess.CompletedProcess([], -9, "", "loading weights\n")
    monkeypatch.setattr(coverage.subprocess, "run", lambda *a, **k: killed)
    (row,) = coverage.coverage(["resnet10t"], isolate=True, journal=tmp_path / "j.jsonl")
    assert not row.passed and row.error == "process: killed by SIGKILL (out of memory) loading weights"
    assert coverage.read_journal(tmp_path / "j.jsonl")["resnet10t"].error == row.error


def test_a_model_whose_float64_check_would_not_fit_in_memory_is_checked_in_float32(monkeypatch):
    monkeypatch.setattr(coverage, "_available_bytes", lambda: 2**20)
    (row,) = coverage.coverage(["resnet10t"])
    assert row.passed, row.error
    assert row.note.startswith("float32: float64 would need about 0 GB, 0 available")
    monkeypatch.setattr(coverage, "_available_bytes", lambda: None)   # unknown: float64
    assert coverage._check_dtype(nn.Linear(3, 2)) == (torch.float64, "")
