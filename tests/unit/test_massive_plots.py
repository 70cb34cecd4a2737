"""A run in which no model has a massive activation (a random-weight model) still draws every 03 figure."""

from __future__ import annotations

from babel_lib.massive import plots


def test_figures_without_any_massive_activation_say_so_instead_of_failing():
    empty = [plots.constancy_figure({}), plots.language_figure({}, {}), plots.perplexity_figure({}),
             plots.attention_heatmaps({}, {}), plots.attention_mass_figure({}, {}, {})]
    for fig in empty:
        assert not fig.data and fig.layout.title.text
        assert "no model in this run has a massive activation" in fig.layout.annotations[0].text
