"""Config profiles, artefacts, batches, perplexity and figure output."""

from __future__ import annotations

import json
import math

import plotly.graph_objects as go
import pytest
import torch
from samples import TEXTS

from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore, params_key
from babel_lib.core.batches import encode, paragraph_batches, windows
from babel_lib.errors import BabelError
from babel_lib.core.evaluation import window_loss


def test_profiles_resolve_for_every_notebook_section():
    for profile in ("default", "smoke", "gpu"):
        sections = config.load_profile(profile)["notebooks"]
        for notebook in sections:
            P = config.notebook_params(notebook, profile)
            assert P.profile == profile and P.notebook == notebook
            assert P.models and P.languages and P.artefacts.endswith(f"build/{profile}/artefacts")


def test_numbers_in_exponent_notation_read_as_numbers(tmp_path, monkeypatch):
    """PyYAML alone reads 1e6 and 1.0e6 as strings; a profile must get numbers (a string broke a fit)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "x.yaml").write_text("a: 1e6\nb: 1.0e6\nc: -3E-2\nd: .5e3\ne: 12\nf: e5\ng: 1.0.0\n")
    monkeypatch.setattr(config, "ROOT", tmp_path)
    assert config.load_profile("x") == {"a": 1e6, "b": 1e6, "c": -0.03, "d": 500.0, "e": 12, "f": "e5", "g": "1.0.0"}


def strings(value):
    """Every string inside a nested config value."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("profile", ["default", "smoke", "gpu"])
def test_no_profile_value_is_a_number_read_as_text(profile):
    def numeric(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    assert not [s for s in strings(config.load_profile(profile)) if numeric(s)]


def test_overrides_and_bad_parameters():
    P = config.notebook_params("01_convert", "smoke", model="tiny:llama, tiny:gpt2", n_experts=8)
    assert P.models == ["tiny:llama", "tiny:gpt2"] and P.n_experts == 8 and P.run == "smoke-tiny_llama, tiny_gpt2"
    with pytest.raises(BabelError, match="unknown parameter.*n_expert.*valid"):
        config.notebook_params("01_convert", "smoke", n_expert=8)
    with pytest.raises(BabelError, match="unknown profile 'fast'.*default"):
        config.notebook_params("01_convert", "fast")
    with pytest.raises(BabelError, match="unknown notebook '99_nope'; notebooks are 01_convert"):
        config.notebook_params("99_nope", "smoke")


def test_artefacts_round_trip_resume_and_corruption(tmp_path):
    store = ArtefactStore(tmp_path)
    params = {"model": "m", "n": 3}
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(6).view(2, 3)}, {"note": "hi"}

    tensors, meta = store.cached("thing", params, compute)
    again, _ = store.cached("thing", params, compute)
    assert calls == [1] and torch.equal(tensors["x"], again["x"]) and meta == {"note": "hi"}
    assert params_key(params) == params_key({"n": 3, "model": "m"}) != params_key({"model": "m", "n": 4})
    path, _ = store.paths("thing", params)
    assert not list(path.parent.glob(".*tmp"))  # no temporary file left behind
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(BabelError, match=r"is corrupt.*delete"):
        store.load("thing", params)
    with pytest.raises(BabelError, match="no thing artefact"):
        store.load("thing", {"model": "other"})


def test_interrupted_compute_leaves_no_artefact(tmp_path):
    store = ArtefactStore(tmp_path)

    def broken():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.cached("thing", {"a": 1}, broken)
    assert not store.exists("thing", {"a": 1}) and not list(tmp_path.rglob("*.safetensors"))


def test_batches_never_count_special_tokens(tiny):
    tok = tiny("llama").tokenizer
    batches = list(paragraph_batches(tok, TEXTS + ["x"], batch_tokens=64))
    total = sum(b.n_tokens for b in batches)
    assert total == sum(len(s) for s in encode(tok, TEXTS + ["x"], add_bos=False))
    for b in batches:
        special = torch.isin(b.input_ids, torch.tensor(tok.all_special_ids))
        assert not (b.count_mask & special).any() and not (b.count_mask & (b.attention_mask == 0)).any()
        assert b.input_ids.numel() <= 64 or b.input_ids.shape[0] == 1
    assert [s[0] for s in encode(tok, ["a"], add_bos=True)] == [tok.bos_token_id]
    assert encode(tok, ["a"], add_bos=False)[0][0] != tok.bos_token_id


def test_windows_have_the_stated_length(tiny):
    tok = tiny("llama").tokenizer
    w = windows(tok, TEXTS * 3, seq_len=20, n_windows=3)
    assert w.shape == (3, 20) and (w[:, 0] == tok.bos_token_id).all()
    with pytest.raises(BabelError, match="fewer than one window"):
        windows(tok, ["hi"], seq_len=64)


@pytest.mark.parametrize("model_type", ["gemma2", "gpt2", "opt"])
def test_perplexity_matches_a_hand_computation(tiny, model_type):
    lm = tiny(model_type, "float64")
    w = windows(lm.tokenizer, TEXTS, seq_len=12, n_windows=3)
    loss = window_loss(lm.model, w, batch_size=2, chunk=5)
    logits = lm.model(w).logits
    by_hand, count = 0.0, 0
    for row in range(w.shape[0]):
        for pos in range(w.shape[1] - 1):
            z = logits[row, pos]
            by_hand += (torch.logsumexp(z, 0) - z[w[row, pos + 1]]).item()
            count += 1
    assert loss.tokens == count and abs(loss.nll - by_hand) < 1e-9
    assert abs(loss.perplexity - math.exp(by_hand / count)) < 1e-9


def test_figures_are_written_with_caption_and_manifest(tmp_path):
    P = config.notebook_params("01_convert", "smoke") | {"figures": str(tmp_path)}
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))
    paths = config.Params(P)
    out = __import__("babel_lib.core.figures", fromlist=["save_figure"]).save_figure(
        fig, "bars", paths, "model x, data: y")
    html = (tmp_path / "01_convert" / "bars.html").read_text()
    assert "model x, data: y" in html and (tmp_path / "01_convert" / "plotly.min.js").exists()
    png = (tmp_path / "01_convert" / "bars.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["01_convert/bars"]["params"]["n_experts"] == P["n_experts"] and out["png"].endswith("bars.png")


def test_without_a_browser_figures_keep_their_html_and_say_once_that_pngs_were_skipped(tmp_path, monkeypatch, capsys):
    """No mock of kaleido: BROWSER_PATH names a missing file, as on a server with no Chrome. kaleido's sync server
    does not raise then (its thread dies and write_image waits forever), so save_figure must not start it."""
    import threading

    from babel_lib.core import figures

    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    monkeypatch.setattr(figures, "_SERVER", [])
    P = config.Params(config.notebook_params("01_convert", "smoke") | {"figures": str(tmp_path)})
    outs = []
    worker = threading.Thread(target=lambda: outs.extend(
        figures.save_figure(go.Figure(go.Bar(x=["a"], y=[i])), f"bars{i}", P, "caption") for i in range(2)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "save_figure hung without a browser"
    assert [o["png"] for o in outs] == [None, None]
    assert all((tmp_path / "01_convert" / f"bars{i}.html").exists() for i in range(2))
    assert not list(tmp_path.rglob("*.png"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["01_convert/bars1"]["png"] is None
    assert capsys.readouterr().err.count("PNG export skipped (no Chrome/Chromium found)") == 1
