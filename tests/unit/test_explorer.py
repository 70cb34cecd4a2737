"""The frequency explorer: the displayed matrix against numpy by hand, the loader, the widget callbacks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.errors import BabelError
from babel_lib.babel.explorer import Controls, Explorer, FrequencySet, explorer_app, heatmap, load_frequencies

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
    assert heatmap(fs, Controls("en", view="vs_mean")).zrange == (-1.0, 1.0)
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
    assert (e.figure.data[0].zmin, e.figure.data[0].zmax) == (-1.0, 1.0)
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
    assert "make figures" in shown_widget.value and "index-empty.json" in shown_widget.value
