"""Figures of notebook 05_prune: perplexity vs pruning rate, the cross-lingual matrix, dynamic vs static sparsity,
and the sliced models' speed. Each function takes result objects and returns a plotly figure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from babel_lib.babel.pruning_study import PruneResult, SpeedResult

COLOURS = {"frequency": "#1f77b4", "adaptive": "#2ca02c", "random": "#d62728", "dense": "#555555",
           "dynamic": "#9467bd"}


def rate_curves(r: PruneResult) -> go.Figure:
    """One panel per language: perplexity vs rate for frequency-guided (uniform, adaptive), random mean +- std,
    and the unpruned model."""
    n = len(r.languages)
    fig = make_subplots(rows=1, cols=n, subplot_titles=r.languages, shared_yaxes=False)
    x = [0.0, *r.rates]
    for j, lang in enumerate(r.languages):
        show = j == 0
        mean, std = r.random[:, :, j].mean(1), r.random[:, :, j].std(1, ddof=1) if r.random.shape[1] > 1 else 0
        lo, hi = np.exp(mean - std), np.exp(mean + std)
        dense = np.exp(r.dense[j])
        fig.add_trace(go.Scatter(x=r.rates + r.rates[::-1], y=[*hi, *lo[::-1]], fill="toself", line={"width": 0},
                                 fillcolor="rgba(214,39,40,0.2)", name="random ± std", legendgroup="band",
                                 showlegend=show, hoverinfo="skip"), row=1, col=j + 1)
        for key, y in (("random", [dense, *np.exp(mean)]), ("frequency", [dense, *np.exp(r.frequency[:, j])]),
                       ("adaptive", [dense, *np.exp(r.adaptive[:, j])])):
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name={"random": "random (mean)",
                                     "frequency": "frequency-guided", "adaptive": "frequency-guided, layer-adaptive"}[key],
                                     line={"color": COLOURS[key]}, legendgroup=key, showlegend=show),
                          row=1, col=j + 1)
        fig.add_hline(y=dense, line={"color": COLOURS["dense"], "dash": "dot"}, row=1, col=j + 1)
    fig.update_yaxes(type="log")  # every panel: the same quantity on the same scale
    fig.update_yaxes(title_text="perplexity", col=1)
    fig.update_xaxes(title_text="share of experts pruned", tickformat=".0%")
    fig.update_layout(title=f"{r.model}: held-out perplexity vs pruning rate (seq_len {r.seq_len}; dotted: unpruned)",
                      height=380)
    return fig


def cross_matrix(results: Sequence[PruneResult]) -> go.Figure:
    """Per model: perplexity when pruning with source language A's frequencies and evaluating on B, divided by B's
    unpruned perplexity."""
    fig = make_subplots(rows=1, cols=len(results), subplot_titles=[r.model for r in results])
    for i, r in enumerate(results):
        z = np.exp(r.cross - r.dense[None])
        fig.add_trace(go.Heatmap(z=z, x=r.languages, y=r.languages, coloraxis="coloraxis", text=np.round(z, 2),
                                 texttemplate="%{text}", hovertemplate="prune with %{y}, evaluate on %{x}: %{z:.3f}"
                                 "<extra></extra>"), row=1, col=i + 1)
    fig.update_yaxes(autorange="reversed", title_text="frequencies of (source)", col=1)
    fig.update_xaxes(title_text="evaluated on (target)")
    rate = results[0].cross_rate
    fig.update_layout(coloraxis={"colorscale": "Viridis", "colorbar": {"title": "ppl / unpruned"}}, height=420,
                      title=f"Cross-lingual pruning at {rate:.0%}: perplexity relative to the target's unpruned model")
    return fig


def dynamic_vs_static(results: Sequence[PruneResult]) -> go.Figure:
    """Median (over languages) perplexity ratio to the unpruned model vs the share of experts kept."""
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot"]
    for i, r in enumerate(results):
        dash = dashes[i % len(dashes)]
        fig.add_trace(go.Scatter(x=r.active_ratios, y=np.median(np.exp(r.dynamic - r.dense[None]), 1),
                                 mode="lines+markers", name=f"{r.model}: dynamic top-k per token",
                                 line={"color": COLOURS["dynamic"], "dash": dash}))
        fig.add_trace(go.Scatter(x=r.kept, y=np.median(np.exp(r.frequency - r.dense[None]), 1), mode="lines+markers",
                                 name=f"{r.model}: static frequency-guided", line={"color": COLOURS["frequency"],
                                                                                   "dash": dash}))
    fig.update_xaxes(title_text="share of experts kept (active)", tickformat=".0%", autorange="reversed")
    fig.update_yaxes(title_text="median perplexity / unpruned", type="log")
    fig.update_layout(title="Dynamic vs static expert sparsity: perplexity ratio vs kept share", height=420)
    return fig


def speed(speeds: Sequence[SpeedResult]) -> go.Figure:
    """Measured speed-up of the sliced decoder body and the ideal one vs the kept share."""
    fig = go.Figure()
    for s in speeds:
        fig.add_trace(go.Scatter(x=s.kept, y=s.speedup(), mode="lines+markers", name=f"{s.model}: measured"))
        fig.add_trace(go.Scatter(x=s.kept, y=s.ideal(), mode="lines", line={"dash": "dot"},
                                 name=f"{s.model}: ideal (FFN share {s.ffn_share:.0%})"))
    fig.update_xaxes(title_text="share of FFN neurons kept", tickformat=".0%", autorange="reversed")
    fig.update_yaxes(title_text="speed-up vs dense (decoder body)")
    fig.update_layout(title=f"Sliced models: measured speed-up on {speeds[0].device if speeds else ''}", height=400)
    return fig
