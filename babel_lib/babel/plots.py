"""Figures of notebooks 01_convert and 02_profile: partition cohesion, the equivalence check, frequency heatmaps, differences, shared/specific experts, language
similarity, stability and model comparisons. Each function takes arrays and returns a plotly figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors as pc
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

FREQ_SCALE = "Viridis"
DIFF_SCALE = "RdBu_r"


def group_colours(labels: Sequence[str]) -> dict[str, str]:
    """One colour per distinct label (e.g. language family), in order of first appearance."""
    palette = pc.qualitative.Dark24
    return {g: palette[i % len(palette)] for i, g in enumerate(dict.fromkeys(labels))}


def _grid(n: int, cols: int) -> tuple[int, int]:
    return math.ceil(n / cols), min(n, cols)


def _heatmap_grid(values: np.ndarray, titles: Sequence[str], title: str, *, zmin: float, zmax: float,
                  colorscale: str, colorbar: str, cols: int = 5) -> go.Figure:
    """One heatmap per panel (layers as rows, layer 0 on top; experts as columns), one shared colour axis."""
    rows, cols = _grid(len(titles), cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles), horizontal_spacing=0.02,
                        vertical_spacing=0.06)
    for i, z in enumerate(values):
        fig.add_trace(go.Heatmap(z=z, coloraxis="coloraxis", hovertemplate="layer %{y}, rank %{x}: %{z:.3f}"
                                 "<extra>" + titles[i] + "</extra>"), row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    for r in range(1, rows + 1):
        fig.update_yaxes(showticklabels=True, title_text="layer", row=r, col=1)
    fig.update_layout(title=title, coloraxis={"colorscale": colorscale, "cmin": zmin, "cmax": zmax,
                                              "colorbar": {"title": {"text": colorbar}}},
                      plot_bgcolor="#eeeeee")
    return fig


def frequency_grid(freq: np.ndarray, languages: Sequence[str], model: str, cols: int = 5) -> go.Figure:
    """Per-language activation-frequency heatmaps [n, L, E] on a fixed [0, 1] scale; experts already put in
    one shared order (x = rank of the expert in its layer by mean frequency)."""
    return _heatmap_grid(freq, languages, f"{model}: expert activation frequency per language (experts ordered by "
                         "mean frequency, the same order in every panel)", zmin=0, zmax=1, colorscale=FREQ_SCALE,
                         colorbar="frequency", cols=cols)


def frequency_explorer(freq: np.ndarray, languages: Sequence[str], model: str) -> go.Figure:
    """One heatmap with a dropdown over languages (interactive HTML; the PNG shows the first language)."""
    fig = go.Figure(go.Heatmap(z=freq[0], zmin=0, zmax=1, colorscale=FREQ_SCALE,
                               colorbar={"title": {"text": "frequency"}},
                               hovertemplate="layer %{y}, rank %{x}: %{z:.3f}<extra></extra>"))
    buttons = [{"label": lang, "method": "update",
                "args": [{"z": [freq[i]]}, {"title.text": f"{model}: activation frequency, {lang}"}]}
               for i, lang in enumerate(languages)]
    fig.update_layout(title=f"{model}: activation frequency, {languages[0]}",
                      updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top"}])
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_xaxes(title_text="expert rank in its layer (by mean frequency over languages)")
    return fig


def difference_grid(diff: np.ndarray, significant: np.ndarray, titles: Sequence[str], title: str,
                    cols: int = 5) -> go.Figure:
    """Frequency differences [n, L, E] on a symmetric fixed scale; cells within the noise floor are blank."""
    shown = np.where(significant, diff, np.nan)
    limit = float(np.nanmax(np.abs(shown))) if np.isfinite(shown).any() else 1.0
    return _heatmap_grid(shown, titles, title, zmin=-limit, zmax=limit, colorscale=DIFF_SCALE,
                         colorbar="Δ frequency", cols=cols)


def high_frequency_layers(fractions: Mapping[str, np.ndarray], languages: Sequence[str], tau_high: float
                          ) -> go.Figure:
    """Per model, the fraction of each layer's experts that are high-frequency (f >= tau_high), per language."""
    models = list(fractions)
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, shared_yaxes=True,
                        horizontal_spacing=0.04)
    for col, model in enumerate(models, start=1):
        fig.add_trace(go.Heatmap(z=fractions[model], y=list(languages), coloraxis="coloraxis",
                                 hovertemplate="%{y}, layer %{x}: %{z:.1%}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"High-frequency experts (f ≥ {tau_high}) across layers: fraction of the layer's experts",
                      coloraxis={"colorscale": "Magma", "cmin": 0,
                                 "colorbar": {"title": {"text": "fraction"}, "tickformat": ".0%"}})
    return fig


def shared_specific_layers(shared: Mapping[str, np.ndarray], specific: Mapping[str, np.ndarray],
                           languages: Sequence[str], n_experts: int) -> go.Figure:
    """Per model (columns): shared experts per layer (top) and language-specific experts per layer, stacked by
    language (bottom). shared[m] is [L]; specific[m] is [n, L] (experts specific to each language)."""
    models = list(shared)
    fig = make_subplots(rows=2, cols=len(models), subplot_titles=[*models, *[""] * len(models)],
                        vertical_spacing=0.1, horizontal_spacing=0.06)
    colours = group_colours(languages)
    for col, model in enumerate(models, start=1):
        layers = list(range(len(shared[model])))
        fig.add_trace(go.Bar(x=layers, y=shared[model], marker_color="#444444", name="shared (every language)",
                             showlegend=col == 1, legendgroup="shared"), row=1, col=col)
        for i, lang in enumerate(languages):
            fig.add_trace(go.Bar(x=layers, y=specific[model][i], name=lang, marker_color=colours[lang],
                                 legendgroup=lang, showlegend=col == 1), row=2, col=col)
        fig.update_xaxes(title_text="layer", row=2, col=col)
    fig.update_yaxes(title_text=f"shared experts (of {n_experts})", row=1, col=1)
    fig.update_yaxes(title_text="language-specific experts", row=2, col=1)
    fig.update_layout(title="Shared and language-specific experts per layer", barmode="stack")
    return fig


def similarity_matrices(sims: Mapping[str, np.ndarray], languages: Sequence[str], metric: str) -> go.Figure:
    """Language-similarity matrices side by side (languages in the given order, e.g. grouped by family)."""
    models = list(sims)
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, horizontal_spacing=0.08)
    off = np.concatenate([s[~np.eye(len(s), dtype=bool)] for s in sims.values()])
    for col, model in enumerate(models, start=1):
        fig.add_trace(go.Heatmap(z=sims[model], x=list(languages), y=list(languages), coloraxis="coloraxis",
                                 hovertemplate="%{y} – %{x}: %{z:.3f}<extra></extra>"), row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"Language similarity of activation frequencies ({metric})",
                      coloraxis={"colorscale": "Viridis", "cmin": float(off.min()), "cmax": float(off.max()),
                                 "colorbar": {"title": {"text": metric}}})
    return fig


def dendrograms(trees: Mapping[str, dict], groups: Mapping[str, str], title: str) -> go.Figure:
    """Dendrograms (scipy coordinates) side by side; leaves coloured by group (e.g. language family).

    trees[m] is scipy's dendrogram dict (icoord, dcoord, ivl); groups maps a leaf label to its group.
    """
    models = list(trees)
    colours = group_colours(list(groups.values()))
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, horizontal_spacing=0.06)
    for col, model in enumerate(models, start=1):
        tree = trees[model]
        for xs, ys in zip(tree["icoord"], tree["dcoord"]):
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#555555", "width": 1.5},
                                     hoverinfo="skip", showlegend=False), row=1, col=col)
        leaves = tree["ivl"]
        xs = [5 + 10 * i for i in range(len(leaves))]
        for group, colour in colours.items():
            idx = [i for i, leaf in enumerate(leaves) if groups[leaf] == group]
            fig.add_trace(go.Scatter(x=[xs[i] for i in idx], y=[0] * len(idx), mode="markers+text",
                                     text=[leaves[i] for i in idx], textposition="bottom center",
                                     marker={"color": colour, "size": 11}, name=group, legendgroup=group,
                                     showlegend=col == 1, hovertemplate="%{text}<extra>" + group + "</extra>"),
                          row=1, col=col)
        fig.update_xaxes(showticklabels=False, row=1, col=col)
    fig.update_yaxes(title_text="distance (1 − similarity)", row=1, col=1)
    fig.update_layout(title=title, legend={"title": {"text": "family"}})
    return fig


def stability(split_half: Mapping[str, np.ndarray], beyond: Mapping[str, np.ndarray], languages: Sequence[str],
              z: float) -> go.Figure:
    """Per language and model: split-half correlation of the frequencies (top) and the fraction of cells whose
    difference from the all-language mean exceeds z standard errors (bottom)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=["split-half correlation (even vs odd paragraphs)",
                                        f"cells differing from the all-language mean by more than {z:g} s.e."])
    for i, model in enumerate(split_half):
        colour = pc.qualitative.Set1[i % len(pc.qualitative.Set1)]
        fig.add_trace(go.Bar(x=list(languages), y=split_half[model], name=model, marker_color=colour,
                             legendgroup=model), row=1, col=1)
        fig.add_trace(go.Bar(x=list(languages), y=beyond[model], name=model, marker_color=colour,
                             legendgroup=model, showlegend=False), row=2, col=1)
    low = min(float(np.min(v)) for v in split_half.values())
    fig.update_yaxes(range=[min(0.9, low) - 0.01, 1.0], title_text="Pearson r", row=1, col=1)
    fig.update_yaxes(tickformat=".0%", title_text="share of cells", row=2, col=1)
    fig.update_layout(title="Split-half stability of the frequencies and of the language differences",
                      barmode="group")
    return fig


def model_comparison(sims: Mapping[str, np.ndarray], languages: Sequence[str],
                     per_layer: Mapping[str, Mapping[str, np.ndarray]]) -> go.Figure:
    """Two models side by side: language-pair similarities of one against the other (left), and per-layer
    curves against relative depth (right; per_layer[name][model] is [L])."""
    a, b = list(sims)[:2]
    i, j = np.triu_indices(len(languages), 1)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["language-pair similarity", "per layer, by relative depth"],
                        horizontal_spacing=0.1)
    fig.add_trace(go.Scatter(x=sims[a][i, j], y=sims[b][i, j], mode="markers", name="language pairs",
                             text=[f"{languages[p]}–{languages[q]}" for p, q in zip(i, j)],
                             hovertemplate="%{text}: %{x:.3f} vs %{y:.3f}<extra></extra>",
                             marker={"color": "#1f77b4", "size": 7}), row=1, col=1)
    dashes = ["solid", "dash", "dot", "dashdot"]
    for k, (name, values) in enumerate(per_layer.items()):
        for m, model in enumerate(values):
            v = np.asarray(values[model], dtype=float)
            depth = np.arange(len(v)) / max(len(v) - 1, 1)
            fig.add_trace(go.Scatter(x=depth, y=v, mode="lines+markers", name=f"{model}: {name}",
                                     line={"dash": dashes[k % len(dashes)],
                                           "color": pc.qualitative.Set1[m % len(pc.qualitative.Set1)]}),
                          row=1, col=2)
    fig.update_xaxes(title_text=a, row=1, col=1)
    fig.update_yaxes(title_text=b, row=1, col=1)
    fig.update_xaxes(title_text="relative depth (0 = first layer, 1 = last)", row=1, col=2)
    fig.update_yaxes(title_text="fraction of the layer's experts", tickformat=".0%", row=1, col=2)
    fig.update_layout(title=f"{a} vs {b}: language similarity and per-layer expert fractions")
    return fig


def variant_comparison(results: Mapping[str, Mapping[str, np.ndarray]]) -> go.Figure:
    """Base vs instruct, per layer: correlation of their frequencies and mean |difference| (one line per pair)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["correlation of frequencies", "mean |difference|"])
    for k, (pair, result) in enumerate(results.items()):
        colour = pc.qualitative.Set1[k % len(pc.qualitative.Set1)]
        layers = list(range(len(result["layer_correlation"])))
        fig.add_trace(go.Scatter(x=layers, y=result["layer_correlation"], name=pair, legendgroup=pair,
                                 line={"color": colour}), row=1, col=1)
        fig.add_trace(go.Scatter(x=layers, y=result["layer_mean_abs_difference"], name=pair, legendgroup=pair,
                                 showlegend=False, line={"color": colour}), row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title="Instruction tuning: base vs instruct activation frequencies per layer")
    return fig

def _counting_style(i: int, label: str) -> dict:
    """Line style of the i-th counting of a model (the same position, the same colour in every model's panels);
    the second expert size is dashed."""
    return {"color": pc.qualitative.Dark24[i % 24], "dash": "dash" if i >= 4 and "neurons" not in label else "solid"}


def tau_sensitivity(curves: Mapping[str, Mapping[str, np.ndarray]], taus: Sequence[float], paper: Mapping[str, str],
                    references: Mapping[str, float]) -> go.Figure:
    """Shared, specific and dormant fractions (columns) against the threshold tau (log axis in every panel), one
    line per counting, one row per model; curves[model][counting] is [T, 3], every model's countings in the same
    order. The paper's counting (paper[model]) is drawn thick; references {"shared": v, "dormant": v} are the
    paper's fractions, dotted."""
    models, kinds = list(curves), ["shared", "specific", "dormant"]
    fig = make_subplots(rows=len(models), cols=3, shared_xaxes=True, vertical_spacing=0.08, horizontal_spacing=0.06,
                        subplot_titles=[f"{m}: {k}" for m in models for k in kinds])
    for row, model in enumerate(models, start=1):
        for i, (label, values) in enumerate(curves[model].items()):
            line = {**_counting_style(i, label), "width": 4 if label == paper[model] else 1.5}
            for col in range(3):
                fig.add_trace(go.Scatter(x=list(taus), y=values[:, col], mode="lines+markers", name=label,
                                         legendgroup=model, legendgrouptitle_text=model, showlegend=col == 0,
                                         line=line, hovertemplate=f"{model}: {label}<br>τ %{{x}}: %{{y:.1%}}"
                                                                  "<extra></extra>"), row=row, col=col + 1)
        for col, kind in enumerate(kinds, start=1):
            if kind in references:
                fig.add_hline(y=references[kind], line={"dash": "dot", "color": "black"}, row=row, col=col,
                              annotation_text=f"paper (v1): {references[kind]:.1%}", annotation_position="top left")
    fig.update_xaxes(type="log", title_text="τ (frequency threshold)")
    fig.update_yaxes(tickformat=".0%", range=[0, 1])
    fig.update_layout(title="Shared (f ≥ τ in every language), specific (f ≥ τ in few, low elsewhere) and dormant "
                            "(f < τ in every language) fractions of experts against τ, per counting rule",
                      legend={"groupclick": "toggleitem"})
    return fig


def rule_layers(per_layer: Mapping[str, Mapping[str, np.ndarray]], tau_high: float) -> go.Figure:
    """Per model (columns), the fraction of each layer's experts with f >= tau_high (mean over languages), one
    line per counting (per_layer[model][counting] is [L], every model's countings in the same order)."""
    models = list(per_layer)
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, shared_yaxes=True, horizontal_spacing=0.05)
    for col, model in enumerate(models, start=1):
        for i, (label, values) in enumerate(per_layer[model].items()):
            fig.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers", name=label,
                                     legendgroup=model, legendgrouptitle_text=model,
                                     line=_counting_style(i, label)), row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(title_text=f"experts with f ≥ {tau_high} (fraction of the layer)", tickformat=".0%", row=1, col=1)
    fig.update_layout(title=f"High-frequency experts (f ≥ {tau_high}) per layer under each counting rule")
    return fig


def fragmentation_bars(ratios: Mapping[str, np.ndarray], languages: Sequence[str], reference: str) -> go.Figure:
    """Tokens per `reference`-language token over the same parallel paragraphs, per language, one bar group per
    model (ratios[model] is [n])."""
    fig = go.Figure([go.Bar(x=list(languages), y=r, name=model, hovertemplate="%{x}: %{y:.2f}×<extra></extra>")
                     for model, r in ratios.items()])
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "black"})
    fig.update_layout(title=f"Tokens per {reference} token on the same paragraphs, per language and tokenizer",
                      barmode="group", xaxis_title="language", yaxis_title=f"tokens / {reference} tokens")
    return fig


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


def equivalence_figure(checks: Mapping[str, Mapping[str, float]]) -> go.Figure:
    """Max |logit difference| against the dense model: every expert active vs a control with experts dropped.
    A linear axis: an exact match is a bar of height 0 labelled "exactly 0"."""
    models = list(checks)
    fig = go.Figure()
    for key, label, colour in (("all_experts", "every expert active", "#2ca02c"),
                               ("dropped", "control: experts dropped", "#d62728")):
        values = [checks[m][key] for m in models]
        text = [f"{v:.1e}" if v else "exactly 0" for v in values]
        fig.add_trace(go.Bar(x=models, y=values, name=label, text=text, textposition="outside",
                             marker_color=colour))
    fig.update_yaxes(title_text="max |converted − dense| logit", rangemode="tozero")
    fig.update_layout(title="Converted MoE vs dense model: max logit difference", barmode="group")
    return fig


def routed_figure(routed) -> go.Figure:
    """Perplexity relative to the dense model when each token runs only its top share of experts (± s.e.),
    beside the control that keeps the same share of experts at random; one panel per model."""
    models = list(routed.losses)
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, shared_yaxes=True)
    for col, m in enumerate(models, start=1):
        ratios = [routed.ratio(m, routed.label(f)) for f in routed.fractions]
        fig.add_trace(go.Scatter(x=[100 * f for f in routed.fractions], y=[r for r, _ in ratios], mode="lines+markers",
                                 name="top experts by score", legendgroup="top", showlegend=col == 1,
                                 error_y={"type": "data", "array": [e for _, e in ratios]},
                                 line={"color": "#1f77b4"}), row=1, col=col)
        control = routed.label(routed.control, random=True)
        if control in routed.losses[m]:
            r, e = routed.ratio(m, control)
            fig.add_trace(go.Scatter(x=[100 * routed.control], y=[r], mode="markers", name="random experts (fixed)",
                                     legendgroup="random", showlegend=col == 1, error_y={"type": "data", "array": [e]},
                                     marker={"color": "#d62728", "symbol": "x", "size": 10}), row=1, col=col)
        fig.add_hline(y=1.0, line_dash="dash", annotation_text="dense", row=1, col=col)
        fig.update_xaxes(title_text="experts active per token and layer (%)", row=1, col=col)
    fig.update_yaxes(type="log")  # every panel: plotly.js drops a shared y-axis between log and linear panels
    fig.update_yaxes(title_text="perplexity / dense perplexity", row=1, col=1)
    fig.update_layout(title="Routed-model perplexity vs share of active experts")
    return fig


def kernel_free_explorer(freq: np.ndarray, diff: np.ndarray, languages: Sequence[str], model: str,
                         noise_z: float) -> go.Figure:
    """A heatmap explorer that needs no kernel: a slider over languages and a dropdown between the frequency
    and the difference to the all-language mean (cells within noise_z s.e. blank, NaN in `diff`). freq and
    diff are [n, L, E], experts already in one order; layer 0 on top."""
    labels = list(languages)
    limit = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
    fig = go.Figure([
        go.Heatmap(z=freq[0], zmin=0, zmax=1, colorscale=FREQ_SCALE, name="frequency",
                   colorbar={"title": {"text": "activation frequency (share of tokens)"}},
                   hovertemplate="layer %{y}, rank %{x}: %{z:.4f}<extra>frequency</extra>"),
        go.Heatmap(z=diff[0], zmin=-limit, zmax=limit, colorscale=DIFF_SCALE, visible=False, name="difference",
                   colorbar={"title": {"text": "Δ activation frequency"}},
                   hovertemplate="layer %{y}, rank %{x}: %{z:+.4f}<extra>language − mean</extra>")])
    steps = [{"label": lang, "method": "update",
              "args": [{"z": [freq[i], diff[i]]}, {"title.text": f"{model} · {lang}"}]}
             for i, lang in enumerate(labels)]
    views = [{"label": "frequency", "method": "restyle", "args": [{"visible": [True, False]}]},
             {"label": f"language − mean (blank within {noise_z:g} s.e.)", "method": "restyle",
              "args": [{"visible": [False, True]}]}]
    fig.update_layout(title=f"{model} · {labels[0]}", plot_bgcolor="#eeeeee", height=620,
                      sliders=[{"steps": steps, "currentvalue": {"prefix": "language: "}, "pad": {"t": 50}}],
                      updatemenus=[{"buttons": views, "x": 1.0, "xanchor": "right", "y": 1.14, "yanchor": "top"}])
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_xaxes(title_text="expert rank in its layer (by mean frequency over languages)")
    return fig
