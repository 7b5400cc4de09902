"""fxrel.fidelity: the bar's arithmetic on hand-made evaluation records."""
from __future__ import annotations

from fxrel.evaluation import EvalResult
from fxrel.fidelity import BASES, REFERENCE, judge, methods_to_run, verdict_table


def _result(values: dict[str, dict[str, float]]) -> EvalResult:
    result = EvalResult(metrics=("pointing_game", "energy_pointing_game", "discrimination"))
    for method, metrics in values.items():
        for metric, value in metrics.items():
            result.records[("m", method, metric)] = {(0, 0): (value, True)}
    return result


def _row(pg: float, epg: float, disc: float) -> dict[str, float]:
    return {"pointing_game": pg, "energy_pointing_game": epg, "discrimination": disc}


def test_the_bar_compares_with_the_reference_and_the_papers_bases():
    result = _result({REFERENCE: _row(1.0, 0.5, 0.9), "lrp_zplus_box": _row(1.0, 0.5, 0.7),
                      "clrp": _row(0.86, 0.4, 0.81), "rap": _row(0.84, 0.4, 0.95), "lrp_alpha_beta": _row(1, 1, 0.96),
                      "grad_cam": _row(0.9, 0.3, 0.6), "ucag:grad_cam": _row(0.9, 0.29, 0.8)})
    assert judge(result, "m", "clrp").holds          # PG ≥ 0.85 · 1.0, Disc ≥ 0.9 − 0.1 and ≥ its LRP's 0.7
    rap = judge(result, "m", "rap")
    assert not rap.holds and len(rap.failures) == 2   # PG below 0.85, Disc below its base's
    ucag = judge(result, "m", "ucag:grad_cam")
    assert not ucag.holds and any("EPG" in f for f in ucag.failures)   # UCAG must not lose energy PG to its base
    assert "rap" in verdict_table(result, ["m"], ["clrp", "rap"]) and "1 of 2" in verdict_table(result, ["m"],
                                                                                             ["clrp", "rap"])


def test_every_seed_method_runs_with_its_bases_and_the_reference():
    names = methods_to_run()
    assert names[0] == REFERENCE and len(names) == len(set(names))
    for seed, bases in BASES.items():
        assert seed in names and all(names.index(b) < names.index(seed) for b in bases)


def test_a_failed_comparison_with_a_base_says_whether_it_is_within_noise():
    """Δ is the paired difference: a method a hair below its base on every pair is significantly below; one that
    is below on the mean but above on half the pairs is within noise."""
    result = EvalResult(metrics=("pointing_game", "energy_pointing_game", "discrimination"))
    pairs = [(i, 0) for i in range(20)]

    def put(method: str, disc: list[float]) -> None:
        result.records[("m", method, "pointing_game")] = {p: (1.0, True) for p in pairs}
        result.records[("m", method, "energy_pointing_game")] = {p: (0.5, True) for p in pairs}
        result.records[("m", method, "discrimination")] = {p: (d, True) for p, d in zip(pairs, disc)}

    base = [0.5 + 0.02 * i for i in range(20)]
    put(REFERENCE, base)
    put("grad_cam", base)
    put("srd", [d - 0.001 for d in base])
    srd = judge(result, "m", "srd")
    assert not srd.holds and "Δ -0.001" in srd.failures[0] and "within noise" not in srd.failures[0]
    put("srd", [d + (0.05 if i % 2 else -0.06) for i, d in enumerate(base)])
    srd = judge(result, "m", "srd")
    assert not srd.holds and "within noise" in srd.failures[0]
