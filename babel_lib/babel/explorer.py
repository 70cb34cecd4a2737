"""Interactive explorer of expert activation frequencies: layers × experts heatmaps per model and language.

The arrays come from the frequency artefacts of notebook 02 (an index per run maps each model to its
safetensors file). `heatmap` computes what is shown from a `FrequencySet` and the `Controls`, so the logic
is testable without widgets; `Explorer` wires ipywidgets controls to a plotly FigureWidget that it updates
in place. The same explorer is embedded in notebook 02 and served as a standalone app (apps/explorer.py).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from babel_lib.core.artefacts import read_artefact
from babel_lib.errors import BabelError
from babel_lib.data.languages import language

VIEWS = {"language": "one language", "vs_mean": "language − mean of all", "pair": "language A − language B"}
ORDERS = {"mean": "by mean frequency across languages", "index": "original expert index",
          "language": "by this language's frequency"}
SCALES = {"fixed": "fixed range", "auto": "auto"}


@dataclass(frozen=True)
class FrequencySet:
    """Per-language expert activation frequencies of one model: freq[lang, layer, expert] in [0, 1]."""

    model: str
    languages: tuple[str, ...]
    freq: np.ndarray
    card: str = ""
    corpus: str = ""
    rule: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.freq.ndim != 3 or self.freq.shape[0] != len(self.languages):
            raise BabelError(f"frequencies of {self.model} have shape {tuple(self.freq.shape)} for "
                             f"{len(self.languages)} languages; expected [n_languages, n_layers, n_experts]")

    @property
    def n_layers(self) -> int:
        return self.freq.shape[1]

    @property
    def n_experts(self) -> int:
        return self.freq.shape[2]

    def row(self, code: str) -> np.ndarray:
        """The [n_layers, n_experts] frequencies of one language."""
        if code not in self.languages:
            raise BabelError(f"{self.model} has no frequencies for language {code!r}; it has "
                             f"{', '.join(self.languages)}")
        return self.freq[self.languages.index(code)]


@dataclass(frozen=True)
class Controls:
    """What the explorer shows. layers is an inclusive (first, last) range, None for all layers."""

    language: str
    view: str = "language"
    other: str | None = None
    layers: tuple[int, int] | None = None
    order: str = "mean"
    scale: str = "fixed"


@dataclass(frozen=True)
class Heatmap:
    """A displayed matrix: z[row, column], the layer of each row, the original expert of each cell."""

    z: np.ndarray
    layers: np.ndarray
    experts: np.ndarray
    zrange: tuple[float, float]
    diverging: bool
    title: str
    subtitle: str
    xlabel: str


def language_label(code: str) -> str:
    """'German (de)' for a known code, the code itself otherwise."""
    try:
        return f"{language(code).name} ({code})"
    except BabelError:
        return code


def _choice(name: str, value: str, options: Mapping[str, str]) -> None:
    if value not in options:
        raise BabelError(f"unknown {name} {value!r}; use one of: {', '.join(options)}")


def _layer_range(fs: FrequencySet, layers: tuple[int, int] | None) -> tuple[int, int]:
    first, last = layers if layers is not None else (0, fs.n_layers - 1)
    if not 0 <= first <= last < fs.n_layers:
        raise BabelError(f"layer range {first}..{last} is outside {fs.model}'s layers 0..{fs.n_layers - 1}; "
                         f"pick first <= last within it")
    return first, last


def _describe(fs: FrequencySet, c: Controls) -> tuple[str, str]:
    """The title (model, language(s), what is shown) and subtitle (card, rule, corpus) of a heatmap."""
    what = {"language": f"{language_label(c.language)}: expert activation frequency",
            "vs_mean": f"{language_label(c.language)} − mean of {len(fs.languages)} languages",
            "pair": f"{language_label(c.language)} − {language_label(c.other or '')}: frequency difference"}[c.view]
    rule = ", ".join(f"{k} {v}" for k, v in fs.rule.items())
    parts = [fs.card or fs.model, rule, f"data: {fs.corpus}" if fs.corpus else ""]
    return f"{fs.model} · {what}", " · ".join(p for p in parts if p)


def heatmap(fs: FrequencySet, c: Controls) -> Heatmap:
    """The matrix the explorer displays for these controls: selected layers × experts, each row ordered."""
    _choice("view", c.view, VIEWS)
    _choice("expert order", c.order, ORDERS)
    _choice("colour scale", c.scale, SCALES)
    first, last = _layer_range(fs, c.layers)
    rows = slice(first, last + 1)
    own = fs.row(c.language)
    if c.view == "language":
        values = own
    elif c.view == "vs_mean":
        values = own - fs.freq.mean(axis=0)
    else:
        if c.other is None:
            raise BabelError("the pair view needs a second language; set Controls.other")
        values = own - fs.row(c.other)
    values = values[rows]
    key = {"mean": fs.freq.mean(axis=0), "language": own}.get(c.order)
    if key is None:
        experts = np.broadcast_to(np.arange(fs.n_experts), values.shape).copy()
    else:  # experts of different layers are unrelated, so each layer (row) is sorted on its own
        experts = np.argsort(-key[rows], axis=1, kind="stable")
    z = np.take_along_axis(values, experts, axis=1)
    diverging = c.view != "language"
    if c.scale == "fixed":
        zrange = (-1.0, 1.0) if diverging else (0.0, 1.0)
    elif diverging:
        bound = float(np.abs(z).max()) or 1.0
        zrange = (-bound, bound)
    else:
        low, high = float(z.min()), float(z.max())
        zrange = (low, high) if high > low else (low, low + 1.0)
    xlabel = "expert (original index)" if c.order == "index" else f"expert rank per layer ({ORDERS[c.order]})"
    title, subtitle = _describe(fs, c)
    return Heatmap(z=z, layers=np.arange(first, last + 1), experts=experts, zrange=zrange, diverging=diverging,
                   title=title, subtitle=subtitle, xlabel=xlabel)


def frequency_index(artefacts: str | Path, run: str) -> Path:
    """The index file of a run's frequency artefacts: <artefacts>/frequencies/index-<run>.json."""
    return Path(artefacts) / "frequencies" / f"index-{run}.json"


def load_frequency_set(model: str, path: str | Path) -> FrequencySet:
    """One model's frequencies from its artefact (safetensors + JSON sidecar written by ArtefactStore)."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        raise BabelError(f"frequency artefact {path} (or its .json sidecar) is missing; run notebook 02_profile "
                         f"again (make figures) to rebuild it")
    tensors, record = read_artefact(path)  # checks the file's sha256 and the sidecar's digest
    try:
        meta, params = record["meta"], record.get("params", {})
        counts, tokens = tensors["expert_counts"].numpy(), tensors["tokens"].numpy()
    except KeyError as err:
        raise BabelError(f"frequency artefact {path} is unreadable ({err}); delete it and its .json sidecar and "
                         f"run notebook 02_profile again") from None
    languages = tuple(meta.get("languages", ()))
    if counts.ndim != 3 or tokens.shape != (counts.shape[0],) or len(languages) != counts.shape[0]:
        raise BabelError(f"frequency artefact {path} is inconsistent: expert_counts {tuple(counts.shape)}, tokens "
                         f"{tuple(tokens.shape)}, {len(languages)} languages; run notebook 02_profile again")
    if (tokens <= 0).any():
        empty = [code for code, n in zip(languages, tokens) if n <= 0]
        raise BabelError(f"frequency artefact {path} counted no tokens for {', '.join(empty)}; check the corpus "
                         f"for those languages and run notebook 02_profile again")
    rule = {k: meta[k] for k in ("rule", "ratio", "mode") if k in meta}
    return FrequencySet(model=meta.get("model", model), languages=languages,
                        freq=counts.astype(np.float64) / tokens[:, None, None].astype(np.float64),
                        card=meta.get("card", ""), corpus=str(meta.get("corpus", params.get("corpus", ""))),
                        rule=rule)


def load_frequencies(source: str | Path, run: str | None = None) -> dict[str, FrequencySet]:
    """Every model's frequencies of a run: `source` is an index file, or the artefacts folder with `run`."""
    index = Path(source) if run is None else frequency_index(source, run)
    if not index.is_file():
        raise BabelError(f"no frequency index at {index}; run `make figures` (notebook 02_profile) for this "
                         f"profile first")
    try:
        entries = json.loads(index.read_text())
    except ValueError as err:
        raise BabelError(f"frequency index {index} is not valid JSON ({err}); run notebook 02_profile again") from None
    if not isinstance(entries, dict) or not entries:
        raise BabelError(f"frequency index {index} lists no models; run notebook 02_profile again")
    return {model: load_frequency_set(model, index.parent / path) for model, path in entries.items()}


class Explorer:
    """Widgets over frequency sets: model, view, language(s), layer range, expert order, colour scale."""

    def __init__(self, sets: Mapping[str, FrequencySet], model: str | None = None, language: str | None = None,
                 height: int = 620):
        import ipywidgets as w
        import plotly.graph_objects as go

        if not sets:
            raise BabelError("the explorer needs at least one frequency set; load them with load_frequencies")
        self.sets = dict(sets)
        model = model or next(iter(self.sets))
        if model not in self.sets:
            raise BabelError(f"no frequencies for model {model!r}; models: {', '.join(self.sets)}")
        fs = self.sets[model]
        language = language or fs.languages[0]
        fs.row(language)
        other = fs.languages[1] if len(fs.languages) > 1 else fs.languages[0]
        self.model = w.Dropdown(options=list(self.sets), value=model, description="model")
        self.view = w.ToggleButtons(options=[(v, k) for k, v in VIEWS.items()], value="language",
                                    description="view", style={"button_width": "auto"})
        self.language = w.Dropdown(options=self._language_options(fs), value=language, description="language A")
        self.other = w.Dropdown(options=self._language_options(fs), value=other, description="language B",
                                disabled=True)
        self.layers = w.IntRangeSlider(min=0, max=fs.n_layers - 1, value=(0, fs.n_layers - 1),
                                       description="layers", continuous_update=False)
        self.order = w.Dropdown(options=[(v, k) for k, v in ORDERS.items()], value="mean",
                                description="experts", layout={"width": "420px"})
        self.scale = w.ToggleButtons(options=[(v, k) for k, v in SCALES.items()], value="fixed",
                                     description="colours")
        for name in ("model", "view", "language", "other", "layers", "order", "scale"):
            getattr(self, name).add_class(f"babel-{name}")
        # built with its first heatmap: a widget's saved state (Voilà, executed notebooks) is its construction
        h = self._heatmap()
        self.figure = go.FigureWidget(data=[go.Heatmap(**self._trace(h))],
                                      layout=self._layout(h) | {"height": height, "margin": {"t": 90},
                                                                "yaxis": {"title": {"text": "layer"}}})
        self.widget = w.VBox([w.HBox([self.model, self.view]), w.HBox([self.language, self.other]),
                              w.HBox([self.layers, self.order]), self.scale, self.figure])
        self._syncing = False
        self.model.observe(self._model_changed, names="value")
        for control in (self.view, self.language, self.other, self.layers, self.order, self.scale):
            control.observe(self._update, names="value")

    @staticmethod
    def _language_options(fs: FrequencySet) -> list[tuple[str, str]]:
        return [(language_label(code), code) for code in fs.languages]

    @property
    def frequencies(self) -> FrequencySet:
        """The frequency set of the selected model."""
        return self.sets[self.model.value]

    def controls(self) -> Controls:
        """The controls' current values."""
        return Controls(language=self.language.value, view=self.view.value, other=self.other.value,
                        layers=tuple(self.layers.value), order=self.order.value, scale=self.scale.value)

    def _model_changed(self, _change=None) -> None:
        """Point the language and layer controls at the new model, keeping choices it also has."""
        fs = self.frequencies
        self._syncing = True
        try:
            options = self._language_options(fs)
            for control in (self.language, self.other):
                keep = control.value if control.value in fs.languages else None
                control.options = options
                control.value = keep or fs.languages[0]
            first, last = self.layers.value
            self.layers.max = max(fs.n_layers - 1, self.layers.min)
            self.layers.value = (min(first, fs.n_layers - 1), min(last, fs.n_layers - 1))
        finally:
            self._syncing = False
        self._update()

    def _heatmap(self) -> Heatmap:
        """The displayed matrix for the current controls (language B only counts in the pair view)."""
        c = self.controls()
        return heatmap(self.frequencies, replace(c, other=c.other if c.view == "pair" else None))

    @staticmethod
    def _trace(h: Heatmap) -> dict[str, Any]:
        return {"z": h.z.tolist(), "x": list(range(h.z.shape[1])), "y": h.layers.tolist(),
                "customdata": h.experts.tolist(), "zmin": h.zrange[0], "zmax": h.zrange[1],
                "colorscale": "RdBu_r" if h.diverging else "Viridis",
                "hovertemplate": "layer %{y}<br>expert %{customdata}<br>value %{z:.4f}<extra></extra>"}

    @staticmethod
    def _layout(h: Heatmap) -> dict[str, Any]:
        return {"title": {"text": html.escape(h.title, quote=False),
                          "subtitle": {"text": html.escape(h.subtitle, quote=False)}},
                "xaxis": {"title": {"text": h.xlabel}}}

    def _update(self, _change=None) -> None:
        """Recompute the displayed matrix and update the figure in place."""
        if self._syncing:
            return
        self.other.disabled = self.view.value != "pair"
        h = self._heatmap()
        with self.figure.batch_update():
            self.figure.data[0].update(**self._trace(h))
            self.figure.layout.update(self._layout(h))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def explorer_app(profile: str = "default", model: str = "") -> Any:
    """The explorer over the frequencies notebook 02 made for this run (profile, model), or a widget saying
    to run `make figures` first when there are none."""
    import ipywidgets as w

    from babel_lib.core import config

    try:
        P = config.notebook_params("02_profile", profile, model)
        return Explorer(load_frequencies(P.artefacts, P.run))
    except BabelError as err:
        return w.HTML(f"<p class='babel-missing'><b>Nothing to explore yet.</b> {html.escape(str(err))}</p>")
