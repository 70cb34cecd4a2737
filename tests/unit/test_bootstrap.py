"""Bootstrap intervals over windows, against brute-force resampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from babel_lib.core import bootstrap
from babel_lib.errors import BabelError
from babel_lib.sparsing.studies import WindowSums, at_target

VALUES = np.array([3.0, 1.0, 4.0, 1.5, 9.0])


def test_interval_equals_a_resampling_loop_by_hand():
    """The same seeded draws, one resample at a time in a plain loop, then the percentiles by sorting."""
    rng = np.random.default_rng(7)
    by_hand = []
    for _ in range(400):
        sample = [VALUES[rng.integers(0, len(VALUES))] for _ in range(len(VALUES))]
        by_hand.append(sum(sample) / len(sample))
    ordered = sorted(by_hand)
    # numpy's default percentile interpolates linearly between order statistics
    def pct(q):
        pos = q / 100 * (len(ordered) - 1)
        low = int(np.floor(pos))
        return ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (pos - low)
    lo, hi = bootstrap.ci(VALUES, lambda r: r.mean(axis=1), replicates=400, seed=7)
    assert (lo, hi) == pytest.approx((pct(2.5), pct(97.5)), abs=1e-12)


def test_interval_approaches_the_exact_bootstrap_distribution():
    """All 5^5 equally likely resamples of a tiny array: the percentile interval of many replicates matches."""
    exact = np.array([VALUES[list(i)].mean() for i in itertools.product(range(5), repeat=5)])
    lo, hi = bootstrap.ci(VALUES, lambda r: r.mean(axis=1), replicates=20000, seed=1)
    assert lo == pytest.approx(np.percentile(exact, 2.5), abs=0.08)
    assert hi == pytest.approx(np.percentile(exact, 97.5), abs=0.08)
    assert bootstrap.interval(np.array([np.nan, 1.0, 2.0, 3.0]), level=1.0) == (1.0, 3.0)


def test_window_sums_recompute_ratios_from_resampled_windows():
    """Perplexity and activation ratios of a resample are those of the windows it holds, duplicates counted."""
    sums = WindowSums(dense=np.array([10.0, 20.0, 30.0]), nll=np.array([[11.0, 21.0, 33.0]]),
                      active=np.array([[[4, 6], [8, 8], [2, 0]]]), counted=np.array([4, 4, 2]),
                      widths=np.array([2, 4]), predicted=5)
    index = np.array([[0, 1, 2], [2, 2, 0]])
    ratio, act = sums.ppl_ratio(index)[0], sums.activation_ratio(index)[0]
    assert ratio[0] == pytest.approx(np.exp(5 / 15)) and ratio[1] == pytest.approx(np.exp(7 / 15))
    assert act[0] == pytest.approx(((4 + 8 + 2) / (10 * 2) + (6 + 8 + 0) / (10 * 4)) / 2)
    assert act[1] == pytest.approx(((2 + 2 + 4) / (8 * 2) + (0 + 0 + 6) / (8 * 4)) / 2)
    draws = sums.draws(10, seed=3, windows=np.array([1, 2]))
    assert draws.shape == (11, 2) and draws[0].tolist() == [1, 2] and set(draws.ravel()) <= {1, 2}


def test_at_target_interpolates_across_the_target_else_extrapolates_from_the_closest():
    ratios = np.array([[1.0, 1.0, 1.02], [1.02, 1.005, 1.03], [1.2, 1.03, 1.2]])  # [evaluations, replicates]
    values = np.array([[0.9, 0.9, 0.7], [0.7, 0.8, 0.6], [0.3, 0.6, 0.3]])
    at = at_target(ratios, values, 1.01)
    assert at[0] == pytest.approx(0.8)  # between 1.0 and 1.02
    assert at[1] == pytest.approx(0.8 + (0.6 - 0.8) / 0.025 * 0.005)  # 1.005 and 1.03 bracket it, not 1.0
    assert at[2] == pytest.approx(0.7 + (0.6 - 0.7) / 0.01 * -0.01)  # all above: the line through the two closest


def test_one_evaluation_moves_along_the_given_slope():
    ratios, values = np.array([[1.012, 1.008, 1.01]]), np.array([[0.74, 0.75, 0.73]])
    assert at_target(ratios, values, 1.01).tolist() == [0.74, 0.75, 0.73]
    assert at_target(ratios, values, 1.01, slope=-10.0) == pytest.approx([0.76, 0.73, 0.73])


def test_a_bootstrap_without_units_is_one_clear_error():
    with pytest.raises(BabelError, match="at least one unit"):
        bootstrap.resamples(0)


def test_mean_intervals_per_column_equal_a_loop_over_resamples():
    import torch

    from babel_lib.massive.plots import _pooled, perplexity_figure
    from babel_lib.massive.stats import mean_intervals

    values = torch.tensor([[1.0, 10.0], [2.0, 30.0], [4.0, 20.0], [8.0, 60.0]])
    low, high = mean_intervals(values, n_resamples=300, seed=4)
    draws = bootstrap.resamples(4, 300, 4)
    for j in range(2):
        means = [float(values[list(row), j].mean()) for row in draws]
        assert (float(low[j]), float(high[j])) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1e-12)
    est, lo, hi = _pooled([np.e, np.e ** 3])  # NLL 1 and 3: pooled exp(2)
    assert est == pytest.approx(np.e ** 2) and np.e * (1 - 1e-12) <= lo <= est <= hi <= np.e ** 3 * (1 + 1e-12)
    fig = perplexity_figure({"m": {"original": {"en": np.e, "ja": np.e ** 3}}})
    (bars,) = fig.data
    assert list(bars.x) == ["en", "ja", "all (95% CI)"] and bars.error_y.array[:2] == (0.0, 0.0)


def test_03_means_over_sequences_carry_their_intervals():
    import torch

    from babel_lib.massive.plots import attention_mass_figure, layerwise_figure

    top, median = torch.rand(6, 4, 3) * 100 + 1, torch.rand(6, 4) + 0.1
    lines = [t for t in layerwise_figure({"m": (top, median)}).data if t.mode == "lines+markers"]
    assert len(lines) == 4 and all(len(t.error_y.array) == 4 for t in lines)
    fig = attention_mass_figure({"m": torch.rand(6, 4)}, {"m": 0.1}, {"m": (1, 2)})
    (mass,) = [t for t in fig.data if t.name == "attention on them"]
    low = np.asarray(mass.y) - np.asarray(mass.error_y.arrayminus)
    assert (low >= 0).all() and len(mass.error_y.array) == 4
