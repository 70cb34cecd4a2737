"""Notebook 01's routing verdict compares per-window losses, so a wildly spread random control cannot hide a win."""

from __future__ import annotations

import torch

from babel_lib.babel.conversion import RoutedPerplexity, verdicts


class NoCohesion:
    baselines = ()
    cohesion = {}


def routed(top, random) -> RoutedPerplexity:
    dense = torch.tensor([1.0, 1.1, 0.9, 1.2], dtype=torch.float64)
    return RoutedPerplexity((0.5,), 0.5, ["en", "de", "fr", "ja"],
                            {"m": {"dense": dense, "top 50%": dense + torch.tensor(top, dtype=torch.float64),
                                   "random 50%": dense + torch.tensor(random, dtype=torch.float64)}})


def test_a_clear_win_in_loss_is_reproduced_even_when_perplexity_ratios_are_spread():
    result = routed([0.6, 0.5, 0.7, 0.6], [8.0, 13.0, 9.0, 12.5])  # exp() of these spreads over 10^3-10^5
    gap, se = result.loss_gap("m", "random 50%", "top 50%")
    assert abs(gap - (42.5 - 2.4) / 4) < 1e-12 and gap > 2 * se
    assert verdicts(NoCohesion(), result)[0].verdict == "reproduced"


def test_no_win_is_not_reproduced():
    result = routed([1.0, 2.0, 1.5, 0.5], [1.2, 1.0, 1.6, 0.7])
    assert verdicts(NoCohesion(), result)[0].verdict == "not reproduced"
