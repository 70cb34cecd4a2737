"""The frequency explorer: the displayed matrix against numpy by hand, the loader, the widget callbacks."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import re
import shutil
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import plotly
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.errors import BabelError
from babel_lib.babel.analysis import standard_error
from babel_lib.babel.explorer import (PLOTLY_CONFIG, PLOTLY_MODULE, Controls, Explorer, FrequencySet, build_command,
                                      explorer_app, heatmap, load_frequencies, load_frequency_set, main,
                                      run_frequencies, to_csv, trim_plotly_bundle, write_frequency_index,
                                      write_plotly_module)
from babel_lib.babel.explorer_server import ExplorerKernelManager

LANGS = ("en", "de", "ja")


def frequency_set(model: str = "m", n_layers: int = 5, n_experts: int = 7, seed: int = 0) -> FrequencySet:
    freq = np.random.default_rng(seed).random((len(LANGS), n_layers, n_experts))
    return FrequencySet(model=model, languages=LANGS, freq=freq, card=f"{model} card", corpus="corpus-x",
                        rule={"rule": "topk", "ratio": 0.25})


def by_hand(values: np.ndarray, key: np.ndarray | None) -> np.ndarray:
    """Each row of `values` reordered by descending `key` (ties by index), with plain Python sorting."""
    if key is None:
        return values.copy()
    out = np.empty_like(values)
    for r in range(values.shape[0]):
        order = sorted(range(values.shape[1]), key=lambda e: (-key[r, e], e))
        out[r] = [values[r, e] for e in order]
    return out


@pytest.mark.parametrize("order", ["mean", "index", "language"])
@pytest.mark.parametrize("view", ["language", "vs_mean", "pair"])
def test_heatmap_matches_numpy_by_hand(view, order):
    fs = frequency_set()
    c = Controls(language="de", view=view, other="ja" if view == "pair" else None, layers=(1, 3), order=order)
    h = heatmap(fs, c)
    de, ja = fs.freq[1], fs.freq[2]
    mean = (fs.freq[0] + fs.freq[1] + fs.freq[2]) / 3
    values = {"language": de, "vs_mean": de - mean, "pair": de - ja}[view][1:4]
    key = {"mean": mean, "index": None, "language": de}[order]
    np.testing.assert_allclose(h.z, by_hand(values, None if key is None else key[1:4]), rtol=0, atol=1e-15)
    assert h.layers.tolist() == [1, 2, 3]
    # the customdata names the original expert of each cell
    for r, layer in enumerate(h.layers):
        np.testing.assert_allclose(h.z[r], values[r][h.experts[r]], atol=1e-15)
        assert sorted(h.experts[r].tolist()) == list(range(fs.n_experts))
    assert h.diverging == (view != "language")
    assert "m" in h.title and "German (de)" in h.title and "corpus-x" in h.subtitle and "topk" in h.subtitle
    if view == "pair":
        assert "Japanese (ja)" in h.title


def test_heatmap_colour_scales():
    fs = frequency_set()
    assert heatmap(fs, Controls("en")).zrange == (0.0, 1.0)
    # fixed difference scales: the largest |difference| any language (pair) reaches, not a near-white ±1
    vs_mean = max(abs(fs.freq[i, l, e] - fs.freq[:, l, e].mean()) for i in range(3) for l in range(5) for e in range(7))
    assert heatmap(fs, Controls("en", view="vs_mean")).zrange == pytest.approx((-vs_mean, vs_mean), abs=1e-15)
    pair = max(abs(fs.freq[i, l, e] - fs.freq[j, l, e]) for i in range(3) for j in range(3) for l in range(5)
               for e in range(7))
    assert heatmap(fs, Controls("de", view="pair", other="ja", layers=(1, 1))).zrange == pytest.approx((-pair, pair))
    auto = heatmap(fs, Controls("en", scale="auto", layers=(2, 2)))
    assert auto.zrange == (fs.freq[0, 2].min(), fs.freq[0, 2].max())
    diff = heatmap(fs, Controls("en", view="pair", other="de", scale="auto"))
    bound = np.abs(fs.freq[0] - fs.freq[1]).max()
    assert diff.zrange == (-bound, bound)


def test_heatmap_rejects_bad_controls():
    fs = frequency_set()
    for bad, match in ((Controls("en", layers=(3, 1)), "layer range"), (Controls("en", layers=(0, 5)), "layer range"),
                       (Controls("xx"), "no frequencies for language"), (Controls("en", view="pair"), "second"),
                       (Controls("en", order="random"), "expert order"), (Controls("en", scale="log"), "colour")):
        with pytest.raises(BabelError, match=match):
            heatmap(fs, bad)


def write_artefact(root, model: str, counts: np.ndarray, tokens: np.ndarray) -> str:
    store = ArtefactStore(root)
    n_langs, n_layers, _ = counts.shape
    tensors = {"expert_counts": torch.from_numpy(counts), "tokens": torch.from_numpy(tokens),
               "neuron_counts": torch.zeros(n_langs, n_layers, 4, dtype=torch.int64)}
    meta = {"languages": list(LANGS), "model": model, "card": f"{model} (test card)", "rule": "topk",
            "ratio": 0.25, "mode": "sum", "n_experts": counts.shape[2], "corpus": "corpus-x"}
    return str(store.save("frequencies", {"model": model, "corpus": "corpus-x"}, tensors, meta))


def test_load_frequencies_from_artefact_store(tmp_path):
    rng = np.random.default_rng(1)
    counts = {"a": rng.integers(0, 100, (3, 4, 6)), "b": rng.integers(0, 100, (3, 2, 8))}
    tokens = np.array([100, 250, 400])
    index = {m: write_artefact(tmp_path, m, c, tokens) for m, c in counts.items()}
    (tmp_path / "frequencies" / "index-run1.json").write_text(json.dumps(index))
    sets = load_frequencies(tmp_path, "run1")
    assert list(sets) == ["a", "b"]
    for m, c in counts.items():
        fs = sets[m]
        assert fs.languages == LANGS and fs.card == f"{m} (test card)" and fs.corpus == "corpus-x"
        assert fs.rule == {"rule": "topk", "ratio": 0.25, "mode": "sum"}
        for i in range(3):
            np.testing.assert_allclose(fs.freq[i], c[i] / tokens[i], rtol=1e-15)
    # the index file itself works too, and relative paths are read from the index's folder
    (tmp_path / "frequencies" / "index-rel.json").write_text(json.dumps({"a": index["a"].rsplit("/", 1)[1]}))
    np.testing.assert_array_equal(load_frequencies(tmp_path / "frequencies" / "index-rel.json")["a"].freq,
                                  sets["a"].freq)


def test_load_frequencies_errors(tmp_path):
    with pytest.raises(BabelError, match="make figures"):
        load_frequencies(tmp_path, "nothing")
    path = write_artefact(tmp_path, "a", np.ones((3, 2, 4), dtype=np.int64), np.array([5, 0, 5]))
    (tmp_path / "frequencies" / "index-zero.json").write_text(json.dumps({"a": path}))
    with pytest.raises(BabelError, match="no tokens for de"):
        load_frequencies(tmp_path, "zero")


def shown(e: Explorer) -> tuple[np.ndarray, list[int]]:
    trace = e.figure.data[0]
    return np.array(trace.z), list(trace.y)


def test_explorer_callbacks_update_the_figure():
    sets = {"m": frequency_set("m", 5, 7, seed=0), "n": frequency_set("n", 3, 4, seed=1)}
    e = Explorer(sets)
    z, y = shown(e)
    np.testing.assert_allclose(z, heatmap(sets["m"], Controls("en")).z)
    assert y == [0, 1, 2, 3, 4]
    sequential = e.figure.data[0].colorscale
    e.language.value = "ja"
    np.testing.assert_allclose(shown(e)[0], by_hand(sets["m"].freq[2], sets["m"].freq.mean(axis=0)))
    assert "Japanese (ja)" in e.figure.layout.title.text
    e.layers.value = (1, 2)
    z, y = shown(e)
    assert y == [1, 2] and z.shape == (2, 7)
    e.order.value = "index"
    np.testing.assert_allclose(shown(e)[0], sets["m"].freq[2, 1:3])
    e.view.value = "pair"
    assert not e.other.disabled
    e.other.value = "en"
    np.testing.assert_allclose(shown(e)[0], sets["m"].freq[2, 1:3] - sets["m"].freq[0, 1:3])
    pair = np.abs(sets["m"].freq.max(0) - sets["m"].freq.min(0)).max()
    assert (e.figure.data[0].zmin, e.figure.data[0].zmax) == pytest.approx((-pair, pair))
    assert e.figure.data[0].colorscale != sequential
    e.scale.value = "auto"
    bound = np.abs(sets["m"].freq[2, 1:3] - sets["m"].freq[0, 1:3]).max()
    assert (e.figure.data[0].zmin, e.figure.data[0].zmax) == (-bound, bound)
    e.model.value = "n"  # fewer layers: the range is clipped, the languages kept
    z, y = shown(e)
    assert e.layers.max == 2 and y == [1, 2] and z.shape == (2, 4)
    np.testing.assert_allclose(z, sets["n"].freq[2, 1:3] - sets["n"].freq[0, 1:3])
    assert e.figure.layout.title.text.startswith("n ·")


def test_explorer_displays_as_a_widget():
    bundle = Explorer({"m": frequency_set()})._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_explorer_app_says_what_to_run_without_artefacts(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "empty.yaml").write_text("models: [tiny:llama]\nlanguages: [en]\nnotebooks:\n  02_profile: {}\n")
    monkeypatch.setattr(config, "ROOT", tmp_path)
    shown_widget = explorer_app("empty")
    assert "make figures PROFILE=empty" in shown_widget.value and "index-empty.json" in shown_widget.value


def with_se(fs: FrequencySet, seed: int = 3) -> FrequencySet:
    return replace(fs, se=np.random.default_rng(seed).random(fs.freq.shape) * 0.05)


@pytest.mark.parametrize("view", ["vs_mean", "pair"])
def test_noise_floor_blanks_cells_within_z_standard_errors(view):
    fs = with_se(frequency_set())
    h = heatmap(fs, Controls("de", view=view, other="en", order="index", noise=True, noise_z=2.0))
    for l in range(fs.n_layers):
        for e in range(fs.n_experts):
            if view == "vs_mean":
                d, se = fs.freq[1, l, e] - fs.freq[:, l, e].mean(), fs.se[1, l, e]
            else:
                d, se = fs.freq[1, l, e] - fs.freq[0, l, e], math.sqrt(fs.se[1, l, e] ** 2 + fs.se[0, l, e] ** 2)
            if abs(d) > 2.0 * se:
                assert h.z[l, e] == pytest.approx(d, abs=1e-15)
            else:
                assert math.isnan(h.z[l, e])
    assert 0 < np.isnan(h.z).sum() < h.z.size and "within 2 s.e." in h.subtitle
    with pytest.raises(BabelError, match="split-half"):
        heatmap(frequency_set(), Controls("de", view=view, other="en", noise=True))


def test_csv_holds_the_displayed_cells_and_the_settings():
    fs = with_se(frequency_set())
    h = heatmap(fs, Controls("ja", view="pair", other="en", layers=(2, 3), noise=True))
    text = to_csv(h, {"model": "m", "view": "pair"})
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "# model: m" in header and "# view: pair" in header and any("Japanese (ja)" in x for x in header)
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    assert len(rows) == 2 * fs.n_experts
    for row in rows:
        layer, expert = int(row["layer"]), int(row["expert"])
        d = fs.freq[2, layer, expert] - fs.freq[0, layer, expert]
        blank = abs(d) <= 3 * math.hypot(fs.se[2, layer, expert], fs.se[0, layer, expert])
        assert row["value"] == "" if blank else float(row["value"]) == d


def test_index_paths_are_relative_to_the_index(tmp_path):
    tokens = np.array([10, 20, 30])
    path = write_artefact(tmp_path / "a", "a", np.ones((3, 2, 4), dtype=np.int64), tokens)
    index = write_frequency_index(tmp_path / "a", "r", {"a": path})
    assert json.loads(index.read_text()) == {"a": Path(path).name}
    shutil.move(tmp_path / "a", tmp_path / "moved")  # the build folder moves: the index still works
    fs = load_frequencies(tmp_path / "moved", "r")["a"]
    np.testing.assert_allclose(fs.freq[2], np.ones((2, 4)) / 30)


def test_standard_errors_come_from_the_split_halves(tmp_path):
    rng = np.random.default_rng(5)
    halves, tokens_halves = rng.integers(1, 50, (2, 3, 2, 4)), rng.integers(60, 90, (2, 3))
    store = ArtefactStore(tmp_path)
    tensors = {"expert_counts": torch.from_numpy(halves.sum(0)), "tokens": torch.from_numpy(tokens_halves.sum(0)),
               "expert_counts_halves": torch.from_numpy(halves), "tokens_halves": torch.from_numpy(tokens_halves)}
    meta = {"languages": list(LANGS), "model": "a", "paragraphs": 6, "split": "calibration"}
    path = store.save("frequencies", {"model": "a"}, tensors, meta)
    fs = load_frequency_set("a", path)
    np.testing.assert_allclose(fs.se, standard_error(halves, tokens_halves)[0], rtol=1e-12)
    assert fs.corpus == "6 calibration paragraphs per language"


def test_explorer_resets_zoom_and_puts_layer_0_on_top():
    e = Explorer({"m": frequency_set()})
    e.figure.layout.yaxis.range = [3.2, 2.7]  # as a box zoom in the browser leaves it
    e.layers.value = (0, 1)
    assert list(e.figure.layout.yaxis.range) == [1.5, -0.5] and list(e.figure.layout.xaxis.range) == [-0.5, 6.5]
    assert e.figure.data[0].colorbar.title.text == "activation frequency (share of tokens)"
    assert "English (en) frequency" in e.figure.data[0].hovertemplate


def test_model_switch_keeps_a_fitting_range_else_shows_all_layers():
    sets = {"short": frequency_set("short", 4, 5), "long": frequency_set("long", 9, 5, seed=2)}
    e = Explorer(sets)
    e.model.value = "long"  # the whole range stays the whole range
    assert e.layers.value == (0, 8) and list(e.figure.data[0].y) == list(range(9))
    e.layers.value = (6, 8)
    e.model.value = "short"  # does not fit: all layers, not a collapsed 3..3
    assert e.layers.value == (0, 3)
    e.layers.value = (1, 2)
    e.model.value = "long"
    assert e.layers.value == (1, 2)


def test_clicking_a_cell_selects_the_expert_for_the_detail_view():
    fs = with_se(frequency_set())
    e = Explorer({"m": fs})
    e.layers.value = (2, 4)
    assert e.detail is None and "Click a cell" in e.detail_box.children[0].value  # made on the first selection
    h = heatmap(fs, Controls("en", layers=(2, 4)))
    e._clicked(None, type("Points", (), {"xs": [3], "ys": [3]})(), None)
    expert = int(h.experts[1, 3])
    assert e.selected == (3, expert) and e.highlight.value == f"3:{expert}"
    assert e.detail_box.children == (e.detail,)
    bar = e.detail.data[0]
    np.testing.assert_allclose(bar.y, fs.freq[:, 3, expert])
    np.testing.assert_allclose(bar.error_y.array, fs.se[:, 3, expert])
    np.testing.assert_allclose(e.detail.data[1].y, fs.freq[0, :, expert])
    np.testing.assert_allclose(np.array(e.detail.data[2].z), fs.freq[:, 3, np.argsort(-fs.freq.mean(0)[3], kind="stable")])
    assert list(e.figure.data[1].x) == [3] and list(e.figure.data[1].y) == [3]  # the highlight marker
    e.highlight.value = str(expert)  # one id, every layer: one marker per shown layer
    assert list(e.figure.data[1].y) == [2, 3, 4]
    for col, layer in zip(e.figure.data[1].x, e.figure.data[1].y):
        assert heatmap(fs, Controls("en", layers=(2, 4))).experts[layer - 2, col] == expert


def test_state_round_trips_through_the_query_string():
    sets = {"m": with_se(frequency_set()), "n": with_se(frequency_set("n", 3, 4, 1))}
    e = Explorer(sets)
    e.model.value, e.view.value, e.other.value, e.layers.value = "n", "pair", "ja", (1, 2)
    e.order.value, e.scale.value, e.noise.value, e.highlight.value = "index", "auto", True, "1:2"
    query = e.state()
    fresh = Explorer(sets)
    fresh.apply_state(query)
    assert fresh.state() == query and fresh.controls() == e.controls()
    np.testing.assert_array_equal(np.array(fresh.figure.data[0].z, dtype=float), np.array(e.figure.data[0].z, dtype=float))
    fresh.apply_state("model=zz&language=xx&layers=7-9&view=language")
    assert "zz" in fresh.status.value and "xx" in fresh.status.value and "7-9" in fresh.status.value
    assert fresh.view.value == "language" and fresh.model.value == "n"


def test_explorer_has_no_cloud_share_and_says_controls_need_a_kernel():
    e = Explorer({"m": frequency_set()})
    assert e.figure._config["showSendToCloud"] is False and "sendChartToCloud" in e.figure._config["modeBarButtonsToRemove"]
    assert "need a running Python kernel" in e._repr_mimebundle_()["text/html"]


def test_plotly_config_shows_without_a_warning():
    """02's kernel-free explorer is shown with this config: plotly warns about keys it does not know."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pio.to_html(go.Figure(), config=PLOTLY_CONFIG)


def smoke_like_root(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "p.yaml").write_text("models: [org/a, org/b]\nlanguages: [en]\nnotebooks:\n  02_profile: {}\n")
    monkeypatch.setattr(config, "ROOT", tmp_path)
    artefacts = tmp_path / "build" / "p" / "artefacts"
    tokens = np.array([10, 20, 30])
    paths = {m: write_artefact(artefacts, m, np.ones((3, 2, 4), dtype=np.int64), tokens) for m in ("org/a", "org/b")}
    write_frequency_index(artefacts, "p", paths)


def test_a_model_of_the_profile_run_needs_no_run_of_its_own(tmp_path, monkeypatch):
    smoke_like_root(tmp_path, monkeypatch)
    assert list(run_frequencies("p", "org/b")) == ["org/b"]
    with pytest.raises(BabelError, match=r"no frequencies for model org/zz in run p; available: org/a, org/b.*PROFILE=p MODEL=org/zz"):
        run_frequencies("p", "org/zz")
    assert main(["check", "p", "org/a"]) == 0 and main(["check", "p", "org/zz"]) == 1
    assert build_command("default") == "make figures" and build_command("smoke") == "make figures PROFILE=smoke"


def test_the_served_figure_imports_the_module_make_explore_writes(tmp_path):
    """The app's figures import plotly's module from voila/files/ (one copy per page, cached by the browser)."""
    written = write_plotly_module(tmp_path)
    assert written.name == PLOTLY_MODULE
    bundle = (Path(plotly.__file__).parent / "package_data" / "widgetbundle.js").read_text(encoding="utf-8")
    assert written.read_text(encoding="utf-8") == trim_plotly_bundle(bundle) != bundle
    assert write_plotly_module(tmp_path) == written
    e = Explorer({"m": frequency_set()}, served_plotly=True)
    assert f'"voila/files/{PLOTLY_MODULE}"' in e.figure._esm and len(e.figure._esm) < 1000
    assert isinstance(e.figure, go.FigureWidget) and len(Explorer({"m": frequency_set()}).figure._esm) > 10**6


def test_the_served_plotly_registers_only_the_traces_the_explorer_draws():
    """plotly's bundle with bar and heatmap registered (scatter is in its core) and nothing else changed; a bundle
    laid out otherwise (another plotly release) is left as it is."""
    bundle = (Path(plotly.__file__).parent / "package_data" / "widgetbundle.js").read_text(encoding="utf-8")
    trimmed = trim_plotly_bundle(bundle)
    register = re.compile(r'"lib/index\.js"\([\w$,]*\)\{var ([\w$]+)=[\w$]+\(\);\1\.register\(\[([^\]]*)\]\)')
    full, kept = register.search(bundle).group(2).split(","), register.search(trimmed).group(2).split(",")
    assert len(full) > 40 and len(kept) == 2 and set(kept) < set(full)
    paths = {re.search(r'(?<![\w$.])' + re.escape(c[:-2]) + r'=[\w$]+\(\{"(lib/[\w-]+\.js)"', bundle).group(1)
             for c in kept}
    assert paths == {"lib/bar.js", "lib/heatmap.js"}
    assert trimmed.replace(",".join(kept), ",".join(full), 1) == bundle
    fake = ('var a=w({"lib/bar.js"(e,r){}}),b=w({"lib/box.js"(e,r){}}),'
            'i=w({"lib/index.js"(e,r){var t=c();t.register([a(),b()]),r.exports=t}});')
    assert trim_plotly_bundle(fake, ("bar",)) == fake.replace("[a(),b()]", "[a()]")
    assert trim_plotly_bundle(fake) is None  # no heatmap in it
    assert trim_plotly_bundle(fake.replace('b=w({"lib/box.js"', 'b=w({"src/box.js"'), ("bar",)) is None
    assert trim_plotly_bundle("export default 1;") is None


def test_a_kernel_handed_out_of_the_pool_gets_a_fresh_idle_clock(monkeypatch):
    """The first culler pass that may take a kernel (a preheated one just handed to a page) restarts its idle
    clock instead of culling it; later passes cull as jupyter_server does."""
    culled = []

    async def cull(self, kernel_id):
        culled.append(kernel_id)

    monkeypatch.setattr(AsyncMappingKernelManager, "cull_kernel_if_idle", cull)
    manager = ExplorerKernelManager()
    old = datetime(2000, 1, 1, tzinfo=timezone.utc)
    kernel = type("Kernel", (), {"last_activity": old})()
    manager._kernels["k"] = kernel
    asyncio.run(manager.cull_kernel_if_idle("k"))
    assert culled == [] and kernel.last_activity > old
    asyncio.run(manager.cull_kernel_if_idle("k"))
    assert culled == ["k"]
