"""The explorer in headless Chromium on a smoke run's real artefacts: `make explore PROFILE=smoke` serves it
(Voilà, preheated kernel), and every defect of issue 14 is checked against numbers computed here from the
artefacts; the rendered notebook 02 must show every figure from a file with the network disabled."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from playwright.sync_api import Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from babel_lib.babel.explorer import Controls, FrequencySet, heatmap, language_label, run_frequencies
from babel_lib.core.config import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")]

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_S = 300  # make explore: set-up check, papermill --prepare-only, Voilà and its preheated kernel
LOAD_MS = 60_000  # a first page on a loaded 2-core machine
UPDATE_MS = 30_000  # a control change: one kernel round trip


@pytest.fixture(scope="module")
def sets(smoke_run) -> dict[str, FrequencySet]:
    """The smoke run's frequencies, read here from its artefacts: what the pages must show."""
    return run_frequencies("smoke")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kernels(server: psutil.Process) -> int:
    """The kernels the server runs (living ipykernel processes below it; a culled one may linger as a zombie)."""
    count = 0
    for p in server.children(recursive=True):
        try:
            count += "ipykernel" in " ".join(p.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return count


@dataclass
class App:
    url: str
    log: Path
    server: psutil.Process


@pytest.fixture(scope="module")
def app(sets, make, tmp_path_factory):
    """`make explore PROFILE=smoke` on a free port, once its preheated kernel is up."""
    port, log_path = free_port(), tmp_path_factory.mktemp("explore") / "explore.log"
    log = open(log_path, "w")
    server = subprocess.Popen(["make", "-C", str(ROOT), "explore", "PROFILE=smoke", f"EXPLORE_PORT={port}"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert server.poll() is None, f"make explore exited:\n{log_path.read_text()[-3000:]}"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0 and kernels(psutil.Process(server.pid)) >= 1:
                    break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"make explore did not serve within {START_S} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(5)  # the preheated kernel runs the notebook
        yield App(f"http://localhost:{port}/", log_path, psutil.Process(server.pid))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def plot(selector: str) -> str:
    return f"""() => {{ const g = document.querySelector('{selector}.js-plotly-plot');
        if (!g || !g.data || !g.data.length || !g.data[0].z || !g._fullLayout) return null;
        const t = g.data[0], L = g._fullLayout;
        return {{z: t.z.map(r => Array.from(r)), y: Array.from(t.y), zmin: t.zmin, zmax: t.zmax,
                 title: L.title.text, subtitle: (L.title.subtitle || {{}}).text || '', hover: t.hovertemplate,
                 colorbar: ((t.colorbar || {{}}).title || {{}}).text, yrange: L.yaxis.range.slice(),
                 xrange: L.xaxis.range.slice(), marks: g.data[1] ? Array.from(g.data[1].x || []) : []}}; }}"""


HEATMAP, DETAIL = plot(".babel-heatmap"), plot(".babel-detail")
CONTROLS = """() => [...document.querySelectorAll('select')].map(s => s.value)
    .concat([...document.querySelectorAll('.widget-readout')].map(r => r.textContent))"""


@dataclass
class AppPage:
    """The app open in a browser page, with what to report when the heatmap does not come."""

    page: Page
    app: App
    errors: list[str]

    def wait(self, ready: str, timeout_ms: int = UPDATE_MS, read: str = HEATMAP) -> dict:
        """The plot's data once the JS condition `ready(p)` holds for it."""
        try:
            self.page.wait_for_function(f"() => {{ const p = ({read})(); return p !== null && ({ready})(p); }}",
                                        timeout=timeout_ms)
        except PlaywrightTimeout:
            raise AssertionError(f"no plot with {ready} after {timeout_ms / 1000:.0f} s; plot "
                                 f"{str(self.page.evaluate(read))[:300]}, controls {self.page.evaluate(CONTROLS)}; "
                                 f"browser errors {self.errors}; log ends:\n{self.app.log.read_text()[-3000:]}"
                                 ) from None
        return self.page.evaluate(read)

    def layers(self, text: str) -> None:
        self.page.locator(".babel-layers .widget-readout").click()
        self.page.keyboard.press("Control+A")
        self.page.keyboard.type(text)
        self.page.keyboard.press("Enter")

    def select(self, name: str, value: str) -> None:
        """Pick an option by its code (a language's shown label is its name and code)."""
        label = value if name == "model" else language_label(value)
        self.page.locator(f".babel-{name} select").select_option(label=label)


@pytest.fixture
def browser(tmp_path):
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(tmp_path / "chromium-profile", executable_path=CHROMIUM,
                                                       headless=True, args=ARGS, accept_downloads=True)
        try:
            yield context
        finally:
            context.close()


def open_page(browser, app: App, query: str = "") -> AppPage:
    errors: list[str] = []
    page = browser.new_page()
    page.on("pageerror", lambda err: errors.append(str(err)[:300]))
    # Voilà's page asks a CDN for Font Awesome (no network here) and a lab extension for a shared module
    page.on("console", lambda m: m.type == "error" and "shared module" not in m.text
            and "ERR_NAME_NOT_RESOLVED" not in m.text and errors.append(m.text[:300]))
    page.goto(app.url + query, timeout=LOAD_MS)
    # connected: the kernel has answered the page's query with the view's state (controls changed before
    # that would be lost)
    page.wait_for_function("() => location.search.includes('model=')", timeout=LOAD_MS)
    return AppPage(page, app, errors)


@pytest.fixture
def app_page(app, browser) -> AppPage:
    return open_page(browser, app)


def numbers(z) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in z], dtype=float)


def test_labels_layer_order_and_data_line(app_page, sets):
    fs = sets["gemma-3-270m"]
    shown = app_page.wait("p => true", LOAD_MS)
    np.testing.assert_allclose(shown["z"], heatmap(fs, Controls("en")).z, rtol=1e-12)
    assert shown["y"] == list(range(fs.n_layers))
    assert shown["yrange"][0] > shown["yrange"][1]  # layer 0 on top, as in the notebook's figures
    assert shown["colorbar"] == "activation frequency (share of tokens)"
    assert "English (en) frequency" in shown["hover"] and "expert %{customdata}" in shown["hover"]
    assert "data: libreoffice-help, 6 calibration paragraphs per language" in shown["subtitle"]
    assert not app_page.errors


def test_zoom_does_not_survive_a_control_change(app_page):
    page = app_page.page
    app_page.wait("p => true", LOAD_MS)
    # the whole plot in the viewport: a drag that ends outside it never reaches plotly (why the zoom did not take)
    page.set_viewport_size({"width": 1280, "height": 1600})
    drag = page.locator(".babel-heatmap .nsewdrag").first
    drag.scroll_into_view_if_needed()
    box = drag.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.7)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.95, steps=8)
    page.mouse.up()
    zoomed = app_page.wait("p => p.yrange[0] - p.yrange[1] < 8")  # the box zoom took: a few layers deep
    assert min(zoomed["yrange"]) > 5
    app_page.layers("0-5")
    shown = app_page.wait("p => p.y.length === 6")
    assert shown["yrange"] == [5.5, -0.5] and shown["xrange"] == [-0.5, len(shown["z"][0]) - 0.5]


def test_model_switch_shows_the_new_models_layers(app_page, sets):
    gemma, smol = sets["gemma-3-270m"], sets["smollm2-135m"]
    app_page.wait("p => true", LOAD_MS)
    app_page.select("model", "smollm2-135m")
    shown = app_page.wait(f"p => p.y.length === {smol.n_layers}")
    assert shown["y"] == list(range(smol.n_layers))
    app_page.layers(f"{smol.n_layers - 5}-{smol.n_layers - 1}")
    app_page.wait("p => p.y.length === 5")
    app_page.select("model", "gemma-3-270m")
    shown = app_page.wait(f"p => p.y.length === {gemma.n_layers}")  # not a collapsed 17..17
    np.testing.assert_allclose(shown["z"], heatmap(gemma, Controls("en")).z, rtol=1e-12)


def test_difference_view_scale_and_noise_floor(app_page, sets):
    fs = sets["gemma-3-270m"]
    page = app_page.page
    app_page.wait("p => true", LOAD_MS)
    page.locator(".babel-view button", has_text="language − mean of all").click()
    shown = app_page.wait("p => p.zmin < 0")
    bound = np.abs(fs.freq - fs.freq.mean(0)).max()
    assert shown["zmax"] == pytest.approx(bound) and bound < 0.9  # the data's range, not a near-white ±1
    assert "English (en) − mean" in shown["hover"]
    page.locator(".babel-noise input").check()
    shown = app_page.wait("p => p.subtitle.includes('s.e.')")
    z = numbers(shown["z"])
    order = np.argsort(-fs.freq.mean(0), axis=1, kind="stable")
    diff = np.take_along_axis(fs.freq[0] - fs.freq.mean(0), order, 1)
    se = np.take_along_axis(fs.se[0], order, 1)
    blank = np.abs(diff) <= 3 * se  # noise_z of the smoke profile
    assert 0 < blank.sum() < blank.size
    np.testing.assert_array_equal(np.isnan(z), blank)
    np.testing.assert_allclose(z[~blank], diff[~blank], rtol=1e-12)


def test_click_shows_the_expert_in_the_detail_view_and_highlights_it(app_page, sets):
    fs = sets["gemma-3-270m"]
    page = app_page.page
    app_page.wait("p => true", LOAD_MS)
    layer, col = 4, 10
    point = page.evaluate(f"""() => {{ const g = document.querySelector('.babel-heatmap.js-plotly-plot');
        const L = g._fullLayout, r = g.getBoundingClientRect();
        return [r.left + L.xaxis._offset + L.xaxis.l2p({col}), r.top + L.yaxis._offset + L.yaxis.l2p({layer})]; }}""")
    page.mouse.click(*point)
    expert = int(np.argsort(-fs.freq.mean(0)[layer], kind="stable")[col])
    detail = page.wait_for_function(f"""() => {{ const g = document.querySelector('.babel-detail.js-plotly-plot');
        return g && g._fullLayout.title.text.includes('layer {layer}, expert {expert}') && g.data; }}""",
                                    timeout=UPDATE_MS)
    bars = page.evaluate("""() => { const g = document.querySelector('.babel-detail.js-plotly-plot');
        return {y: Array.from(g.data[0].y), err: Array.from(g.data[0].error_y.array), x: Array.from(g.data[0].x),
                layers: Array.from(g.data[1].y)}; }""")
    assert detail and bars["x"][0] == "English (en)"
    np.testing.assert_allclose(bars["y"], fs.freq[:, layer, expert], rtol=1e-12)
    np.testing.assert_allclose(bars["err"], fs.se[:, layer, expert], rtol=1e-12)
    np.testing.assert_allclose(bars["layers"], fs.freq[0, :, expert], rtol=1e-12)
    assert app_page.wait("p => p.marks.length === 1")["marks"] == [col]
    assert page.locator(".babel-highlight input").input_value() == f"{layer}:{expert}"


def test_csv_download_holds_the_displayed_matrix_and_settings(app_page, sets, tmp_path):
    fs = sets["smollm2-135m"]
    page = app_page.page
    app_page.wait("p => true", LOAD_MS)
    app_page.select("model", "smollm2-135m")
    app_page.select("language", "ja")
    app_page.wait("p => p.title.includes('Japanese')")
    app_page.layers("3-7")
    app_page.wait("p => p.y.length === 5")
    with page.expect_download(timeout=UPDATE_MS) as download:
        page.locator(".babel-csv a").click()
    path = tmp_path / "matrix.csv"
    download.value.save_as(path)
    lines = path.read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    for setting in ("# model: smollm2-135m", "# language: ja", "# layers: 3-7", "# view: language", "# rule: topk",
                    "# ratio: 0.25", "# source: run smoke"):
        assert setting in header
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert len(rows) == 5 * fs.n_experts
    for row in rows:
        assert float(row["value"]) == pytest.approx(fs.freq[fs.index("ja"), int(row["layer"]), int(row["expert"])],
                                                    rel=1e-12)


def test_view_state_round_trips_through_the_url(app, browser, sets):
    first = open_page(browser, app)
    first.wait("p => true", LOAD_MS)
    first.select("model", "smollm2-135m")
    first.page.locator(".babel-view button", has_text="language A − language B").click()
    first.select("language", "de")
    first.select("other", "ja")
    first.layers("2-9")
    first.page.locator(".babel-scale button", has_text="auto").click()
    expected = heatmap(sets["smollm2-135m"], Controls("de", "pair", "ja", (2, 9), scale="auto"))
    # read the view only once the auto scale has reached the plot (the clicks above are answered in turn)
    shown = first.wait(f"p => p.y.length === 8 && p.title.includes('Japanese') && "
                       f"Math.abs(p.zmax - {expected.zrange[1]!r}) < 1e-9")
    first.page.wait_for_function("() => location.search.includes('scale=auto')", timeout=UPDATE_MS)
    url = first.page.url
    shared = open_page(browser, app, "?" + url.split("?", 1)[1])  # a shared link, in a fresh page
    again = shared.wait("p => p.y.length === 8 && p.title.includes('Japanese')", LOAD_MS)
    np.testing.assert_allclose(numbers(again["z"]), numbers(shown["z"]), rtol=1e-12)
    fs = sets["smollm2-135m"]
    np.testing.assert_allclose(numbers(again["z"]), heatmap(fs, Controls("de", "pair", "ja", (2, 9), scale="auto")).z,
                               rtol=1e-12)
    assert again["zmax"] == pytest.approx(shown["zmax"])
    first.page.reload()
    reloaded = first.wait("p => p.y.length === 8 && p.title.includes('Japanese')", LOAD_MS)
    np.testing.assert_allclose(numbers(reloaded["z"]), numbers(shown["z"]), rtol=1e-12)


def test_no_cloud_share_button(app_page):
    app_page.wait("p => true", LOAD_MS)
    page = app_page.page
    page.locator(".babel-heatmap").hover()
    buttons = page.evaluate("() => [...document.querySelectorAll('.modebar-btn')].map(b => b.dataset.title)")
    assert any("png" in (b or "").lower() for b in buttons)
    assert not [b for b in buttons if b and ("Share" in b or "Cloud" in b or "Chart Studio" in b)]


def test_kernel_shut_down_on_tab_close(app, browser):
    server = app.server
    before = kernels(server)
    page = open_page(browser, app)
    page.page.close(run_before_unload=True)
    deadline = time.monotonic() + 90  # shut down at once by Voilà, or culled after 60 s idle
    while kernels(server) > max(before, 1) and time.monotonic() < deadline:
        time.sleep(1)
    assert kernels(server) <= max(before, 1)


def test_make_explore_names_what_is_missing(make):
    unknown = make("explore", "PROFILE=smoke", "MODEL=no-such-model", timeout=300)
    assert unknown.returncode != 0
    assert "unknown model 'no-such-model'" in unknown.stderr and "gemma-3-270m, smollm2-135m" in unknown.stderr
    missing = make("explore", "PROFILE=gpu", timeout=300)
    assert missing.returncode != 0 and "make figures PROFILE=gpu" in missing.stderr
    assert "voila" not in missing.stdout  # checked before the server starts


def test_a_model_of_the_run_is_found_in_the_runs_index(sets):
    only = run_frequencies("smoke", "gemma-3-270m")
    assert list(only) == ["gemma-3-270m"]
    np.testing.assert_array_equal(only["gemma-3-270m"].freq, sets["gemma-3-270m"].freq)


def test_rendered_notebook_shows_every_figure_offline(smoke_run, browser, sets):
    html_path = ROOT / "build" / "smoke" / "02_profile.html"
    text = html_path.read_text()
    assert "cdn" not in " ".join(line for line in text.splitlines() if "<script src=" in line)
    requests: list[str] = []
    browser.set_offline(True)
    page = browser.new_page()
    page.on("request", lambda r: not r.url.startswith(("file:", "data:", "blob:", "about:")) and requests.append(r.url))
    page.goto(html_path.as_uri(), timeout=LOAD_MS)
    figures = text.count("Plotly.newPlot(")
    page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {figures}",
                           timeout=LOAD_MS)
    assert figures >= 10 and not requests
    assert page.locator(".babel-needs-kernel").count() == 1 and page.locator(".widget-dropdown").count() == 0
    # the kernel-free explorer: one per model, its slider changes the language
    free = page.locator(".js-plotly-plot", has=page.locator(".slider-container"))
    assert free.count() == len(sets)
    fs = sets["gemma-3-270m"]
    data = free.first.evaluate("g => ({z: Array.from(g._fullData[0].z, r => Array.from(r)), title: g.layout.title.text})")
    order = np.argsort(-fs.freq.mean(0), axis=1, kind="stable")
    np.testing.assert_allclose(data["z"], np.take_along_axis(fs.freq[0], order, 1), rtol=1e-12)
    free.first.scroll_into_view_if_needed()
    rail = free.first.locator(".slider-rail-rect").bounding_box()
    page.mouse.click(rail["x"] + rail["width"] - 2, rail["y"] + rail["height"] / 2)  # the last language
    last = fs.languages[-1]
    free.first.evaluate(f"g => new Promise(r => {{ const t = () => g.layout.title.text.includes('{last}') ? r() "
                        f": setTimeout(t, 50); t(); }})")
    shown = free.first.evaluate("g => Array.from(g._fullData[0].z, r => Array.from(r))")
    np.testing.assert_allclose(shown, np.take_along_axis(fs.freq[-1], order, 1), rtol=1e-12)
