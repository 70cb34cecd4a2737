"""Sparsing Law's power laws of the activation ratio A over training tokens D, fitted with scipy.

  ReLU: A(D) = exp(−c·D^α + b) + A₀   (decreases and converges to A₀)
  SiLU: A(D) = −c·D^(−α) + A₀        (increases and converges to A₀)

D is measured in `unit` tokens (the paper: billions). A₀, the limit activation ratio, is what the paper
then compares across width/depth ratios and parameter scales. `PAPER` holds the published constants,
shown beside ours as a reference; `fit_runs` fits every run of a zoo table.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy.optimize import curve_fit
from scipy.stats import spearmanr

from babel_lib.core.study import StudyParams, param
from babel_lib.errors import BabelError

FORMS = ("relu", "silu")
ZOO_COLUMNS = ("run", "activation", "width", "depth", "params", "tokens", "activation_ratio")
A0_MARGIN = 1e-3  # a fitted A₀ this close to 0 or 1 sits on its bound: no limit was identified
DIRECTION = {"relu": -1, "silu": 1}  # the sign of each form's slope over tokens
FORM_NAME = {"relu": "ReLU", "silu": "SiLU"}


@dataclass(frozen=True)
class ScalingParams(StudyParams):
    """Notebook 04's scaling section: the token unit of the fits, and hub checkpoints (the zoo table's place is
    the profile's: `babel_lib.sparsing.zoo.paths.table_path`)."""

    KIND: ClassVar[str] = "scaling"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.sparsing.scaling",)

    token_unit: float = param(1e6, gt=0)  # D in the power-law fits is tokens / token_unit
    token_unit_name: str = "millions"
    checkpoints: tuple[tuple[str, str, int], ...] = ()  # [[model, revision, tokens seen], ...]


def relu_form(d: np.ndarray, alpha: float, b: float, c: float, a0: float) -> np.ndarray:
    """A(D) = exp(−c·D^α + b) + A₀."""
    return np.exp(-c * np.power(d, alpha) + b) + a0


def silu_form(d: np.ndarray, alpha: float, c: float, a0: float) -> np.ndarray:
    """A(D) = −c·D^(−α) + A₀."""
    return -c * np.power(d, -alpha) + a0


@dataclass(frozen=True)
class PowerLaw:
    """One fitted (or published) curve: the form, its constants and the token unit of D."""

    form: str
    alpha: float
    c: float
    a0: float
    b: float | None = None  # ReLU only
    unit: float = 1e9  # tokens per unit of D
    rmse: float | None = None  # of the fit on its data; None for published constants

    def __call__(self, tokens: np.ndarray | Sequence[float]) -> np.ndarray:
        """The activation ratio at `tokens` (raw token counts)."""
        d = np.asarray(tokens, dtype=float) / self.unit
        if self.form == "relu":
            return relu_form(d, self.alpha, self.b, self.c, self.a0)
        return silu_form(d, self.alpha, self.c, self.a0)

    def as_row(self) -> dict[str, float | str | None]:
        return {"form": self.form, "alpha": self.alpha, "b": self.b, "c": self.c, "a0": self.a0, "rmse": self.rmse}


def _paper() -> dict[tuple[str, str], PowerLaw]:
    """The constants of Sparsing Law (Luo et al. 2024), D in billions of tokens: (α, b, c, A₀) per scale."""
    relu = {"0.1B": (0.101, -0.0151, 3.20, 0.0614), "0.2B": (0.449, -3.05, 0.286, 0.0674),
            "0.4B": (0.683, -3.46, 0.0790, 0.0690), "0.8B": (1.01, -3.49, 7.97e-3, 0.0721),
            "1.2B": (1.33, -3.89, 9.03e-4, 0.0782)}
    silu = {"0.1B": (0.479, 0.102, 0.409), "0.2B": (0.844, 0.208, 0.390), "0.4B": (1.03, 0.420, 0.385),
            "0.8B": (0.995, 0.562, 0.383), "1.2B": (0.967, 0.538, 0.382)}
    table = {("relu", s): PowerLaw("relu", alpha=a, b=b, c=c, a0=a0) for s, (a, b, c, a0) in relu.items()}
    table |= {("silu", s): PowerLaw("silu", alpha=a, c=c, a0=a0) for s, (a, c, a0) in silu.items()}
    return table


PAPER: dict[tuple[str, str], PowerLaw] = _paper()


def _starts(form: str, ratio: np.ndarray):
    """Initial guesses spread over the plausible range (the ReLU form has near-degenerate directions)."""
    if form == "relu":
        a0 = max(float(ratio.min()) * 0.9, 1e-6)
        return [(alpha, b, c, a0) for alpha, b, c in itertools.product((0.2, 0.5, 1.0, 1.5), (-3.0, 0.0), (0.01, 0.3, 3.0))]
    a0 = min(float(ratio.max()) * 1.05, 1.0)
    return [(alpha, c, a0) for alpha, c in itertools.product((0.2, 0.5, 1.0, 1.5), (0.01, 0.1, 1.0))]


def fit_power_law(tokens: Sequence[float], ratio: Sequence[float], form: str, unit: float = 1e9) -> PowerLaw:
    """Least-squares fit of the paper's `form` ("relu" | "silu") to activation ratios at token counts.

    Tries several starting points within bounds (α in (0, 5], c ≥ 0, 0 ≤ A₀ ≤ 1: a ratio) and keeps the best.
    """
    if form not in FORMS:
        raise BabelError(f"unknown form {form!r}; use 'relu' (decreasing) or 'silu' (increasing)")
    d = np.asarray(tokens, dtype=float) / unit
    y = np.asarray(ratio, dtype=float)
    n_params = 4 if form == "relu" else 3
    if d.shape != y.shape or d.size <= n_params or (d <= 0).any() or not np.isfinite(y).all():
        raise BabelError(f"the {form} form needs more than {n_params} points with tokens > 0 and finite ratios "
                         f"(got {d.size}); measure the activation ratio at more checkpoints")
    f = relu_form if form == "relu" else silu_form
    bounds = ([1e-3, -50.0, 0.0, 0.0], [5.0, 50.0, 1e6, 1.0]) if form == "relu" else ([1e-3, 0.0, 0.0], [5.0, 1e3, 1.0])
    best, best_sse = None, np.inf
    for start in _starts(form, y):
        try:
            params, _ = curve_fit(f, d, y, p0=start, bounds=bounds, maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((f(d, *params) - y) ** 2))
        if sse < best_sse:
            best, best_sse = params, sse
    if best is None:
        raise BabelError(f"the {form} form could not be fitted to these {d.size} points; check that the ratios "
                         "follow a monotone trend over tokens")
    rmse = float(np.sqrt(best_sse / d.size))
    if form == "relu":
        alpha, b, c, a0 = best
        return PowerLaw("relu", alpha=float(alpha), b=float(b), c=float(c), a0=float(a0), unit=unit, rmse=rmse)
    alpha, c, a0 = best
    return PowerLaw("silu", alpha=float(alpha), c=float(c), a0=float(a0), unit=unit, rmse=rmse)


def check_zoo(table: pd.DataFrame) -> pd.DataFrame:
    """The zoo table with its required columns checked, activations lower-cased, sorted by run and tokens."""
    missing = [c for c in ZOO_COLUMNS if c not in table.columns]
    if missing:
        raise BabelError(f"zoo table lacks columns {missing}; it needs {', '.join(ZOO_COLUMNS)} "
                         "(make zoo writes data/zoo/zoo.csv)")
    table = table.assign(activation=table["activation"].str.lower())
    unknown = sorted(set(table["activation"]) - set(FORMS))
    if unknown:
        raise BabelError(f"zoo table has activations {unknown}; the Sparsing-Law forms cover {', '.join(FORMS)}")
    return table.sort_values(["run", "tokens"]).reset_index(drop=True)


def fit_runs(table: pd.DataFrame, unit: float = 1e9) -> pd.DataFrame:
    """Fit each run's activation ratio over tokens with its activation's form; one row per run.

    Columns: run, activation, width, depth, width_depth (width / depth), params, checkpoints, max_tokens,
    then the constants alpha, b, c, a0 (the limit activation ratio), rmse, `last_ratio` (the ratio measured at
    the last checkpoint), `trend` (Spearman ρ of the ratio over tokens) and `a0_identified`: False when the
    data run against the form's direction (ReLU's form decreases, SiLU's increases) or A₀ sits on a bound of
    the fit (0 or 1: the curve has not bent towards a limit within its tokens); A₀ is then not a measurement.
    """
    rows = []
    for run, group in check_zoo(table).groupby("run", sort=True):
        first = group.iloc[0]
        fit = fit_power_law(group["tokens"], group["activation_ratio"], first["activation"], unit)
        trend = float(spearmanr(group["tokens"], group["activation_ratio"]).statistic)
        rows.append({"run": run, "activation": first["activation"], "width": int(first["width"]),
                     "depth": int(first["depth"]), "width_depth": first["width"] / first["depth"],
                     "params": int(first["params"]), "checkpoints": len(group), "max_tokens": int(group["tokens"].max()),
                     **{k: v for k, v in fit.as_row().items() if k != "form"},
                     "last_ratio": float(group["activation_ratio"].iloc[-1]), "trend": trend,
                     "a0_identified": bool(A0_MARGIN < fit.a0 < 1 - A0_MARGIN and trend * DIRECTION[fit.form] > 0)})
    return pd.DataFrame(rows)


def fitted_curve(row: pd.Series | dict, unit: float = 1e9) -> PowerLaw:
    """The PowerLaw of one row of `fit_runs`."""
    b = row.get("b")
    return PowerLaw(row["activation"], alpha=row["alpha"], c=row["c"], a0=row["a0"],
                    b=None if b is None or pd.isna(b) else float(b), unit=unit, rmse=row.get("rmse"))


def _non_embedding_params(model) -> int:
    """Parameters outside the input and output embeddings (the paper's parameter scale)."""
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def measure_checkpoints(checkpoints: Sequence[Sequence], texts: Sequence[str], *, seq_len: int, n_windows: int,
                        p: float = 1.0, tol: float = 1e-3, device: str | None = None, dtype: str | None = None,
                        batch_size: int = 4) -> pd.DataFrame:
    """The PPL-p% activation ratio of hub checkpoints [[model, revision, tokens seen], ...] as zoo-table rows.

    Each checkpoint gets its own PPL-p% bisection on the same text. A ReLU model is fitted with the ReLU
    form, every other activation (SiLU, GELU, ...) with the SiLU form.
    """
    from babel_lib.core.batches import windows
    from babel_lib.core.ffn import ffn_layers
    from babel_lib.core.models import load_model
    from babel_lib.sparsing.sparsity import ppl_p

    rows = []
    for entry in checkpoints:
        if len(entry) != 3:
            raise BabelError(f"checkpoint {entry!r} should be [model, revision, tokens seen], "
                             "e.g. ['EleutherAI/pythia-70m', 'step3000', 6291456000]")
        name, revision, tokens = entry
        lm = load_model(name, device, dtype, revision=revision)
        config = lm.model.config
        act = str(getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
                  or getattr(config, "activation_function", ""))
        layers = ffn_layers(lm.model)
        result = ppl_p(lm, windows(lm.tokenizer, texts, seq_len, n_windows), p, tol, batch_size=batch_size)
        rows.append({"run": name, "revision": revision, "activation": "relu" if act == "relu" else "silu",
                     "hidden_act": act, "width": config.hidden_size, "depth": len(layers), "d_ff": layers[0].width,
                     "params": _non_embedding_params(lm.model), "tokens": int(tokens),
                     "activation_ratio": result.activation_ratio, "cett": result.cett,
                     "dense_loss": result.dense_loss, "ppl_ratio": result.ppl_ratio})
        del lm
    return pd.DataFrame(rows)
