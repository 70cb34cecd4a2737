"""Every figure of the smoke run, rendered by plotly.js in headless Chromium and read back from its full layout and
data (not pixels), obeys issue 12's rules: no title states a claim, every caption names the quantisation of the
embedded models it shows, panels of one quantity share a log scale, no fitted value is negative. Each rule is also shown to fail on a deliberately bad synthetic figure."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import plotly
import plotly.graph_objects as go
import pytest
from playwright.sync_api import sync_playwright
from plotly.subplots import make_subplots

from babel_lib.core.config import ROOT
from babel_lib.core.figures import caption
from babel_lib.core.models import EMBEDDED

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

# words that state a finding (the paper's or ours) rather than what is plotted; findings go under the title
CLAIMS = re.compile(r"\b(reproduc\w*|confirm\w*|concentrat\w*|(nearly|almost|approximately|near|roughly)[ -]constant|"
                    r"constant across|as (predicted|expected|in the paper)|agrees? with|consistent with|proves?|"
                    r"demonstrat\w*|shows? that|dominat\w*|emerges?|universal\w*)\b", re.IGNORECASE)
VALUED = {"scatter", "scattergl", "bar", "box"}  # traces whose x/y are plotted values (not heatmap indices)

# reads a rendered plot back: titles, annotations, each axis's effective type, every trace's values
READ = """gd => { const L = gd._fullLayout, axes = {};
  for (const k of Object.keys(L)) if (/^[xy]axis\\d*$/.test(k))
    axes[L[k]._id] = {type: L[k].type, title: (L[k].title || {}).text || ''};
  const values = v => (v && typeof v !== 'string' && v.length !== undefined && !Array.isArray(v[0]))
    ? Array.from(v, e => typeof e === 'number' && isFinite(e) ? e : null) : [];
  return {title: L.title.text || '', subtitle: (L.title.subtitle || {}).text || '',
          annotations: (L.annotations || []).map(a => a.text || ''), axes,
          traces: gd._fullData.map(t => ({type: t.type, name: t.name || '', group: t.legendgroup || '',
            mode: t.mode || '', hover: t.hovertemplate || '', xaxis: t.xaxis || '', yaxis: t.yaxis || '',
            x: values(t.x), y: values(t.y)}))}; }"""


def claims(fig: dict) -> list[str]:
    """Titles (the figure's and its panels') that state a finding."""
    return [f"title {text!r} states a finding ({m.group(0)!r}); say what is plotted and put the finding under it"
            for text in [fig["title"], *fig["annotations"]] if (m := CLAIMS.search(text))]


def unquantised(fig: dict, caption_text: str) -> list[str]:
    """Embedded models shown (named anywhere in the figure) whose quantisation the caption does not name, and a
    caption the figure does not display."""
    shown = " ".join([fig["title"], *fig["annotations"], caption_text, *(t["name"] for t in fig["traces"])])
    problems = [f"caption does not name {alias}'s quantisation ({entry.quantisation} 4-bit)"
                for alias, entry in EMBEDDED.items()
                if alias in shown and not re.search(rf"{re.escape(entry.quantisation)}\b[^·]*4-bit", caption_text)]
    if caption_text and caption_text not in fig["subtitle"]:
        problems.append("the caption is not shown under the title")
    return problems


def unlogged(fig: dict) -> list[str]:
    """Panels of one quantity (the same axis title, or the same named traces) drawn on mixed linear and log
    scales, as plotly.js resolved them (a `matches` between axes of different types is dropped)."""
    axes, problems = fig["axes"], []
    for letter in "xy":
        ids = [a for a in axes if a.startswith(letter)]
        traces = {a: frozenset(t["group"] or t["name"] for t in fig["traces"] if t[f"{letter}axis"] == a
                               and t["type"] in VALUED and (t["group"] or t["name"])) for a in ids}
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                same = (axes[a]["title"] and axes[a]["title"] == axes[b]["title"]) or (traces[a] and traces[a] == traces[b])
                if same and "log" in (axes[a]["type"], axes[b]["type"]) and axes[a]["type"] != axes[b]["type"]:
                    problems.append(f"{a} is {axes[a]['type']} but {b}, the same quantity, is {axes[b]['type']}")
    return problems


def fitted(trace: dict, title: str) -> bool:
    """A fitted curve: named a fit, or a line without markers in a figure whose title says it draws fits."""
    said = " ".join((trace["name"], trace["group"], trace["hover"])).lower()
    return "fit" in said or ("fit" in title.lower() and trace["mode"] == "lines")


def negative_fits(fig: dict) -> list[str]:
    """Fitted curves drawn below zero."""
    return [f"fitted trace {t['name'] or t['group'] or i!r} plots {min(v for v in t['y'] if v is not None):.3g} < 0; "
            "draw fits over their data range and clip at 0"
            for i, t in enumerate(fig["traces"])
            if fitted(t, fig["title"]) and any(v is not None and v < 0 for v in t["y"])]


def problems(fig: dict, caption_text: str) -> list[str]:
    """Every rule's complaints about one rendered figure."""
    return claims(fig) + unquantised(fig, caption_text) + unlogged(fig) + negative_fits(fig)


@pytest.fixture(scope="module")
def page():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def render(page, fig: go.Figure) -> dict:
    """A plotly figure drawn by the plotly.js that ships with plotly, read back as the smoke figures are."""
    if not page.evaluate("() => typeof Plotly !== 'undefined'"):
        page.add_script_tag(path=str(Path(plotly.__file__).parent / "package_data" / "plotly.min.js"))
    spec = json.loads(fig.to_json())
    return page.evaluate(f"""async spec => {{ document.body.innerHTML = '<div id="g"></div>';
        const gd = document.getElementById('g'); await Plotly.newPlot(gd, spec.data, spec.layout);
        return ({READ})(gd); }}""", spec)


CAPTION = caption({"profile": "test"}, "gemma-3-270m")


def good() -> go.Figure:
    """Two panels of one quantity on log axes, a fit clipped at 0, a neutral title and a full caption."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["gemma-3-270m", "gemma-3-270m, again"])
    for col in (1, 2):
        fig.add_scatter(x=[1, 2, 3], y=[1e-3, 0.5, 40], name="top-1", mode="markers", row=1, col=col)
        fig.add_scatter(x=[1, 2, 3], y=[0.0, 0.2, 0.4], name="fit", mode="lines", row=1, col=col)
    fig.update_yaxes(type="log", title_text="|h|")
    fig.update_layout(title={"text": "Magnitude per layer", "subtitle": {"text": CAPTION}})
    return fig


def test_a_good_figure_passes(page):
    assert problems(render(page, good()), CAPTION) == []


def test_a_claim_in_a_title_fails(page):
    fig = good().update_layout(title_text="Attention concentrates on the massive tokens")
    assert [p for p in problems(render(page, fig), CAPTION) if "concentrates" in p]
    fig = good()
    fig.layout.annotations[1].text = "value nearly constant across inputs"
    assert [p for p in problems(render(page, fig), CAPTION) if "nearly constant" in p]


def test_a_caption_without_the_quantisation_fails(page):
    bare = "gemma-3-270m · data: libreoffice-help · profile test"
    fig = good().update_layout(title_subtitle_text=bare)
    assert problems(render(page, fig), bare) == ["caption does not name gemma-3-270m's quantisation (Q4_K_M 4-bit)"]
    other = caption({"profile": "test"}, "smollm2-135m")  # names a model, but not the one plotted
    assert "caption does not name gemma-3-270m's quantisation (Q4_K_M 4-bit)" in problems(render(page, good()), other)


def test_a_linear_panel_beside_its_log_twin_fails(page):
    fig = good().update_yaxes(type="linear", row=1, col=2)
    assert problems(render(page, fig), CAPTION) == ["y is log but y2, the same quantity, is linear"]
    # a shared axis (`matches`) that plotly.js drops because the types differ: the panel is drawn linear
    shared = make_subplots(rows=1, cols=2, shared_yaxes=True)
    for col in (1, 2):
        shared.add_scatter(x=[1, 2], y=[0.5, 900], name="ratio", row=1, col=col)
    shared.update_yaxes(type="log", row=1, col=1)
    assert unlogged(render(page, shared)) == ["y is log but y2, the same quantity, is linear"]
    titled = make_subplots(rows=1, cols=2)  # no shared traces, the same axis title
    titled.add_scatter(x=[1, 2], y=[1, 10], name="a", row=1, col=1)
    titled.add_scatter(x=[1, 2], y=[1, 10], name="b", row=1, col=2)
    titled.update_yaxes(title_text="perplexity").update_yaxes(type="log", row=1, col=2)
    assert unlogged(render(page, titled)) == ["y is linear but y2, the same quantity, is log"]
    assert unlogged(render(page, titled.update_yaxes(title_text="other", row=1, col=2))) == []


def test_a_negative_fitted_value_fails(page):
    fig = good()
    fig.data[1].y = (-0.1, 0.2, 0.4)
    assert problems(render(page, fig), CAPTION) == ["fitted trace 'fit' plots -0.1 < 0; draw fits over their data "
                                                    "range and clip at 0"]
    unnamed = good().update_layout(title_text="Activation ratio with fitted curves")
    unnamed.data[3].update(name="", y=(0.3, -0.2, 0.1))  # a nameless line in a figure of fits
    assert len(negative_fits(render(page, unnamed))) == 1


@pytest.mark.slow
def test_every_smoke_figure_follows_the_rules(smoke_run, page):
    figures = ROOT / "figures" / "smoke"
    manifest = json.loads((figures / "manifest.json").read_text())
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)[:300]))
    found = {}
    for key, entry in sorted(manifest.items()):
        page.goto((figures / entry["html"]).as_uri())
        page.wait_for_selector(".plotly-graph-div .main-svg", timeout=60_000)
        fig = page.evaluate(f"() => ({READ})(document.querySelector('.plotly-graph-div'))")
        assert fig["title"] == entry["title"], key
        found.update({key: p for p in [problems(fig, entry["caption"])] if p})
    assert not errors
    assert not found, json.dumps(found, indent=1, ensure_ascii=False)
