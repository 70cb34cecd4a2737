"""The standalone explorer app in headless Chromium: Voilà serves apps/explorer.py over synthetic frequency
artefacts; the page must show the heatmap, and choosing another language or layer range must change it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jupytext
import numpy as np
import papermill
import pytest
from playwright.sync_api import Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from babel_lib.babel.explorer import Controls, FrequencySet, heatmap

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LANGS = ["en", "de", "ja"]
SHAPES = {"model-a": (6, 16), "model-b": (4, 12)}  # model -> (layers, experts)
TIMEOUT_MS = 120_000  # first render: kernel start and imports, slow on a loaded 2-core machine
UPDATE_MS = 30_000  # a control change: one kernel round trip


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> tuple[Path, dict[str, FrequencySet]]:
    """A BABEL_ROOT with a 'browser' profile whose artefacts hold frequencies of two models (distinct per
    language), and the frequency sets they must show, computed here from the counts."""
    import torch

    from babel_lib.core.artefacts import ArtefactStore

    root = tmp_path_factory.mktemp("babel-root")
    (root / "configs").mkdir()
    (root / "configs" / "browser.yaml").write_text("languages: [en, de, ja]\nnotebooks:\n  02_profile: {}\n")
    store = ArtefactStore(root / "build" / "browser" / "artefacts")
    rng = np.random.default_rng(7)
    index, expected = {}, {}
    for model, (n_layers, n_experts) in SHAPES.items():
        tokens = np.array([1000, 1500, 800])
        counts = rng.integers(0, 800, (len(LANGS), n_layers, n_experts))
        meta = {"languages": LANGS, "model": model, "card": f"{model} (synthetic)", "rule": "topk", "ratio": 0.1,
                "mode": "sum", "n_experts": n_experts, "corpus": "synthetic"}
        tensors = {"expert_counts": torch.from_numpy(counts), "tokens": torch.from_numpy(tokens),
                   "neuron_counts": torch.zeros(len(LANGS), n_layers, 8, dtype=torch.int64)}
        index[model] = str(store.save("frequencies", {"model": model}, tensors, meta))
        expected[model] = FrequencySet(model, tuple(LANGS), counts / tokens[:, None, None])
    (store.root / "frequencies" / "index-browser.json").write_text(json.dumps(index))
    return root, expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"voila exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"voila did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="module")
def app(run_root, tmp_path_factory):
    """(url, log) of Voilà serving the app notebook (made as `make explore` makes it) for profile browser."""
    root, _ = run_root
    work = tmp_path_factory.mktemp("voila")
    papermill.execute_notebook(jupytext.read(ROOT / "apps" / "explorer.py"), str(work / "explorer.ipynb"),
                               parameters={"profile": "browser"}, prepare_only=True, log_output=False,
                               progress_bar=False)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    log = open(work / "voila.log", "w")
    voila = subprocess.Popen([bin_dir / "voila", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
                              "explorer.ipynb"], cwd=work, env=os.environ | {"BABEL_ROOT": str(root)},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, voila)
        yield f"http://127.0.0.1:{port}/", work / "voila.log"
    finally:
        os.killpg(voila.pid, signal.SIGTERM)  # its own session: Voilà and the kernels it started
        try:
            voila.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(voila.pid, signal.SIGKILL)
            voila.wait()
        log.close()


READ_PLOT = """() => { const g = document.querySelector('.js-plotly-plot');
    if (!g || !g.data || !g.data.length || !g.data[0].z) return null;
    return {z: g.data[0].z.map(r => Array.from(r)), y: Array.from(g.data[0].y), title: g.layout.title.text}; }"""
READ_CONTROLS = """() => [...document.querySelectorAll('select')].map(s => s.value)
    .concat([...document.querySelectorAll('.widget-readout')].map(r => r.textContent))"""


@dataclass
class AppPage:
    """The app open in a browser page, with what to report when the heatmap does not come."""

    page: Page
    log: Path
    errors: list[str]

    def wait_for_plot(self, ready: str, timeout_ms: int = UPDATE_MS) -> dict:
        """The heatmap's data once the JS condition `ready(p)` holds for it (p = {z, y, title})."""
        try:
            self.page.wait_for_function(f"() => {{ const p = ({READ_PLOT})(); return p !== null && ({ready})(p); }}",
                                        timeout=timeout_ms)
        except PlaywrightTimeout:
            plot, controls = self.page.evaluate(READ_PLOT), self.page.evaluate(READ_CONTROLS)
            raise AssertionError(f"no heatmap with {ready} after {timeout_ms / 1000:.0f} s; heatmap title "
                                 f"{plot and plot['title']!r}, controls {controls}; browser errors {self.errors}; "
                                 f"voila log ends:\n{self.log.read_text()[-3000:]}") from None
        return self.page.evaluate(READ_PLOT)


@pytest.fixture
def app_page(app, tmp_path):
    """The app open in a headless Chromium with a fresh profile; the browser is always closed."""
    url, log = app
    errors: list[str] = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(tmp_path / "chromium-profile", executable_path=CHROMIUM,
                                                       headless=True, args=ARGS)
        try:
            page = context.new_page()
            page.on("pageerror", lambda err: errors.append(str(err)[:300]))
            page.on("console", lambda m: m.type == "error" and "shared module" not in m.text
                    and errors.append(m.text[:300]))
            page.goto(url, timeout=TIMEOUT_MS)
            yield AppPage(page, log, errors)
        finally:
            context.close()


def test_app_heatmap_follows_language_and_layers(app_page, run_root):
    _, expected = run_root
    fs = expected["model-a"]
    page = app_page.page

    shown = app_page.wait_for_plot("p => true", TIMEOUT_MS)
    np.testing.assert_allclose(shown["z"], heatmap(fs, Controls("en")).z, rtol=1e-12)
    assert shown["y"] == list(range(6)) and "English (en)" in shown["title"]

    page.locator(".babel-language select").select_option(label="Japanese (ja)")
    shown = app_page.wait_for_plot("p => p.title.includes('Japanese')")
    np.testing.assert_allclose(shown["z"], heatmap(fs, Controls("ja")).z, rtol=1e-12)
    assert not np.allclose(shown["z"], heatmap(fs, Controls("en")).z)

    page.locator(".babel-layers .widget-readout").click()
    page.keyboard.press("Control+A")
    page.keyboard.type("2-4")
    page.keyboard.press("Enter")
    shown = app_page.wait_for_plot("p => p.y.length === 3")
    assert shown["y"] == [2, 3, 4]
    np.testing.assert_allclose(shown["z"], heatmap(fs, Controls("ja", layers=(2, 4))).z, rtol=1e-12)
