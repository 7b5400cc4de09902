"""The fidelity bar: do the seed methods keep their papers' promise on trained networks nobody tuned them for?

Every seed method is evaluated with its **default parameters** on the evaluation zoo (:mod:`fxrel.zoo`) next to
what a user would pick instead (LRP-ε+♭, ``epsilon_plus_flat``) and next to the base its paper compares against.
A (model, method) pair *holds* when

* ``PG ≥ 0.85 · PG(epsilon_plus_flat)`` and ``Disc ≥ Disc(epsilon_plus_flat) − 0.10``, and
* ``Disc ≥ Disc(base)`` for each of its paper's bases (CLRP vs its LRP, SGLRP vs its deep-Taylor LRP and the z⁺
  LRP it runs by default, RAP vs LRP-αβ, AGF and RSP vs Grad-CAM and gradient × input, SRD vs Grad-CAM at the last
  feature map), and, for UCAG, ``PG ≥ PG(base)`` and ``EPG ≥ EPG(base)``.

PG: pointing game over all labels; EPG: energy pointing game; Disc: :func:`fxrel.metrics.discrimination` on the
multi-object scenes. A failed comparison with a base also gives the paired difference ``Δ`` (method − base, pair by
pair) with its 95% bootstrap interval, and says *within noise* when that interval holds 0 (:mod:`fxrel.statistics`).
``fxrel fidelity --markdown docs/fidelity.md`` regenerates the table.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from fxrel.demo.models import WEIGHTS_DIR as DEMO_WEIGHTS
from fxrel.evaluation import EvalResult
from fxrel.zoo.models import WEIGHTS_DIR as ZOO_WEIGHTS

__all__ = ["REFERENCE", "SEED_METHODS", "BASES", "FIDELITY_METRICS", "Verdict", "judge", "methods_to_run",
           "model_summary", "verdict_table"]

REFERENCE = "epsilon_plus_flat"
PG_FRACTION = 0.85
DISC_MARGIN = 0.10
#: each seed method (default parameters) and the bases its paper compares it against
BASES: dict[str, tuple[str, ...]] = {
    "clrp": ("lrp_zplus_box",),
    "sglrp": ("lrp_deep_taylor", "lrp_zplus_box"),   # its paper's base and its default preset
    "rap": ("lrp_alpha_beta",),
    "agf": ("grad_cam", "gradient_x_input"),
    "rsp": ("grad_cam", "gradient_x_input"),
    "crsp": ("grad_cam", "gradient_x_input"),
    "srd": ("grad_cam",),
    "ucag:grad_cam": ("grad_cam",),
    "ucag:epsilon_plus_flat": ("epsilon_plus_flat",),
}
SEED_METHODS: tuple[str, ...] = tuple(BASES)
FIDELITY_METRICS = ("pointing_game", "energy_pointing_game", "discrimination", "class_correlation", "insertion",
                    "deletion")


def methods_to_run(seeds: Sequence[str] = SEED_METHODS) -> list[str]:
    """The reference, the seed methods and their bases, each once, in table order."""
    names = [REFERENCE]
    for seed in seeds:
        for name in (*BASES.get(seed, ()), seed):
            if name not in names:
                names.append(name)
    return names


@dataclass(frozen=True)
class Verdict:
    model: str
    method: str
    holds: bool
    failures: tuple[str, ...]   #: the conditions that failed, with their numbers


def judge(result: EvalResult, model: str, method: str) -> Verdict:
    """Whether ``method`` meets the bar on ``model`` (see the module docstring)."""
    def get(name: str, metric: str) -> float:
        return result.mean(model, name, metric)

    pg, disc, epg = get(method, "pointing_game"), get(method, "discrimination"), get(method, "energy_pointing_game")
    failures = []
    ref_pg, ref_disc = get(REFERENCE, "pointing_game"), get(REFERENCE, "discrimination")
    if not pg >= PG_FRACTION * ref_pg:
        failures.append(f"PG {pg:.2f} < {PG_FRACTION}×{ref_pg:.2f}")
    if not disc >= ref_disc - DISC_MARGIN:
        failures.append(f"Disc {disc:.2f} < {ref_disc:.2f}−{DISC_MARGIN}")
    def below_base(label: str, metric: str, value: float, base: str) -> None:
        if not value >= get(base, metric):
            d = result.difference(model, method, base, metric)
            noise = " (within noise)" if d.low <= 0 <= d.high else ""
            failures.append(f"{label} {value:.2f} < {base} {get(base, metric):.2f}: Δ {d.mean:+.3f} "
                            f"[{d.low:+.3f}, {d.high:+.3f}]{noise}")

    for base in BASES.get(method, ()):
        below_base("Disc", "discrimination", disc, base)
        if method.startswith("ucag:"):
            below_base("PG", "pointing_game", pg, base)
            below_base("EPG", "energy_pointing_game", epg, base)
    return Verdict(model, method, not failures, tuple(failures))


def model_summary(models: Sequence[str]) -> str:
    """Markdown: each model's parameters and test figures from its weights manifest."""
    manifest = {**json.loads((DEMO_WEIGHTS / "manifest.json").read_text()),
                **json.loads((ZOO_WEIGHTS / "manifest.json").read_text())}
    lines = ["| model | parameters | training steps | test F1 | exact-set accuracy | mAP |",
             "|---|---|---|---|---|---|"]
    for name in models:
        entry = manifest[name]
        test = entry["test"]
        lines.append(f"| {name} | {entry['parameters']:,} | {entry['training']['steps']} | {test['f1']:.3f} | "
                     f"{test['exact_set_accuracy']:.3f} | {test['map']:.3f} |")
    return "\n".join(lines)


def verdict_table(result: EvalResult, models: Sequence[str], seeds: Sequence[str] = SEED_METHODS) -> str:
    """Markdown: one row per seed method, one column per model, ✓ or the failed conditions."""
    lines = ["| method | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for method in seeds:
        cells = []
        for model in models:
            v = judge(result, model, method)
            cells.append("✓" if v.holds else "✗ " + "; ".join(v.failures))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    held = sum(judge(result, m, s).holds for m in models for s in seeds)
    lines.append("")
    lines.append(f"{held} of {len(models) * len(seeds)} (model, method) pairs hold.")
    return "\n".join(lines)
