"""Notebook 05's result objects: findings and verdicts computed from small synthetic results; parameter checks."""

from __future__ import annotations

import numpy as np
import pytest

from babel_lib.babel.pruning_study import PruneParams, PruneResult, SpeedResult, verdicts
from babel_lib.errors import BabelError


def result() -> PruneResult:
    dense = np.log(np.array([10.0, 20.0]))
    rates = [0.25, 0.5]
    frequency = np.log(np.array([[9.0, 21.0], [12.0, 29.0]]))  # en at 25% beats the unpruned model
    adaptive = np.log(np.array([[8.5, 22.0], [11.0, 24.0]]))  # adaptive better in 3 of 4
    random = np.log(np.array([[[11.0, 24.0], [13.0, 26.0]], [[15.0, 30.0], [17.0, 32.0]]]))  # [R, S, n]
    cross = np.log(np.array([[12.0, 27.0], [14.0, 25.0]]))  # diagonal best for both targets
    dyn = np.log(np.array([[12.0, 24.0]]))
    return PruneResult("m", ["en", "ja"], rates, [0.75, 0.5], dense, frequency, adaptive, random, 0.5, cross,
                       [0.5], dyn, 64, [63, 63])


def test_findings_are_computed_from_the_losses():
    text = "\n".join(result().findings())
    assert "random prunings in 4 of 4 (language, rate) pairs" in text
    assert "lower by more than 2 standard deviations of the random seeds in 3" in text  # in log space; ja at 50% is within 2 std
    assert "beats the unpruned model in en at 25%" in text
    assert "uniform rate at the same total in 3 of 4" in text
    assert "lowest perplexity for 2 of 2 target languages (en, ja)" in text
    assert "mean diagonal perplexity 18.50 vs off-diagonal 20.50" in text
    assert "to static frequency-guided pruning at the same kept share 0.914" in text  # median(12/12, 24/29)


def test_speed_ideal_and_findings():
    s = SpeedResult("m", "cpu", [0.5], [0.5], dense=100.0, pruned=[120.0], ffn_share=0.4)
    assert s.ideal() == [pytest.approx(1 / 0.8)]
    assert "1.20x (ideal 1.25x, 96% of it)" in s.findings()[0]


def test_verdicts_follow_their_rules():
    v = {x.claim: x for x in verdicts([result()], [SpeedResult("m", "cpu", [0.5], [0.5], 100.0, [135.0], 0.5)])}
    assert v["Frequency-guided expert pruning beats random expert pruning"].verdict == "reproduced"
    assert v["In some languages frequency-guided pruning beats the unpruned model"].verdict == "reproduced"
    assert v["Per-layer pruning rates from activation differences beat one uniform rate"].verdict == "partly"
    assert v["Pruning low-activation experts gives ~30% faster inference at comparable quality"].verdict == "reproduced"


@pytest.mark.parametrize("change, match", [({"rates": (0.5, 1.0)}, r"rates: .*\[0, 1\)"),
                                           ({"active_ratios": (0.0,)}, r"active_ratios"),
                                           ({"eval_languages": ("en", "en")}, "listed twice"),
                                           ({"cross_rate": 1.0}, "cross_rate")])
def test_bad_parameters_are_one_line_errors(change, match):
    with pytest.raises(BabelError, match=match) as info:
        PruneParams(**change)
    assert "\n" not in str(info.value)
