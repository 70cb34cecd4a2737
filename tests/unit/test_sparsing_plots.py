"""Notebook 04's figures say what they plot: no negative fitted ratio, the Pareto y-axis cut stated, every
language in the frequency legend, neutral titles."""

from __future__ import annotations

import numpy as np
import pandas as pd

from babel_lib.sparsing.plots import frequency_figure, paper_figure, pareto_figure, tokens_figure
from babel_lib.sparsing.scaling import PAPER, PowerLaw, fit_runs, fitted_curve
from babel_lib.sparsing.studies import LanguageResult
from tests.unit.test_sparsing_findings import pareto_result

CLAIM_WORDS = ("reproduce", "beats", "better", "sparser", "concentrat", "nearly constant", "confirms")


def _plotted(fig) -> np.ndarray:
    return np.concatenate([np.asarray(t.y, dtype=float) for t in fig.data if t.y is not None])


def test_published_curves_are_drawn_only_where_they_are_a_ratio():
    tokens = np.geomspace(1e9, 400e9, 200)
    assert (PAPER[("silu", "0.8B")](tokens) < 0).any()  # the published SiLU form goes negative early on
    y = _plotted(paper_figure(PAPER, tokens))
    assert np.nanmin(y) >= 0 and np.isnan(y).any()


def test_fits_are_drawn_over_their_data_and_never_below_zero():
    law = PowerLaw("silu", alpha=1.0, c=0.5, a0=0.3, unit=1e6)  # negative below 1.7M tokens
    tokens = np.geomspace(1e6, 30e6, 8)
    table = pd.DataFrame({"run": "silu-a", "activation": "silu", "width": 64, "depth": 2, "params": 1000,
                          "tokens": tokens.astype(int), "activation_ratio": np.clip(law(tokens), 0.01, None)})
    fits = fit_runs(table, unit=1e6)
    curves = {r["run"]: fitted_curve(r, unit=1e6) for _, r in fits.iterrows()}
    fig = tokens_figure(table, fits, curves, 1e6, "millions")
    line = next(t for t in fig.data if t.mode == "lines")
    assert min(line.x) >= tokens.min() / 1e6 * (1 - 1e-9) and max(line.x) <= tokens.max() / 1e6 * (1 + 1e-9)
    assert np.nanmin(_plotted(fig)) >= 0


def test_the_pareto_axis_cut_is_stated_with_the_points_it_hides():
    result = pareto_result(topk=(2.0, 1.1))  # one top-k point at 2x dense: above the 1.5x cut
    fig = pareto_figure([result])
    (note,) = [a.text for a in fig.layout.annotations if "cut" in a.text]
    assert "1.5× dense perplexity: 1 point(s) above, not shown" in note
    assert not any(word in fig.layout.title.text.lower() for word in CLAIM_WORDS)


def test_every_language_is_in_the_frequency_legend():
    languages = ["en", "de", "ja", "zh-CN", "ru", "tr", "ar", "ko", "el", "he", "hi", "th", "vi", "fr", "es", "pt",
                 "it"]
    table = pd.DataFrame({"language": languages, "activation_ratio": 0.3, "activation_lo": 0.2, "activation_hi": 0.4,
                          "ppl_ratio": 1.01, "ppl_lo": 1.0, "ppl_hi": 1.02, "dense_perplexity": 9.0, "windows": 5})
    result = LanguageResult("m", 0.2, 1.01, 0.01, table, np.random.default_rng(0).random((len(languages), 2, 8)))
    fig = frequency_figure([result])
    assert [t.name for t in fig.data if t.showlegend] == languages
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0  # a row below the panel, not cut


def test_every_sampled_point_carries_its_interval():
    from babel_lib.sparsing.plots import language_figure, layer_figure
    from babel_lib.sparsing.studies import LanguageParams, by_language

    result = pareto_result()
    points = [t for t in pareto_figure([result]).data if t.name != "dense model"]
    assert points and all(t.error_x.array is not None and t.error_y.array is not None for t in points)
    (layers,) = layer_figure([result]).data
    assert len(layers.error_y.array) == len(result.layer_ratio)
    bars = language_figure([by_language(result, LanguageParams(rare=0.01))]).data
    assert all(t.error_y.array is not None for t in bars)
