"""Figures of notebook 04_sparsity_scaling: Pareto curves, PPL-p% sparsity per layer and language, neuron
activation frequencies, and the activation-ratio scaling of the micro family. Each takes arrays, returns a figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from babel_lib.sparsing.scaling import FORM_NAME, PowerLaw

if TYPE_CHECKING:
    from babel_lib.sparsing.studies import LanguageResult, ParetoResult

METHOD_STYLE = {"cett": ("CETT (sweep c)", "#d62728"), "topk": ("top-k", "#1f77b4"), "fat": ("FAT-ε", "#2ca02c"),
                "relu": ("zero threshold", "#7f7f7f")}
FORM_COLOUR = {"relu": "#1f77b4", "silu": "#d62728"}


def _bars(values, low, high) -> dict:
    """A plotly error-bar spec from a point and its interval."""
    values, low, high = (np.asarray(v, dtype=float) for v in (values, low, high))
    return {"type": "data", "symmetric": False, "array": high - values, "arrayminus": values - low, "thickness": 1}


def pareto_figure(results: Sequence[ParetoResult], ceiling: float = 1.5) -> go.Figure:
    """Perplexity ratio against activation ratio per method on the sweep set, one panel per model, with 95 %
    bootstrap intervals (both axes), and the full set's PPL-p% point with its intervals.

    The y axis stops at `ceiling` × the dense perplexity; an annotation in each panel says so and counts the
    points above it.
    """
    models = [r.model for r in results]
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models)
    for col, r in enumerate(results, start=1):
        for method, group in r.points.groupby("method", sort=False):
            group = group.sort_values("activation_ratio")
            label, colour = METHOD_STYLE[method]
            fig.add_trace(go.Scatter(x=group["activation_ratio"], y=group["ppl_ratio"], mode="lines+markers",
                                     name=f"{label}, sweep set", legendgroup=method, showlegend=col == 1,
                                     line={"color": colour},
                                     error_x=_bars(group["activation_ratio"], group["activation_lo"],
                                                   group["activation_hi"]),
                                     error_y=_bars(group["ppl_ratio"], group["ppl_lo"], group["ppl_hi"])),
                          row=1, col=col)
        fig.add_trace(go.Scatter(x=[0, 1], y=[1, 1], mode="lines", name="dense model", legendgroup="dense",
                                 showlegend=col == 1, line={"color": "black", "dash": "dot"}), row=1, col=col)
        (a_lo, a_hi), (r_lo, r_hi) = r.activation_ci, r.ppl_ci
        fig.add_trace(go.Scatter(x=[r.activation_ratio], y=[r.ppl_ratio], mode="markers",
                                 marker={"symbol": "star", "size": 14, "color": "black"},
                                 error_x=_bars([r.activation_ratio], [a_lo], [a_hi]),
                                 error_y=_bars([r.ppl_ratio], [r_lo], [r_hi]),
                                 name="PPL-p% (CETT), full set", legendgroup="chosen", showlegend=col == 1),
                      row=1, col=col)
        fig.update_xaxes(title_text="activation ratio (1 − sparsity)", range=[0, 1.02], row=1, col=col)
        fig.update_yaxes(range=[0.98, ceiling], row=1, col=col)
        above = int((r.points["ppl_ratio"] > ceiling).sum())
        fig.add_annotation(text=f"y axis cut at {ceiling:g}× dense perplexity: {above} point(s) above, not shown",
                           xref="x domain" if col == 1 else f"x{col} domain",
                           yref="y domain" if col == 1 else f"y{col} domain", x=0.02, y=0.98, showarrow=False,
                           xanchor="left", yanchor="top", font={"size": 11})
    fig.update_yaxes(title_text="perplexity / dense perplexity", row=1, col=1)
    fig.update_layout(title="Perplexity ratio against activation ratio per sparsity method (bars: 95% bootstrap "
                            "intervals over windows)")
    return fig


def layer_figure(results: Sequence[ParetoResult]) -> go.Figure:
    """Activation ratio per layer at PPL-p% (full set) with 95 % bootstrap intervals, one line per model over
    relative depth."""
    fig = go.Figure()
    for r in results:
        ratio = np.asarray(r.layer_ratio)
        depth = np.arange(len(ratio)) / max(len(ratio) - 1, 1)
        fig.add_trace(go.Scatter(x=depth, y=ratio, mode="lines+markers", name=r.model,
                                 error_y=_bars(ratio, r.layer_ci[:, 0], r.layer_ci[:, 1]),
                                 text=[f"layer {i}" for i in range(len(ratio))]))
    fig.update_xaxes(title_text="relative depth (layer / (n_layers − 1))")
    fig.update_yaxes(title_text="activation ratio", rangemode="tozero")
    fig.update_layout(title="Activation ratio per layer at PPL-p% (bars: 95% bootstrap intervals over windows)")
    return fig


def language_figure(results: Sequence[LanguageResult]) -> go.Figure:
    """Per language: activation ratio (top) and perplexity ratio (bottom) at the pooled PPL-p% c, per model, with
    95 % bootstrap intervals over the language's windows."""
    table = pd.concat([r.table.assign(model=r.model) for r in results])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for i, (model, group) in enumerate(table.groupby("model", sort=False)):
        colour = _palette(i)
        fig.add_trace(go.Bar(x=group["language"], y=group["activation_ratio"], name=model, legendgroup=model,
                             marker_color=colour,
                             error_y=_bars(group["activation_ratio"], group["activation_lo"], group["activation_hi"])),
                      row=1, col=1)
        fig.add_trace(go.Bar(x=group["language"], y=group["ppl_ratio"] - 1, base=1, name=model, legendgroup=model,
                             showlegend=False, marker_color=colour,
                             error_y=_bars(group["ppl_ratio"], group["ppl_lo"], group["ppl_hi"])), row=2, col=1)
    fig.update_yaxes(title_text="activation ratio", row=1, col=1)
    fig.update_yaxes(title_text="perplexity ratio (bars from 1)", row=2, col=1)
    fig.update_layout(title="Sparsity and its cost per language at one CETT value (whiskers: 95% bootstrap "
                            "intervals over the language's windows)", barmode="group")
    return fig


def frequency_figure(results: Sequence[LanguageResult], points: int = 200) -> go.Figure:
    """ECDF of per-neuron activation frequency (all layers pooled), one line per language, one panel per model."""
    frequencies = {r.model: r.frequencies() for r in results}
    models = list(frequencies)
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, shared_yaxes=True)
    levels = np.linspace(0, 1, points)
    for col, model in enumerate(models, start=1):
        for i, (language, freq) in enumerate(frequencies[model].items()):
            values = np.quantile(np.asarray(freq), levels)
            fig.add_trace(go.Scatter(x=values, y=levels, mode="lines", name=language, legendgroup=language,
                                     showlegend=col == 1, line={"color": _palette(i)}), row=1, col=col)
        fig.update_xaxes(title_text="neuron activation frequency", range=[0, 1], row=1, col=col)
    fig.update_yaxes(title_text="share of neurons (ECDF)", row=1, col=1)
    fig.update_layout(title="Neuron activation frequency distributions per language at PPL-p% thresholds",
                      legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0, "title": {"text": "language"}},
                      margin={"b": 140})  # a row of every language below the panels: no legend cut off
    return fig


def non_negative(values: np.ndarray) -> np.ndarray:
    """A fitted curve with its negative values (no activation ratio is below 0) left out of the line."""
    values = np.asarray(values, dtype=float)
    return np.where(values >= 0, values, np.nan)


def _palette(i: int) -> str:
    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")
    return colours[i % len(colours)]


def _band(values: pd.DataFrame, column: str) -> dict:
    """Plotly error bars from a band's `_lo`/`_hi` columns around its mean (none where the table has no seeds)."""
    if f"{column}_lo" not in values:
        return {"visible": False}
    return {"type": "data", "symmetric": False, "array": values[f"{column}_hi"] - values[column],
            "arrayminus": values[column] - values[f"{column}_lo"], "thickness": 1, "width": 3}


def tokens_figure(bands: pd.DataFrame, fits: pd.DataFrame, curves: Mapping[str, PowerLaw], unit: float,
                  unit_name: str) -> go.Figure:
    """Activation ratio over training tokens per series (trends.seed_bands: mean with min–max over seeds as error
    bars), the per-checkpoint-c variant dashed where the table has it, and the power law fitted to the means: solid
    where the fit identifies a limit A₀, dotted where it does not (scaling.fit_runs); ReLU | SiLU."""
    forms = [f for f in ("relu", "silu") if f in set(fits["activation"])]
    fig = make_subplots(rows=1, cols=len(forms), subplot_titles=[f"{FORM_NAME[f]} runs" for f in forms])
    for col, form in enumerate(forms, start=1):
        runs = fits[fits["activation"] == form].sort_values(["params", "width_depth"])
        for i, (run, identified) in enumerate(zip(runs["run"], runs["a0_identified"])):
            data = bands[bands["run"] == run].sort_values("tokens")
            colour, x = _palette(i), data["tokens"] / unit
            fig.add_trace(go.Scatter(x=x, y=data["activation_ratio"], mode="markers", name=run, legendgroup=run,
                                     marker={"color": colour}, error_y=_band(data, "activation_ratio")), row=1, col=col)
            if "own_activation_ratio" in data:
                fig.add_trace(go.Scatter(x=x, y=data["own_activation_ratio"], mode="lines+markers", legendgroup=run,
                                         name=f"{run}, c per checkpoint", showlegend=False,
                                         marker={"color": colour, "symbol": "circle-open"},
                                         line={"color": colour, "dash": "dash", "width": 1}), row=1, col=col)
            grid = np.geomspace(data["tokens"].min(), data["tokens"].max(), 100)  # the fit's own data range only
            fig.add_trace(go.Scatter(x=grid / unit, y=non_negative(curves[run](grid)), mode="lines", legendgroup=run,
                                     showlegend=False, line={"color": colour, "dash": "solid" if identified else "dot"}),
                          row=1, col=col)
        fig.update_xaxes(title_text=f"training tokens ({unit_name})", type="log", row=1, col=col)
    fig.update_yaxes(title_text="activation ratio at PPL-p%", row=1, col=1)
    fig.update_layout(title="Activation ratio over training: one c per run (mean, min–max over seeds), c per checkpoint "
                            "(dashed), fitted forms (dotted: no A₀)")
    return fig


def limit_figure(shapes: pd.DataFrame, x: str, x_title: str, paper: Mapping[tuple[str, str], PowerLaw]) -> go.Figure:
    """Per shape (labelled), against `x` (width_depth or params), ReLU vs SiLU: the activation ratio at the last
    checkpoint (filled; seed mean, min–max bars), the per-checkpoint-c variant (crosses), and the fitted limit A₀
    where every seed's fit identifies one (open); the paper's A₀ range per activation as a shaded band."""
    fig = go.Figure()
    for form, group in shapes.groupby("activation", sort=True):
        group = group.sort_values(x)
        colour = FORM_COLOUR[form]
        fig.add_trace(go.Scatter(x=group[x], y=group["last_ratio"], mode="markers+text", text=group["shape"],
                                 name=f"{FORM_NAME[form]}: last checkpoint, one c per run", textposition="top center",
                                 textfont={"size": 9}, marker={"color": colour, "size": 10},
                                 error_y=_band(group, "last_ratio")))
        fig.add_trace(go.Scatter(x=group[x], y=group["own_last"], mode="markers", marker={"color": colour, "symbol": "x"},
                                 name=f"{FORM_NAME[form]}: last checkpoint, c per checkpoint"))
        limits = group[group["identified"] == group["seeds"]]
        if len(limits):
            fig.add_trace(go.Scatter(x=limits[x], y=limits["a0"], mode="markers", name=f"{FORM_NAME[form]}: fitted A₀",
                                     marker={"color": colour, "size": 12, "symbol": "circle-open"},
                                     error_y=_band(limits, "a0")))
        published = [law.a0 for (f, _), law in paper.items() if f == form]
        fig.add_hrect(y0=min(published), y1=max(published), fillcolor=colour, opacity=0.12, line_width=0,
                      annotation_text=f"paper {FORM_NAME[form]} A₀ (0.1B-1.2B)", annotation_position="top left")
    fig.update_xaxes(title_text=x_title, type="log")
    fig.update_yaxes(title_text="PPL-1% activation ratio", rangemode="tozero")
    fig.update_layout(title=f"Activation ratio against {x_title}: last checkpoint (mean, min–max over seeds) and "
                            "fitted limit A₀")
    return fig


def loss_figure(losses: pd.DataFrame) -> go.Figure:
    """Held-out dense loss at the last checkpoint, ReLU beside SiLU per shape (seed mean, min–max bars; trends.losses)."""
    fig = go.Figure()
    for form in ("relu", "silu"):
        fig.add_trace(go.Bar(x=losses["shape"], y=losses[form], name=FORM_NAME[form], marker_color=FORM_COLOUR[form],
                             error_y=_band(losses, form)))
    fig.update_xaxes(title_text="shape (width, depth), by parameters")
    fig.update_yaxes(title_text="held-out next-token loss (nats)")
    fig.update_layout(barmode="group", title="Dense held-out loss at the last checkpoint per shape, ReLU vs SiLU "
                                             "(mean, min–max over seeds)")
    return fig


def paper_figure(paper: Mapping[tuple[str, str], PowerLaw], tokens: Sequence[float]) -> go.Figure:
    """The paper's published curves (reference): activation ratio over tokens (billions) per scale; ReLU | SiLU."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["ReLU (paper)", "SiLU (paper)"])
    grid = np.asarray(tokens, dtype=float)
    for col, form in enumerate(("relu", "silu"), start=1):
        for i, ((f, scale), law) in enumerate((k, v) for k, v in paper.items() if k[0] == form):
            fig.add_trace(go.Scatter(x=grid / 1e9, y=non_negative(law(grid)), mode="lines", name=scale, legendgroup=scale,
                                     showlegend=col == 1, line={"color": _palette(i)}), row=1, col=col)
        fig.update_xaxes(title_text="training tokens (billions)", type="log", row=1, col=col)
    fig.update_yaxes(title_text="activation ratio", row=1, col=1)
    fig.update_layout(title="Reference: Sparsing Law's fitted curves with the published constants "
                            "(drawn where the form is ≥ 0)")
    return fig
