"""Figures of notebook 01_convert: partition cohesion and the dense-vs-converted equivalence check."""

from __future__ import annotations

from collections.abc import Mapping

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots


def cohesion_figure(cohesion: Mapping[str, Mapping[str, torch.Tensor]]) -> go.Figure:
    """Per-layer mean within-expert cosine similarity, one panel per model, one line per partition method.

    cohesion[model][method] is [n_layers, n_experts].
    """
    models = list(cohesion)
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, shared_yaxes=True)
    palette = {"kmeans": "#1f77b4", "coactivation": "#2ca02c", "random": "#7f7f7f", "contiguous": "#ff7f0e"}
    for col, model in enumerate(models, start=1):
        for method, values in cohesion[model].items():
            mean = values.mean(dim=1)
            fig.add_trace(go.Scatter(x=list(range(len(mean))), y=mean.tolist(), mode="lines+markers", name=method,
                                     legendgroup=method, showlegend=col == 1,
                                     line={"color": palette.get(method)}), row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(title_text="mean within-expert cosine similarity", row=1, col=1)
    fig.update_layout(title="Partition cohesion per layer: balanced k-means vs baselines")
    return fig


def equivalence_figure(checks: Mapping[str, Mapping[str, float]], tolerance: float = 1e-5) -> go.Figure:
    """Max |logit difference| against the dense model: every expert active vs a control with experts dropped."""
    models = list(checks)
    floor = 1e-12  # an exact match is drawn at the floor of the log axis
    fig = go.Figure()
    for key, label, colour in (("all_experts", "every expert active", "#2ca02c"),
                               ("dropped", "control: experts dropped", "#d62728")):
        values = [max(checks[m][key], floor) for m in models]
        text = [f"{checks[m][key]:.1e}" if checks[m][key] else "0 (exact)" for m in models]
        fig.add_trace(go.Bar(x=models, y=values, name=label, text=text, textposition="outside",
                             marker_color=colour))
    fig.add_hline(y=tolerance, line_dash="dash", annotation_text=f"tolerance {tolerance:g}")
    fig.update_yaxes(type="log", title_text="max |converted − dense| logit")
    fig.update_layout(title="The converted MoE reproduces the dense model", barmode="group")
    return fig
