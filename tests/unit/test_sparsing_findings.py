"""Notebook 04's sentences and verdicts, computed from small synthetic results with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from babel_lib.sparsing import claims
from babel_lib.sparsing.scaling import PowerLaw, fit_runs
from babel_lib.sparsing.studies import (
    LanguageParams,
    LanguageResult,
    ParetoResult,
    WindowSums,
    by_language,
)
from babel_lib.sparsing.trends import ScalingResult


def window_sums(ratios, layer_ratios, n=4, predicted=10, counted=100, width=10) -> WindowSums:
    """n identical windows (so every bootstrap interval is the point itself): dense loss 1 per token, and per
    evaluation the given perplexity ratio and per-layer activation ratios."""
    return WindowSums(dense=np.full(n, float(predicted)),
                      nll=np.array([[predicted * (1 + math.log(r))] * n for r in ratios]),
                      active=np.array([[[a * counted * width for a in layers]] * n for layers in layer_ratios]),
                      counted=np.full(n, counted), widths=np.full(len(layer_ratios[0]), width), predicted=predicted)


def pareto_result(topk=(1.30, 1.10), fat=(1.20, 1.05), converged=True, model="m") -> ParetoResult:
    """Dense perplexity e (loss 1); CETT's PPL-1% point at activation ratio 0.4 with ratio 1.01 on both window sets
    (full set: layers 0.5, 0.1, 0.6); each baseline a straight line from (0.3, first) to (0.5, second) in
    perplexity ratio on the sweep set, so its value at 0.4 is their mean."""
    points, ratios, acts = [("cett", 0.5)], [1.01], [[0.4]]
    for method, pair in (("topk", topk), ("fat", fat)):
        for value, ratio, act in zip((0.1, 0.2), pair or (), (0.3, 0.5)):  # None: no sweep of that method
            points, ratios, acts = points + [(method, value)], ratios + [ratio], acts + [[act]]
    return ParetoResult(model=model, p=1.0, tol=1e-3, cett=0.5, ppl_ratio=1.01, converged=converged, evaluations=3,
                        sweep_evaluations=6, dense_loss=1.0, points=pd.DataFrame(points, columns=["method", "value"]),
                        full=window_sums([1.01], [[0.5, 0.1, 0.6]]), full_cett=[0.5],
                        sweep=window_sums(ratios, acts, n=2), languages=["en", "ja"], frequency=np.zeros((2, 3, 10)),
                        thresholds=np.zeros(3), replicates=50)


def test_pareto_findings_compare_the_baselines_at_cetts_activation_ratio():
    result = pareto_result()
    assert result.activation_ratio == pytest.approx(0.4) and result.activation_ci == pytest.approx((0.4, 0.4))
    assert result.comparison("topk") == pytest.approx((1.20 / 1.01,) * 3)
    assert result.comparison("fat") == pytest.approx((1.125 / 1.01,) * 3)
    (line,) = result.findings()
    assert f"keeps the perplexity at {1.01 * math.e:.2f} (dense {math.e:.2f}, ratio 1.0100)" in line
    assert "activation ratio of 0.400 (95% CI 0.400-0.400, 40 predicted tokens)" in line
    assert f"topk {1.2 / 1.01:.3f}x [{1.2 / 1.01:.3f}, {1.2 / 1.01:.3f}]" in line and f"fat {1.125 / 1.01:.3f}x" in line
    assert result.layer_findings() == ["m: per-layer activation ratio from 0.100 (layer 1, CI 0.100-0.100) to 0.600 "
                                       "(layer 2, CI 0.600-0.600); model-level 0.400."]


def test_a_sweep_that_does_not_reach_cetts_ratio_is_said_so():
    result = pareto_result(fat=(1.2,))  # fat: one point, no line to interpolate on
    assert result.comparison("fat") is None
    assert "fat: its sweep does not reach that activation ratio" in result.findings()[0]


def test_an_unconverged_search_is_a_visible_warning():
    lines = pareto_result(converged=False).findings()
    assert lines[0].startswith("WARNING m: the PPL-1% search did not converge in 3 evaluations")
    assert "1.0100" in lines[0] and "target 1.01 ± 0.001" in lines[0]


def test_language_rows_are_each_languages_windows_with_intervals():
    languages = by_language(pareto_result(), LanguageParams(rare=0.01)).table.set_index("language")
    assert list(languages.index) == ["en", "ja"] and (languages["windows"] == 2).all()
    assert languages["activation_ratio"].tolist() == pytest.approx([0.4, 0.4])
    assert languages["ppl_lo"].tolist() == pytest.approx([1.01, 1.01])


def test_language_findings_name_the_extreme_languages_and_rare_shares():
    frequency = np.zeros((2, 2, 50))
    frequency[0] = 0.5
    frequency[0, 0, :10] = 0.001  # en: 10 of 100 neurons rare
    frequency[1] = 0.005  # ja: every neuron rare
    table = pd.DataFrame({"language": ["en", "ja"], "activation_ratio": [0.3, 0.45], "activation_lo": [0.25, 0.4],
                          "activation_hi": [0.35, 0.5], "ppl_ratio": [1.02, 0.995], "ppl_lo": [1.01, 0.99],
                          "ppl_hi": [1.03, 0.998], "dense_perplexity": [10.0, 20.0], "windows": [5, 5]})
    result = LanguageResult(model="m", cett=0.25, target=1.01, rare=0.01, table=table, frequency=frequency)
    assert result.rare_shares() == {"en": pytest.approx(0.1), "ja": pytest.approx(1.0)}
    assert result.findings() == ["m at c = 0.2500 (5 windows per language): activation ratio from 0.300 (en, CI "
                                 "0.250-0.350) to 0.450 (ja, CI 0.400-0.500); the extremes' intervals do not overlap. "
                                 "Perplexity ratio from 0.9950 (ja) to 1.0200 (en) against the pooled target 1.01; "
                                 "below 1 with its whole interval in ja."]
    assert result.frequency_findings() == ["m: the share of neurons kept on fewer than 1% of tokens ranges from "
                                           "10.0% (en) to 100.0% (ja)."]


# --- the zoo's trends and the verdicts -----------------------------------------------------------------------

SHAPES = {"w16-d2": ("ratio", 16, 2, 6_000), "w32-d2": ("scale;ratio", 32, 2, 25_000), "w48-d1": ("ratio", 48, 1, 27_000),
          "w48-d3": ("scale", 48, 3, 83_000), "w64-d4": ("scale", 64, 4, 200_000)}


def zoo(limits: dict[str, dict[str, float]], loss_gap: float = 0.0) -> ScalingResult:
    """A zoo table of two seeds per shape whose runs follow the paper's forms towards the given limits (per
    activation, per shape; the seeds ±2 % apart), with a per-checkpoint-c variant 10 % lower and a dense loss that
    falls over training, ReLU's `loss_gap` nats above SiLU's."""
    rows = []
    for form, per_shape in limits.items():
        for shape, a0 in per_shape.items():
            axes, width, depth, params = SHAPES[shape]
            law = (PowerLaw("relu", alpha=0.5, b=-1.0, c=0.8, a0=a0, unit=1e6) if form == "relu"
                   else PowerLaw("silu", alpha=0.7, c=0.05, a0=a0, unit=1e6))
            for seed, scale in enumerate((0.98, 1.02)):
                for k, tokens in enumerate(np.geomspace(1e6, 30e6, 8)):
                    ratio = float(law(tokens)) * scale
                    rows.append({"run": f"{form}-{shape}-s{seed}", "shape": shape, "seed": seed, "activation": form,
                                 "width": width, "depth": depth, "width_depth_ratio": width / depth, "params": params,
                                 "axes": axes, "tokens": int(tokens), "tokens_per_param": tokens / params,
                                 "epochs": round(tokens / 40e6, 4), "activation_ratio": ratio,
                                 "own_activation_ratio": 0.9 * ratio, "in_fixed_c": k >= 3,
                                 "dense_loss": 4.0 - 0.1 * k + (loss_gap if form == "relu" else 0.0) + 0.01 * seed})
    table = pd.DataFrame(rows)
    return ScalingResult("build/x/zoo/zoo.csv", table, fit_runs(table, unit=1e6), 1e6, "millions", None)


PAPER_LIKE = {"relu": {"w16-d2": 0.05, "w32-d2": 0.06, "w48-d1": 0.07, "w48-d3": 0.062, "w64-d4": 0.064},
              "silu": {"w16-d2": 0.36, "w32-d2": 0.38, "w48-d1": 0.40, "w48-d3": 0.385, "w64-d4": 0.39}}


def test_a_paper_like_zoo_reproduces_the_scaling_claims():
    result = zoo(PAPER_LIKE)
    assert claims.relu_sparser(result).verdict == "reproduced"
    assert claims.training_trends(result).verdict == "reproduced"
    assert claims.scale_dependence(result).verdict == "reproduced"
    rising = claims.width_depth(result)
    assert rising.verdict == "partly" and "(ρ +1.00)" in rising.ours  # 3 ratios: a rise, no plateau test
    assert claims.comparable_loss(result).verdict == "reproduced"  # same loss: perplexity ratio 1.000
    lines = result.findings()
    assert lines[0].startswith("build/x/zoo/zoo.csv: 160 checkpoints of 20 runs (micro family: 20 runs = 5 shapes × "
                               "2 activations × 2 seeds, 0.75 epoch, ")
    assert "one c per run bisected on its last 5 checkpoints; spread = min–max over seeds" in lines[0]
    assert lines[1].startswith("ReLU: a limit A₀ is identified in every seed for 5 of 5 shapes: w16-d2 0.050 [0.049, 0.051]")
    assert "with one c per run and" in lines[3] and "ReLU is sparser than SiLU in 5 of 5 shapes" in lines[5]
    assert lines[6].startswith("Dense loss at the last checkpoint, ReLU − SiLU (paired by seed, mean [min, max]): ")
    assert any(line.startswith("SiLU along width/depth (8, 16, 48)") for line in lines)
    relu, silu = result.summary()
    assert relu.startswith("ReLU: a limit A₀ is identified in every seed for 5 of 5 shapes")
    assert "with data, 10 of 10 runs move in the paper's direction (down)" in relu
    assert "along width/depth the last-checkpoint ratio goes 0.355 → 0.395 (Spearman ρ +1.00; seed spread up to" in silu


def test_a_zoo_against_the_paper_gets_not_reproduced():
    flipped = {"relu": {k: v + 0.5 for k, v in PAPER_LIKE["relu"].items()},  # ReLU denser than SiLU
               "silu": {"w16-d2": 0.40, "w32-d2": 0.36, "w48-d1": 0.30, "w48-d3": 0.2, "w64-d4": 0.1}}
    result = zoo(flipped)
    assert claims.relu_sparser(result).verdict == "not reproduced"
    assert claims.width_depth(result).verdict == "not reproduced"  # SiLU falls with width/depth
    assert claims.scale_dependence(result).verdict == "partly"  # ReLU flat, SiLU moves by far more than 25 %
    shifted = {"relu": {k: 3 * v for k, v in PAPER_LIKE["relu"].items()}, "silu": PAPER_LIKE["silu"]}
    assert claims.relu_sparser(zoo(shifted)).verdict == "partly"  # sparser, but not at the paper's level


def test_comparable_loss_is_a_seed_paired_perplexity_ratio():
    assert claims.comparable_loss(zoo(PAPER_LIKE, loss_gap=0.03)).verdict == "reproduced"  # 3 % higher perplexity
    worse = claims.comparable_loss(zoo(PAPER_LIKE, loss_gap=0.2))  # 22 % higher perplexity
    assert worse.verdict == "not reproduced" and "w16-d2 1.221 [1.221, 1.221]" in worse.ours


def test_an_old_table_is_reported_not_used(tmp_path, monkeypatch):
    from babel_lib.sparsing import trends
    from babel_lib.sparsing.scaling import ScalingParams

    old = tmp_path / "zoo.csv"
    pd.DataFrame({"run": ["relu-w8-d1"], "activation": ["relu"], "tokens": [1], "activation_ratio": [0.1]}).to_csv(old)
    monkeypatch.setattr(trends.paths, "table_path", lambda profile: old)
    result = trends.zoo_scaling("smoke", ScalingParams())
    assert not result.available and "predates the seeded one-epoch protocol" in result.findings()[0]


def test_cett_verdict_follows_the_baselines_and_convergence():
    assert claims.cett_beats_baselines([pareto_result()]).verdict == "reproduced"
    assert claims.cett_beats_baselines([pareto_result(converged=False)]).verdict == "partly"
    worse = pareto_result(topk=(1.0, 0.98), fat=(1.0, 0.99))  # both baselines below CETT at its ratio
    assert claims.cett_beats_baselines([worse]).verdict == "not reproduced"
    assert claims.cett_beats_baselines([pareto_result(), worse]).verdict == "partly"
    unreached = pareto_result(topk=None, fat=None)
    assert claims.cett_beats_baselines([unreached]).verdict == "not attempted"


def test_no_zoo_table_means_not_attempted(tmp_path, monkeypatch):
    from babel_lib.sparsing import trends
    from babel_lib.sparsing.scaling import ScalingParams

    monkeypatch.setattr(trends.paths, "table_path", lambda profile: tmp_path / "none.csv")
    monkeypatch.setattr(trends.paths, "table_location", lambda profile: "data/zoo/zoo.csv")
    empty = trends.zoo_scaling("default", ScalingParams())
    verdicts = claims.sparsing_verdicts([pareto_result()], empty)
    assert [v.verdict for v in verdicts[1:]] == ["not attempted"] * 5
    assert empty.findings()[0].startswith("No zoo table at data/zoo/zoo.csv")
