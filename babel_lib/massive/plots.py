"""Figures of notebook 03_massive_activations: layer-wise magnitudes, a 3-D |h| surface, constancy, languages,
interventions and attention. Each function takes arrays and returns a plotly figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from babel_lib.massive.stats import bootstrap, mean_intervals

LINES = (("top-1", "#d62728"), ("top-2", "#ff7f0e"), ("top-3", "#2ca02c"), ("median", "#1f77b4"))
KIND_COLOURS = {"start": "#d62728", "delimiter": "#1f77b4", "other": "#7f7f7f"}


def _nothing_found(title: str) -> go.Figure:
    """The figure for a run where no model has a massive activation (a random-weight model, say): the title and a
    note instead of empty panels."""
    fig = go.Figure()
    fig.add_annotation(text="no model in this run has a massive activation: nothing to plot (see the findings)",
                       x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 16})
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False})
    return fig


def _band(fig, x, low, high, colour, row, col):
    fig.add_trace(go.Scatter(x=x + x[::-1], y=high + low[::-1], fill="toself", fillcolor=colour, opacity=0.15,
                             line={"width": 0}, hoverinfo="skip", showlegend=False), row=row, col=col)


def _mean_bars(values: torch.Tensor) -> dict:
    """Error bars of the mean over windows of [N, L]: its 95 % bootstrap interval per column."""
    low, high = mean_intervals(values)
    centre = values.double().mean(0)
    return {"type": "data", "symmetric": False, "array": (high - centre).tolist(),
            "arrayminus": (centre - low).tolist(), "thickness": 1}


def layerwise_figure(panels: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> go.Figure:
    """Per layer: top-1/2/3 |h| and the median |h| (mean over sequences with its 95 % bootstrap interval as error
    bars; band = min..max over sequences), one panel per run.

    panels[label] = (magnitudes [N, L, 3], median [N, L]).
    """
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels), shared_yaxes=True)
    for col, (label, (top, median)) in enumerate(panels.items(), start=1):
        series = [top[..., i] for i in range(3)] + [median]
        x = list(range(median.shape[1]))
        for (name, colour), values in zip(LINES, series):
            _band(fig, x, values.min(0).values.tolist(), values.max(0).values.tolist(), colour, 1, col)
            fig.add_trace(go.Scatter(x=x, y=values.mean(0).tolist(), mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1, line={"color": colour},
                                     error_y=_mean_bars(values)), row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_yaxes(title_text="|h| (residual stream)", row=1, col=1)
    fig.update_layout(title="Top-1/2/3 and median magnitude of the residual stream per layer (mean over sequences, "
                            "bars: 95% bootstrap interval, band: min-max)")
    return fig


def surface_figure(size: torch.Tensor, tokens: Sequence[str], title: str) -> go.Figure:
    """Interactive 3-D surface of |h| [T, D] over token position x feature dimension."""
    labels = [f"{i}: {t!r}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Surface(z=size.tolist(), x=list(range(size.shape[1])), y=list(range(size.shape[0])),
                               colorscale="Viridis", colorbar={"title": "|h|"},
                               customdata=[[label] * size.shape[1] for label in labels],
                               hovertemplate="token %{customdata}<br>dim %{x}<br>|h| %{z:.1f}<extra></extra>"))
    fig.update_layout(title=title, scene={"xaxis_title": "feature dimension", "zaxis_title": "|h|",
                                          "yaxis": {"title": "token", "tickvals": list(range(len(tokens))),
                                                    "ticktext": [repr(t) for t in tokens]}})
    return fig


def constancy_figure(rows: Mapping[str, Sequence[Mapping]]) -> go.Figure:
    """Mean ± std over sequences of each massive activation (dimension, token kind), one panel per model.

    rows[model] = [{"dim", "kind", "layer", "mean", "std", ...}, ...].
    """
    title = "Value of each massive activation across sequences (mean ± std)"
    if not rows:
        return _nothing_found(title)
    fig = make_subplots(rows=1, cols=len(rows), subplot_titles=list(rows))
    for col, (model, items) in enumerate(rows.items(), start=1):
        for kind in KIND_COLOURS:
            mine = [r for r in items if r["kind"] == kind]
            if mine:
                fig.add_trace(go.Bar(x=[f"dim {r['dim']} · L{r['layer']}" for r in mine], y=[r["mean"] for r in mine],
                                     error_y={"type": "data", "array": [r["std"] for r in mine]}, name=kind,
                                     legendgroup=kind, showlegend=col == 1, marker_color=KIND_COLOURS[kind]),
                              row=1, col=col)
    fig.update_yaxes(title_text="value (mean ± std over sequences)", row=1, col=1)
    fig.update_layout(title=title, barmode="group")
    return fig


def language_figure(values: Mapping[str, Mapping[str, torch.Tensor]], labels: Mapping[str, str]) -> go.Figure:
    """Box plot per language of a massive activation's value, one panel per model.

    values[model][language] = 1-D values; labels[model] names the activation (dim, kind, layer).
    """
    title = "Value of the largest massive activation per language"
    if not values:
        return _nothing_found(title)
    fig = make_subplots(rows=len(values), cols=1, subplot_titles=[f"{m}: {labels[m]}" for m in values])
    for row, (model, per_lang) in enumerate(values.items(), start=1):
        for lang, vals in per_lang.items():
            fig.add_trace(go.Box(y=vals.tolist(), name=lang, boxpoints="all", jitter=0.3, showlegend=False,
                                 marker_color="#1f77b4"), row=row, col=1)
        fig.update_yaxes(title_text="value", row=row, col=1)
    fig.update_layout(title=title)
    return fig


def perplexity_figure(ppl: Mapping[str, Mapping[str, Mapping[str, float]]]) -> go.Figure:
    """Per-language perplexity under each intervention (log axis), one panel per model, and "all": the perplexity
    of every language's windows pooled (equal lengths), with its 95 % bootstrap interval over languages.

    ppl[model][condition][language] = perplexity (inf drawn at the top of the panel).
    """
    title = ("Perplexity when massive activations are zeroed or set to their mean (per language; all: pooled, "
             "bar = 95% bootstrap interval over languages)")
    if not ppl:
        return _nothing_found(title)
    palette = ["#2ca02c", "#d62728", "#1f77b4", "#8c564b", "#9467bd", "#7f7f7f"]
    fig = make_subplots(rows=len(ppl), cols=1, subplot_titles=list(ppl))
    for row, (model, conditions) in enumerate(ppl.items(), start=1):
        finite = [v for per in conditions.values() for v in per.values() if v != float("inf")]
        ceiling = max(finite) * 10 if finite else 1e6
        for i, (condition, per) in enumerate(conditions.items()):
            values = list(per.values())
            pooled = _pooled(values)
            bars = [min(v, ceiling) for v in values] + [min(pooled[0], ceiling)]
            errors = {"type": "data", "symmetric": False, "array": [0.0] * len(values) + [pooled[2] - pooled[0]],
                      "arrayminus": [0.0] * len(values) + [pooled[0] - pooled[1]], "thickness": 1}
            fig.add_trace(go.Bar(x=list(per) + ["all (95% CI)"], y=bars, name=condition, legendgroup=condition,
                                 showlegend=row == 1, marker_color=palette[i % len(palette)],
                                 error_y=errors if all(math.isfinite(p) for p in pooled) else None,
                                 hovertext=[f"{v:.4g}" for v in values + [pooled[0]]]), row=row, col=1)
        fig.update_yaxes(type="log", title_text="perplexity", row=row, col=1)
    fig.update_layout(title=title, barmode="group")
    return fig


def _pooled(perplexities: Sequence[float]) -> tuple[float, float, float]:
    """exp(mean NLL) over equal-length windows given their perplexities, and its bootstrap interval."""
    nll = torch.tensor([math.log(p) if p < math.inf else math.inf for p in perplexities], dtype=torch.float64)
    if not bool(torch.isfinite(nll).all()):
        return math.inf, math.inf, math.inf
    est, low, high = bootstrap(nll)
    return math.exp(est), math.exp(low), math.exp(high)


def attention_heatmaps(maps: Mapping[str, Mapping[int, torch.Tensor]],
                       tokens: Mapping[str, Sequence[str]]) -> go.Figure:
    """Head-averaged attention probabilities [T, T] at two layers per model (rows: models, columns: layers).

    maps[model][layer] = [T, T]; tokens[model] labels the axes.
    """
    title = ("Head-averaged attention of the prompt at the layer where the largest massive activation appears "
             "and the next")
    if not maps:
        return _nothing_found(title)
    models = list(maps)
    titles = [f"{m} · layer {layer}" for m in models for layer in maps[m]]
    fig = make_subplots(rows=len(models), cols=2, subplot_titles=titles, horizontal_spacing=0.12)
    for row, model in enumerate(models, start=1):
        ticks = [f"{i} {t!r}" for i, t in enumerate(tokens[model])]
        for col, (layer, attn) in enumerate(maps[model].items(), start=1):
            fig.add_trace(go.Heatmap(z=attn.tolist(), x=ticks, y=ticks, colorscale="Blues", zmin=0, zmax=1,
                                     showscale=row == 1 and col == 2), row=row, col=col)
            fig.update_yaxes(autorange="reversed", title_text="query" if col == 1 else None, row=row, col=col)
            fig.update_xaxes(title_text="key", row=row, col=col)
    fig.update_layout(title=title)
    return fig


def attention_mass_figure(mass: Mapping[str, torch.Tensor], baseline: Mapping[str, float],
                          spans: Mapping[str, tuple[int, int]]) -> go.Figure:
    """Per layer: share of attention on massive-activation tokens (mean with its 95 % bootstrap interval over
    sequences as error bars, band = min..max over sequences), with the
    uniform-attention baseline; shaded: the layers whose input carries the massive activation (it is in the
    output of blocks first..last, so in the input of blocks first+1..last+1).

    mass[model] = [N, L]; baseline[model] = float; spans[model] = (first layer, last layer) of the activation.
    """
    title = ("Share of attention on the massive-activation tokens per layer (mean over sequences, bars: 95% "
             "bootstrap interval, band: min-max)")
    if not mass:
        return _nothing_found(title)
    fig = make_subplots(rows=1, cols=len(mass), subplot_titles=list(mass), shared_yaxes=True)
    for col, (model, values) in enumerate(mass.items(), start=1):
        x = list(range(values.shape[1]))
        _band(fig, x, values.min(0).values.tolist(), values.max(0).values.tolist(), "#1f77b4", 1, col)
        fig.add_trace(go.Scatter(x=x, y=values.mean(0).tolist(), mode="lines+markers", name="attention on them",
                                 legendgroup="mass", showlegend=col == 1, line={"color": "#1f77b4"},
                                 error_y=_mean_bars(values)), row=1, col=col)
        fig.add_trace(go.Scatter(x=x, y=[baseline[model]] * len(x), mode="lines", name="uniform causal attention",
                                 legendgroup="base", showlegend=col == 1, line={"color": "#7f7f7f", "dash": "dash"}),
                      row=1, col=col)
        first, last = spans[model]  # after the traces: plotly skips shapes on subplots that have none yet
        fig.add_vrect(x0=first + 0.5, x1=min(last + 1, len(x) - 1) + 0.5, fillcolor="#d62728", opacity=0.15,
                      layer="below", line_width=0, row=1, col=col)
        fig.update_xaxes(title_text="layer (shaded: its input carries the massive activation)", row=1, col=col)
    fig.update_yaxes(title_text="share of attention on massive-activation tokens", range=[0, 1], row=1, col=1)
    fig.update_layout(title=title)
    return fig
