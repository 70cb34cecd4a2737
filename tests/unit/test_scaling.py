"""Power-law fits of the activation ratio over training tokens: recover known constants from their own data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from babel_lib.errors import BabelError
from babel_lib.sparsing.scaling import PAPER, PowerLaw, fit_power_law, fit_runs, fitted_curve


@pytest.mark.parametrize("key", sorted(PAPER))
def test_fit_recovers_the_published_constants_from_their_curves(key):
    law = PAPER[key]
    tokens = np.geomspace(1e9, 300e9, 12)
    rng = np.random.default_rng(0)
    ratio = law(tokens) * (1 + 1e-4 * rng.standard_normal(tokens.size))  # tiny noise
    fit = fit_power_law(tokens, ratio, law.form)
    assert fit.a0 == pytest.approx(law.a0, rel=2e-3)
    assert fit.alpha == pytest.approx(law.alpha, rel=3e-2)
    assert fit.c == pytest.approx(law.c, rel=5e-2)
    if law.form == "relu":
        assert fit.b == pytest.approx(law.b, abs=5e-2)
    assert np.abs(fit(tokens) - law(tokens)).max() < 1e-3


def test_fit_works_in_any_token_unit_and_on_micro_scales():
    truth = PowerLaw("silu", alpha=0.6, c=0.05, a0=0.3, unit=1e6)  # millions of tokens, like the micro zoo
    tokens = np.linspace(2e6, 40e6, 10)
    fit = fit_power_law(tokens, truth(tokens), "silu", unit=1e6)
    assert (fit.alpha, fit.c, fit.a0) == pytest.approx((0.6, 0.05, 0.3), rel=1e-3)


def test_forms_have_the_papers_shapes():
    tokens = np.geomspace(1e9, 1e12, 50)
    for (form, _), law in PAPER.items():
        ratio = law(tokens)
        assert (np.diff(ratio) < 0).all() if form == "relu" else (np.diff(ratio) > 0).all()
        assert ratio[-1] == pytest.approx(law.a0, abs=0.02)


def _synthetic_zoo() -> tuple[pd.DataFrame, dict[str, PowerLaw]]:
    truths = {"relu-a": PowerLaw("relu", alpha=0.5, b=-1.0, c=0.8, a0=0.07, unit=1e6),
              "silu-a": PowerLaw("silu", alpha=0.7, c=0.1, a0=0.4, unit=1e6)}
    rows = []
    for run, law in truths.items():
        for tokens in np.linspace(1e6, 30e6, 9):
            rows.append({"run": run, "activation": law.form.upper(), "width": 128, "depth": 4, "d_ff": 512,
                         "params": 800_000, "tokens": int(tokens), "activation_ratio": float(law(tokens)),
                         "cett": 0.2, "dense_loss": 3.0})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0), truths


def test_fit_runs_fits_each_run_with_its_activation_form():
    table, truths = _synthetic_zoo()
    fits = fit_runs(table, unit=1e6).set_index("run")
    assert fits.loc["relu-a", "width_depth"] == 32 and fits.loc["relu-a", "checkpoints"] == 9
    for run, law in truths.items():
        assert fits.loc[run, "a0"] == pytest.approx(law.a0, rel=1e-3)
        curve = fitted_curve(fits.loc[run], unit=1e6)
        tokens = np.linspace(1e6, 30e6, 5)
        assert np.abs(curve(tokens) - law(tokens)).max() < 1e-4
    assert fits["a0_identified"].all()


def test_a_curve_still_rising_at_its_end_has_no_identified_limit():
    """A SiLU-like run growing like log(D) bends towards no limit: A₀ runs into its bound 1 and is flagged."""
    tokens = np.geomspace(4e5, 33e6, 12)
    rows = [{"run": "silu-log", "activation": "silu", "width": 128, "depth": 4, "params": 800_000,
             "tokens": int(t), "activation_ratio": 0.1 + 0.12 * np.log(t / 4e5)} for t in tokens]
    fit = fit_runs(pd.DataFrame(rows), unit=1e6).iloc[0]
    assert fit["a0"] <= 1.0 and fit["trend"] == pytest.approx(1.0) and not fit["a0_identified"]
    rising_relu = fit_runs(pd.DataFrame(rows).assign(activation="relu", activation_ratio=lambda t: 0.02 + 0.01 *
                                                     np.log(t["tokens"] / 4e5)), unit=1e6).iloc[0]
    assert not rising_relu["a0_identified"]  # the ReLU form decreases: a rising run has no ReLU-form limit
    assert fit["last_ratio"] == pytest.approx(rows[-1]["activation_ratio"])


def test_bad_tables_and_too_few_points_raise():
    table, _ = _synthetic_zoo()
    with pytest.raises(BabelError, match="lacks columns"):
        fit_runs(table.drop(columns=["tokens"]))
    with pytest.raises(BabelError, match="activations"):
        fit_runs(table.assign(activation="gelu"))
    with pytest.raises(BabelError, match="more than 4 points"):
        fit_power_law([1e9, 2e9, 3e9], [0.1, 0.09, 0.08], "relu")
    with pytest.raises(BabelError, match="unknown form"):
        fit_power_law([1e9] * 6, [0.1] * 6, "gelu")
