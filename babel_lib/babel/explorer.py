"""Interactive explorer of expert activation frequencies: layers × experts heatmaps per model and language.

The arrays come from the frequency artefacts of notebook 02 (an index per run maps each model to its
safetensors file). `heatmap` computes what is shown from a `FrequencySet` and the `Controls`, so the logic
is testable without widgets; `Explorer` wires ipywidgets controls to a plotly FigureWidget that it updates
in place. The same explorer is embedded in notebook 02 and served as a standalone app (apps/explorer.py).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import numpy as np

from babel_lib.babel.analysis import standard_error
from babel_lib.core.artefacts import atomic_path, read_artefact, write_json
from babel_lib.data.languages import language
from babel_lib.errors import BabelError

VIEWS = {"language": "one language", "vs_mean": "language − mean of all", "pair": "language A − language B"}
ORDERS = {"mean": "by mean frequency across languages", "index": "original expert index",
          "language": "by this language's frequency"}
SCALES = {"fixed": "fixed range", "auto": "auto"}
FREQ_UNIT = "activation frequency (share of tokens)"
DIFF_UNIT = "Δ activation frequency"


@dataclass(frozen=True)
class FrequencySet:
    """Per-language expert activation frequencies of one model: freq[lang, layer, expert] in [0, 1], and the
    standard error of each cell from the two paragraph halves (se, same shape; None when not profiled)."""

    model: str
    languages: tuple[str, ...]
    freq: np.ndarray
    card: str = ""
    corpus: str = ""
    rule: dict[str, Any] = field(default_factory=dict)
    se: np.ndarray | None = None

    def __post_init__(self):
        if self.freq.ndim != 3 or self.freq.shape[0] != len(self.languages):
            raise BabelError(f"frequencies of {self.model} have shape {tuple(self.freq.shape)} for "
                             f"{len(self.languages)} languages; expected [n_languages, n_layers, n_experts]")
        if self.se is not None and self.se.shape != self.freq.shape:
            raise BabelError(f"standard errors of {self.model} have shape {tuple(self.se.shape)}, frequencies "
                             f"{tuple(self.freq.shape)}; run notebook 02_profile again")

    @property
    def n_layers(self) -> int:
        return self.freq.shape[1]

    @property
    def n_experts(self) -> int:
        return self.freq.shape[2]

    def index(self, code: str) -> int:
        """The position of a language in the set."""
        if code not in self.languages:
            raise BabelError(f"{self.model} has no frequencies for language {code!r}; it has "
                             f"{', '.join(self.languages)}")
        return self.languages.index(code)

    def row(self, code: str) -> np.ndarray:
        """The [n_layers, n_experts] frequencies of one language."""
        return self.freq[self.index(code)]


@dataclass(frozen=True)
class Controls:
    """What the explorer shows. layers is an inclusive (first, last) range, None for all layers; noise blanks
    the cells of a difference view that lie within noise_z standard errors (as the notebook's figures do)."""

    language: str
    view: str = "language"
    other: str | None = None
    layers: tuple[int, int] | None = None
    order: str = "mean"
    scale: str = "fixed"
    noise: bool = False
    noise_z: float = 3.0


@dataclass(frozen=True)
class Heatmap:
    """A displayed matrix: z[row, column] (NaN where blanked), the layer of each row, the original expert of
    each cell, the colour range, and the words that label it."""

    z: np.ndarray
    layers: np.ndarray
    experts: np.ndarray
    zrange: tuple[float, float]
    diverging: bool
    title: str
    subtitle: str
    xlabel: str
    value: str
    unit: str


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


def _describe(fs: FrequencySet, c: Controls) -> tuple[str, str, str]:
    """The title (model, language(s), what is shown), subtitle (card, rule, data, noise floor) and the name of
    a cell's value (for the hover) of a heatmap."""
    a, b = language_label(c.language), language_label(c.other or "")
    value = {"language": f"{a} frequency", "vs_mean": f"{a} − mean", "pair": f"{a} − {b}"}[c.view]
    what = {"language": f"{a}: expert activation frequency",
            "vs_mean": f"{a} − mean of {len(fs.languages)} languages",
            "pair": f"{a} − {b}: frequency difference"}[c.view]
    rule = ", ".join(f"{k} {v}" for k, v in fs.rule.items())
    noise = f"blank within {c.noise_z:g} s.e." if c.noise and c.view != "language" else ""
    parts = [fs.card or fs.model, rule, f"data: {fs.corpus}" if fs.corpus else "", noise]
    return f"{fs.model} · {what}", " · ".join(p for p in parts if p), value


def differences(fs: FrequencySet, c: Controls) -> tuple[np.ndarray, np.ndarray | None]:
    """The [L, E] values of the view over all layers, and their standard errors (None for the language view
    or without split-half counts): the language's own for vs_mean, as the notebook's figure uses, and
    sqrt(se_a² + se_b²) for a pair."""
    own = fs.row(c.language)
    if c.view == "language":
        return own, None
    if c.view == "vs_mean":
        return own - fs.freq.mean(axis=0), None if fs.se is None else fs.se[fs.index(c.language)]
    if c.other is None:
        raise BabelError("the pair view needs a second language; set Controls.other")
    se = None if fs.se is None else np.hypot(fs.se[fs.index(c.language)], fs.se[fs.index(c.other)])
    return own - fs.row(c.other), se


def _fixed_bound(fs: FrequencySet, view: str) -> float:
    """The largest |difference| the view reaches for any language (pair) of the model: a colour range that
    stays put while languages and layers change, and is not a near-white ±1."""
    spread = fs.freq - fs.freq.mean(axis=0) if view == "vs_mean" else fs.freq.max(0) - fs.freq.min(0)
    return float(np.abs(spread).max()) or 1.0


def heatmap(fs: FrequencySet, c: Controls) -> Heatmap:
    """The matrix the explorer displays for these controls: selected layers × experts, each row ordered."""
    _choice("view", c.view, VIEWS)
    _choice("expert order", c.order, ORDERS)
    _choice("colour scale", c.scale, SCALES)
    first, last = _layer_range(fs, c.layers)
    rows = slice(first, last + 1)
    values, se = differences(fs, c)
    if c.noise and c.view != "language":
        if se is None:
            raise BabelError(f"the frequency artefact of {fs.model} has no split-half counts, so there is no noise "
                             f"floor; run notebook 02_profile again")
        values = np.where(np.abs(values) > c.noise_z * se, values, np.nan)
    values = values[rows]
    key = {"mean": fs.freq.mean(axis=0), "language": fs.row(c.language)}.get(c.order)
    if key is None:
        experts = np.broadcast_to(np.arange(fs.n_experts), values.shape).copy()
    else:  # experts of different layers are unrelated, so each layer (row) is sorted on its own
        experts = np.argsort(-key[rows], axis=1, kind="stable")
    z = np.take_along_axis(values, experts, axis=1)
    diverging = c.view != "language"
    shown = z[np.isfinite(z)]
    if c.scale == "fixed":
        zrange = (-_fixed_bound(fs, c.view), _fixed_bound(fs, c.view)) if diverging else (0.0, 1.0)
    elif diverging:
        bound = float(np.abs(shown).max()) if shown.size else 0.0
        zrange = (-(bound or 1.0), bound or 1.0)
    else:
        low, high = float(shown.min()), float(shown.max())
        zrange = (low, high) if high > low else (low, low + 1.0)
    xlabel = "expert (original index)" if c.order == "index" else f"expert rank per layer ({ORDERS[c.order]})"
    title, subtitle, value = _describe(fs, c)
    return Heatmap(z=z, layers=np.arange(first, last + 1), experts=experts, zrange=zrange, diverging=diverging,
                   title=title, subtitle=subtitle, xlabel=xlabel, value=value,
                   unit=DIFF_UNIT if diverging else FREQ_UNIT)


def to_csv(h: Heatmap, settings: Mapping[str, Any]) -> str:
    """The displayed matrix as CSV, one row per cell (layer, column, original expert, value; empty when
    blanked), after '# key: value' lines that say what it is and how it was made."""
    lines = [f"# {key}: {value}" for key, value in settings.items()]
    lines += [f"# title: {h.title}", f"# subtitle: {h.subtitle}", f"# value: {h.unit}", "layer,column,expert,value"]
    for r, layer in enumerate(h.layers.tolist()):
        for col, (expert, v) in enumerate(zip(h.experts[r].tolist(), h.z[r].tolist())):
            lines.append(f"{layer},{col},{expert},{'' if math.isnan(v) else repr(float(v))}")
    return "\n".join(lines) + "\n"


def frequency_index(artefacts: str | Path, run: str) -> Path:
    """The index file of a run's frequency artefacts: <artefacts>/frequencies/index-<run>.json."""
    return Path(artefacts) / "frequencies" / f"index-{run}.json"


def write_frequency_index(artefacts: str | Path, run: str, paths: Mapping[str, str | Path]) -> Path:
    """Write a run's index {model: artefact path relative to the index file}, so the build folder can move."""
    index = frequency_index(artefacts, run)
    write_json(index, {model: os.path.relpath(Path(path).resolve(), index.parent.resolve())
                       for model, path in paths.items()})
    return index


def _data(meta: Mapping[str, Any]) -> str:
    """What text was counted, from an artefact's metadata: the corpus if named, paragraphs and split."""
    sample = (f"{meta['paragraphs']} {meta.get('split', '')} paragraphs per language".replace("  ", " ")
              if "paragraphs" in meta else "")
    return ", ".join(str(p) for p in (meta.get("corpus", ""), sample) if p)


def load_frequency_set(model: str, path: str | Path) -> FrequencySet:
    """One model's frequencies (and split-half standard errors) from its artefact (safetensors + JSON sidecar
    written by ArtefactStore)."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        raise BabelError(f"frequency artefact {path} (or its .json sidecar) is missing; run notebook 02_profile "
                         f"again (make figures) to rebuild it")
    tensors, record = read_artefact(path)  # checks the file's sha256 and the sidecar's digest
    try:
        meta = record["meta"]
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
    se = None
    if "expert_counts_halves" in tensors and "tokens_halves" in tensors:
        se = standard_error(tensors["expert_counts_halves"].numpy(), tensors["tokens_halves"].numpy())[0]
    rule = {k: meta[k] for k in ("rule", "ratio", "mode") if k in meta}
    return FrequencySet(model=meta.get("model", model), languages=languages,
                        freq=counts.astype(np.float64) / tokens[:, None, None].astype(np.float64),
                        card=meta.get("card", ""), corpus=_data(meta), rule=rule, se=se)


def load_frequencies(source: str | Path, run: str | None = None, build: str = "make figures"
                     ) -> dict[str, FrequencySet]:
    """Every model's frequencies of a run: `source` is an index file, or the artefacts folder with `run`.
    Paths in the index are relative to its folder (absolute ones, from older runs, work too); `build` is the
    command that makes them, named when they are missing."""
    index = Path(source) if run is None else frequency_index(source, run)
    if not index.is_file():
        raise BabelError(f"no frequency index at {index}; run `{build}` (notebook 02_profile) first")
    try:
        entries = json.loads(index.read_text())
    except ValueError as err:
        raise BabelError(f"frequency index {index} is not valid JSON ({err}); run `{build}` again") from None
    if not isinstance(entries, dict) or not entries:
        raise BabelError(f"frequency index {index} lists no models; run `{build}` again")
    return {model: load_frequency_set(model, index.parent / path) for model, path in entries.items()}


# plotly.js 3 has no Chart Studio button; the cloud ones go (a warning-free config: plotly.py checks the keys)
PLOTLY_CONFIG = {"displaylogo": False, "showSendToCloud": False,
                 "modeBarButtonsToRemove": ["sendChartToCloud", "sendDataToCloud"]}
NEEDS_KERNEL = ("<p class='babel-needs-kernel'><b>The explorer's controls need a running Python kernel.</b> "
                "Open this notebook in Jupyter (<code>make lab</code>) or run <code>make explore</code>; the "
                "kernel-free heatmap below works in this page.</p>")
URL_STATE_ESM = """
function render({ model }) {
  const query = window.location.search.replace(/^\\?/, "");
  const write = (state) => {
    const url = new URL(window.location.href);
    url.search = state;
    window.history.replaceState(null, "", url);
  };
  // asked until the kernel answers: a message sent before the page's kernel connection is up is lost
  const ask = () => model.send({ query });
  const timer = setInterval(ask, 100);
  model.on("msg:custom", (msg) => { clearInterval(timer); write(msg.state); });
  model.on("change:state", () => write(model.get("state")));
  ask();
}
export default { render };
"""


@cache
def _url_state_class() -> type:
    """An invisible widget that sends the page's query string to the kernel when it is shown and writes the
    view's state back into the address bar, so a reload or a shared link restores the view. (A message, not a
    synced trait: an empty query must reach the kernel too, and its answer shows the page is connected.)"""
    import anywidget
    import traitlets

    class UrlState(anywidget.AnyWidget):
        _esm = URL_STATE_ESM
        state = traitlets.Unicode("").tag(sync=True)

    return UrlState


PLOTLY_MODULE = "plotly-widget.js"  # plotly's FigureWidget module in the app's folder (make explore writes it)
PLOTLY_TRACES = ("bar", "heatmap")  # what the app draws besides scatter (in plotly's core); a new trace type goes here
_FACTORY = re.compile(r'(?<![\w$.])([\w$]+)=[\w$]+\(\{"(lib/[\w-]+\.js)"')
_REGISTER = re.compile(r'\{"lib/index\.js"\(([\w$]+),([\w$]+)\)\{var ([\w$]+)=[\w$]+\(\);\3\.register\(\[([^\]]*)\]\)')


def trim_plotly_bundle(text: str, traces: tuple[str, ...] = PLOTLY_TRACES) -> str | None:
    """plotly's FigureWidget bundle with only `traces` registered (scatter is always), or None when the bundle is
    not laid out as expected. plotly.js registers all of its ~47 trace types as its module is evaluated, half of
    the module's 1.1 s of CPU on a 2-core machine; the other types' code stays in the file but never runs."""
    found = list(_REGISTER.finditer(text))
    if len(found) != 1:
        return None
    match = found[0]
    calls = match.group(4).split(",")
    if not calls or not all(c.endswith("()") for c in calls):
        return None
    defined: dict[str, list[str]] = {}  # esbuild's module factories: NAME=wrap({"lib/<trace>.js"(e,r){...}})
    for name, path in _FACTORY.findall(text):
        defined.setdefault(name, []).append(path)
    paths = {}
    for call in calls:
        if len(defined.get(call[:-2], ())) != 1:
            return None
        paths[defined[call[:-2]][0]] = call
    wanted = [f"lib/{t}.js" for t in traces]
    if any(w not in paths for w in wanted):
        return None
    return text[:match.start(4)] + ",".join(paths[w] for w in wanted) + text[match.end(4):]


def write_plotly_module(folder: str | Path) -> Path:
    """Write plotly's FigureWidget module (an ES module with plotly.js inside, 5 MB) into `folder`, which Voilà
    serves under voila/files/ (make explore allows only this file; the browser revalidates it by its ETag), with
    only the trace types the explorer draws registered (trim_plotly_bundle; unchanged if it cannot be trimmed)."""
    import plotly

    source, target = Path(plotly.__file__).parent / "package_data" / "widgetbundle.js", Path(folder) / PLOTLY_MODULE
    text = source.read_text(encoding="utf-8")
    trimmed = trim_plotly_bundle(text)
    if trimmed is None:
        print(f"explore: plotly {plotly.__version__}'s widget bundle is not laid out as expected; it is served "
              "whole (every trace type registered: about 0.5 s more per page)", file=sys.stderr)
    data = (trimmed or text).encode("utf-8")
    if not target.exists() or target.read_bytes() != data:
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(data)
    return target


@cache
def _served_figure_class() -> type:
    """A FigureWidget that imports plotly's module from the Voilà server by URL instead of receiving it over the
    kernel's websocket: the page evaluates it once for every figure (the browser's module map), and later loads
    use the browser's compiled copy; a plain FigureWidget sends and evaluates 5 MB per figure, every load."""
    import plotly.graph_objects as go

    class ServedFigureWidget(go.FigureWidget):
        _esm = ('const config = JSON.parse(document.getElementById("jupyter-config-data")?.textContent || "{}");\n'
                f'const url = new URL((config.baseUrl || "/") + "voila/files/{PLOTLY_MODULE}", '
                'window.location.origin);\nexport default (await import(url.href)).default;\n')

    return ServedFigureWidget


def parse_cell(text: str) -> tuple[int | None, int] | None:
    """'12:5' -> (layer 12, expert 5); '5' -> (None, 5), expert 5 of every layer; '' -> None."""
    text = text.strip()
    if not text:
        return None
    layer, _, expert = text.rpartition(":")
    try:
        return (int(layer) if layer else None), int(expert)
    except ValueError:
        raise BabelError(f"highlight {text!r} is not 'layer:expert' or 'expert' (whole numbers)") from None


class Explorer:
    """Widgets over frequency sets: model, view, language(s), layer range, expert order, colour scale, noise
    floor; a heatmap whose cells link to a detail view; CSV export; optionally the state in the page URL."""

    def __init__(self, sets: Mapping[str, FrequencySet], model: str | None = None, language: str | None = None,
                 height: int = 620, noise_z: float = 3.0, source: str = "", url_state: bool = False,
                 served_plotly: bool = False):
        import ipywidgets as w
        import plotly.graph_objects as go

        if not sets:
            raise BabelError("the explorer needs at least one frequency set; load them with load_frequencies")
        self.sets = dict(sets)
        self.noise_z, self.source = noise_z, source
        self._figure_class = _served_figure_class() if served_plotly else go.FigureWidget
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
        self.noise = w.Checkbox(value=False, description=f"blank differences within {noise_z:g} s.e.",
                                disabled=True, indent=False)
        self.highlight = w.Text(value="", description="highlight", placeholder="layer:expert or expert",
                                continuous_update=False)
        self.csv = w.HTML()
        self.status = w.HTML()
        for name in ("model", "view", "language", "other", "layers", "order", "scale", "noise", "highlight",
                     "csv", "status"):
            getattr(self, name).add_class(f"babel-{name}")
        self.selected: tuple[int, int] | None = None
        self._syncing = self._query_applied = False
        # built with their first contents: a widget's saved state (Voilà, executed notebooks) is its construction,
        # and a FigureWidget changed before it is displayed leaves its view out of step with the kernel
        h = self._heatmap()
        cols, rows = self._highlighted(h)
        self.figure = self._figure_class(
            data=[go.Heatmap(**self._trace(h)),
                  go.Scatter(x=cols, y=rows, mode="markers", hoverinfo="skip", showlegend=False,
                             marker={"symbol": "square-open", "size": 11, "color": "#ff00ff",
                                     "line": {"width": 2}})],
            layout=self._layout(h) | {"height": height, "margin": {"t": 90}})
        self.figure._config = PLOTLY_CONFIG
        self.figure.add_class("babel-heatmap")
        # the detail view is made on the first selection: each FigureWidget loads its own copy of plotly.js
        # (about 1 s of the page's CPU on a 2-core machine), which a first view does not need
        self.detail: Any = None
        self.detail_box = w.VBox([w.HTML("<p class='babel-detail-hint'>Click a cell of the heatmap (or type "
                                         "<code>layer:expert</code> under highlight) for that expert across "
                                         "languages and layers.</p>")])
        self.url = _url_state_class()(layout={"display": "none"}) if url_state else None
        self._export(h)
        self.widget = w.VBox([w.HBox([self.model, self.view]), w.HBox([self.language, self.other]),
                              w.HBox([self.layers, self.order]), w.HBox([self.scale, self.noise]),
                              w.HBox([self.highlight, self.csv]), self.status, self.figure, self.detail_box,
                              *([self.url] if self.url else [])])
        self.figure.data[0].on_click(self._clicked)
        self.model.observe(self._model_changed, names="value")
        for control in (self.view, self.language, self.other, self.layers, self.order, self.scale, self.noise,
                        self.highlight):
            control.observe(self._update, names="value")
        if self.url:
            self.url.on_msg(self._page_query)

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
                        layers=tuple(self.layers.value), order=self.order.value, scale=self.scale.value,
                        noise=self.noise.value, noise_z=self.noise_z)

    def settings(self) -> dict[str, Any]:
        """What the displayed matrix depends on, for the CSV header."""
        c, fs = self.controls(), self.frequencies
        return {"model": fs.model, "card": fs.card, "source": self.source, "view": c.view, "language": c.language,
                "other": c.other if c.view == "pair" else "", "layers": f"{c.layers[0]}-{c.layers[1]}",
                "order": c.order, "scale": c.scale,
                "noise": f"blank within {c.noise_z:g} s.e." if c.noise and c.view != "language" else "off",
                **{k: v for k, v in fs.rule.items()}, "data": fs.corpus}

    def state(self) -> str:
        """The view as a URL query string (what apply_state reads)."""
        c = self.controls()
        fields = {"model": self.model.value, "view": c.view, "language": c.language, "other": c.other,
                  "layers": f"{c.layers[0]}-{c.layers[1]}", "order": c.order, "scale": c.scale,
                  "noise": int(c.noise), "highlight": self.highlight.value,
                  "cell": f"{self.selected[0]}:{self.selected[1]}" if self.selected else ""}
        return urlencode({k: v for k, v in fields.items() if v != ""})

    def apply_state(self, query: str) -> None:
        """Set the controls from a query string (a shared link); values that do not fit are named in the
        status line and left as they are."""
        fields = {k: v[-1] for k, v in parse_qs(query).items()}
        problems = []
        self._syncing = True
        try:
            if fields.get("model") in self.sets:
                self.model.value = fields["model"]
                self._retarget()
            elif "model" in fields:
                problems.append(f"model {fields['model']!r} (models: {', '.join(self.sets)})")
            fs = self.frequencies
            for name, allowed in (("view", VIEWS), ("language", fs.languages), ("other", fs.languages),
                                  ("order", ORDERS), ("scale", SCALES)):
                if name in fields:
                    if fields[name] in allowed:
                        getattr(self, name).value = fields[name]
                    else:
                        problems.append(f"{name} {fields[name]!r}")
            if "layers" in fields:
                try:
                    first, last = (int(x) for x in fields["layers"].split("-"))
                    _layer_range(fs, (first, last))
                    self.layers.value = (first, last)
                except (ValueError, BabelError):
                    problems.append(f"layers {fields['layers']!r} (0-{fs.n_layers - 1})")
            self.noise.value = fields.get("noise", "0") == "1"
            self.highlight.value = fields.get("highlight", self.highlight.value)
            cell = parse_cell(fields.get("cell", ""))
            if cell and cell[0] is not None and 0 <= cell[0] < fs.n_layers and 0 <= cell[1] < fs.n_experts:
                self.selected = (cell[0], cell[1])
        except BabelError as err:
            problems.append(str(err))
        finally:
            self._syncing = False
        self._update()
        if problems:
            self.status.value = f"<span class='babel-warning'>ignored from the link: {html.escape('; '.join(problems))}</span>"

    def _page_query(self, _widget, content: Mapping[str, Any], _buffers) -> None:
        """The page's query string, sent until answered: applied once, answered with the view's state."""
        if not self._query_applied:
            self._query_applied = True
            self.apply_state(str(content.get("query", "")))
        self.url.send({"state": self.state()})

    def _retarget(self) -> None:
        """Point the language and layer controls at the selected model: languages it also has are kept, the
        layer range is kept when it fits and was not the whole of the previous model, else all layers."""
        fs = self.frequencies
        options = self._language_options(fs)
        for control in (self.language, self.other):
            keep = control.value if control.value in fs.languages else None
            control.options = options
            control.value = keep or fs.languages[0]
        first, last = self.layers.value
        whole = (first, last) == (self.layers.min, self.layers.max)
        self.layers.max = fs.n_layers - 1
        self.layers.value = (0, fs.n_layers - 1) if whole or last >= fs.n_layers else (first, last)
        if self.selected and not (self.selected[0] < fs.n_layers and self.selected[1] < fs.n_experts):
            self.selected = None

    def _model_changed(self, _change=None) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            self._retarget()
        finally:
            self._syncing = False
        self._update()

    def _heatmap(self) -> Heatmap:
        """The displayed matrix for the current controls (language B only counts in the pair view)."""
        c = self.controls()
        return heatmap(self.frequencies, replace(c, other=c.other if c.view == "pair" else None))

    @staticmethod
    def _trace(h: Heatmap) -> dict[str, Any]:
        z = [[None if math.isnan(v) else v for v in row] for row in h.z.tolist()]
        return {"z": z, "x": list(range(h.z.shape[1])), "y": h.layers.tolist(),
                "customdata": h.experts.tolist(), "zmin": h.zrange[0], "zmax": h.zrange[1],
                "colorscale": "RdBu_r" if h.diverging else "Viridis",
                "colorbar": {"title": {"text": h.unit, "side": "right"}},
                "hovertemplate": f"layer %{{y}} · expert %{{customdata}}<br>{html.escape(h.value)}: "
                                 "%{z:.4f}<extra></extra>"}

    @staticmethod
    def _layout(h: Heatmap) -> dict[str, Any]:
        """Titles, and axes reset to the whole matrix with layer 0 on top (as in the notebook's figures): a
        zoom never outlives a control change."""
        return {"title": {"text": html.escape(h.title, quote=False),
                          "subtitle": {"text": html.escape(h.subtitle, quote=False)}},
                "plot_bgcolor": "#eeeeee",
                "xaxis": {"title": {"text": h.xlabel}, "autorange": False, "range": [-0.5, h.z.shape[1] - 0.5]},
                "yaxis": {"title": {"text": "layer"}, "autorange": False,
                          "range": [int(h.layers[-1]) + 0.5, int(h.layers[0]) - 0.5]}}

    def _highlighted(self, h: Heatmap) -> tuple[list[int], list[int]]:
        """(columns, layers) of the displayed cells of the highlighted expert(s)."""
        try:
            target = parse_cell(self.highlight.value)
        except BabelError as err:
            self.status.value = f"<span class='babel-warning'>{html.escape(str(err))}</span>"
            return [], []
        if target is None:
            return [], []
        layer, expert = target
        cols, rows = [], []
        for r, l in enumerate(h.layers.tolist()):
            if layer is None or layer == l:
                cols += np.flatnonzero(h.experts[r] == expert).tolist()
                rows += [l] * int((h.experts[r] == expert).sum())
        return cols, rows

    def _clicked(self, _trace, points, _state) -> None:
        """A click on a cell selects that expert: the detail view shows it, and it is highlighted."""
        if not points.xs:
            return
        h = self._heatmap()
        col, layer = int(points.xs[0]), int(points.ys[0])
        self.selected = (layer, int(h.experts[layer - int(h.layers[0]), col]))
        self.highlight.value = f"{self.selected[0]}:{self.selected[1]}"  # observed: updates everything

    def _detail_figure(self) -> Any:
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=2, specs=[[{}, {}], [{"colspan": 2}, None]], row_heights=[0.45, 0.55],
                            vertical_spacing=0.16, horizontal_spacing=0.08,
                            subplot_titles=["across languages (± split-half s.e.)", "across layers", "one layer"])
        fig.add_bar(x=[], y=[], error_y={"type": "data", "array": []}, marker_color="#4c72b0", row=1, col=1,
                    hovertemplate="%{x}: %{y:.4f}<extra></extra>", showlegend=False)
        fig.add_scatter(x=[], y=[], mode="lines+markers", row=1, col=2, showlegend=False,
                        hovertemplate="layer %{x}: %{y:.4f}<extra></extra>")
        fig.add_heatmap(z=[[0]], row=2, col=1, colorscale="Viridis", zmin=0, zmax=1, showscale=False,
                        hovertemplate="%{y} · expert %{customdata}: %{z:.4f}<extra></extra>")
        fig.update_yaxes(title_text="frequency", row=1, col=1)
        fig.update_yaxes(title_text="frequency", row=1, col=2)
        fig.update_xaxes(title_text="layer", row=1, col=2)
        fig.update_layout(height=640, title={"text": "click a cell of the heatmap"}, margin={"t": 80})
        return fig

    def _detail(self, d: Any, h: Heatmap) -> None:
        """The selected expert across languages (with its split-half standard error) and across layers, and
        its layer as languages × experts in the heatmap's order."""
        fs = self.frequencies
        if self.selected is None:
            self.selected = (int(h.layers[0]), int(h.experts[0, 0]))
        layer, expert = self.selected
        labels = [language_label(code) for code in fs.languages]
        key = {"mean": fs.freq.mean(axis=0), "language": fs.row(self.language.value)}.get(self.order.value)
        order = np.arange(fs.n_experts) if key is None else np.argsort(-key[layer], kind="stable")
        column = int(np.flatnonzero(order == expert)[0])
        lang = fs.index(self.language.value)
        d.data[0].update(x=labels, y=fs.freq[:, layer, expert].tolist(),
                         error_y={"type": "data", "visible": fs.se is not None,
                                  "array": [] if fs.se is None else fs.se[:, layer, expert].tolist()})
        d.data[1].update(x=list(range(fs.n_layers)), y=fs.freq[lang, :, expert].tolist())
        d.data[2].update(z=fs.freq[:, layer, order].tolist(), y=labels, x=list(range(fs.n_experts)),
                         customdata=np.broadcast_to(order, (len(labels), fs.n_experts)).tolist())
        d.layout.title.text = html.escape(f"{fs.model} · layer {layer}, expert {expert}")
        d.layout.annotations[1].text = html.escape(f"expert index {expert} in every layer, "
                                                   f"{language_label(self.language.value)} "
                                                   "(indices are not linked across layers)")
        d.layout.annotations[2].text = html.escape(f"layer {layer}: all languages × experts "
                                                   f"({'original index' if key is None else ORDERS[self.order.value]}"
                                                   f"); expert {expert} framed")
        d.layout.shapes = [{"type": "rect", "xref": "x3", "yref": "y3", "x0": column - 0.5, "x1": column + 0.5,
                            "y0": -0.5, "y1": len(labels) - 0.5, "line": {"color": "#ff00ff", "width": 2}}]
        d.layout.yaxis3.autorange = "reversed"

    def _show(self, h: Heatmap) -> None:
        """Everything that follows the displayed matrix: highlight, detail, CSV link, URL."""
        cols, rows = self._highlighted(h)
        self.figure.data[1].update(x=cols, y=rows)
        if self.detail is not None:
            with self.detail.batch_update():
                self._detail(self.detail, h)
        elif self.selected is not None:
            self._make_detail(h)
        self._export(h)

    def _make_detail(self, h: Heatmap) -> None:
        """The detail FigureWidget, built with its first contents (see __init__), in place of the hint."""
        detail = self._detail_figure()
        self._detail(detail, h)
        self.detail = self._figure_class(detail)
        self.detail._config = PLOTLY_CONFIG
        self.detail.add_class("babel-detail")
        self.detail_box.children = [self.detail]

    def _export(self, h: Heatmap) -> None:
        """The CSV link of the displayed matrix and the URL state."""
        name = "_".join(str(v) for v in (self.model.value, self.view.value, self.language.value,
                                         self.other.value if self.view.value == "pair" else "",
                                         f"layers{h.layers[0]}-{h.layers[-1]}") if v)
        self.csv.value = (f"<a class='babel-csv-link' download='{html.escape(name)}.csv' "
                          f"href='data:text/csv;charset=utf-8,{quote(to_csv(h, self.settings()))}'>"
                          "download the displayed matrix (CSV)</a>")
        if self.url:
            self.url.state = self.state()

    def _update(self, _change=None) -> None:
        """Recompute the displayed matrix and update the figures in place."""
        if self._syncing:
            return
        self.other.disabled = self.view.value != "pair"
        self.noise.disabled = self.view.value == "language" or self.frequencies.se is None
        self.status.value = ""
        try:
            target = parse_cell(self.highlight.value)
        except BabelError:
            target = None
        if target and target[0] is not None and target[0] < self.frequencies.n_layers \
                and target[1] < self.frequencies.n_experts:
            self.selected = (target[0], target[1])
        h = self._heatmap()
        with self.figure.batch_update():
            self.figure.data[0].update(**self._trace(h))
            self.figure.layout.update(self._layout(h))
            self._show(h)

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        return {**bundle, "text/html": NEEDS_KERNEL}


def build_command(profile: str, model: str = "") -> str:
    """The make command that writes the frequencies of a run."""
    return " ".join(["make figures", *([f"PROFILE={profile}"] if profile != "default" else []),
                     *([f"MODEL={model}"] if model else [])])


def run_frequencies(profile: str = "default", model: str = "") -> dict[str, FrequencySet]:
    """The frequencies notebook 02 made for a run. A model that the profile's own run profiled is read from
    that run (no separate `MODEL=` run needed); an unknown model is named with the ones available."""
    from babel_lib.core import config

    P = config.notebook_params("02_profile", profile, model)
    index = frequency_index(P.artefacts, P.run)
    if index.is_file() or not model:
        return load_frequencies(index, build=build_command(profile, model))
    base = config.notebook_params("02_profile", profile)
    sets = load_frequencies(frequency_index(base.artefacts, base.run), build=build_command(profile))
    wanted = [m.strip() for m in model.split(",") if m.strip()]
    missing = [m for m in wanted if m not in sets]
    if missing:
        raise BabelError(f"no frequencies for model {', '.join(missing)} in run {base.run}; available: "
                         f"{', '.join(sets)}; pick one of them or run `{build_command(profile, model)}`")
    return {m: sets[m] for m in wanted}


def explorer_app(profile: str = "default", model: str = "", url_state: bool = False, served_plotly: bool = False
                 ) -> Any:
    """The explorer over the frequencies notebook 02 made for this run (profile, model), or a widget saying
    which command builds them when there are none. served_plotly: Voilà serves plotly's module from the app's
    folder (write_plotly_module)."""
    import ipywidgets as w

    from babel_lib.core import config

    try:
        P = config.notebook_params("02_profile", profile, model)
        sets = run_frequencies(profile, model)
        return Explorer({m: replace(fs, corpus=", ".join(p for p in (P.get("corpus", ""), fs.corpus) if p))
                         for m, fs in sets.items()}, noise_z=float(P.get("noise_z", 3.0)),
                        source=f"run {P.run}", url_state=url_state, served_plotly=served_plotly)
    except BabelError as err:
        return w.HTML(f"<p class='babel-missing'><b>Nothing to explore yet.</b> {html.escape(str(err))}</p>")


def main(argv: list[str] | None = None) -> int:
    """`python -m babel_lib.babel.explorer check PROFILE [MODEL]`: exit 1 with the command to run when the
    frequencies of that run are missing (what `make explore` checks before starting the server)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "check" or len(args) > 3:
        print("usage: python -m babel_lib.babel.explorer check PROFILE [MODEL]", file=sys.stderr)
        return 2
    try:
        sets = run_frequencies(args[1] if len(args) > 1 else "default", args[2] if len(args) > 2 else "")
    except BabelError as err:
        print(f"explore: {err}", file=sys.stderr)
        return 1
    print(f"explore: frequencies of {', '.join(sets)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
